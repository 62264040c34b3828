"""``cag-node train vlm`` and ``cag-node evaluate vlm``.

    cag-node train vlm --data DIR --out BUNDLE [--base MODEL_DIR | --build-tiny]
                       [--lora | --full] [--rank 16 --alpha 32 --dropout 0.05 --target-modules REGEX]
                       [--steps N | --budget-s S] [--lr X] [--batch-size N] [--merge] [--resume]
                       [--checkpoint-every N] [--seed S] [--device auto|cpu|cuda]
                       [--concepts none|findings] [--json]
    cag-node evaluate vlm --data DIR --bundle BUNDLE [--split val|test|train|all] [--limit N]
                       [--concepts none|truth|noisy|lesions] [--concepts-seed S]
                       [--rating-export FILE.csv|.jsonl] [--import-ratings FILE] [--json]

``--concepts findings`` trains the VLM to read the lesion model's findings in its prompt (the
true findings perturbed like a detector's errors, ``training.vlm.concepts``); the manifest records
it (``vlm.training.concepts``) and the node then passes the lesion model's findings.  ``evaluate
vlm --concepts`` says what such a model is given per study: ``truth``, ``noisy`` (the training
perturbation under another seed) or ``none``; default: ``noisy`` for a model trained with
concepts, ``none`` otherwise (a model trained without them is never given any).

``--data`` is a synthetic dataset folder (labels.jsonl) or a hospital JSONL (see
``training.vlm.data``).  The model, tokenizer/processor and (unless merged) the LoRA adapter
go into ``BUNDLE/vlm`` (+ ``BUNDLE/vlm/adapter``); the manifest's vlm section is written.
Heavy imports happen only when a command runs.
"""

from __future__ import annotations

import json
import sys


def register_train(sub) -> None:
    p = sub.add_parser("vlm", help="fine-tune the report VLM (LoRA or full) and write it into a bundle")
    p.add_argument("--data", required=True, help="dataset folder (labels.jsonl) or hospital JSONL")
    p.add_argument("--out", required=True, help="bundle folder to write (model in OUT/vlm, manifest updated)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--base", help="local base model dir (Gemma3 / PaliGemma2 save_pretrained + processor)")
    src.add_argument("--build-tiny", action="store_true", help="build the tiny demo model (tokenizer + random init)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--lora", action="store_true", help="LoRA fine-tuning (default with --base)")
    kind.add_argument("--full", action="store_true", help="full fine-tuning (default with --build-tiny)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--target-modules", default=None,
                   help="regex of module names for LoRA (default: the language model's linear layers)")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: train for --budget-s)")
    p.add_argument("--budget-s", type=float, default=150.0, help="wall-clock training budget when --steps is 0")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-3 full, 1e-3 LoRA)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--languages", default="en,ja")
    p.add_argument("--merge", action="store_true", help="merge the LoRA adapter into the saved model")
    p.add_argument("--resume", action="store_true", help="resume from OUT/checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--independent-languages", action="store_true",
                   help="learn each language from the images alone (default: later languages are written "
                   "from the first language's report, so the drafts agree)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--concepts", default="none", choices=["none", "findings"],
                   help="findings: every prompt names the study's findings, perturbed like a lesion "
                   "detector's errors, so the model learns to write from the lesion model's findings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--version", default="0.1.0", help="version recorded in the manifest")
    p.add_argument("--no-eval", action="store_true", help="skip the validation evaluation")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=_train)


def register_evaluate(sub) -> None:
    p = sub.add_parser("vlm", help="evaluate the bundle's VLM: clinical F1 vs no-image baseline, BLEU/ROUGE-L, VLScore")
    p.add_argument("--data", required=False, help="dataset folder (labels.jsonl) or hospital JSONL")
    p.add_argument("--bundle", required=False, help="bundle folder")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    p.add_argument("--limit", type=int, default=None, help="evaluate at most N studies")
    p.add_argument("--languages", default="en,ja")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-vlscore", action="store_true")
    p.add_argument("--concepts", default=None, choices=["none", "truth", "noisy", "lesions"],
                   help="the lesion-model findings given to a model trained with concepts: the true "
                   "findings, noisy ones (the training perturbation, another seed), lesions (the "
                   "bundle's own lesion model on the key frames, as the node does) or none "
                   "(default: noisy for such a model, none otherwise)")
    p.add_argument("--concepts-seed", type=int, default=1, help="seed of the --concepts noisy perturbation")
    p.add_argument("--rating-export", default=None, help="write a clinician rating sheet (.csv or .jsonl)")
    p.add_argument("--import-ratings", default=None, help="summarise a filled rating sheet (no generation)")
    p.add_argument("--outputs", action="store_true", help="include the generated reports in the JSON")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=_evaluate)


def _langs(s: str) -> tuple[str, ...]:
    from inference.types import LANGUAGES

    out = tuple(l.strip() for l in s.split(",") if l.strip())
    bad = [l for l in out if l not in LANGUAGES]
    if bad or not out:
        raise SystemExit(f"cag-node: --languages: unknown language(s) {bad}")
    return out


def _print(metrics: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(metrics, indent=2, ensure_ascii=False, default=str))
        return
    for lang in ("en", "ja"):
        m = metrics.get(lang) or (metrics.get("val") or {}).get(lang)
        if not m:
            continue
        c, b = m["clinical"], m["baseline_clinical"]
        if m.get("concepts_clinical"):
            k = m["concepts_clinical"]
            print(f"[{lang}] the concepts alone (templated report): finding F1 {k['severity']['f1']:.3f} "
                  f"(vessel {k['vessel']['f1']:.3f}); treatment agreement {k['treatment_agreement']}")
        print(f"[{lang}] finding F1 {c['severity']['f1']:.3f} (vessel {c['vessel']['f1']:.3f}, side "
              f"{c['side']['f1']:.3f}) vs baseline {b['severity']['f1']:.3f}; treatment agreement "
              f"{c['treatment_agreement']} vs {b['treatment_agreement']}; BLEU {m['bleu']:.3f} ROUGE-L "
              f"{m['rouge_l']:.3f}; format ok {m['format_ok']:.2f}"
              + (f"; VLScore {m['vlscore']:.3f} vs {m['baseline_vlscore']:.3f}" if "vlscore" in m else ""))
    concepts = metrics.get("concepts", (metrics.get("val") or {}).get("concepts"))
    if concepts:
        print(f"concepts given to the model: {concepts}")
    agree = metrics.get("language_agreement", (metrics.get("val") or {}).get("language_agreement"))
    if agree is not None:
        print(f"EN/JA drafts agree (findings and treatment) in {agree:.0%} of studies")


def _train(args) -> int:
    from pathlib import Path

    from training.vlm.train import LM_TARGETS, LoraSpec, TrainConfig

    langs = _langs(args.languages)
    lora = args.lora or (args.base is not None and not args.full)
    if not args.base and not args.build_tiny:
        args.build_tiny = True
    spec = LoraSpec(rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                    target_modules=args.target_modules or LM_TARGETS) if lora else None
    cfg = TrainConfig(steps=args.steps, budget_s=args.budget_s, batch_size=args.batch_size,
                      lr=args.lr or (1e-3 if lora else 2e-3), max_images=args.max_images, languages=langs,
                      lora=spec, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, progress=sys.stderr.isatty(),
                      from_first_language=not args.independent_languages, concepts=args.concepts)
    try:
        metrics = train_vlm(args.data, args.out, base=args.base, cfg=cfg, merge=args.merge, resume=args.resume,
                            device=args.device, version=args.version, evaluate=not args.no_eval)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cag-node train vlm: {exc}", file=sys.stderr)
        return 1
    _print(metrics, args.json)
    if not args.json:
        print(f"wrote {Path(args.out) / 'vlm'}; manifest updated")
    return 0


def train_vlm(data, out, base=None, cfg=None, merge: bool = False, resume: bool = False, device: str = "auto",
              version: str = "0.1.0", evaluate: bool = True, tiny=None) -> dict:
    """Train (LoRA or full) from a local base model or the tiny demo model; write ``out/vlm`` and
    the manifest's vlm section; return metrics."""
    import shutil
    import time
    from pathlib import Path

    import torch

    from inference.bundle import VLMSpec, sha256_dir, update_manifest
    from inference.vlm.transformers_backend import TransformersBackend, family_of, load_model
    from training.vlm.build import (TinyConfig, _summary, build_processor, build_tiny_model, n_parameters,
                                    save_vlm, tokenizer_corpus, validation_concepts)
    from training.vlm.data import FrameCache, load_examples, split_examples
    from training.vlm.train import TrainConfig, train_model

    t0 = time.monotonic()
    cfg = cfg or TrainConfig()
    out = Path(out)
    vdir = out / "vlm"
    studies = load_examples(data)
    if not studies:
        raise ValueError(f"{data}: no studies with key frames and reports")
    parts = split_examples(studies, val_frac=0.2, seed=cfg.seed)
    train, val = parts["train"] or studies, parts["val"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if base:
        model, processor, device = load_model(base, None, device)
        family = family_of(model)
        image_size = int((getattr(processor.image_processor, "size", None) or {}).get("height", 0) or 0)
        tiny_dict = None
    else:
        from training.vlm.tokenizer import train_tokenizer

        tiny = tiny or TinyConfig()
        tokenizer = train_tokenizer(tokenizer_corpus(studies, cfg.concepts), vocab_size=tiny.vocab_size)
        processor = build_processor(tokenizer, tiny)
        model = build_tiny_model(tokenizer, tiny, seed=cfg.seed).to(device)
        family, image_size, tiny_dict = tiny.family, tiny.image_size, tiny.to_dict()
    if cfg.lora is not None:
        # The un-adapted base goes into the bundle; the adapter next to it.
        if vdir.exists():
            shutil.rmtree(vdir)
        if base:
            shutil.copytree(base, vdir, ignore=shutil.ignore_patterns("adapter", "checkpoints"))
        else:
            save_vlm(model, processor, vdir)
    frames = FrameCache(image_size or None)
    model, stats = train_model(model, processor, train, cfg, out_dir=out if cfg.checkpoint_every or resume else None,
                               resume=resume, frame_cache=frames)
    adapter_rel = None
    if cfg.lora is not None and not merge:
        model.save_pretrained(vdir / "adapter")
        adapter_rel = "vlm/adapter"
        serve_model = model
    else:
        if cfg.lora is not None:
            model = model.merge_and_unload()
        if vdir.exists():
            shutil.rmtree(vdir)
        save_vlm(model, processor, vdir)
        serve_model = model
    metrics: dict = {"parameters": n_parameters(serve_model), "train": stats, "n_train": len(train),
                     "n_val": len(val), "size_mb": round(sum(f.stat().st_size for f in vdir.rglob("*")
                                                             if f.is_file()) / 1e6, 2)}
    if evaluate and val:
        from training.vlm.evaluate import evaluate_backend, most_common_reports

        backend = TransformersBackend(vdir, model=serve_model, processor=processor, max_images=cfg.max_images,
                                      timeout_s=600)
        backend.from_first_language = cfg.from_first_language
        concepts_for, given = validation_concepts(backend, cfg.concepts, cfg.seed)
        metrics["val"] = evaluate_backend(backend, val, most_common_reports(train, cfg.languages), cfg.languages,
                                          frame_cache=frames, keep_outputs=False, concepts_for=concepts_for)
        if given:
            metrics["val"]["concepts"] = given
    metrics["build_seconds"] = round(time.monotonic() - t0, 1)
    lora_d = None
    if cfg.lora is not None:
        lora_d = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                  "target_modules": cfg.lora.target_modules, "merged": bool(merge)}
    tr = cfg.to_dict()
    tr.pop("lora", None)
    spec = VLMSpec(path="vlm", family=family, adapter=adapter_rel, image_size=image_size or 0,
                   sha256=sha256_dir(vdir), version=version,
                   training={"kind": "lora" if cfg.lora else "full", "base": str(base) if base else "tiny",
                             "tiny": tiny_dict, "lora": lora_d, **tr, "split_seed": cfg.seed, "val_frac": 0.2,
                             "data": str(data)},
                   metrics=_summary(metrics))
    update_manifest(out, vlm=spec)
    return metrics


def _evaluate(args) -> int:
    from training.vlm.evaluate import evaluate_bundle, import_ratings

    if args.import_ratings:
        res = import_ratings(args.import_ratings)
        print(json.dumps(res, indent=2, ensure_ascii=False))
        return 0 if not res["errors"] else 1
    if not args.data or not args.bundle:
        print("cag-node evaluate vlm: --data and --bundle are required", file=sys.stderr)
        return 2
    try:
        res = evaluate_bundle(args.data, args.bundle, split=args.split, languages=_langs(args.languages),
                              limit=args.limit, vlscore=not args.no_vlscore, device=args.device,
                              rating_export=args.rating_export, concepts=args.concepts,
                              concepts_seed=args.concepts_seed)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cag-node evaluate vlm: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # bundle errors etc.
        from inference.bundle import BundleError

        if isinstance(exc, BundleError):
            print(f"cag-node evaluate vlm: {exc}", file=sys.stderr)
            return 1
        raise
    if not args.outputs:
        res.pop("outputs", None)
    _print(res, args.json)
    return 0
