"""Database plumbing shared by the journal and the outbox.

One SQLAlchemy ``Base`` so that every durable table (studies, series,
instances, jobs, outbox) lives in one database, addressed by URL: SQLite in WAL
mode by default, PostgreSQL (``postgresql+psycopg://...``) when several nodes
share work.  Modules that define tables import ``Base`` from here; ``create_engine``
sets the SQLite pragmas that make a journal crash-safe.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, sessionmaker


class Base(DeclarativeBase):
    pass


def create_engine(url: str) -> sa.Engine:
    """Create an engine; for SQLite: WAL, synchronous=FULL, a busy timeout."""
    if url.startswith("sqlite:///") and not url.endswith(":memory:"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def make_sessionmaker(engine: sa.Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def create_all(engine: sa.Engine) -> None:
    """Create every table.  Imports the table modules so their classes register."""
    from dicom_node import journal  # noqa: F401
    try:
        from dicom_node import outbox  # noqa: F401
    except ImportError:  # outbox not present in a minimal build
        pass
    from dicom_node import mpps, ups  # noqa: F401  (MPPS and UPS state tables)
    Base.metadata.create_all(engine)
