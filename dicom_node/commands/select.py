"""``cag-node select FILE... [--bundle DIR] [--config FILE] [--json]`` — the selector alone.

Prints, per file, laterality with confidence, key frames (1-based, best first) and the
candidate frames.  With ``--json``: a JSON list of objects with ``file``,
``sop_instance_uid``, ``laterality``, ``confidence``, ``key_frames``, ``candidates`` (and
``n_frames``, ``key_frame_details``, ``error``).  A run that cannot be analysed is listed with
its ``error``; the exit status is 1 only when no file could be analysed.
"""

from __future__ import annotations

import json
import sys

from dicom_node.commands import add_run_arguments


def register(sub) -> None:
    p = sub.add_parser("select", help="key frames and laterality of XA runs (the selector alone)")
    add_run_arguments(p, "DICOM runs (multi-frame XA)", "print a JSON list")
    p.add_argument("--min-gap", type=int, default=None, help="override selector.min_gap")
    p.add_argument("--max-key-frames", type=int, default=None, help="override selector.max_key_frames")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from dicom_node.config import load_config

    cfg = load_config(args.config)
    sc = cfg.selector
    from dicom_node.commands import load_selector_bundle

    bundle = load_selector_bundle(args, cfg, "select")
    if bundle is None:
        return 1
    from inference.selector import Selector, SelectorError

    try:
        sel = Selector(bundle, threads=sc.threads, batch_size=sc.batch_size, providers=sc.providers)
    except SelectorError as exc:
        print(f"cag-node select: {exc}", file=sys.stderr)
        return 1
    min_gap = args.min_gap or sc.min_gap
    max_kf = args.max_key_frames or sc.max_key_frames
    results = []
    for f in args.files:
        if not Path(f).is_file():
            from inference.types import RunSelection

            results.append(RunSelection(file=f, sop_instance_uid="", error=f"{f}: no such file"))
            continue
        results.append(sel.select_run(f, min_gap=min_gap, max_key_frames=max_kf))
    if args.json:
        out = []
        for r in results:
            d = r.to_dict()
            out.append({
                "file": d["file"],
                "sop_instance_uid": d["sop_instance_uid"],
                "laterality": d["laterality"],
                "confidence": d["confidence"],
                "key_frames": d["key_frames"],
                "candidates": d["candidates"],
                "n_frames": d["n_frames"],
                "key_frame_details": d["key_frame_details"],
                "error": d["error"],
            })
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        for r in results:
            if r.error:
                print(f"{r.file}: ERROR {r.error}")
            else:
                kf = ", ".join(f"{k.frame_number} ({k.label} {k.score:.2f})" for k in r.key_frames)
                print(f"{r.file}: {r.laterality} {r.confidence:.3f}; key frames {kf}; "
                      f"{len(r.candidates)} candidates of {r.n_frames} frames")
    return 0 if any(r.error is None for r in results) else 1
