"""Fixtures of the reliability and security tests (tests/reliability/).

The node always runs as a subprocess (``cag-node serve --config``) so that it can
be killed with SIGKILL and restarted exactly as in production.  Every node and
destination started through these fixtures is stopped at the end of its test.

A model bundle is needed only where a study is processed: ``rel_bundle`` builds
a quick demo bundle once per session (``training.demo.build_demo_bundle(...,
quick=True)``) unless ``CAG_TEST_BUNDLE`` names one already built.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relhelp import NodeProc, RecordingSCP, node_config  # noqa: E402


def pytest_collection_modifyitems(items):
    here = Path(__file__).resolve().parent
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.reliability)


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: kill -9, failing peers, hostile inputs, security")
    config.addinivalue_line(
        "markers", "known_defect(where): fails because of a defect reported in another area's code "
        "(assertions unchanged; deselect with -m 'not known_defect' until it is fixed)")


def _sources_hash() -> str:
    """A hash of the code that builds a bundle: a cached bundle is reused only while it is unchanged."""
    root = Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for pkg in ("training", "inference"):
        for p in sorted((root / pkg).rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def rel_bundle(request, tmp_path_factory) -> Path:
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
        root = tmp_path_factory.mktemp("rel-bundle")
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


@pytest.fixture
def nodes(tmp_path):
    """Factory: ``nodes(cfg_overrides...) -> NodeProc`` (not started); all stopped at teardown."""
    made: list[NodeProc] = []

    def make(name: str = "node", **cfg_kw) -> NodeProc:
        workdir = tmp_path / name
        n = NodeProc(workdir, node_config(workdir, **cfg_kw))
        made.append(n)
        return n

    yield make
    for n in made:
        try:
            n.stop(timeout=15)
        except Exception:
            n.kill9()


@pytest.fixture
def pacs_factory(tmp_path):
    made: list[RecordingSCP] = []

    def make(name: str = "pacs", **kw) -> RecordingSCP:
        scp = RecordingSCP(tmp_path / name, **kw)
        made.append(scp)
        return scp

    yield make
    for s in made:
        s.stop()


def need_tool(name: str):
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"{name} not installed")
