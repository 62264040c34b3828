"""Shared test configuration.

Area-specific fixtures live in each sub-folder's own conftest.py.  Here: the
location of the real XA files, tool availability, and an environment that can
never reach a model hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cagtest.net import have, require_tools  # noqa: F401  (for the folders' conftests)

ROOT = Path(__file__).resolve().parent.parent
REAL_XA = Path(os.environ.get("CAG_REAL_XA", ROOT.parent / "shared" / "data" / "real-xa"))

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def real_xa_dir() -> Path:
    """The real public XA/RF files (../shared/data/real-xa); skip when absent."""
    if not REAL_XA.is_dir() or not any(REAL_XA.glob("*.dcm")):
        pytest.skip(f"real XA files not available at {REAL_XA}")
    return REAL_XA


@pytest.fixture(scope="session")
def real_xa_files(real_xa_dir) -> list[Path]:
    return sorted(real_xa_dir.glob("*.dcm"))


# One quick demo bundle per test session, shared by e2e, reliability and web tests.
@pytest.fixture(scope="session")
def quick_bundle(request, tmp_path_factory) -> Path:
    """A quick demo bundle: ``CAG_TEST_BUNDLE`` if set, else one cached in pytest's cache folder
    (keyed by the training/inference sources: ``cagtest.bundle.sources_hash``), else built now."""
    pre = os.environ.get("CAG_TEST_BUNDLE")
    if pre:
        return Path(pre)
    try:
        import training.demo  # noqa: F401
    except ImportError as exc:  # the training module is not there (serving-only install)
        pytest.skip(f"no model bundle: training module unavailable ({exc})")
    from cagtest.bundle import cached_quick_bundle

    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("cag-quick-bundle")) if cache is not None else tmp_path_factory.mktemp("quick-bundle")
    return cached_quick_bundle(root)
