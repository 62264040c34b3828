"""``cag-node demo [--prepare] [--pacs]``: the main job (see dicom_node/demo.py)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="build the demo models if absent, run a node, send a study, print the SR")
    p.add_argument("--config", default=None, help="config file (default ./config.yaml)")
    p.add_argument("--bundle", default=None, help="model bundle dir (default models.bundle of the config)")
    p.add_argument("--prepare", action="store_true", help="only build the demo bundle")
    p.add_argument("--pacs", action="store_true", help="use a real Orthanc as the PACS that forwards the study")
    p.add_argument("--out", default="demo-out", help="output folder (spool, journal, results, report.html)")
    p.add_argument("--quick", action="store_true", help="a tiny bundle and study (tests)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the SR")
    p.set_defaults(func=run)


def run(args) -> int:
    from dicom_node.config import load_config
    from dicom_node.demo import run_demo

    cfg = load_config(args.config)
    bundle = Path(args.bundle).resolve() if args.bundle else cfg.bundle_dir
    return run_demo(cfg, bundle, Path(args.out), prepare_only=args.prepare, use_orthanc=args.pacs,
                    quick=args.quick, timeout_s=args.timeout)
