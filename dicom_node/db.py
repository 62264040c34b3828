"""Database plumbing shared by the journal and the outbox.

Every durable table (studies, series, instances, jobs, outbox, MPPS, UPS) is on the one
``Base`` of :mod:`dicom_node.tables` and lives in one database, addressed by URL: SQLite in WAL
mode by default, PostgreSQL (``postgresql+psycopg://...``) when several nodes share work.
``create_engine`` sets the SQLite pragmas that make a journal crash-safe; ``create_all`` creates
the tables of the modules imported here (none of them imports this module back).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from dicom_node import mpps, ups  # noqa: F401  (their tables: MPPS and UPS state)
from dicom_node.tables import Base


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
    """Create every table (those of the modules imported above), then add the nullable columns
    a journal made by an older release lacks (``add_missing_columns``)."""
    Base.metadata.create_all(engine)
    add_missing_columns(engine)


def add_missing_columns(engine: sa.Engine) -> list[str]:
    """``ALTER TABLE ... ADD COLUMN`` for every nullable column of ``Base`` that an existing
    table lacks (columns are only ever added, nullable, so an old journal opens as it was and
    its rows read NULL there).  Returns ``table.column`` for each column added."""
    added: list[str] = []
    with engine.begin() as conn:  # one connection: SQLite's BEGIN IMMEDIATE would lock out a second
        insp = sa.inspect(conn)
        for table in Base.metadata.sorted_tables:
            if not insp.has_table(table.name):
                continue
            have = {c["name"] for c in insp.get_columns(table.name)}
            for col in table.columns:
                if col.name in have:
                    continue
                if not col.nullable:
                    raise RuntimeError(f"journal table {table.name} lacks the required column {col.name}; "
                                       "it was made by an incompatible release")
                ddl = col.type.compile(dialect=engine.dialect)
                conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN {col.name} {ddl}')
                added.append(f"{table.name}.{col.name}")
    return added
