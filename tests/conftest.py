"""Shared test configuration.

Area-specific fixtures live in each sub-folder's own conftest.py.  Here: the
location of the real XA files, tool availability, and an environment that can
never reach a model hub.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# helper modules shared by several test folders (nodewait) import by name, as each folder's own
sys.path.insert(0, str(Path(__file__).resolve().parent))
REAL_XA = Path(os.environ.get("CAG_REAL_XA", ROOT.parent / "shared" / "data" / "real-xa"))

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


@pytest.fixture(scope="session")
def real_xa_dir() -> Path:
    """The real public XA/RF files (../shared/data/real-xa); skip when absent."""
    if not REAL_XA.is_dir() or not any(REAL_XA.glob("*.dcm")):
        pytest.skip(f"real XA files not available at {REAL_XA}")
    return REAL_XA


@pytest.fixture(scope="session")
def real_xa_files(real_xa_dir) -> list[Path]:
    return sorted(real_xa_dir.glob("*.dcm"))


def require_tools(*tools: str):
    missing = [t for t in tools if not have(t)]
    return pytest.mark.skipif(bool(missing), reason=f"missing tools: {', '.join(missing)}")


# One quick demo bundle per test session, shared by e2e and reliability tests.
def _sources_hash() -> str:
    """A hash of the code that builds a bundle: a cached bundle is reused only while it is unchanged."""
    root = ROOT  # the repository (parents[2] pointed above it, so no source was hashed)
    h = hashlib.sha256()
    for pkg in ("training", "inference"):
        for p in sorted((root / pkg).rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def quick_bundle(request, tmp_path_factory) -> Path:
    """A quick demo bundle: ``CAG_TEST_BUNDLE`` if set, else one cached in pytest's cache folder
    (keyed by the training/inference sources), else built now (minutes on 2 cores)."""
    pre = os.environ.get("CAG_TEST_BUNDLE")
    if pre:
        return Path(pre)
    try:
        from training.demo import build_demo_bundle
        from inference.bundle import Bundle, BundleError
    except ImportError as exc:  # the training module is not there (serving-only install)
        pytest.skip(f"no model bundle: training module unavailable ({exc})")
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        root = Path(cache.mkdir("cag-quick-bundle")) / _sources_hash()
    else:
        root = tmp_path_factory.mktemp("quick-bundle")
    bundle = root / "demo"
    try:
        Bundle.load(bundle)
        return bundle
    except BundleError:
        pass
    for old in root.parent.iterdir() if cache is not None else []:
        if old != root and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    build_demo_bundle(bundle, work_dir=root / "work", quick=True)
    shutil.rmtree(root / "work", ignore_errors=True)
    return bundle


