"""The outbox: results (SR, KOS) journalled per destination and sent until they land.

Every (object, destination) pair is one row of the ``outbox`` table (on the
shared ``Base`` of :mod:`dicom_node.tables`).  A row moves::

    pending ──claim──▶ sending ──peer says success/warning──▶ sent
       ▲                  │──retryable failure──▶ pending (next_attempt_at = now + backoff)
       └── retry_study ◀──┴──permanent failure, or retryable after horizon_s──▶ failed

* Backoff is exponential with jitter: ``min(retry_max_s, retry_base_s * 2**(attempts-1))``
  scaled by a random factor in [0.5, 1].
* A row is claimed (``sending``) in its own committed transaction before the
  network send, and marked ``sent`` in the transaction that follows the peer's
  success response — before the next file is sent.
* A claim is a lease (``lease_until``) that the claiming process renews every third of
  ``node.lease_s`` while it sends.  A row left ``sending`` by a crash of this node is made
  ``pending`` again by :meth:`Outbox.start` (:meth:`Outbox.recover`); one left by another node
  (several nodes on one PostgreSQL journal, docs/scale-out.md) only once its lease has expired,
  when any node's pass takes it over.  A live node's sends are never taken.

Delivery guarantee: **at-least-once on the network, exactly one journal row per
(object, destination)**.  If the node dies after the peer stored an object but
before the ``sent`` commit, the object is sent again after the restart; a PACS
keys instances by SOP Instance UID, so the second C-STORE replaces (or is
ignored as) the same instance and the study holds it exactly once.

With no destination configured, :meth:`Outbox.enqueue` does nothing and
``on_study_sent`` is never called: the study stays ``reported`` (results are on
disk, nothing to deliver).  Add a destination and call :meth:`Outbox.enqueue`
again (or re-run the study) to send them.

Who calls what: the pipeline calls :meth:`enqueue` for the SR and the KOS; the
node passes its APScheduler to :meth:`start`, whose interval job (every
``outbox.poll_s``) runs :meth:`process_due`; ``on_study_sent(study_uid)`` fires once
when every row of a study is ``sent`` (the node marks the study ``sent``), and
``on_study_failed(study_uid, error)`` when nothing is left to try and a row failed.
The CLI uses :func:`retry_study_db` without a running node.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import random
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from dicom_node import scu
from dicom_node.config import Config, Destination
from dicom_node.tables import OutboxRow, OutboxState, utcnow

log = logging.getLogger(__name__)

PENDING = OutboxState.PENDING
SENDING = OutboxState.SENDING
SENT = OutboxState.SENT
FAILED = OutboxState.FAILED
SUPERSEDED = OutboxState.SUPERSEDED  # an older result of a re-processed study: never sent
STATES = tuple(OutboxState)


def create_table(engine: sa.Engine) -> None:
    """Create only the outbox table (when the journal's tables are not wanted)."""
    OutboxRow.__table__.create(engine, checkfirst=True)


def backoff_s(attempts: int, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempts + 1``: exponential, capped, with jitter in [0.5, 1]."""
    delay = min(maximum, base * (2 ** max(0, attempts - 1)))
    return delay * (rng or random).uniform(0.5, 1.0)


def requeue_failed(session, study_uid: str) -> int:
    """In ``session``: a study's failed (and waiting) rows pending now, attempts and horizon
    from zero; returns how many."""
    now = utcnow()
    rows = session.scalars(sa.select(OutboxRow).where(
        OutboxRow.study_uid == study_uid, OutboxRow.state.in_((FAILED, PENDING)))).all()
    for r in rows:
        r.state = PENDING
        r.attempts = 0
        r.queued_at = now
        r.next_attempt_at = now
        r.claimed_by = None
    return len(rows)


def retry_study_db(session_factory: sessionmaker, study_uid: str) -> int:
    """Re-queue a study's failed (and waiting) rows now; usable without a running node.

    Returns the number of rows re-queued (0: nothing to retry or unknown study).
    The horizon starts again from now.
    """
    with session_factory() as s, s.begin():
        return requeue_failed(s, study_uid)


def resend_study_db(session_factory: sessionmaker, study_uid: str) -> int:
    """Send a study's current results again, including ones already ``sent`` (a PACS
    lost them); superseded results stay unsent and rows being sent are left alone.
    Returns the number of rows queued.  Delivery is the outbox's usual path.
    """
    with session_factory() as s, s.begin():
        return requeue_current(s, study_uid)


def requeue_current(session, study_uid: str) -> int:
    """In ``session``: every current (not superseded, not being sent) row of a study pending now."""
    now = utcnow()
    rows = session.scalars(sa.select(OutboxRow).where(
        OutboxRow.study_uid == study_uid, OutboxRow.state.in_((SENT, FAILED, PENDING)))).all()
    for r in rows:
        r.state, r.attempts, r.queued_at, r.next_attempt_at, r.claimed_by = PENDING, 0, now, now, None
        r.sent_at = None
    return len(rows)


class Outbox:
    """Journalled, retried delivery of result objects to every configured destination."""

    def __init__(
        self,
        config: Config,
        session_factory: sessionmaker,
        on_study_sent: Optional[Callable[[str], None]] = None,
        *,
        on_study_failed: Optional[Callable[[str, str], None]] = None,
        claim_timeout_s: Optional[float] = None,
        rng: Optional[random.Random] = None,
    ):
        if not isinstance(config, Config):
            raise TypeError(f"config: expected dicom_node.config.Config, got {type(config).__name__}")
        self.config = config
        self.session_factory = session_factory
        self.on_study_sent = on_study_sent
        self.on_study_failed = on_study_failed
        # the lease of a claim: renewed every third of it while the claimant lives
        self.claim_timeout_s = float(claim_timeout_s if claim_timeout_s is not None else config.node.lease_s)
        self.node_id = config.node_id
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._scheduler = None
        self._job_id = f"outbox-{uuid.uuid4().hex[:8]}"
        self._token = f"{self.node_id}:{os.getpid()}:{self._job_id}"

    # ------------------------------------------------------------------ config
    @property
    def destinations(self) -> dict[str, Destination]:
        return {d.name: d for d in self.config.destinations}

    # ------------------------------------------------------------------ queue
    def enqueue(self, study_uid: str, sop_instance_uid: str, path: str | Path) -> list[int]:
        """One ``pending`` row per configured destination (idempotent per object and destination).

        Returns the row ids.  An existing ``failed`` row is re-queued; a ``sent``
        one is left alone.  No destinations: returns [] (the study stays reported).
        """
        with self.session_factory() as s, s.begin():
            return self.enqueue_in(s, study_uid, [(sop_instance_uid, path)])

    def enqueue_in(self, session, study_uid: str, items: Sequence[tuple[str, str | Path]],
                   supersede: bool = False) -> list[int]:
        """``enqueue`` inside the caller's transaction (the pipeline publishes a study's
        results, its ``reported`` state and its job's completion in one commit).

        ``supersede``: older rows of the study that were not sent yet (a previous
        result of a re-processed study) become ``superseded`` and are never sent,
        so a PACS never receives two AI reports for one processing of a study.
        """
        for name, v in [("study_uid", study_uid)] + [("sop_instance_uid", u) for u, _ in items]:
            if not v or len(v) > 64:
                raise ValueError(f"{name}: must be a DICOM UID, got {v!r}")
        if not self.config.destinations:
            log.warning("no destinations configured: results of study %s are not sent", study_uid)
            return []
        now = utcnow()
        new_uids = {u for u, _ in items}
        if supersede:
            session.execute(sa.update(OutboxRow).where(
                OutboxRow.study_uid == study_uid, OutboxRow.state.in_((PENDING, FAILED)),
                OutboxRow.sop_instance_uid.not_in(new_uids)).values(state=SUPERSEDED, claimed_by=None))
        ids = []
        for sop_instance_uid, path in items:
            path = str(Path(path).resolve())
            for dest in self.config.destinations:
                row = session.scalars(sa.select(OutboxRow).where(
                    OutboxRow.sop_instance_uid == sop_instance_uid,
                    OutboxRow.destination == dest.name)).first()
                if row is None:
                    row = OutboxRow(study_uid=study_uid, sop_instance_uid=sop_instance_uid, path=path,
                                    destination=dest.name, state=PENDING, attempts=0, created_at=now,
                                    queued_at=now, next_attempt_at=now)
                    session.add(row)
                    session.flush()
                elif row.state == FAILED:
                    row.state, row.attempts, row.queued_at, row.next_attempt_at = PENDING, 0, now, now
                    row.path = path
                ids.append(row.id)
        return ids

    def rows_for(self, study_uid: str) -> list[OutboxRow]:
        """The study's rows (detached snapshots), oldest first."""
        with self.session_factory() as s:
            rows = s.scalars(sa.select(OutboxRow).where(OutboxRow.study_uid == study_uid)
                             .order_by(OutboxRow.id)).all()
            s.expunge_all()
            return list(rows)

    def study_state(self, study_uid: str) -> Optional[str]:
        """``sent`` (all rows sent), ``failed`` (none left to try, one failed), ``pending``, or None."""
        return _study_state([r.state for r in self.rows_for(study_uid)])

    def counts(self) -> dict[str, int]:
        """Rows per state (for metrics and the admin page)."""
        with self.session_factory() as s:
            got = dict(s.execute(sa.select(OutboxRow.state, sa.func.count()).group_by(OutboxRow.state)).all())
        return {state: int(got.get(state, 0)) for state in STATES}

    def retry_study(self, study_uid: str) -> int:
        """Re-queue the study's failed rows (and make waiting ones due now)."""
        return retry_study_db(self.session_factory, study_uid)

    # ------------------------------------------------------------------ lifecycle
    def _mine(self):
        """Claims by any process of this node id (or by nobody: a release before node ids)."""
        c = OutboxRow.claimed_by
        return sa.or_(c.is_(None), c == self.node_id, c.startswith(self.node_id + ":", autoescape=True))

    def _stale(self, now: _dt.datetime):
        """A ``sending`` row whose claimant stopped renewing its lease (a claim made before
        leases counts from its attempt)."""
        return sa.and_(OutboxRow.state == SENDING, sa.or_(
            OutboxRow.lease_until < now,
            sa.and_(OutboxRow.lease_until.is_(None),
                    OutboxRow.last_attempt_at < now - _dt.timedelta(seconds=self.claim_timeout_s))))

    def recover(self) -> int:
        """At start-up: rows an earlier process of this node left ``sending`` (a crash) are
        ``pending`` again, and so are other nodes' whose lease expired; a live node's
        in-flight sends are left alone.  Returns how many."""
        now = utcnow()
        with self.session_factory() as s, s.begin():
            res = s.execute(sa.update(OutboxRow).where(
                OutboxRow.state == SENDING,
                sa.or_(OutboxRow.claimed_by.is_(None), OutboxRow.claimed_by != self._token),
                sa.or_(self._mine(), self._stale(now)))
                .values(state=PENDING, claimed_by=None, lease_until=None, next_attempt_at=now)
                .execution_options(synchronize_session=False))
            n = res.rowcount or 0
        if n:
            log.info("outbox: %d row(s) left sending by an earlier run are pending again", n)
        return n

    def renew(self) -> int:
        """Extend the leases of the rows this process is sending; returns how many."""
        now = utcnow()
        with self.session_factory() as s, s.begin():
            res = s.execute(sa.update(OutboxRow).where(OutboxRow.state == SENDING,
                                                       OutboxRow.claimed_by == self._token)
                            .values(lease_until=now + _dt.timedelta(seconds=self.claim_timeout_s))
                            .execution_options(synchronize_session=False))
            return res.rowcount or 0

    def start(self, scheduler) -> None:
        """Recover, then run :meth:`process_due` every ``outbox.poll_s`` on ``scheduler``, and
        :meth:`renew` every third of the lease."""
        self._stopping.clear()
        self.recover()
        self._scheduler = scheduler
        scheduler.add_job(self._job, "interval", seconds=self.config.outbox.poll_s, id=self._job_id,
                          max_instances=1, coalesce=True, next_run_time=_dt.datetime.now(),
                          replace_existing=True)
        scheduler.add_job(self._renew_job, "interval", seconds=max(0.5, self.claim_timeout_s / 3),
                          id=self._job_id + "-renew", max_instances=1, coalesce=True, replace_existing=True)

    def stop(self) -> None:
        """Stop the job; a pass in progress stops after the file it is sending."""
        self._stopping.set()
        if self._scheduler is not None:
            for job_id in (self._job_id, self._job_id + "-renew"):
                try:
                    self._scheduler.remove_job(job_id)
                except Exception:  # already gone / scheduler shut down
                    pass
            self._scheduler = None
        with self._lock:  # wait for a running pass to finish
            pass

    def _job(self) -> None:
        try:
            self.process_due()
        except Exception:  # never kill the scheduler thread
            log.exception("outbox pass failed")

    def _renew_job(self) -> None:
        try:
            self.renew()
        except Exception:
            log.exception("outbox lease renewal failed")

    # ------------------------------------------------------------------ sending
    def process_due(self) -> int:
        """Send every row that is due; returns the number of rows attempted."""
        with self._lock:
            return self._process_due()

    def _claim(self) -> dict[str, list[OutboxRow]]:
        now = utcnow()
        lease = now + _dt.timedelta(seconds=self.claim_timeout_s)
        by_dest: dict[str, list[OutboxRow]] = defaultdict(list)
        with self.session_factory() as s, s.begin():
            # PostgreSQL: rows another node is claiming right now are skipped, not waited for
            rows = s.scalars(sa.select(OutboxRow).where(sa.or_(
                sa.and_(OutboxRow.state == PENDING, OutboxRow.next_attempt_at <= now),
                self._stale(now),
            )).order_by(OutboxRow.id).with_for_update(skip_locked=True)).all()
            for r in rows:
                if r.state == SENDING:
                    log.warning("outbox: taking over %s to %s: its sender (%s) stopped renewing its lease",
                                r.sop_instance_uid, r.destination, r.claimed_by)
                # conditional claim: safe when several nodes share the database
                res = s.execute(sa.update(OutboxRow).where(
                    OutboxRow.id == r.id, OutboxRow.state == r.state,
                    OutboxRow.attempts == r.attempts).values(
                    state=SENDING, claimed_by=self._token, last_attempt_at=now, lease_until=lease,
                    attempts=r.attempts + 1).execution_options(synchronize_session=False))
                if res.rowcount:
                    by_dest[r.destination].append(r)
            s.expunge_all()
        return by_dest

    def _process_due(self) -> int:
        by_dest = self._claim()
        attempted = 0
        touched: set[str] = set()
        dests = self.destinations
        for dest_name, rows in by_dest.items():
            dest = dests.get(dest_name)
            if dest is None:
                for r in rows:
                    self._finish(r, FAILED, None, f"destination {dest_name!r} is no longer configured")
                    touched.add(r.study_uid)
                attempted += len(rows)
                continue
            by_path = {str(Path(r.path)): r for r in rows}
            done: set[int] = set()
            node = self.config.node
            gen = scu.store_files(
                dest, list(by_path), calling_ae=dest.calling_ae_title or node.ae_title,
                acse_timeout=node.acse_timeout, dimse_timeout=node.dimse_timeout,
                network_timeout=node.network_timeout, max_pdu=node.max_pdu, resolve=self.config.resolve)
            try:
                for outcome in gen:
                    r = by_path.get(outcome.path)
                    if r is None:  # pragma: no cover - scu yields the paths it was given
                        continue
                    self._apply(r, outcome)
                    done.add(r.id)
                    touched.add(r.study_uid)
                    attempted += 1
                    if self._stopping.is_set():
                        break
            finally:
                gen.close()
                # claimed but not attempted (stop requested): back to pending, attempt not counted
                for r in rows:
                    if r.id not in done:
                        self._release(r)
        for study_uid in touched:
            self._notify(study_uid)
        return attempted

    def _apply(self, r: OutboxRow, outcome: scu.StoreOutcome) -> None:
        if outcome.stored:
            self._finish(r, SENT, outcome.status, None if outcome.category == scu.SUCCESS else outcome.message)
            log.info("outbox: %s sent to %s", r.sop_instance_uid, r.destination)
            return
        if outcome.category == scu.FAILED:
            log.error("outbox: %s to %s failed permanently: %s", r.sop_instance_uid, r.destination, outcome.message)
            self._finish(r, FAILED, outcome.status, outcome.message)
            return
        now = utcnow()
        attempts = r.attempts + 1  # r is the pre-claim snapshot
        age = (now - r.queued_at).total_seconds()
        horizon = self.config.outbox.horizon_s
        if age >= horizon:
            msg = f"gave up after {horizon:g} s and {attempts} attempt(s): {outcome.message}"
            log.error("outbox: %s to %s: %s", r.sop_instance_uid, r.destination, msg)
            self._finish(r, FAILED, outcome.status, msg)
            return
        delay = backoff_s(attempts, self.config.outbox.retry_base_s, self.config.outbox.retry_max_s, self._rng)
        log.warning("outbox: %s to %s: %s; retry in %.1f s", r.sop_instance_uid, r.destination,
                    outcome.message, delay)
        with self.session_factory() as s, s.begin():
            s.execute(sa.update(OutboxRow).where(self._held(r)).values(
                state=PENDING, claimed_by=None, lease_until=None, last_status=outcome.status,
                last_error=outcome.message, next_attempt_at=now + _dt.timedelta(seconds=delay)))

    def _held(self, r: OutboxRow):
        """The row while this process's claim on it stands (after a stall past the lease another
        node may have taken it over: its outcome, not ours, is then the row's)."""
        return sa.and_(OutboxRow.id == r.id, OutboxRow.state == SENDING, OutboxRow.claimed_by == self._token)

    def _finish(self, r: OutboxRow, state: str, status: Optional[int], error: Optional[str]) -> None:
        values = dict(state=state, claimed_by=None, lease_until=None, last_status=status, last_error=error)
        if state == SENT:
            values["sent_at"] = utcnow()
        with self.session_factory() as s, s.begin():
            s.execute(sa.update(OutboxRow).where(self._held(r)).values(**values))

    def _release(self, r: OutboxRow) -> None:
        with self.session_factory() as s, s.begin():
            s.execute(sa.update(OutboxRow).where(self._held(r))
                      .values(state=PENDING, claimed_by=None, lease_until=None, attempts=r.attempts))

    def _notify(self, study_uid: str) -> None:
        rows = self.rows_for(study_uid)
        state = _study_state([r.state for r in rows])
        try:
            if state == SENT and self.on_study_sent is not None:
                self.on_study_sent(study_uid)
            elif state == FAILED and self.on_study_failed is not None:
                errors = "; ".join(f"{r.destination}: {r.last_error}" for r in rows if r.state == FAILED)
                self.on_study_failed(study_uid, errors)
        except Exception:
            log.exception("outbox: study callback failed for %s", study_uid)


def _study_state(states: Sequence[str]) -> Optional[str]:
    states = [s for s in states if s != SUPERSEDED]
    if not states:
        return None
    if all(s == SENT for s in states):
        return SENT
    if any(s in (PENDING, SENDING) for s in states):
        return PENDING
    return FAILED


__all__ = ["Outbox", "OutboxRow", "retry_study_db", "resend_study_db", "create_table", "backoff_s",
           "PENDING", "SENDING", "SENT", "FAILED", "SUPERSEDED"]
