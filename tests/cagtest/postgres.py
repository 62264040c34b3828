"""A throw-away PostgreSQL server for the journal tests.

CI installs Debian's ``postgresql`` package (``scripts/setup.sh``); this starts a cluster of its
own in a temporary folder on a free loopback port (``initdb`` + ``pg_ctl``, trust authentication,
no Unix socket outside that folder) and stops and removes it at the end of the session.  The
system's own cluster (if any) is never touched.  ``initdb`` refuses to run as root, so as root the
cluster belongs to the ``postgres`` user (``runuser``).

``CAG_TEST_POSTGRES_URL`` names an existing server instead.  Without either the tests that need
PostgreSQL skip, unless ``CAG_REQUIRE_POSTGRES=1`` (set by ``.ci/run``), which makes that a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dicom_node.demo import free_port


def find_bin_dir() -> Optional[Path]:
    """The newest ``/usr/lib/postgresql/<ver>/bin`` that has initdb and pg_ctl (or PATH's)."""
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if cands:
        return Path(cands[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


@dataclass
class PostgresServer:
    """One running cluster: ``url`` is a SQLAlchemy URL for its ``postgres`` database."""

    data_dir: Path
    port: int
    bin_dir: Path
    user: str = "cag"
    _as: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=timeout)

    @classmethod
    def start(cls, bin_dir: Optional[Path] = None) -> "PostgresServer":
        bin_dir = bin_dir or find_bin_dir()
        if bin_dir is None:
            raise FileNotFoundError("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
        root = Path(tempfile.mkdtemp(prefix="cag-pg-"))
        as_user: tuple[str, ...] = ()
        if os.geteuid() == 0:  # initdb will not run as root
            shutil.chown(root, "postgres", "postgres")
            as_user = ("runuser", "-u", "postgres", "--")
        srv = cls(data_dir=root / "data", port=free_port(), bin_dir=bin_dir, _as=as_user)
        r = srv._run(str(bin_dir / "initdb"), "-D", str(srv.data_dir), "-U", srv.user, "-A", "trust",
                     "-E", "UTF8", "--no-sync")
        if r.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"initdb failed: {r.stderr.strip()[-800:]}")
        opts = (f"-c listen_addresses=127.0.0.1 -p {srv.port} -k {root} -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        r = srv._run(str(bin_dir / "pg_ctl"), "-D", str(srv.data_dir), "-o", opts, "-l", str(root / "log"),
                     "-w", "-t", "60", "start")
        if r.returncode != 0:
            log = (root / "log").read_text(errors="replace")[-800:] if (root / "log").exists() else ""
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"pg_ctl start failed: {r.stderr.strip()[-400:]} {log}")
        return srv

    def stop(self) -> None:
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop",
                  timeout=60)
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def fresh_database(self, name: str) -> str:
        """A new empty database ``name`` on this server; its URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres",
                             autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"
