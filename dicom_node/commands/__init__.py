"""One module per cag-node sub-command; each exposes register(subparsers)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_run_arguments(p, files_help: str, json_help: str) -> None:
    """The arguments ``select`` and ``report`` share: the runs, ``--bundle``, ``--config``, ``--json``."""
    p.add_argument("files", nargs="+", metavar="FILE", help=files_help)
    p.add_argument("--bundle", default=None, help="model bundle folder (default: models.bundle of the config)")
    p.add_argument("--config", default=None, help="config file (default: ./config.yaml if present)")
    p.add_argument("--json", action="store_true", help=json_help)


def load_selector_bundle(args, cfg, command: str):
    """The bundle of ``--bundle`` (or ``models.bundle``), verified and holding a selector.

    Returns None after printing why to stderr (the command then exits 1).
    """
    from inference.bundle import Bundle, BundleError

    bundle_dir = Path(args.bundle) if getattr(args, "bundle", None) else cfg.bundle_dir
    try:
        bundle = Bundle.load(bundle_dir)
    except BundleError as exc:
        print(f"cag-node {command}: {exc}", file=sys.stderr)
        return None
    if bundle.manifest.selector is None:
        print(f"cag-node {command}: bundle {bundle_dir} has no selector", file=sys.stderr)
        return None
    return bundle
