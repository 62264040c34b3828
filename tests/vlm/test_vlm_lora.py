"""LoRA: targets the language model only; adapter save/load/merge equivalence; LoRA training
into a bundle served by load_backend; checkpoints and resume."""

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_random(standin_dir):
    from training.vlm.build import TinyConfig, build_processor, build_tiny_model
    from training.vlm.data import load_examples, report_corpus
    from training.vlm.tokenizer import train_tokenizer

    cfg = TinyConfig()
    tok = train_tokenizer(report_corpus(load_examples(standin_dir)), vocab_size=600)
    return build_tiny_model(tok, cfg, seed=1), build_processor(tok, cfg)


def _lora_modules(model):
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A"))]


def test_lora_targets_language_model_only(tiny_random):
    import copy

    from training.vlm.train import LoraSpec, apply_lora

    model, _ = tiny_random
    peft_model = apply_lora(copy.deepcopy(model), LoraSpec(rank=4))
    names = _lora_modules(peft_model)
    n_layers = model.config.text_config.num_hidden_layers
    assert len(names) == 7 * n_layers
    assert all("language_model" in n for n in names)
    assert not any("vision" in n or "projector" in n for n in names)
    # The naive list also adapts the vision tower: the reason for the regex.
    naive = apply_lora(copy.deepcopy(model), LoraSpec(rank=4, target_modules=["q_proj", "v_proj"]))
    assert any("vision" in n for n in _lora_modules(naive))


def _inputs(processor, n=2):
    import numpy as np

    from inference.vlm.base import build_prompt, to_pil
    from inference.vlm.transformers_backend import build_inputs

    imgs = [to_pil(np.random.default_rng(i).random((64, 64)).astype("float32")) for i in range(n)]
    return build_inputs(processor, "gemma3", imgs, build_prompt("en", ["LCA", "RCA"][:n]))


def test_adapter_save_load_merge_equivalence(tiny_random, tmp_path):
    import copy

    from peft import PeftModel

    from inference.vlm.transformers_backend import TransformersBackend, load_model
    from training.vlm.build import save_vlm
    from training.vlm.train import LoraSpec, apply_lora

    base, processor = tiny_random
    save_vlm(base, processor, tmp_path / "base")
    pm = apply_lora(copy.deepcopy(base), LoraSpec(rank=4, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval()
    pm.save_pretrained(tmp_path / "adapter")
    x = _inputs(processor)
    with torch.no_grad():
        ref = pm(**x).logits
        base_logits = base.eval()(**x).logits
    assert not torch.allclose(ref, base_logits, atol=1e-4)  # the adapter changes the output
    # reload: base + adapter (unmerged) and merged
    unmerged, _, _ = load_model(tmp_path / "base", tmp_path / "adapter", "cpu", merge=False)
    merged, _, _ = load_model(tmp_path / "base", tmp_path / "adapter", "cpu", merge=True)
    assert isinstance(unmerged, PeftModel) and not isinstance(merged, PeftModel)
    with torch.no_grad():
        assert torch.allclose(unmerged(**x).logits, ref, atol=1e-5)
        assert torch.allclose(merged(**x).logits, ref, atol=1e-4)
    # the served text is the same either way
    frames = [__import__("numpy").full((32, 32), 0.5, "float32")]
    t1 = TransformersBackend("m", model=unmerged, processor=processor, max_new_tokens=12).generate_text(frames, "hi")
    t2 = TransformersBackend("m", model=merged, processor=processor, max_new_tokens=12).generate_text(frames, "hi")
    assert t1 == t2


def _retemplated(src: Path, dst: Path) -> Path:
    """The stand-in dataset with a new English recommendation template."""
    dst.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in (src / "labels.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        for im in r["images"]:
            im["file"] = str(src / im["file"])
        r["report"]["en"]["recommendation"] = "Heart team review: " + r["report"]["en"]["recommendation"]
        lines.append(json.dumps(r, ensure_ascii=False))
    (dst / "labels.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def test_lora_training_into_bundle(tiny_bundle, standin_dir, tmp_path, frames_standin):
    from inference.bundle import Bundle
    from inference.vlm import load_backend
    from training.vlm.cli import train_vlm
    from training.vlm.train import LoraSpec, TrainConfig

    data = _retemplated(standin_dir, tmp_path / "data")
    cfg = TrainConfig(steps=30, batch_size=8, lr=5e-3, warmup=3, languages=("en",), progress=False,
                      lora=LoraSpec(rank=16, alpha=32, dropout=0.0))
    out = tmp_path / "bundle"
    m = train_vlm(data, out, base=Path(tiny_bundle) / "vlm", cfg=cfg, device="cpu", evaluate=False)
    assert m["train"]["final_loss"] < m["train"]["first_loss"]
    assert m["train"]["trainable_parameters"] < m["parameters"] / 3
    b = Bundle.load(out)  # verifies sha256 over vlm/ incl. the adapter
    assert b.manifest.vlm.adapter == "vlm/adapter" and (out / "vlm/adapter/adapter_config.json").is_file()
    assert b.manifest.vlm.training["kind"] == "lora"
    assert b.model_info().adapter == "vlm/adapter"
    backend = load_backend({"backend": "bundle", "device": "cpu", "max_new_tokens": 96}, b)
    imgs = frames_standin["LCA"] + frames_standin["RCA"]
    r1 = backend.generate(imgs, "en", ["LCA", "LCA", "RCA", "RCA"])
    assert r1 == backend.generate(imgs, "en", ["LCA", "LCA", "RCA", "RCA"])
    assert r1.findings


def test_checkpoint_and_resume(tiny_random, standin_dir, tmp_path):
    import copy

    from training.vlm.data import load_examples
    from training.vlm.train import TrainConfig, train_model

    model, processor = tiny_random
    studies = load_examples(standin_dir)[:6]
    cfg = TrainConfig(steps=3, batch_size=2, checkpoint_every=2, progress=False, languages=("en",))
    m1, s1 = train_model(copy.deepcopy(model), processor, studies, cfg, out_dir=tmp_path)
    assert s1["steps"] == 3 and (tmp_path / "checkpoints/step-3/state.json").is_file()
    cfg2 = TrainConfig(steps=5, batch_size=2, checkpoint_every=2, progress=False, languages=("en",))
    m2, s2 = train_model(copy.deepcopy(model), processor, studies, cfg2, out_dir=tmp_path, resume=True)
    assert s2["steps"] == 5 and s2["steps_this_run"] == 2
    # the resumed model started from the checkpoint's weights, not the fresh copy
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-5"]


def test_paligemma_family_builds_loads_and_trains(tmp_path, standin_dir):
    """The same code serves PaliGemma(2): tiny PaliGemma built, saved, loaded by path, one train step."""
    import numpy as np

    from inference.vlm import load_backend
    from training.vlm.build import TinyConfig, build_processor, build_tiny_model, save_vlm
    from training.vlm.data import load_examples, report_corpus
    from training.vlm.tokenizer import train_tokenizer
    from training.vlm.train import TrainConfig, train_model

    studies = load_examples(standin_dir)[:4]
    tok = train_tokenizer(report_corpus(studies), vocab_size=400)
    cfg = TinyConfig(family="paligemma")
    proc = build_processor(tok, cfg)  # adds <loc>/<seg> tokens: the vocab comes after this
    model = build_tiny_model(tok, cfg)
    assert model.config.text_config.vocab_size == len(proc.tokenizer)
    _, stats = train_model(model, proc, studies, TrainConfig(steps=2, batch_size=2, languages=("en",),
                                                            progress=False))
    assert stats["steps"] == 2 and stats["first_loss"] > 0
    save_vlm(model, proc, tmp_path / "pg")
    b = load_backend({"backend": "transformers", "path": str(tmp_path / "pg"), "device": "cpu",
                      "max_new_tokens": 8}, None)
    assert b.family == "paligemma"
    img = [np.full((32, 32), 0.3, np.float32)]
    assert b.generate(img, "en", ["LCA"]) == b.generate(img, "en", ["LCA"])
