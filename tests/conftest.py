"""Shared test configuration.

Area-specific fixtures live in each sub-folder's own conftest.py.  Here: the
location of the real XA files, tool availability, and an environment that can
never reach a model hub.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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
