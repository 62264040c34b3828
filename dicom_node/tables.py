"""The node's durable tables, its state names and its one UTC convention.

Every table lives on one SQLAlchemy ``Base`` so that studies, series, instances, jobs,
rejections and the outbox (and the MPPS/UPS tables of :mod:`dicom_node.mpps` and
:mod:`dicom_node.ups`) share one database.  This module imports nothing of the node's:
:mod:`dicom_node.db` imports it (and the MPPS/UPS modules) to create the tables, and the
journal, the outbox and the web pages read the tables from here.

States are ``str``-valued enums, so what is stored (and printed by ``cag-node studies --json``)
is the same plain string as before.  A study and an outbox row have separate enums: both have
a ``sent`` and a ``failed``, which mean different things (the study: every result delivered /
the study could not be processed or delivered; a row: that object landed / gave up).

Time: every datetime the node handles is timezone-aware UTC (:func:`utcnow`).  Columns are
:class:`UTCDateTime`, which stores UTC (naive UTC in the outbox's older ``timestamp without
time zone`` columns, so existing databases keep their schema) and always reads back aware UTC.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


def utcnow() -> datetime:
    """Now, timezone-aware UTC: the node's one convention."""
    return datetime.now(timezone.utc)


def aware(t: Optional[datetime]) -> Optional[datetime]:
    """``t`` as aware UTC (a naive value is UTC: SQLite returns datetimes without a zone)."""
    if t is None:
        return None
    return t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)


class UTCDateTime(sa.types.TypeDecorator):
    """A datetime column holding UTC; values go in aware (naive ones are taken as UTC) and come
    out aware UTC.  ``timezone=False`` stores naive UTC (the outbox's existing columns)."""

    impl = sa.DateTime
    cache_ok = True

    def __init__(self, timezone: bool = True):
        super().__init__(timezone=timezone)

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = aware(value)
        return value if self.impl.timezone else value.replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return aware(value)


class _State(str, enum.Enum):
    """A state stored and printed as its plain string value."""

    def __str__(self) -> str:
        return self.value


class StudyState(_State):
    """A study's lifecycle (docs/architecture.md draws it)."""

    RECEIVING = "receiving"    # instances arriving; completion timer armed
    WAITING = "waiting"        # complete (quiet period or MPPS); a process job is queued
    PROCESSING = "processing"  # a worker runs the pipeline (``stage`` names the step)
    REPORTED = "reported"      # SR/KOS written and in the outbox (stage ``outbox``)
    SENT = "sent"              # every current result delivered to every destination
    FAILED = "failed"          # processing or delivery failed (``stage`` and ``error`` say where)


class JobState(_State):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    # a queued job superseded because its study was reopened by a late instance before any
    # worker took it (the next completion queues a fresh one)
    CANCELLED = "cancelled"


class OutboxState(_State):
    """One (object, destination) row of the outbox (:mod:`dicom_node.outbox` draws its moves)."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # an older result of a re-processed study: never sent


PROCESS = "process"  # the job kind that runs the pipeline


class StateColumn(sa.types.TypeDecorator):
    """A state column of ``enum_cls``: stored as the plain string value (so the database holds
    exactly what it held before the enums, and any driver binds it), read back as the enum."""

    impl = sa.String(16)
    cache_ok = True

    def __init__(self, enum_cls: type[enum.Enum]):
        super().__init__()
        self.enum_cls = enum_cls

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        return self.enum_cls(value).value  # an unknown state is refused (ValueError)

    def process_result_value(self, value, dialect):
        return None if value is None else self.enum_cls(value)


# ---------------------------------------------------------------------------
# The journal's tables
# ---------------------------------------------------------------------------
class Study(Base):
    __tablename__ = "studies"

    study_uid: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    state: Mapped[StudyState] = mapped_column(StateColumn(StudyState), index=True, default=StudyState.RECEIVING)
    stage: Mapped[Optional[str]] = mapped_column(sa.String(32), nullable=True)
    error: Mapped[Optional[str]] = mapped_column(sa.Text, nullable=True)
    n_instances: Mapped[int] = mapped_column(sa.Integer, default=0)
    first_received: Mapped[datetime] = mapped_column(UTCDateTime())
    last_received: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    timings: Mapped[Optional[dict]] = mapped_column(sa.JSON, nullable=True)
    patient_hash: Mapped[Optional[str]] = mapped_column(sa.String(16), nullable=True)


class Series(Base):
    __tablename__ = "series"

    series_uid: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    study_uid: Mapped[str] = mapped_column(sa.String(128), sa.ForeignKey("studies.study_uid"), index=True)
    modality: Mapped[Optional[str]] = mapped_column(sa.String(16), nullable=True)
    n_instances: Mapped[int] = mapped_column(sa.Integer, default=0)


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    study_uid: Mapped[str] = mapped_column(sa.String(128), sa.ForeignKey("studies.study_uid"), index=True)
    series_uid: Mapped[str] = mapped_column(sa.String(128), index=True)
    sop_class_uid: Mapped[str] = mapped_column(sa.String(128))
    modality: Mapped[Optional[str]] = mapped_column(sa.String(16), nullable=True)
    transfer_syntax: Mapped[str] = mapped_column(sa.String(128))
    path: Mapped[str] = mapped_column(sa.Text)
    size: Mapped[int] = mapped_column(sa.BigInteger)
    n_frames: Mapped[Optional[int]] = mapped_column(sa.Integer, nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    calling_aet: Mapped[Optional[str]] = mapped_column(sa.String(16), nullable=True)
    processable: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    reason: Mapped[Optional[str]] = mapped_column(sa.Text, nullable=True)
    # the process that acknowledged it ("<node id>:<pid>:<random>", Journal.token): which node,
    # which receiver process (node.processes), for an operator tracing a study across nodes
    received_by: Mapped[Optional[str]] = mapped_column(sa.String(255), nullable=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(sa.String(128), index=True)
    kind: Mapped[str] = mapped_column(sa.String(16), default=PROCESS)
    state: Mapped[JobState] = mapped_column(StateColumn(JobState), index=True, default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[Optional[str]] = mapped_column(sa.Text, nullable=True)
    # Which node process runs it ("<node id>:<pid>:<random>", Journal.token): at start-up a node
    # re-queues only its own node id's running jobs; another node takes one over only once its
    # lease has expired (the runner renews it every lease_s/3 while alive).
    claimed_by: Mapped[Optional[str]] = mapped_column(sa.String(255), nullable=True)
    lease_until: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(), nullable=True)


class Rejection(Base):
    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    calling_aet: Mapped[Optional[str]] = mapped_column(sa.String(16), nullable=True)
    sop_class_uid: Mapped[Optional[str]] = mapped_column(sa.String(128), nullable=True)
    # As sent by the peer (possibly hostile), truncated; never used as a path.
    sop_instance_uid: Mapped[Optional[str]] = mapped_column(sa.String(128), nullable=True)
    status: Mapped[int] = mapped_column(sa.Integer)
    reason: Mapped[str] = mapped_column(sa.Text)



# ---------------------------------------------------------------------------
# The outbox's table
# ---------------------------------------------------------------------------
class OutboxRow(Base):
    """One object to deliver to one destination."""

    __tablename__ = "outbox"
    __table_args__ = (sa.UniqueConstraint("sop_instance_uid", "destination", name="uq_outbox_object_dest"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(sa.String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(sa.String(64))
    path: Mapped[str] = mapped_column(sa.Text)
    destination: Mapped[str] = mapped_column(sa.String(64))
    state: Mapped[OutboxState] = mapped_column(StateColumn(OutboxState), index=True, default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(timezone=False), default=utcnow)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime(timezone=False), default=utcnow)  # horizon starts here
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(timezone=False), default=utcnow, index=True)
    last_attempt_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(timezone=False), nullable=True)
    sent_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(timezone=False), nullable=True)
    last_status: Mapped[Optional[int]] = mapped_column(sa.Integer, nullable=True)
    last_error: Mapped[Optional[str]] = mapped_column(sa.Text, nullable=True)
    claimed_by: Mapped[Optional[str]] = mapped_column(sa.String(128), nullable=True)
    # a ``sending`` row whose lease has passed belongs to a dead node: any node may take it over
    lease_until: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(timezone=False), nullable=True)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return (f"OutboxRow({self.sop_instance_uid} -> {self.destination}: {self.state}, "
                f"attempts={self.attempts}, error={self.last_error!r})")
