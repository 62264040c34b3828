"""The quick demo bundle the e2e, reliability and web tests share, cached by a hash of its sources."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
BUNDLE_SOURCES = ("training", "inference")  # the packages whose code builds a bundle


def sources_hash(root: Path = ROOT, packages=BUNDLE_SOURCES) -> str:
    """A hash of every ``*.py`` under ``root/<package>``: a cached bundle is reused only while it
    is unchanged.  Raises ValueError when no source is found (a wrong root hashes nothing)."""
    h = hashlib.sha256()
    n = 0
    for pkg in packages:
        for p in sorted((Path(root) / pkg).rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
            n += 1
    if n == 0:
        raise ValueError(f"no bundle source under {root} ({', '.join(packages)})")
    return h.hexdigest()[:16]


def cached_quick_bundle(cache_root: Path) -> Path:
    """``cache_root/<sources hash>/demo``: loaded if it is a valid bundle, else built now (minutes
    on 2 cores); bundles of other hashes under ``cache_root`` are removed."""
    from inference.bundle import Bundle, BundleError
    from training.demo import build_demo_bundle

    root = Path(cache_root) / sources_hash()
    bundle = root / "demo"
    try:
        Bundle.load(bundle)
        return bundle
    except BundleError:
        pass
    if Path(cache_root).is_dir():
        for old in Path(cache_root).iterdir():
            if old != root and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    build_demo_bundle(bundle, work_dir=root / "work", quick=True)
    shutil.rmtree(root / "work", ignore_errors=True)
    return bundle
