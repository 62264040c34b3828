"""``cag-node train selector``, ``cag-node export selector``, ``cag-node evaluate selector``."""

from __future__ import annotations

import json

from inference.frames import NORMALIZATIONS
from training.selector.train import AUGMENTATIONS


def _train(args) -> int:
    from training.selector.train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data, out=args.out, arch=args.arch, size=args.size, epochs=args.epochs, steps=args.steps,
        batch=args.batch, lr=args.lr, weight_decay=args.weight_decay, augment=args.augment, normalize=args.normalize,
        balance="none" if args.no_balance else args.balance, val_frac=args.val_frac, seed=args.seed, threads=args.threads,
        eval_every=args.eval_every, ckpt_every=args.ckpt_every, min_gap=args.min_gap, resume=args.resume,
        cache=args.cache, progress=not args.no_progress, drop_path=args.drop_path,
        label_smoothing=args.label_smoothing, ls_init=args.ls_init, bg_swap=args.bg_swap,
    )
    summary = train(cfg)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        from training.selector.evaluate import format_metrics

        print(f"trained {summary['arch']} for {summary['steps']} steps in {summary['seconds']['train']} s; "
              f"checkpoints: {summary['best_checkpoint']}, {summary['last_checkpoint']}")
        if summary.get("val_metrics"):
            print(format_metrics(summary["val_metrics"]))
    return 0


def register_train(sub) -> None:
    p = sub.add_parser("selector", help="train the key-frame / laterality selector (timm ConvNeXt)")
    p.add_argument("--data", required=True, help="dataset folder (DICOM runs + labels.jsonl, e.g. from `cag-node synth`)")
    p.add_argument("--out", required=True, help="output folder (checkpoints last.pt/best.pt, train-summary.json)")
    p.add_argument("--arch", default="convnext_atto",
                   help="timm architecture: convnext_base (paper, GPU), convnext_atto/femto/pico/nano/tiny (CPU)")
    p.add_argument("--size", type=int, default=128, help="input size in pixels (default 128)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (paper: 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--augment", default="trivialaugment", choices=list(AUGMENTATIONS),
                   help="trivialaugment (the paper's TrivialAugmentWide), sim2real (zoom, gamma, window, "
                   "blur, noise, lossy JPEG, shutters: another cath lab's frames), both, light, none")
    p.add_argument("--normalize", default="flatfield", choices=list(NORMALIZATIONS),
                   help="frame normalisation, recorded in the bundle and applied when serving: flatfield "
                   "(detail over a smooth background, RMS-scaled, field edges neutral) or none")
    p.add_argument("--bg-swap", type=float, default=0.0, metavar="P",
                   help="probability of moving a frame's contrast onto another run's pre-contrast background, "
                   "so the side is read from the vessels (default 0)")
    p.add_argument("--balance", default="class", choices=["class", "class+view", "none"],
                   help="frame sampling: balance the classes, or the classes within each projection "
                   "family (the RCA is rarely filmed in RAO), or uniform")
    p.add_argument("--no-balance", action="store_true", help="same as --balance none")
    p.add_argument("--val-frac", type=float, default=0.2, help="fraction of studies held out for validation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default: every epoch)")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--min-gap", type=int, default=5, help="candidate spacing used for run-level metrics")
    p.add_argument("--resume", default=None, help="checkpoint to resume from, or 'auto' (OUT/last.pt if present)")
    p.add_argument("--cache", default=None, help="preprocessed-frame cache folder (default DATA/.cache)")
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--ls-init", type=float, default=None,
                   help="ConvNeXt layer-scale init (timm default 1e-6; 1.0 learns faster in short CPU runs)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--json", action="store_true", help="print the training summary as JSON")
    p.set_defaults(func=_train)


def _export(args) -> int:
    from training.selector.export import main_export

    return main_export(args)


def register_export(sub) -> None:
    p = sub.add_parser("selector", help="export a selector checkpoint to ONNX into a model bundle")
    p.add_argument("--checkpoint", required=True, help="a checkpoint from `cag-node train selector` (best.pt)")
    p.add_argument("--bundle", required=True, help="bundle folder: writes selector.onnx and updates manifest.json")
    p.add_argument("--int8", action="store_true", help="quantize to int8 (accuracy drift is measured and recorded)")
    p.add_argument("--int8-method", default="auto", choices=["auto", "static", "dynamic"],
                   help="static QDQ (atto..nano), dynamic MatMul-only (tiny/base); auto picks by architecture")
    p.add_argument("--data", default=None, help="dataset for parity check / int8 calibration (default: random inputs)")
    p.add_argument("--tol", type=float, default=1e-3, help="max |logit difference| torch vs ORT allowed")
    p.set_defaults(func=_export)


def _evaluate(args) -> int:
    from training.selector.evaluate import main_evaluate

    return main_evaluate(args)


def register_evaluate(sub) -> None:
    p = sub.add_parser("selector", help="evaluate a bundle's selector (ONNX Runtime) on a labelled dataset "
                       "(--data) or on labelled real runs (--labels)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset folder (DICOM runs + labels.jsonl, e.g. from `cag-node synth`)")
    src.add_argument("--labels", metavar="CSV",
                     help="labelled real runs: a CSV with a header file,laterality[,key_frame] (file: a DICOM run, "
                     "relative to the CSV's folder; laterality: LCA/RCA or left/right; key_frame: optional "
                     "1-based frame number a reader chose)")
    p.add_argument("--bundle", required=True, help="model bundle folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--min-gap", type=int, default=5)
    p.add_argument("--max-key-frames", type=int, default=2)
    p.add_argument("--key-frame-tolerance", type=int, default=2,
                   help="with --labels: the top key frame agrees when within this many frames of the reader's (default 2)")
    p.add_argument("--saliency", metavar="DIR", default=None,
                   help="with --labels: write an occlusion-saliency picture of each run's top key frame "
                   "(where the side decision comes from) to DIR/<run>.png, and DIR/sheet.png")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=_evaluate)
