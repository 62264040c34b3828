"""End-to-end fixtures: one quick demo bundle per test session, real peers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cagtest.pacs import StoreSCP


@pytest.fixture(scope="session")
def demo_bundle(quick_bundle) -> Path:
    """The session's quick demo bundle (tests/conftest.py); CAG_TEST_BUNDLE reuses a built one."""
    return quick_bundle


@pytest.fixture(scope="session")
def held_out_study(tmp_path_factory) -> list[Path]:
    from training.demo import make_demo_study

    return make_demo_study(tmp_path_factory.mktemp("study") / "s", seed=99, quick=True)


@pytest.fixture
def storescp(tmp_path):
    if shutil.which("storescp") is None:
        pytest.skip("dcmtk storescp not installed")
    scp = StoreSCP(tmp_path / "pacs", aet="PACS", bit_preserving=True)
    yield scp
    scp.stop()
