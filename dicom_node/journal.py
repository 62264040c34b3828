"""The journal: the durable record of every study, instance and job.

Everything the node acknowledges or decides is written here first (short
transactions, one per call), so a crash at any point resumes from the last
completed step: the C-STORE handler records an instance only after its file is
fsynced and renamed into the spool, and answers success only after the commit.

The tables are in :mod:`dicom_node.tables` (one ``Base``, shared with the outbox).
Every change of a study's state is a method here (``complete_study``, ``advance_stage``,
``publish_results``, ``mark_sent`` ...): one transaction, conditional on the state it starts
from, returning whether it happened.  SQLite (WAL, synchronous=FULL) by default; any SQLAlchemy URL works
(PostgreSQL for several nodes).  Job claiming is an ``UPDATE ... WHERE
state='queued'`` checked by row count, which is atomic on both.

No PHI is stored: the patient is kept only as a short SHA-256 prefix of
PatientID (enough to notice two studies of one patient, not to identify them).

Public values are frozen dataclasses (``StudyRecord``, ``InstanceRecord``,
``JobRecord``) so callers never hold ORM objects bound to a closed session.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Optional

import sqlalchemy as sa

from dicom_node import db
from dicom_node.tables import (PROCESS, Instance, Job, JobState, Rejection, Series, Study, StudyState, aware,
                               utcnow)

log = logging.getLogger(__name__)

STUDY_STATES = tuple(s.value for s in StudyState)
JOB_STATES = tuple(s.value for s in JobState)
_aware = aware  # (the name other modules used)

__all__ = ["Journal", "StudyRecord", "InstanceRecord", "JobRecord", "RecordResult", "StudyState", "JobState",
           "STUDY_STATES", "JOB_STATES", "PROCESS", "Study", "Series", "Instance", "Job", "Rejection", "utcnow"]


# ---------------------------------------------------------------------------
# Values handed to callers
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StudyRecord:
    study_uid: str
    state: str
    stage: Optional[str]
    error: Optional[str]
    n_instances: int
    first_received: datetime
    last_received: datetime
    completed_at: Optional[datetime]
    updated_at: datetime
    timings: dict = field(default_factory=dict)
    patient_hash: Optional[str] = None

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k, v in d.items():
            if isinstance(v, datetime):
                d[k] = v.isoformat()
        return d


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: Optional[str]
    transfer_syntax: str
    path: str
    size: int
    received_at: datetime
    calling_aet: Optional[str] = None
    processable: bool = False
    reason: Optional[str] = None
    n_frames: Optional[int] = None
    received_by: Optional[str] = None  # "<node id>:<pid>:<random>" of the receiving process

    @property
    def series_uid(self) -> str:
        return self.series_instance_uid


@dataclass(frozen=True)
class JobRecord:
    id: int
    study_uid: str
    kind: str
    state: str
    attempts: int
    created_at: datetime
    started_at: Optional[datetime]
    finished_at: Optional[datetime]
    error: Optional[str]
    claimed_by: Optional[str] = None  # "<node id>:<pid>:<random>" of the process running it
    lease_until: Optional[datetime] = None  # when another node may take it over


@dataclass(frozen=True)
class RecordResult:
    """What ``record_instance`` did, so the caller can (re)arm the completion timer."""

    new_instance: bool
    new_study: bool
    reopened: bool  # the study had left 'receiving' and is receiving again
    last_received: datetime
    sop_instance_uid: str = ""  # what was recorded (the MPPS watch needs it)


def _study(s: Study) -> StudyRecord:
    return StudyRecord(
        study_uid=s.study_uid, state=s.state, stage=s.stage, error=s.error, n_instances=s.n_instances,
        first_received=_aware(s.first_received), last_received=_aware(s.last_received),
        completed_at=_aware(s.completed_at), updated_at=_aware(s.updated_at), timings=dict(s.timings or {}),
        patient_hash=s.patient_hash,
    )


def _instance(i: Instance) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=i.sop_instance_uid, study_uid=i.study_uid, series_instance_uid=i.series_uid,
        sop_class_uid=i.sop_class_uid, modality=i.modality, transfer_syntax=i.transfer_syntax, path=i.path,
        size=i.size, received_at=_aware(i.received_at), calling_aet=i.calling_aet, processable=i.processable,
        reason=i.reason, n_frames=i.n_frames, received_by=i.received_by,
    )


def _job(j: Job) -> JobRecord:
    return JobRecord(
        id=j.id, study_uid=j.study_uid, kind=j.kind, state=j.state, attempts=j.attempts,
        created_at=_aware(j.created_at), started_at=_aware(j.started_at), finished_at=_aware(j.finished_at),
        error=j.error, claimed_by=j.claimed_by, lease_until=_aware(j.lease_until),
    )


# ---------------------------------------------------------------------------
# The journal
# ---------------------------------------------------------------------------
def _begin_immediate(engine: sa.Engine) -> None:
    """SQLite: take the write lock at BEGIN (the SQLAlchemy pysqlite recipe).

    With Python's default deferred transactions, two threads that both read
    and then write (every ``record_instance``) can fail with "database is
    locked" (a stale WAL snapshot cannot be upgraded to a writer, and
    busy_timeout does not help).  BEGIN IMMEDIATE makes writers queue on the
    busy timeout instead; transactions here are a few milliseconds.
    """

    @sa.event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_conn, _record):  # let SQLAlchemy emit BEGIN itself
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class _NothingToDo(Exception):
    """Roll a transaction back from inside it."""


_RETRYABLE = (sa.exc.IntegrityError, sa.exc.OperationalError)


def _retrying(fn):
    """Retry a write that lost a race (two first instances of one new study on
    two associations both inserting it) or met a transient lock."""

    def wrapper(*args, **kwargs):
        for attempt in range(5):
            try:
                return fn(*args, **kwargs)
            except _RETRYABLE as exc:
                if attempt == 4:
                    raise
                log.debug("journal write retried after %s", exc.__class__.__name__)
                time.sleep(0.01 * (attempt + 1))

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper

class Journal:
    """Thread-safe: every method opens its own short session/transaction."""

    def __init__(self, url: str, owner: Optional[str] = None, lease_s: float = 60.0):
        """``owner`` is this node's id (``node.id``; default the host name): its claims on jobs
        are ``token`` = ``<owner>:<pid>:<random>`` in ``jobs.claimed_by``, leases of ``lease_s``
        seconds that :meth:`renew_leases` extends.  Nodes sharing a journal need distinct ids."""
        self.url = url
        self.owner = owner or socket.gethostname()
        self.token = f"{self.owner}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.lease_s = float(lease_s)
        self.engine = db.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            _begin_immediate(self.engine)
        db.create_all(self.engine)
        self.sessionmaker = db.make_sessionmaker(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- instances ----------------------------------------------------------
    @_retrying
    def record_instance(
        self,
        *,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        modality: Optional[str],
        transfer_syntax: str,
        path: str,
        size: int,
        calling_aet: Optional[str] = None,
        processable: bool = False,
        reason: Optional[str] = None,
        n_frames: Optional[int] = None,
        patient_hash: Optional[str] = None,
        received_at: Optional[datetime] = None,
    ) -> RecordResult:
        """Record one stored instance (idempotent per SOP Instance UID)."""
        now = received_at or utcnow()
        with self.sessionmaker.begin() as s:
            # FOR UPDATE: on PostgreSQL concurrent associations would otherwise
            # lose counter updates (SQLite already serialises at BEGIN IMMEDIATE).
            study = s.get(Study, study_uid, with_for_update=True)
            new_study = study is None
            reopened = False
            if study is None:
                study = Study(study_uid=study_uid, state=StudyState.RECEIVING, n_instances=0, first_received=now,
                              last_received=now, updated_at=now, patient_hash=patient_hash)
                s.add(study)
                s.flush()
            elif study.state != StudyState.RECEIVING:
                reopened = True
                study.state = StudyState.RECEIVING
                study.stage = None
                study.error = None
                s.execute(sa.update(Job).where(Job.study_uid == study_uid, Job.state == JobState.QUEUED)
                          .values(state=JobState.CANCELLED, finished_at=now, error="superseded: study reopened"))
            study.last_received = now
            study.updated_at = now
            if patient_hash and not study.patient_hash:
                study.patient_hash = patient_hash

            series = s.get(Series, series_uid, with_for_update=True)
            if series is None:
                series = Series(series_uid=series_uid, study_uid=study_uid, modality=modality, n_instances=0)
                s.add(series)

            inst = s.get(Instance, sop_instance_uid, with_for_update=True)
            new_instance = inst is None
            if inst is None:
                inst = Instance(sop_instance_uid=sop_instance_uid)
                s.add(inst)
                study.n_instances += 1
                series.n_instances += 1
            elif inst.study_uid != study_uid:
                # The same SOP Instance UID re-sent under another study: move it.
                old = s.get(Study, inst.study_uid, with_for_update=True)
                if old is not None:
                    old.n_instances = max(0, old.n_instances - 1)
                study.n_instances += 1
                series.n_instances += 1
            inst.study_uid = study_uid
            inst.series_uid = series_uid
            inst.sop_class_uid = sop_class_uid
            inst.modality = modality
            inst.transfer_syntax = transfer_syntax
            inst.path = path
            inst.size = size
            inst.n_frames = n_frames
            inst.received_at = now
            inst.calling_aet = calling_aet
            inst.processable = processable
            inst.reason = reason
            inst.received_by = self.token
        return RecordResult(new_instance, new_study, reopened, now, sop_instance_uid)

    def record_rejection(self, *, status: int, reason: str, calling_aet: Optional[str] = None,
                         sop_class_uid: Optional[str] = None, sop_instance_uid: Optional[str] = None) -> None:
        with self.sessionmaker.begin() as s:
            s.add(Rejection(received_at=utcnow(), calling_aet=calling_aet, sop_class_uid=(sop_class_uid or "")[:128],
                            sop_instance_uid=(sop_instance_uid or "")[:128], status=status, reason=reason[:2000]))

    def rejections(self) -> list[dict]:
        with self.sessionmaker() as s:
            rows = s.scalars(sa.select(Rejection).order_by(Rejection.id)).all()
            return [dict(id=r.id, received_at=_aware(r.received_at), calling_aet=r.calling_aet,
                         sop_class_uid=r.sop_class_uid, sop_instance_uid=r.sop_instance_uid,
                         status=r.status, reason=r.reason) for r in rows]

    def study_instances(self, study_uid: str) -> list[InstanceRecord]:
        with self.sessionmaker() as s:
            rows = s.scalars(sa.select(Instance).where(Instance.study_uid == study_uid)
                             .order_by(Instance.series_uid, Instance.received_at)).all()
            return [_instance(i) for i in rows]

    def get_instance(self, sop_instance_uid: str) -> Optional[InstanceRecord]:
        with self.sessionmaker() as s:
            i = s.get(Instance, sop_instance_uid)
            return _instance(i) if i else None

    def count_instances(self) -> int:
        with self.sessionmaker() as s:
            return s.scalar(sa.select(sa.func.count()).select_from(Instance)) or 0

    # -- studies ------------------------------------------------------------
    def get_study(self, study_uid: str) -> Optional[StudyRecord]:
        with self.sessionmaker() as s:
            st = s.get(Study, study_uid)
            return _study(st) if st else None

    def list_studies(self, states: Optional[Iterable[str]] = None) -> list[StudyRecord]:
        with self.sessionmaker() as s:
            q = sa.select(Study).order_by(Study.first_received)
            if states is not None:
                q = q.where(Study.state.in_(list(states)))
            return [_study(x) for x in s.scalars(q).all()]

    def set_study_state(self, study_uid: str, state: str, *, stage: Optional[str] = None,
                        error: Optional[str] = None) -> None:
        """Force a study's state (and stage); ``error`` is cleared unless given.

        Unconditional: for tests and manual repair only.  The node moves studies with the
        transitions below, each conditional on the state it starts from.
        """
        try:
            state = StudyState(state)
        except ValueError:
            raise ValueError(f"unknown study state {state!r}") from None
        with self.sessionmaker.begin() as s:
            st = s.get(Study, study_uid)
            if st is None:
                raise KeyError(study_uid)
            st.state = state
            st.stage = stage
            st.error = error
            st.updated_at = utcnow()
        log.info("study %s -> %s%s", study_uid, state, f" ({stage})" if stage else "")

    # -- transitions: one transaction each, only from the states they name -----
    def _move(self, study_uid: str, from_states, to: StudyState, **values) -> bool:
        with self.sessionmaker.begin() as s:
            res = s.execute(sa.update(Study).where(Study.study_uid == study_uid, Study.state.in_(tuple(from_states)))
                            .values(state=to, updated_at=utcnow(), **values))
            moved = res.rowcount == 1
        if moved:
            log.info("study %s -> %s%s", study_uid, to, f" ({values['stage']})" if values.get("stage") else "")
        return moved

    def mark_sent(self, study_uid: str) -> bool:
        """``reported`` -> ``sent``: every current result landed (not if the study was reopened)."""
        return self._move(study_uid, (StudyState.REPORTED,), StudyState.SENT, stage=None, error=None)

    def mark_delivery_failed(self, study_uid: str, error: str) -> bool:
        """``reported``/``sent`` -> ``failed`` (stage ``outbox``): a result could not be delivered."""
        return self._move(study_uid, (StudyState.REPORTED, StudyState.SENT), StudyState.FAILED,
                          stage="outbox", error=(error or "")[:2000])

    def fail_receiving(self, study_uid: str, stage: str, error: str) -> bool:
        """``receiving`` -> ``failed``: the study can never complete (e.g. its MPPS was discontinued)."""
        return self._move(study_uid, (StudyState.RECEIVING,), StudyState.FAILED, stage=stage,
                          error=(error or "")[:2000])

    def abandon_job(self, job_id: int, study_uid: str, error: str) -> bool:
        """A processing job raised: the job ``failed`` and, unless a late instance reopened the
        study (``receiving``), the study ``failed`` at its current stage (or ``pipeline``), in one
        transaction.  Returns whether the study was failed."""
        error = (error or "")[:2000]
        now = utcnow()
        with self.sessionmaker.begin() as s:
            res = s.execute(sa.update(Job).where(self._my_job(job_id))
                            .values(state=JobState.FAILED, finished_at=now, error=error, lease_until=None))
            if res.rowcount != 1:  # another node took the job over: the study is its business now
                return False
            st = s.get(Study, study_uid, with_for_update=True)
            if st is None or st.state == StudyState.RECEIVING:
                return False
            st.state, st.stage, st.error, st.updated_at = StudyState.FAILED, st.stage or "pipeline", error, now
        log.info("study %s -> failed (%s)", study_uid, st.stage)
        return True

    def resume_delivery(self, study_uid: str, requeue: Callable[[Any], int],
                        from_states=(StudyState.FAILED, StudyState.REPORTED, StudyState.SENT),
                        stage: Optional[str] = None) -> Optional[int]:
        """Deliver a study's results again: back to ``reported`` (stage ``outbox``) and
        ``requeue(session)`` (the outbox's rows) in one transaction, only from ``from_states``
        (and ``stage``, when given).  Returns the number of rows re-queued; 0 changes nothing
        (no result to send), None when the study is unknown or not in those states."""
        try:
            with self.sessionmaker.begin() as s:
                st = s.get(Study, study_uid, with_for_update=True)
                if st is None or st.state not in from_states or (stage is not None and st.stage != stage):
                    return None
                st.state, st.stage, st.error, st.updated_at = StudyState.REPORTED, "outbox", None, utcnow()
                n = requeue(s)
                if not n:
                    raise _NothingToDo
        except _NothingToDo:  # rolled back
            return 0
        log.info("study %s -> reported (outbox): %d result(s) re-queued", study_uid, n)
        return n

    def advance_stage(self, study_uid: str, stage: str, first: bool = True) -> bool:
        """Move a study being processed to ``stage`` (state ``processing``).

        The ``first`` stage of a job starts from ``waiting`` (or ``processing``, a
        job re-queued after a crash); every later stage only from ``processing``.
        A study that a late instance has reopened (``receiving``), and perhaps
        already completed again (``waiting``, a new job queued), is left alone and
        False is returned, so the running pipeline stops instead of publishing
        results of half the study before the new job runs.  So is a study whose job another
        node has taken over (this process stalled past its lease).
        """
        states = (StudyState.WAITING, StudyState.PROCESSING) if first else (StudyState.PROCESSING,)
        with self.sessionmaker.begin() as s:
            if self._fenced(s, study_uid):  # another node took the job over: this runner stops
                return False
            res = s.execute(sa.update(Study).where(Study.study_uid == study_uid,
                                                   Study.state.in_(states))
                            .values(state=StudyState.PROCESSING, stage=stage, error=None, updated_at=utcnow()))
            return res.rowcount == 1

    def fail_processing(self, study_uid: str, stage: str, error: str) -> bool:
        """``failed`` with stage and error, unless the study was reopened meanwhile (or another
        node took its job over)."""
        with self.sessionmaker.begin() as s:
            if self._fenced(s, study_uid):
                return False
            res = s.execute(sa.update(Study).where(Study.study_uid == study_uid,
                                                   Study.state.in_((StudyState.WAITING, StudyState.PROCESSING)))
                            .values(state=StudyState.FAILED, stage=stage, error=error, updated_at=utcnow()))
            return res.rowcount == 1

    def _fenced(self, s, study_uid: str) -> Optional[str]:
        """The claim of another process on the study's running process job when this process
        holds none (its lease expired while it stalled and another node took the job over): then
        nothing this process concludes about the study may be written.  None otherwise."""
        running = s.scalars(sa.select(Job.claimed_by).where(
            Job.study_uid == study_uid, Job.kind == PROCESS, Job.state == JobState.RUNNING)).all()
        if running and self.token not in running:
            return running[0] or "(unknown)"
        return None

    def _my_job(self, job_id: int):
        """The job, while this process holds it (or nobody does: a release before leases)."""
        return sa.and_(Job.id == job_id, sa.or_(Job.claimed_by == self.token, Job.claimed_by.is_(None)))

    def publish_results(self, study_uid: str, in_transaction=None) -> bool:
        """Finish a study's processing in ONE commit: state ``reported``, the running
        process job ``done``, and whatever ``in_transaction(session)`` adds (the
        outbox rows).  Returns False, changing nothing, when the study is no longer
        ``processing`` (a late instance reopened it: these results are stale and a
        new processing follows).  A crash before the commit leaves the job running
        (re-queued at restart, nothing sent); after it, nothing is re-processed.
        """
        now = utcnow()
        with self.sessionmaker.begin() as s:
            st = s.get(Study, study_uid, with_for_update=True)
            if st is None or st.state != StudyState.PROCESSING:
                return False
            other = self._fenced(s, study_uid)
            if other:  # another node took the job over: its results, not these, are the study's
                log.warning("study %s: not publishing, its job is now %s's", study_uid, other)
                return False
            st.state = StudyState.REPORTED
            st.stage = "outbox"
            st.error = None
            st.updated_at = now
            s.execute(sa.update(Job).where(Job.study_uid == study_uid, Job.kind == PROCESS,
                                           Job.state == JobState.RUNNING,
                                           sa.or_(Job.claimed_by == self.token, Job.claimed_by.is_(None)))
                      .values(state=JobState.DONE, finished_at=now,
                                                                          error=None))
            if in_transaction is not None:
                in_transaction(s)
        log.info("study %s -> reported (outbox)", study_uid)
        return True

    def set_study_timings(self, study_uid: str, timings: dict) -> None:
        """Merge per-stage timings (seconds) into the study's record."""
        with self.sessionmaker.begin() as s:
            st = s.get(Study, study_uid, with_for_update=True)
            if st is None:
                raise KeyError(study_uid)
            merged = dict(st.timings or {})
            merged.update({k: float(v) for k, v in timings.items()})
            st.timings = merged

    def complete_study(self, study_uid: str, quiet_seconds: float,
                       now: Optional[datetime] = None) -> "bool | datetime":
        """Declare a study complete if it has been quiet long enough.

        Returns ``True`` when it was completed now (state ``waiting``, one
        ``process`` job queued), ``False`` when there is nothing to do, or the
        time at which to check again (an instance arrived meanwhile).
        """
        now = now or utcnow()
        with self.sessionmaker.begin() as s:
            st = s.get(Study, study_uid, with_for_update=True)
            if st is None:
                return False
            due = _aware(st.last_received) + timedelta(seconds=quiet_seconds)
            if due > now:
                return due
            if st.state != StudyState.RECEIVING:
                # The pipeline may have overwritten a reopened study's state;
                # process again if something arrived after the last job.
                last_job = s.scalar(sa.select(sa.func.max(Job.created_at))
                                    .where(Job.study_uid == study_uid, Job.kind == PROCESS))
                if last_job is not None and _aware(last_job) >= _aware(st.last_received):
                    return False
            st.state = StudyState.WAITING
            st.stage = None
            st.error = None
            st.completed_at = now
            st.updated_at = now
            self._enqueue(s, study_uid, PROCESS, now)
        log.info("study %s complete (quiet %gs): queued for processing", study_uid, quiet_seconds)
        return True

    def retry_study(self, study_uid: str) -> JobRecord:
        """Re-queue a study's processing (after a failure, or to re-process it)."""
        now = utcnow()
        with self.sessionmaker.begin() as s:
            st = s.get(Study, study_uid, with_for_update=True)
            if st is None:
                raise KeyError(study_uid)
            st.state = StudyState.WAITING
            st.stage = None
            st.error = None
            st.updated_at = now
            job = self._enqueue(s, study_uid, PROCESS, now)
            return _job(job)

    # -- jobs ---------------------------------------------------------------
    @staticmethod
    def _enqueue(s, study_uid: str, kind: str, now: datetime) -> Job:
        existing = s.scalars(sa.select(Job).where(Job.study_uid == study_uid, Job.kind == kind,
                                                  Job.state == JobState.QUEUED)).first()
        if existing is not None:
            return existing
        job = Job(study_uid=study_uid, kind=kind, state=JobState.QUEUED, attempts=0, created_at=now)
        s.add(job)
        s.flush()
        return job

    def enqueue_job(self, study_uid: str, kind: str = PROCESS) -> JobRecord:
        """Queue a job (a study has at most one queued job per kind)."""
        with self.sessionmaker.begin() as s:
            s.get(Study, study_uid, with_for_update=True)  # serialise the queued-job check per study
            return _job(self._enqueue(s, study_uid, kind, utcnow()))

    def _lease(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.lease_s)

    def _expired_job(self, now: datetime):
        """A running job whose runner stopped renewing its lease (a dead node's); a job claimed by
        a release without leases counts from its start."""
        return sa.and_(Job.state == JobState.RUNNING, sa.or_(
            Job.lease_until < now,
            sa.and_(Job.lease_until.is_(None), Job.started_at < now - timedelta(seconds=self.lease_s))))

    def claim_job(self, kind: str = PROCESS) -> Optional[JobRecord]:
        """Atomically take the oldest queued job, or a dead node's whose lease expired
        (-> running, claimed by :attr:`token` with a lease), or None.

        On PostgreSQL the candidate row is locked ``FOR UPDATE SKIP LOCKED``, so nodes claiming
        at the same moment take different jobs instead of queueing on one row; SQLite's
        ``BEGIN IMMEDIATE`` serialises claims anyway.  The update re-checks the condition, so a
        job is never claimed twice.
        """
        while True:
            now = utcnow()
            claimable = sa.and_(Job.kind == kind, sa.or_(Job.state == JobState.QUEUED, self._expired_job(now)))
            with self.sessionmaker.begin() as s:
                row = s.execute(sa.select(Job.id, Job.state, Job.claimed_by).where(claimable).order_by(Job.id)
                                .limit(1).with_for_update(skip_locked=True)).first()
                if row is None:
                    return None
                res = s.execute(sa.update(Job).where(Job.id == row.id, claimable)
                                .values(state=JobState.RUNNING, started_at=now, attempts=Job.attempts + 1,
                                        claimed_by=self.token, lease_until=self._lease(now)))
                if res.rowcount == 1:
                    if row.state == JobState.RUNNING:
                        log.warning("took over job %d of study %s: its runner (%s) stopped renewing its lease",
                                    row.id, s.get(Job, row.id).study_uid, row.claimed_by)
                    return _job(s.get(Job, row.id))
            # another worker (or node) took it first: try the next one

    def renew_leases(self) -> int:
        """Extend the leases of the jobs this process runs (the node calls this every
        ``lease_s / 3``); returns how many."""
        now = utcnow()
        with self.sessionmaker.begin() as s:
            res = s.execute(sa.update(Job).where(Job.claimed_by == self.token, Job.state == JobState.RUNNING)
                            .values(lease_until=self._lease(now)))
            return res.rowcount or 0

    def holds_job(self, job_id: int) -> bool:
        """Whether this process still holds ``job_id`` (running, claimed by :attr:`token`)."""
        with self.sessionmaker() as s:
            j = s.get(Job, job_id)
            return j is not None and j.state == JobState.RUNNING and j.claimed_by == self.token

    def finish_job(self, job_id: int) -> bool:
        """``done`` -- unless another node has taken the job over (returns False)."""
        with self.sessionmaker.begin() as s:
            res = s.execute(sa.update(Job).where(self._my_job(job_id))
                            .values(state=JobState.DONE, finished_at=utcnow(), error=None, lease_until=None))
            return res.rowcount == 1

    def fail_job(self, job_id: int, error: str) -> bool:
        """``failed`` -- unless another node has taken the job over (returns False)."""
        with self.sessionmaker.begin() as s:
            res = s.execute(sa.update(Job).where(self._my_job(job_id))
                            .values(state=JobState.FAILED, finished_at=utcnow(), error=(error or "")[:4000],
                                    lease_until=None))
            return res.rowcount == 1

    def get_job(self, job_id: int) -> Optional[JobRecord]:
        with self.sessionmaker() as s:
            j = s.get(Job, job_id)
            return _job(j) if j else None

    def jobs(self, study_uid: Optional[str] = None, state: Optional[str] = None) -> list[JobRecord]:
        with self.sessionmaker() as s:
            q = sa.select(Job).order_by(Job.id)
            if study_uid is not None:
                q = q.where(Job.study_uid == study_uid)
            if state is not None:
                q = q.where(Job.state == state)
            return [_job(j) for j in s.scalars(q).all()]

    def mine(self, column):
        """Claims of this node id by any of its processes (``<owner>:...``; a bare ``<owner>`` or
        NULL: a release before leases) -- at start-up, a dead earlier process's."""
        return sa.or_(column == self.owner, column.startswith(self.owner + ":", autoescape=True),
                      column.is_(None))

    def requeue_running_jobs(self) -> int:
        """At start-up: jobs an earlier process of this node id left 'running' go back to
        'queued' (another node's are left alone: they are taken over when their lease expires)."""
        with self.sessionmaker.begin() as s:
            mine = self.mine(Job.claimed_by)
            studies = s.scalars(sa.select(Job.study_uid).where(Job.state == JobState.RUNNING, mine)).all()
            res = s.execute(sa.update(Job).where(Job.state == JobState.RUNNING, mine)
                            .values(state=JobState.QUEUED, started_at=None, claimed_by=None, lease_until=None))
            n = res.rowcount or 0
            # Their studies were mid-processing; they wait again.
            if studies:
                s.execute(sa.update(Study).where(Study.study_uid.in_(set(studies)), Study.state == StudyState.PROCESSING)
                          .values(state=StudyState.WAITING, stage=None, updated_at=utcnow()))
        return n
