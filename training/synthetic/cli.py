"""``cag-node synth OUT_DIR --studies N --seed S``: synthetic angiography studies."""

from __future__ import annotations

import argparse
import sys


def _range(text: str):
    """'40' -> 40; '30-45' -> (30, 45)."""
    if "-" in text:
        lo, hi = text.split("-", 1)
        lo, hi = int(lo), int(hi)
        if lo > hi or lo < 1:
            raise argparse.ArgumentTypeError(f"bad range {text!r}")
        return (lo, hi)
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return v


def register_synth(sub) -> None:
    p = sub.add_parser(
        "synth",
        help="generate synthetic coronary angiography studies (DICOM XA + labels.jsonl)",
        description="Synthetic cath-lab studies: multi-frame XA runs (LCA and RCA injections) "
        "with per-frame labels (LCA/RCA x better/bad/other), study findings and a reference "
        "report in English and Japanese.  Writes OUT_DIR/labels.jsonl (one line per run) and "
        "OUT_DIR/studies.jsonl (one line per study).  Deterministic per --seed.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--studies", type=int, default=10, help="number of studies (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=512, help="image rows = columns (default 512)")
    p.add_argument("--frames", type=_range, default=(30, 45), help="frames per run, N or LO-HI (default 30-45)")
    p.add_argument("--runs-per-study", type=_range, default=(4, 6), help="runs per study, N or LO-HI (default 4-6)")
    p.add_argument("--pattern", choices=["normal", "mild", "1v", "2v", "3v", "lm"], default=None,
                   help="force one disease pattern for every study (default: random mix)")
    p.add_argument("--compression", choices=["none", "rle", "jpegls", "jpeg", "mixed"], default="none",
                   help="transfer syntax: none = Explicit VR Little Endian (default), rle, jpegls (lossless), "
                   "jpeg (JPEG baseline, lossy, 8-bit), mixed (none or jpeg per run, at random)")
    p.add_argument("--jpeg-quality", type=int, default=None,
                   help="JPEG quality 1-100 for jpeg/mixed (default: drawn from 70-95 per run)")
    p.add_argument("--domain", choices=["wide", "narrow"], default="wide",
                   help="wide (default): domain randomisation (contrast, calibre, tortuosity, background, "
                   "hardware, partial injections, aim/zoom); narrow: the original generator")
    p.add_argument("--geometry", choices=["typical", "broad"], default="typical",
                   help="typical (default): each side's usual projections and a heart axis fixed within a few "
                   "degrees; broad: the sides share projections, angles vary more and the heart is tilted "
                   "and turned (docs/sim-to-real.md)")
    p.add_argument("--bits", type=int, choices=[8, 10, 12], default=8,
                   help="bits stored: 8 (default) or 10/12 in 16-bit words")
    p.add_argument("--targets", type=int, default=0, metavar="N",
                   help="per-pixel training targets (vessel mask, AHA segment map, projected lesions) for up to N "
                   "key frames per run: OUT_DIR/study_XXXXX/run_YY_targets.npz + a 'targets' entry per record "
                   "(default 0 = off)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--start", type=int, default=0, help="index of the first study (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .dataset import generate_dataset

    if args.studies < 1:
        print("cag-node synth: --studies must be >= 1", file=sys.stderr)
        return 2
    if args.compression in ("jpeg", "mixed") and args.bits != 8:
        print("cag-node synth: --compression jpeg/mixed needs --bits 8", file=sys.stderr)
        return 2
    if args.jpeg_quality is not None and not 1 <= args.jpeg_quality <= 100:
        print("cag-node synth: --jpeg-quality must be in 1..100", file=sys.stderr)
        return 2
    if args.targets < 0:
        print("cag-node synth: --targets must be >= 0", file=sys.stderr)
        return 2
    if not 32 <= args.size <= 2048:
        print("cag-node synth: --size must be in 32..2048", file=sys.stderr)
        return 2
    recs = generate_dataset(
        args.out_dir,
        args.studies,
        args.seed,
        size=args.size,
        frames=args.frames,
        runs_per_study=args.runs_per_study,
        pattern=args.pattern,
        compression=args.compression,
        jpeg_quality=args.jpeg_quality,
        domain=args.domain,
        geometry=args.geometry,
        bits=args.bits,
        targets=args.targets,
        workers=args.workers,
        start=args.start,
        progress=not args.no_progress,
    )
    n_frames = sum(len(r["frame_labels"]) for r in recs)
    print(f"wrote {len(recs)} runs ({n_frames} frames) of {args.studies} studies to {args.out_dir}"
          f" (labels.jsonl, studies.jsonl)")
    return 0
