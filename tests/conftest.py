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


# One throw-away PostgreSQL server per session (cagtest.postgres), for every journal test that
# runs on PostgreSQL too.  CI sets CAG_REQUIRE_POSTGRES=1: there a missing server is a failure.
@pytest.fixture(scope="session")
def postgres_server():
    """A running :class:`cagtest.postgres.PostgresServer`, or the URL's server, or a skip."""
    from cagtest.postgres import PostgresServer, find_bin_dir

    required = os.environ.get("CAG_REQUIRE_POSTGRES") == "1"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        if required:
            pytest.fail("CAG_REQUIRE_POSTGRES=1 but psycopg is not installed")
        pytest.skip("psycopg not installed (pip install -e '.[postgres]')")
    url = os.environ.get("CAG_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if find_bin_dir() is None:
        if required:
            pytest.fail("CAG_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries (apt-get install postgresql)")
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    srv = PostgresServer.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """An empty database of its own for one test (on the session's server)."""
    if isinstance(postgres_server, str):  # an outside server: one schema, dropped per test
        from dicom_node import db

        eng = db.create_engine(postgres_server)
        db.create_all(eng)
        db.Base.metadata.drop_all(eng)
        eng.dispose()
        return postgres_server
    import re

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    return postgres_server.fresh_database(name)
