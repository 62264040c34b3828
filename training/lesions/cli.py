"""``cag-node train lesions`` and ``cag-node evaluate lesions``."""

from __future__ import annotations

import json
import logging
import sys


def register_train(sub) -> None:
    p = sub.add_parser("lesions", help="train the lesion model (vessel / AHA segment / stenosis maps) into a bundle")
    p.add_argument("--data", required=True,
                   help="synthetic set generated with lesion targets (`cag-node synth ... --targets N`)")
    p.add_argument("--bundle", required=True, help="bundle folder: writes lesions.onnx and the manifest's lesions section")
    p.add_argument("--arch", default="unet_tiny", help="unet_tiny (CPU) | unet_small | unet_base (GPU)")
    p.add_argument("--size", type=int, default=256, help="model input size in pixels (default 256)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--crop", type=int, default=128,
                   help="train on crops of this size (the model serves whole frames); 0 = whole frames")
    p.add_argument("--whole-every", type=int, default=0, metavar="K",
                   help="every K-th step trains on whole frames (segment naming needs the whole tree); 0 = never")
    p.add_argument("--fade", type=float, default=0.0, metavar="P",
                   help="fade the opacified vessels of a share P of the training frames by 0-70 %% (real "
                        "vessels are fainter than synthetic ones); 0 = off")
    p.add_argument("--normalize", default="flatfield", choices=["flatfield", "none"])
    p.add_argument("--augment", default="sim2real", help="photometric augmentation: sim2real (no geometry) | none")
    p.add_argument("--time-budget", type=float, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.set_defaults(func=_train)


def _train(args) -> int:
    from .export import build_lesions

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = build_lesions(args.data, args.bundle, arch=args.arch, size=args.size, steps=args.steps,
                            batch=args.batch, lr=args.lr, crop=args.crop, whole_every=args.whole_every, fade=args.fade, seed=args.seed, normalize=args.normalize,
                            augment=args.augment, time_budget_s=args.time_budget, threads=args.threads)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def register_evaluate(sub) -> None:
    p = sub.add_parser("lesions", help="evaluate a bundle's lesion model (ONNX Runtime) on a synthetic set with targets")
    p.add_argument("data", metavar="DIR", help="synthetic set generated with lesion targets (labels.jsonl + *_targets.npz)")
    p.add_argument("--bundle", required=True, help="model bundle folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--match-px", type=float, default=None,
                   help="a found lesion matches a true one within this many stored pixels (default 4%% of the frame)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--overlays", metavar="DIR", default=None,
                   help="write PNGs of frames with the predicted vessel mask and true/found lesions")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> int:
    from .evaluate import evaluate_lesions

    try:
        m = evaluate_lesions(args.data, args.bundle, match_px=args.match_px, threads=args.threads,
                             max_frames=args.max_frames, overlays=args.overlays)
    except (ValueError, FileNotFoundError) as exc:
        print(f"cag-node evaluate lesions: {exc}", file=sys.stderr)
        return 2
    print_metrics(m, args.json)
    return 0


def print_metrics(m: dict, as_json: bool) -> None:
    """Metrics as JSON, or one ``name value`` line each."""
    if as_json:
        print(json.dumps(m, indent=2))
    else:
        for k, v in m.items():
            print(f"{k:28s} {v}")
