"""A byte-level BPE tokenizer trained locally (``tokenizers``) on the EN+JA report corpus.

Byte-level BPE round-trips any UTF-8 text (English and Japanese alike) without an
unknown token.  The tokenizer carries the special tokens the Gemma3 chat format and
``Gemma3Processor`` need (``<bos>``, ``<eos>``, ``<pad>``, ``<start_of_turn>``,
``<end_of_turn>``, ``<start_of_image>``, ``<end_of_image>``, ``<image_soft_token>``),
exposed as ``boi_token`` / ``eoi_token`` / ``image_token`` attributes.
"""

from __future__ import annotations

from typing import Iterable

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SOT, EOT = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMG = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
# Ids 0..3 follow Gemma's order (pad=0, eos=1, bos=2, unk=3).
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, SOT, EOT, BOI, EOI, IMG]

# A Gemma-style chat template (what Gemma3's own template produces for image+text turns).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1500, min_frequency: int = 2):
    """Train a byte-level BPE on ``texts``; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMG,
                              "sot_token": SOT, "eot_token": EOT},
        padding_side="left",
        add_bos_token=False,
        add_eos_token=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
