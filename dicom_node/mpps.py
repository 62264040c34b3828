"""MPPS SCP: the modality says when a study is done, so the node need not guess.

Why: the quiet period (``dicom_node.scheduler``) can only guess that a study is
complete; a study is processed too early when a series arrives late and too
late (the quiet period) otherwise.  A modality that sends Modality Performed
Procedure Step (PS3.4 F.7) says so explicitly: N-CREATE (IN PROGRESS), then
N-SET COMPLETED or DISCONTINUED listing, in Performed Series Sequence ->
Referenced Image / Non-Image Composite SOP Instance Sequence, every instance
it produced.

What the node does with it:

* every MPPS is a row of the ``mpps`` table (journal database), written before
  the DIMSE response, so a restart keeps its state;
* on COMPLETED, the listed instances are watched (in memory, rebuilt from the
  journal at start): when the last of them is journaled, the study is declared
  complete at once (``Journal.complete_study`` with no quiet period), which
  queues exactly one processing job (the quiet-period timer that fires later
  finds the job and does nothing: nothing is processed twice);
* if some listed instances never arrive within ``mpps.instance_timeout_s``, the
  MPPS is marked ``timed_out`` (logged, shown by ``cag-node studies``) and the
  quiet-period timer decides, as without MPPS;
* DISCONTINUED: ``mpps.on_discontinued: process`` completes the study with what
  arrived; ``skip`` makes the quiet-period timer mark the study ``failed``
  (stage ``mpps``) instead of processing it (``cag-node retry`` still can);
* invalid transitions are refused with the PS3.4 F.7.2 statuses: N-CREATE of an
  existing instance 0x0111, N-CREATE not IN PROGRESS 0x0106, N-SET of an
  unknown instance 0x0112, N-SET of an MPPS already COMPLETED/DISCONTINUED
  0x0110 (Processing failure, "Performed Procedure Step Object may no longer be
  updated", Error ID 0xA710 as F.7.2.2 asks), a status value other than
  IN PROGRESS/COMPLETED/DISCONTINUED 0x0106.  (0xC310 is a UPS status, PS3.4
  CC.2, not an MPPS one.)

No PHI is kept: only UIDs, states and the list of expected SOP Instance UIDs.
Optional forwarding (``mpps.forward_to``) re-sends each accepted N-CREATE/N-SET
to one destination from one background thread, in order, best effort (logged
on failure, not journaled: the modality's MPPS is the source of truth).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Callable, Optional

import sqlalchemy as sa
from pydicom.dataset import Dataset
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.tables import Base, UTCDateTime, aware as _aware, utcnow
from dicom_node.scu import QueuedSender, association, dimse_status

log = logging.getLogger(__name__)

# how often watched MPPS look in the journal for instances other nodes received
RECHECK_S = 2.0

MPPS_CLASS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step SOP Class

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STATES = (IN_PROGRESS, COMPLETED, DISCONTINUED)

# completion: what the MPPS did to its study
C_NONE = "none"            # still IN PROGRESS
C_WAITING = "waiting"      # COMPLETED, some listed instances not here yet
C_TRIGGERED = "triggered"  # the study was declared complete by the MPPS
C_TIMED_OUT = "timed_out"  # listed instances never came: the quiet period decides
C_SKIPPED = "skipped"      # DISCONTINUED with on_discontinued: skip

ST_SUCCESS = 0x0000
ST_INVALID_VALUE = 0x0106
ST_PROCESSING_FAILURE = 0x0110
ST_DUPLICATE = 0x0111
ST_NO_SUCH_INSTANCE = 0x0112
ST_MISSING_VALUE = 0x0121


class MPPSRow(Base):
    __tablename__ = "mpps"

    sop_instance_uid: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(16))
    study_uid: Mapped[Optional[str]] = mapped_column(sa.String(128), index=True, nullable=True)
    calling_aet: Mapped[Optional[str]] = mapped_column(sa.String(16), nullable=True)
    expected: Mapped[list] = mapped_column(sa.JSON, default=list)  # listed SOP Instance UIDs
    completion: Mapped[str] = mapped_column(sa.String(16), index=True, default=C_NONE)
    note: Mapped[Optional[str]] = mapped_column(sa.Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(), nullable=True)
    deadline: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(), nullable=True)
    triggered_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime(), nullable=True)


class MPPSError(Exception):
    def __init__(self, status: int, comment: str, error_id: Optional[int] = None):
        super().__init__(comment)
        self.status, self.comment, self.error_id = status, comment, error_id

    def status_dataset(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment[:64]
        if self.error_id is not None:
            ds.ErrorID = self.error_id
        return ds


def listed_instances(ds: Dataset) -> list[str]:
    """SOP Instance UIDs in Performed Series Sequence (images and non-image objects)."""
    out: list[str] = []
    for series in ds.get("PerformedSeriesSequence", None) or []:
        for key in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for item in series.get(key, None) or []:
                uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
                if uid and uid not in out:
                    out.append(uid)
    return out


def scheduled_study_uid(ds: Dataset) -> Optional[str]:
    for item in ds.get("ScheduledStepAttributesSequence", None) or []:
        uid = str(item.get("StudyInstanceUID", "") or "").strip()
        if uid:
            return uid
    return None


def mpps_by_study(session_factory) -> dict[str, list[dict]]:
    """For ``cag-node studies``: each study's MPPS (state, completion, note)."""
    out: dict[str, list[dict]] = {}
    with session_factory() as s:
        for r in s.scalars(sa.select(MPPSRow).order_by(MPPSRow.created_at)):
            if r.study_uid:
                out.setdefault(r.study_uid, []).append({
                    "sop_instance_uid": r.sop_instance_uid, "state": r.state, "completion": r.completion,
                    "n_listed": len(r.expected or []), "note": r.note})
    return out


class MPPSService:
    """MPPS state (journal), the watch on listed instances, and the DIMSE handlers' logic.

    ``complete_study(study_uid) -> bool`` declares a study complete now (the node
    passes ``Journal.complete_study`` with no quiet period plus its own callback);
    ``scheduler`` is the node's apscheduler, for the timeouts and to run
    completions off the DIMSE threads.
    """

    def __init__(self, config, journal, scheduler, complete_study: Callable[[str], bool],
                 forward: Optional[Callable[[str, str, Dataset], None]] = None):
        self.cfg = config.mpps
        self.journal = journal
        self.sessionmaker = journal.sessionmaker
        self.scheduler = scheduler
        self.complete_study = complete_study
        self.forward = forward
        self._lock = threading.Lock()
        self._missing: dict[str, set[str]] = {}  # mpps uid -> listed instances not journaled yet
        self._index: dict[str, set[str]] = {}  # sop instance uid -> mpps uids waiting on it

    # -- start-up -------------------------------------------------------------
    def resume(self) -> int:
        """Re-watch every COMPLETED MPPS still waiting for instances (after a restart), and start
        the periodic :meth:`recheck`."""
        self.scheduler.add_job(self._recheck_job, "interval", seconds=RECHECK_S, id="mpps-recheck",
                               replace_existing=True, max_instances=1, coalesce=True)
        with self.sessionmaker() as s:
            rows = s.scalars(sa.select(MPPSRow).where(MPPSRow.completion == C_WAITING)).all()
            waiting = [(r.sop_instance_uid, list(r.expected or []), _aware(r.deadline)) for r in rows]
        for uid, expected, deadline in waiting:
            self._watch(uid, expected, deadline or utcnow())
        if waiting:
            log.info("re-watching %d completed MPPS waiting for their instances", len(waiting))
        return len(waiting)

    # -- DIMSE ---------------------------------------------------------------
    def n_create(self, uid: Optional[str], attrs: Dataset, calling_aet: str) -> None:
        if not uid:
            raise MPPSError(ST_MISSING_VALUE, "no Affected SOP Instance UID")
        state = str(attrs.get("PerformedProcedureStepStatus", "") or "").strip().upper()
        if state != IN_PROGRESS:
            raise MPPSError(ST_INVALID_VALUE, f"N-CREATE status must be IN PROGRESS, not {state or '(none)'}")
        now = utcnow()
        with self.sessionmaker.begin() as s:
            if s.get(MPPSRow, uid) is not None:
                raise MPPSError(ST_DUPLICATE, "MPPS instance already exists")
            s.add(MPPSRow(sop_instance_uid=uid, state=IN_PROGRESS, study_uid=scheduled_study_uid(attrs),
                          calling_aet=calling_aet, expected=listed_instances(attrs), completion=C_NONE,
                          created_at=now, updated_at=now))
        log.info("MPPS %s IN PROGRESS from %s", uid, calling_aet)
        if self.forward is not None:
            self.forward("create", uid, attrs)

    def n_set(self, uid: Optional[str], mods: Dataset, calling_aet: str) -> str:
        """Apply an N-SET; returns the (possibly unchanged) state."""
        if not uid:
            raise MPPSError(ST_MISSING_VALUE, "no Requested SOP Instance UID")
        new_state = None
        if "PerformedProcedureStepStatus" in mods:
            new_state = str(mods.PerformedProcedureStepStatus or "").strip().upper()
            if new_state not in STATES:
                raise MPPSError(ST_INVALID_VALUE, f"invalid Performed Procedure Step Status {new_state!r}")
        now = utcnow()
        with self.sessionmaker.begin() as s:
            row = s.get(MPPSRow, uid, with_for_update=True)
            if row is None:
                raise MPPSError(ST_NO_SUCH_INSTANCE, "no such MPPS instance")
            if row.state != IN_PROGRESS:
                raise MPPSError(ST_PROCESSING_FAILURE, "Performed Procedure Step Object may no longer be updated",
                                error_id=0xA710)
            if "PerformedSeriesSequence" in mods:  # N-SET replaces a sequence as a whole
                row.expected = listed_instances(mods)
            if row.study_uid is None:
                row.study_uid = scheduled_study_uid(mods)
            row.updated_at = now
            if new_state in (COMPLETED, DISCONTINUED):
                row.state = new_state
                row.ended_at = now
                if new_state == COMPLETED or self.cfg.on_discontinued == "process":
                    row.completion = C_WAITING
                    row.deadline = now + timedelta(seconds=self.cfg.instance_timeout_s)
                else:
                    row.completion = C_SKIPPED
                    row.note = "DISCONTINUED: not processed (mpps.on_discontinued: skip)"
            expected, deadline, completion, state = list(row.expected or []), row.deadline, row.completion, row.state
        log.info("MPPS %s %s from %s (%d instance(s) listed)", uid, state, calling_aet, len(expected))
        if self.forward is not None:
            self.forward("set", uid, mods)
        if completion == C_WAITING and new_state == COMPLETED:
            self._watch(uid, expected, deadline)
        elif completion == C_WAITING and new_state == DISCONTINUED:
            self._run(self._trigger, uid, "DISCONTINUED: processing what arrived")
        elif completion == C_SKIPPED:
            self._run(self._skip_now, uid)
        return state

    # -- the watch -------------------------------------------------------------
    def _watch(self, uid: str, expected: list[str], deadline: datetime) -> None:
        """Watch ``expected``; the registration and the journal check happen under one
        lock, so an instance journaled meanwhile is seen either here or by ``instance_stored``."""
        with self._lock:
            missing = set(expected) - self._present(expected)
            if missing:
                self._missing[uid] = missing
                for sop in missing:
                    self._index.setdefault(sop, set()).add(uid)
        if missing:
            log.info("MPPS %s: waiting for %d of %d listed instance(s)", uid, len(missing), len(expected))
            self.scheduler.add_job(self._timeout, "date", run_date=deadline, args=[uid],
                                   id=f"mpps-timeout:{uid}", replace_existing=True)
        else:
            self._run(self._trigger, uid, "all listed instances are here")

    def _present(self, uids: list[str]) -> set[str]:
        from dicom_node.tables import Instance

        found: set[str] = set()
        with self.sessionmaker() as s:
            for i in range(0, len(uids), 500):
                found.update(s.scalars(sa.select(Instance.sop_instance_uid)
                                       .where(Instance.sop_instance_uid.in_(uids[i:i + 500]))).all())
        return found

    def instance_stored(self, sop_instance_uid: str) -> None:
        """Called after each journaled instance; cheap when no MPPS waits for it."""
        if not self._index:
            return
        done = []
        with self._lock:
            for uid in self._index.pop(sop_instance_uid, ()):
                missing = self._missing.get(uid)
                if missing is None:
                    continue
                missing.discard(sop_instance_uid)
                if not missing:
                    del self._missing[uid]
                    done.append(uid)
        for uid in done:
            self._run(self._trigger, uid, "the last listed instance arrived")

    def recheck(self) -> int:
        """Watch every COMPLETED MPPS the journal says is waiting that this process does not watch
        yet (one another receiver process or node took, which may die), and look in the journal
        for the instances watched MPPS still miss: another process or node may have received them
        (its ``instance_stored`` is not called here).  Every process watching one MPPS is safe:
        it is triggered or timed out once (the row is locked and its state checked).  Returns how
        many missing instances were found."""
        with self.sessionmaker() as s:
            rows = s.execute(sa.select(MPPSRow.sop_instance_uid, MPPSRow.expected, MPPSRow.deadline)
                             .where(MPPSRow.completion == C_WAITING)).all()
        with self._lock:
            watched = set(self._missing)
        for uid, expected, deadline in rows:
            if uid not in watched:
                self._watch(uid, list(expected or []), _aware(deadline) or utcnow())
        with self._lock:
            wanted = sorted({sop for missing in self._missing.values() for sop in missing})
        if not wanted:
            return 0
        found = self._present(wanted)
        for sop in found:
            self.instance_stored(sop)
        return len(found)

    def _recheck_job(self) -> None:
        try:
            self.recheck()
        except Exception:
            log.exception("MPPS recheck failed")

    def _forget(self, uid: str) -> None:
        with self._lock:
            for sop in self._missing.pop(uid, ()):
                waiting = self._index.get(sop)
                if waiting is not None:
                    waiting.discard(uid)
                    if not waiting:
                        del self._index[sop]

    def _run(self, fn, *args) -> None:
        """Off the DIMSE thread: the response goes out before the study is queued."""
        self.scheduler.add_job(fn, args=list(args))

    def _studies_of(self, s, row: MPPSRow) -> list[str]:
        from dicom_node.tables import Instance

        studies = set()
        uids = list(row.expected or [])
        for i in range(0, len(uids), 500):
            studies.update(s.scalars(sa.select(Instance.study_uid).distinct()
                                     .where(Instance.sop_instance_uid.in_(uids[i:i + 500]))).all())
        if row.study_uid:
            studies.add(row.study_uid)
        return sorted(studies)

    def _trigger(self, uid: str, why: str) -> None:
        self._forget(uid)
        now = utcnow()
        with self.sessionmaker.begin() as s:
            row = s.get(MPPSRow, uid, with_for_update=True)
            if row is None or row.completion != C_WAITING:
                return  # already done (or timed out meanwhile)
            studies = self._studies_of(s, row)
            if row.study_uid is None and studies:
                row.study_uid = studies[0]
            row.completion = C_TRIGGERED
            row.triggered_at = now
            row.note = why
        try:
            self.scheduler.remove_job(f"mpps-timeout:{uid}")
        except Exception:
            pass
        for study in studies:
            try:
                done = self.complete_study(study)
            except Exception:
                log.exception("MPPS %s: completing study %s failed; the quiet period decides", uid, study)
                continue
            log.info("MPPS %s: study %s %s (%s)", uid, study,
                     "complete, queued for processing" if done else "already queued or unknown", why)

    def _timeout(self, uid: str) -> None:
        with self._lock:
            missing = len(self._missing.get(uid, ()))
        self._forget(uid)
        with self.sessionmaker.begin() as s:
            row = s.get(MPPSRow, uid, with_for_update=True)
            if row is None or row.completion != C_WAITING:
                return
            n = len(row.expected or [])
            if not missing:  # restarted after the deadline: count from the journal
                missing = n - len(self._present(list(row.expected or [])))
            studies = self._studies_of(s, row)
            if row.study_uid is None and studies:
                row.study_uid = studies[0]
            row.completion = C_TIMED_OUT
            row.note = (f"{missing} of {n} listed instance(s) never arrived within "
                        f"{self.cfg.instance_timeout_s:g}s; completion by quiet period")
            note = row.note
        log.warning("MPPS %s: %s", uid, note)

    def _skip_now(self, uid: str) -> None:
        with self.sessionmaker.begin() as s:
            row = s.get(MPPSRow, uid, with_for_update=True)
            if row is None:
                return
            studies = self._studies_of(s, row)
            if row.study_uid is None and studies:
                row.study_uid = studies[0]
        log.info("MPPS %s DISCONTINUED: stud%s %s will not be processed (mpps.on_discontinued: skip)", uid,
                 "y" if len(studies) == 1 else "ies", ", ".join(studies) or "(none received)")

    def veto(self, study_uid: str) -> Optional[str]:
        """Why the quiet period must not process this study (a skipped DISCONTINUED MPPS), or None."""
        with self.sessionmaker() as s:
            rows = s.scalars(sa.select(MPPSRow).where(MPPSRow.study_uid == study_uid)
                             .order_by(MPPSRow.updated_at.desc())).all()
        if rows and rows[0].completion == C_SKIPPED:
            return rows[0].note or "MPPS DISCONTINUED"
        return None

    def get(self, uid: str) -> Optional[dict]:
        with self.sessionmaker() as s:
            r = s.get(MPPSRow, uid)
            if r is None:
                return None
            return {"sop_instance_uid": r.sop_instance_uid, "state": r.state, "study_uid": r.study_uid,
                    "completion": r.completion, "note": r.note, "expected": list(r.expected or [])}


class MPPSForwarder(QueuedSender):
    """Re-sends MPPS N-CREATE/N-SET to one destination, in order, from one thread (best effort)."""

    def __init__(self, config, destination):
        self.config = config
        self.dest = destination
        super().__init__("mpps-forward")

    def __call__(self, op: str, uid: str, ds: Dataset) -> None:
        self._put((op, uid, ds))

    def _deliver(self, item: tuple) -> None:
        op, uid, ds = item
        try:
            self._send(op, uid, ds)
        except Exception as exc:
            log.warning("forwarding MPPS %s (%s) to %s failed: %s", uid, op, self.dest.name, exc)

    def _send(self, op: str, uid: str, ds: Dataset) -> None:
        d = self.dest
        with association(d.calling_ae_title or self.config.node.ae_title, d.host, d.port, d.ae_title,
                         MPPS_CLASS, 10) as assoc:
            if op == "create":
                st, _ = assoc.send_n_create(ds, MPPS_CLASS, uid)
            else:
                st, _ = assoc.send_n_set(ds, MPPS_CLASS, uid)
            status = dimse_status(st)
            if status != 0:
                raise RuntimeError(f"status {status if status is None else hex(status)}")
