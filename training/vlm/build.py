"""Build the tiny demo VLM: a Gemma3-architecture model (random init) + processor.

Measured: text hidden 128 x 2 layers, vision hidden 64 x 2 layers, 112 px,
16 image tokens ~ 0.76 M parameters (~3 MB).  The same loading code serves real
Gemma3 / PaliGemma2 weights from a local path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class TinyConfig:
    family: str = "gemma3"  # gemma3 | paligemma
    image_size: int = 112
    patch_size: int = 14
    mm_tokens_per_image: int = 16
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 128
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 1
    head_dim: int = 32
    text_intermediate: int = 256
    max_positions: int = 1024
    vocab_size: int = 1500  # tokenizer target; the model takes len(tokenizer)

    def to_dict(self) -> dict:
        return asdict(self)


def build_processor(tokenizer, cfg: TinyConfig):
    """A Gemma3Processor (or PaliGemmaProcessor) around ``tokenizer`` for ``cfg.image_size`` px."""
    if cfg.family == "paligemma":
        from transformers import PaliGemmaProcessor, SiglipImageProcessor

        ip = SiglipImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
        ip.image_seq_length = (cfg.image_size // cfg.patch_size) ** 2
        return PaliGemmaProcessor(image_processor=ip, tokenizer=tokenizer)
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    ip = Gemma3ImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size},
                              image_mean=[0.5] * 3, image_std=[0.5] * 3, do_pan_and_scan=False)
    return Gemma3Processor(image_processor=ip, tokenizer=tokenizer,
                           image_seq_length=cfg.mm_tokens_per_image,
                           chat_template=tokenizer.chat_template)


def build_tiny_model(tokenizer, cfg: TinyConfig, seed: int = 0):
    """A randomly initialised tiny Gemma3 (or PaliGemma) whose vocabulary is ``tokenizer``'s."""
    import torch
    from transformers import SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False,
    )
    vocab = len(tokenizer)
    if cfg.family == "paligemma":
        from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration

        text = GemmaConfig(
            vocab_size=vocab, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            num_key_value_heads=cfg.text_kv_heads, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_positions,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        n_img = (cfg.image_size // cfg.patch_size) ** 2
        config = PaliGemmaConfig(
            vision_config=vision.to_dict(), text_config=text.to_dict(),
            image_token_index=(getattr(tokenizer, "image_token_id", None)
                               or tokenizer.convert_tokens_to_ids("<image>")),
            projection_dim=cfg.text_hidden, hidden_size=cfg.text_hidden,
        )
        config.vision_config.projection_dim = cfg.text_hidden
        config.text_config.num_image_tokens = n_img
        config.vision_config.num_image_tokens = n_img
        config.image_seq_length = n_img
        model = PaliGemmaForConditionalGeneration(config)
    else:
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

        text = Gemma3TextConfig(
            vocab_size=vocab, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
            num_key_value_heads=cfg.text_kv_heads, head_dim=cfg.head_dim,
            query_pre_attn_scalar=cfg.head_dim, max_position_embeddings=cfg.max_positions,
            sliding_window=cfg.max_positions,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        config = Gemma3Config(
            text_config=text.to_dict(), vision_config=vision.to_dict(),
            mm_tokens_per_image=cfg.mm_tokens_per_image,
            boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
            image_token_index=tokenizer.image_token_id,
        )
        model = Gemma3ForConditionalGeneration(config)
    eos = [tokenizer.eos_token_id]
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        eos.append(eot)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    return model


def n_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def save_vlm(model, processor, out_dir: str | Path, extra: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _prompt_corpus() -> list[str]:
    from inference.vlm.base import build_prompt

    out = []
    for lang in ("en", "ja"):
        for sides in (["LCA"], ["RCA"], ["LCA", "RCA"], ["LCA", "LCA", "RCA"], ["LCA", "RCA", "RCA"],
                      ["LCA", "LCA", "RCA", "RCA"], ["LCA"] * 2, ["RCA"] * 2):
            out.append(build_prompt(lang, sides))
            out.append(build_prompt(lang, sides, source="-"))
    return out


def _concept_corpus(studies) -> list[str]:
    """Concept lines for the tokenizer (only a model trained with concepts): every study's true
    findings, no stenosis, and every segment at every grade (spurious detections included)."""
    from inference.types import SEGMENTS
    from inference.vlm.base import concepts_line
    from training.vlm.concepts import GRADES, true_concepts

    out = []
    every = [{"segment": seg, "severity": g} for seg in sorted(SEGMENTS) for g in GRADES]
    for lang in ("en", "ja"):
        out.append(concepts_line([], lang))
        out += [concepts_line(every[i:i + 3], lang) for i in range(0, len(every), 3)]
        out += [concepts_line(true_concepts(s), lang) for s in studies]
    return out


def tokenizer_corpus(studies, concepts: str) -> list[str]:
    """What the tokenizer is trained on: the reports, the prompts and, for a model trained with
    concepts (``concepts`` != "none"), the concept lines."""
    from training.vlm.data import report_corpus

    corpus = report_corpus(studies) + _prompt_corpus()
    if concepts != "none":
        corpus += _concept_corpus(studies)
    return corpus


def validation_concepts(backend, concepts: str, seed: int):
    """``(concepts_for, label)`` for the validation run of a model trained with concepts (the
    noisy truth: the training perturbation with the seed; ``backend.uses_concepts`` set), or
    ``(None, None)`` for one trained without."""
    if concepts == "none":
        return None, None
    from training.vlm.concepts import concepts_source

    backend.uses_concepts = True
    return concepts_source("noisy", seed=seed), f"noisy (seed {seed})"


def build_vlm(data_dir: str | Path, bundle_dir: str | Path, seed: int = 0, budget_s: float = 150.0,
              quick: bool = False, tiny: TinyConfig | None = None, train_cfg=None,
              evaluate: bool = True, version: str = "0.1.0", max_studies: int | None = None,
              concepts: str | None = None) -> dict:
    """The demo VLM: tokenizer + tiny Gemma3 trained (full fine-tune) on ``data_dir``'s key frames
    and reports, saved into ``bundle_dir/vlm``, manifest updated; returns metrics.

    ``concepts``: "findings" trains every prompt with the study's true findings perturbed like a
    lesion detector's errors (``training.vlm.concepts``; manifest ``vlm.training.concepts``), so
    the node can give the model the lesion model's findings; "none" (default) the images alone.
    ``None`` keeps ``train_cfg.concepts`` (else "none").  The validation evaluation of a model
    with concepts gives it the noisy truth (the training perturbation with another seed).

    ``quick`` (tests) trains for ~1/4 of the budget.  Validation studies are split off by patient.
    ``max_studies``: use only the first N studies (in StudyInstanceUID order, so a fixed subset):
    a time budget buys few passes over a large set, and the demo VLM then learns only the most
    common report (measured: 640 studies in 200 s, side F1 0.00 on held-out studies).
    """
    import time

    import torch

    from inference.bundle import VLMSpec, sha256_dir, update_manifest
    from training.vlm.data import FrameCache, load_examples, split_examples
    from training.vlm.tokenizer import train_tokenizer
    from training.vlm.train import TrainConfig, train_model

    t0 = time.monotonic()
    torch.manual_seed(seed)
    tiny = tiny or TinyConfig()
    cfg = train_cfg or TrainConfig(budget_s=budget_s / 4 if quick else budget_s, seed=seed, progress=not quick)
    if concepts is not None:
        from dataclasses import replace

        from training.vlm.concepts import check_mode

        cfg = replace(cfg, concepts=check_mode(concepts))
    studies = load_examples(data_dir)
    if max_studies is not None:
        if max_studies < 1:
            raise ValueError(f"max_studies must be >= 1, got {max_studies}")
        studies = studies[:max_studies]
    if not studies:
        raise ValueError(f"{data_dir}: no studies with key frames and reports")
    parts = split_examples(studies, val_frac=0.2, seed=seed)
    train, val = parts["train"] or studies, parts["val"]
    tokenizer = train_tokenizer(tokenizer_corpus(studies, cfg.concepts), vocab_size=tiny.vocab_size)
    processor = build_processor(tokenizer, tiny)
    model = build_tiny_model(tokenizer, tiny, seed=seed)
    t_build = time.monotonic() - t0
    frames = FrameCache(tiny.image_size)
    model, stats = train_model(model, processor, train, cfg, frame_cache=frames)
    bundle_dir = Path(bundle_dir)
    vdir = bundle_dir / "vlm"
    save_vlm(model, processor, vdir)
    metrics: dict = {"parameters": n_parameters(model), "train": stats, "n_train": len(train),
                     "n_val": len(val), "build_seconds": None, "size_mb": round(
                         sum(f.stat().st_size for f in vdir.rglob("*") if f.is_file()) / 1e6, 2)}
    if evaluate and val:
        from inference.vlm.transformers_backend import TransformersBackend
        from training.vlm.evaluate import VLMEmbeddingEncoder, evaluate_backend, most_common_reports
        from training.vlm.evaluate import fit_vlscore_c

        backend = TransformersBackend(vdir, model=model, processor=processor, max_images=cfg.max_images,
                                      max_new_tokens=256, timeout_s=600)
        backend.from_first_language = cfg.from_first_language
        enc = VLMEmbeddingEncoder(model, processor)
        # C fitted on training pairs (English references), stored in the manifest for evaluate.
        fit = train[: min(len(train), 32)]
        from inference.vlm.base import format_report

        c = fit_vlscore_c([enc.encode_image([frames(r) for r in s.frames(cfg.max_images)[0]]) for s in fit],
                          [enc.encode_text(format_report(s.report["en"], "en")) for s in fit], seed=seed)
        concepts_for, given = validation_concepts(backend, cfg.concepts, seed)
        ev = evaluate_backend(backend, val, most_common_reports(train), cfg.languages, enc, c,
                              frame_cache=frames, keep_outputs=False, concepts_for=concepts_for)
        if given:
            ev["concepts"] = given
        metrics["val"] = ev
        metrics["vlscore_c"] = c
    metrics["build_seconds"] = round(time.monotonic() - t0, 1)
    metrics["setup_seconds"] = round(t_build, 1)
    try:
        import resource

        metrics["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except Exception:  # pragma: no cover - non-POSIX
        pass
    spec = VLMSpec(
        path="vlm", family=tiny.family, adapter=None, image_size=tiny.image_size,
        sha256=sha256_dir(vdir), version=version, prompt_style="sections",
        training={"kind": "full", "tiny": tiny.to_dict(), **cfg.to_dict(), "lora": None,
                  "split_seed": seed, "val_frac": 0.2, "data": str(data_dir), "max_studies": max_studies},
        metrics=_summary(metrics),
    )
    update_manifest(bundle_dir, vlm=spec)
    return metrics


def _summary(metrics: dict) -> dict:
    """The small subset of metrics stored in the manifest."""
    out = {k: metrics.get(k) for k in ("parameters", "size_mb", "build_seconds", "n_train", "n_val", "vlscore_c",
                                       "peak_rss_mb")}
    out["final_loss"] = metrics.get("train", {}).get("final_loss")
    val = metrics.get("val") or {}
    for lang in ("en", "ja"):
        if lang in val:
            m = val[lang]
            out[f"{lang}_finding_f1"] = m["clinical"]["severity"]["f1"]
            out[f"{lang}_baseline_finding_f1"] = m["baseline_clinical"]["severity"]["f1"]
            out[f"{lang}_treatment_agreement"] = m["clinical"]["treatment_agreement"]
            out[f"{lang}_baseline_treatment_agreement"] = m["baseline_clinical"]["treatment_agreement"]
            out[f"{lang}_bleu"] = m["bleu"]
            out[f"{lang}_format_ok"] = m["format_ok"]
    if val.get("concepts"):
        out["val_concepts"] = val["concepts"]
        for lang in ("en", "ja"):
            if (val.get(lang) or {}).get("concepts_clinical"):
                out[f"{lang}_concepts_finding_f1"] = val[lang]["concepts_clinical"]["severity"]["f1"]
    if "language_agreement" in val:
        out["language_agreement"] = val["language_agreement"]
    if "latency_s_per_study" in val:
        out["latency_s_per_study"] = val["latency_s_per_study"]["mean"]
    return out
