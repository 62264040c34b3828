"""End-to-end fixtures: one quick demo bundle per test session, real peers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dicom_node.demo import free_port



@pytest.fixture(scope="session")
def demo_bundle(quick_bundle) -> Path:
    """The session's quick demo bundle (tests/conftest.py); CAG_TEST_BUNDLE reuses a built one."""
    return quick_bundle


@pytest.fixture(scope="session")
def held_out_study(tmp_path_factory) -> list[Path]:
    from training.demo import make_demo_study

    return make_demo_study(tmp_path_factory.mktemp("study") / "s", seed=99, quick=True)


class StoreSCP:
    """dcmtk storescp as a destination PACS."""

    def __init__(self, out_dir: Path, aet: str = "PACS"):
        self.out_dir = out_dir
        self.aet = aet
        self.port = free_port()
        self.proc = None

    def start(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["storescp", "--aetitle", self.aet, "-od", str(self.out_dir), "+B",
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise RuntimeError("storescp did not start")

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait(5)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


@pytest.fixture
def storescp(tmp_path):
    if shutil.which("storescp") is None:
        pytest.skip("dcmtk storescp not installed")
    scp = StoreSCP(tmp_path / "pacs").start()
    yield scp
    scp.stop()
