"""UPS provider (IHE AI Workflow for Imaging): work items a RIS/PACS can create and watch.

Why: AIW-I lets a requester ask for AI work and follow it.  The node is the UPS
SCP of PS3.4 Annex CC (Push, Pull, Watch, Event SOP classes; pynetdicom carries
the DIMSE-N messages, the state, persistence and rules are here):

* a work item is a row of ``ups_items`` (journal database) holding its state,
  its Transaction UID and its attributes (DICOM JSON, as the requester sent them
  and as N-SET changed them: N-GET and C-FIND must return them, so this table,
  unlike the rest of the journal, may hold the work item's patient attributes;
  they are never logged);
* state machine (PS3.4 CC.1.1, Table CC.1.1-2): SCHEDULED --claim (N-ACTION,
  Transaction UID)--> IN PROGRESS --(same Transaction UID)--> COMPLETED or
  CANCELED.  Refusals: unknown instance 0xC307, wrong/missing Transaction UID
  0xC301, already IN PROGRESS 0xC302, SCHEDULED via N-ACTION 0xC303, final
  state requirements unmet 0xC304, N-CREATE not SCHEDULED 0xC309, not yet
  IN PROGRESS 0xC310, cancel of a COMPLETED item 0xC311, an item COMPLETED or
  CANCELED may no longer be updated 0xC300; the warnings 0xB304/0xB306 when it
  already is in the requested final state; unknown Receiving AE 0xC308;
* subscriptions (``ups_subscriptions``) to one item or globally
  (1.2.840.10008.5.1.4.34.5 / .5.1); N-EVENT-REPORTs (State Report, Cancel
  Requested, Progress Report) go to each subscriber on a separate association
  to the host/port ``ups.subscribers`` gives its AE title, from one background
  thread, in order, after the DIMSE response;
* the node as performer: when it processes a study it claims the SCHEDULED
  work items whose Input Information Sequence references that study (and, with
  ``ups.create_for_studies``, creates one when there is none), and completes
  them with the SR/KOS as Output Information when the results are published
  (CANCELED with a reason when processing fails).  At start-up, items the node
  left IN PROGRESS are finished from the journal if their study was published
  meanwhile; otherwise the re-queued processing job resumes them.  A work item
  created for a study already reported is completed with the existing results,
  not processed again.

Event reports are not journaled: a subscriber that was down misses them, and
N-GET / C-FIND tell it the state (the standard's answer as well).
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

import sqlalchemy as sa
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.tables import Base, StudyState, UTCDateTime, utcnow
from dicom_node.scu import QueuedSender, association, dimse_status
from dicom_node.spool import RESULTS_DIR

log = logging.getLogger(__name__)

UPS_PUSH = "1.2.840.10008.5.1.4.34.6.1"
UPS_WATCH = "1.2.840.10008.5.1.4.34.6.2"
UPS_PULL = "1.2.840.10008.5.1.4.34.6.3"
UPS_EVENT = "1.2.840.10008.5.1.4.34.6.4"
UPS_QUERY = "1.2.840.10008.5.1.4.34.6.5"
UPS_CLASSES = (UPS_PUSH, UPS_WATCH, UPS_PULL, UPS_EVENT, UPS_QUERY)
GLOBAL = "1.2.840.10008.5.1.4.34.5"  # UPS Global Subscription SOP Instance
GLOBAL_FILTERED = "1.2.840.10008.5.1.4.34.5.1"  # (filter not evaluated: treated as global)

SCHEDULED, IN_PROGRESS, COMPLETED, CANCELED = "SCHEDULED", "IN PROGRESS", "COMPLETED", "CANCELED"
FINAL = (COMPLETED, CANCELED)

# N-ACTION action types (PS3.4 CC.2.2.2, CC.2.3)
A_CHANGE_STATE, A_REQUEST_CANCEL, A_SUBSCRIBE, A_UNSUBSCRIBE, A_SUSPEND_GLOBAL = 1, 2, 3, 4, 5
# N-EVENT-REPORT event types (PS3.4 CC.2.4)
E_STATE, E_CANCEL_REQUESTED, E_PROGRESS = 1, 2, 3

ST_SUCCESS = 0x0000
ST_INVALID_VALUE = 0x0106
ST_DUPLICATE = 0x0111
ST_MISSING_VALUE = 0x0121
ST_NO_SUCH_ACTION = 0x0123
ST_FINAL_WARNING_CANCELED = 0xB304
ST_FINAL_WARNING_COMPLETED = 0xB306
ST_NO_LONGER_UPDATABLE = 0xC300
ST_WRONG_TRANSACTION = 0xC301
ST_ALREADY_IN_PROGRESS = 0xC302
ST_ONLY_SCHEDULED_BY_CREATE = 0xC303
ST_FINAL_REQUIREMENTS = 0xC304
ST_NO_SUCH_UPS = 0xC307
ST_UNKNOWN_RECEIVING_AE = 0xC308
ST_CREATE_NOT_SCHEDULED = 0xC309
ST_NOT_IN_PROGRESS = 0xC310
ST_ALREADY_COMPLETED = 0xC311
ST_UNABLE_TO_PROCESS = 0xC000

NODE = "node"  # owner of work items the node performs itself


def _dt(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y%m%d%H%M%S+0000")


class UPSItem(Base):
    __tablename__ = "ups_items"

    sop_instance_uid: Mapped[str] = mapped_column(sa.String(128), primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(16), index=True)
    transaction_uid: Mapped[Optional[str]] = mapped_column(sa.String(128), nullable=True)
    owner: Mapped[Optional[str]] = mapped_column(sa.String(16), nullable=True)  # "node" or the claiming AE
    study_uid: Mapped[Optional[str]] = mapped_column(sa.String(128), index=True, nullable=True)
    attrs: Mapped[str] = mapped_column(sa.Text)  # DICOM JSON
    created_by: Mapped[Optional[str]] = mapped_column(sa.String(16), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class UPSSubscription(Base):
    __tablename__ = "ups_subscriptions"

    ae_title: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    ups_uid: Mapped[str] = mapped_column(sa.String(128), primary_key=True)  # or GLOBAL
    deletion_lock: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class UPSError(Exception):
    def __init__(self, status: int, comment: str):
        super().__init__(comment)
        self.status, self.comment = status, comment

    def status_dataset(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment[:64]
        return ds


def _load(text: str) -> Dataset:
    return Dataset.from_json(text)


def _dump(ds: Dataset) -> str:
    return ds.to_json()


def input_study_uid(ds: Dataset) -> Optional[str]:
    """The study a work item is about: its Input Information Sequence (or a top-level Study UID)."""
    for item in ds.get("InputInformationSequence", None) or []:
        uid = str(item.get("StudyInstanceUID", "") or "").strip()
        if uid:
            return uid
    for item in ds.get("ReferencedRequestSequence", None) or []:
        uid = str(item.get("StudyInstanceUID", "") or "").strip()
        if uid:
            return uid
    uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    return uid or None


def _check_final(ds: Dataset, state: str) -> None:
    """PS3.4 CC.2.5.1.3 final state requirements, the part that makes a result findable."""
    if state != COMPLETED:
        return
    seq = ds.get("UnifiedProcedureStepPerformedProcedureSequence", None)
    if not seq:
        raise UPSError(ST_FINAL_REQUIREMENTS, "no UPS Performed Procedure Sequence")
    if "PerformedProcedureStepEndDateTime" not in seq[0] and "PerformedProcedureStepStartDateTime" not in seq[0]:
        raise UPSError(ST_FINAL_REQUIREMENTS, "no Performed Procedure Step Start/End DateTime")


class EventSender(QueuedSender):
    """N-EVENT-REPORTs to subscribers, each on its own association, from one thread, in order."""

    def __init__(self, config):
        self.config = config
        self.targets = {s.ae_title: s for s in config.ups.subscribers}
        self.sent = 0
        super().__init__("ups-events")

    def send(self, ae_titles: Iterable[str], ups_uid: str, event_type: int, info: Dataset) -> None:
        for ae in ae_titles:
            self._put((ae, ups_uid, event_type, info))

    def _deliver(self, item: tuple) -> None:
        ae, ups_uid, event_type, info = item
        for attempt in range(3):
            try:
                self._send(ae, ups_uid, event_type, info)
                self.sent += 1
                break
            except Exception as exc:
                if attempt == 2:
                    log.warning("UPS event %d for %s to %s not delivered: %s", event_type, ups_uid, ae, exc)
                else:
                    time.sleep(0.5 * (attempt + 1))

    def _send(self, ae_title: str, ups_uid: str, event_type: int, info: Dataset) -> None:
        t = self.targets.get(ae_title)
        if t is None:
            raise LookupError("no host/port configured (ups.subscribers)")
        with association(self.config.node.ae_title, t.host, t.port, ae_title, UPS_EVENT,
                         self.config.ups.event_timeout_s) as assoc:
            st, _ = assoc.send_n_event_report(info, event_type, UPS_EVENT, ups_uid)
            status = dimse_status(st)
            if status is None or status >= 0xA000:
                raise RuntimeError(f"status {status if status is None else hex(status)}")


class UPSService:
    """UPS state (journal), its rules, subscriptions and event reports."""

    def __init__(self, config, journal, scheduler=None, events: Optional[EventSender] = None):
        self.config = config
        self.cfg = config.ups
        self.journal = journal
        self.sessionmaker = journal.sessionmaker
        self.scheduler = scheduler
        self.events = events
        self._lock = threading.RLock()  # one state change at a time (the journal also serialises)

    # -- helpers ---------------------------------------------------------------
    def _row(self, s, uid: Optional[str]) -> UPSItem:
        row = s.get(UPSItem, uid, with_for_update=True) if uid else None
        if row is None:
            raise UPSError(ST_NO_SUCH_UPS, "no such UPS instance")
        return row

    def _subscribers(self, s, uid: str) -> list[str]:
        rows = s.scalars(sa.select(UPSSubscription.ae_title)
                         .where(UPSSubscription.ups_uid.in_([uid, GLOBAL]))).all()
        return sorted(set(rows))

    def _emit(self, subscribers: list[str], uid: str, event_type: int, info: Dataset) -> None:
        if self.events is not None and subscribers:
            self.events.send(subscribers, uid, event_type, info)

    @staticmethod
    def _state_info(ds: Dataset, state: str) -> Dataset:
        info = Dataset()
        info.ProcedureStepState = state
        info.InputReadinessState = ds.get("InputReadinessState", "READY") or "READY"
        if state == CANCELED:
            for kw in ("ReasonForCancellation", "ProcedureStepDiscontinuationReasonCodeSequence"):
                if kw in ds:
                    info[kw] = ds[kw]
        return info

    # -- N-CREATE --------------------------------------------------------------
    def create(self, uid: Optional[str], attrs: Dataset, calling_aet: str, owner: Optional[str] = None) -> str:
        state = str(attrs.get("ProcedureStepState", "") or "").strip().upper()
        if state != SCHEDULED:
            raise UPSError(ST_CREATE_NOT_SCHEDULED, f"UPS State must be SCHEDULED, not {state or '(none)'}")
        if "TransactionUID" in attrs and attrs.TransactionUID:
            raise UPSError(ST_INVALID_VALUE, "a new UPS has no Transaction UID")
        uid = uid or generate_uid()
        ds = Dataset()
        ds.update(attrs)
        ds.SOPClassUID = UPS_PUSH
        ds.SOPInstanceUID = uid
        ds.ProcedureStepState = SCHEDULED
        if "InputReadinessState" not in ds or not ds.InputReadinessState:
            ds.InputReadinessState = "READY"
        if "TransactionUID" in ds:
            del ds.TransactionUID
        now = utcnow()
        with self._lock, self.sessionmaker.begin() as s:
            if s.get(UPSItem, uid) is not None:
                raise UPSError(ST_DUPLICATE, "UPS instance already exists")
            s.add(UPSItem(sop_instance_uid=uid, state=SCHEDULED, study_uid=input_study_uid(ds), attrs=_dump(ds),
                          created_by=calling_aet, owner=owner, created_at=now, updated_at=now))
            subs = sorted(set(s.scalars(sa.select(UPSSubscription.ae_title)
                                        .where(UPSSubscription.ups_uid == GLOBAL)).all()))
            study = input_study_uid(ds)
        log.info("UPS %s SCHEDULED by %s", uid, calling_aet)
        if subs:  # global subscribers are subscribed to new items too (CC.2.3.2)
            with self.sessionmaker.begin() as s:
                for ae in subs:
                    if s.get(UPSSubscription, (ae, uid)) is None:
                        s.add(UPSSubscription(ae_title=ae, ups_uid=uid, deletion_lock=False, created_at=now))
            self._emit(subs, uid, E_STATE, self._state_info(ds, SCHEDULED))
        if owner is None and study and self.scheduler is not None:
            self.scheduler.add_job(self._adopt_if_done, args=[uid, study])
        return uid

    # -- N-ACTION --------------------------------------------------------------
    def change_state(self, uid: str, state: str, transaction_uid: Optional[str], by: str) -> int:
        """N-ACTION type 1.  Returns the (success or warning) status."""
        state = (state or "").strip().upper()
        if state == SCHEDULED:
            raise UPSError(ST_ONLY_SCHEDULED_BY_CREATE, "a UPS becomes SCHEDULED only by N-CREATE")
        if state not in (IN_PROGRESS, COMPLETED, CANCELED):
            raise UPSError(ST_INVALID_VALUE, f"invalid Procedure Step State {state!r}")
        if not transaction_uid:
            raise UPSError(ST_WRONG_TRANSACTION, "no Transaction UID")
        with self._lock, self.sessionmaker.begin() as s:
            row = self._row(s, uid)
            ds = _load(row.attrs)
            cur = row.state
            if cur == state and state == COMPLETED:
                return ST_FINAL_WARNING_COMPLETED
            if cur == state and state == CANCELED:
                return ST_FINAL_WARNING_CANCELED
            if cur in FINAL:
                raise UPSError(ST_NO_LONGER_UPDATABLE, f"the UPS is {cur} and may no longer be updated")
            if state == IN_PROGRESS:
                if cur == IN_PROGRESS:
                    raise UPSError(ST_ALREADY_IN_PROGRESS, "the UPS is already IN PROGRESS")
                row.transaction_uid = transaction_uid
                row.owner = by
                ds.ProcedureStepState = IN_PROGRESS
                seq = ds.get("UnifiedProcedureStepPerformedProcedureSequence", None)
                if not seq:
                    item = Dataset()
                    item.PerformedProcedureStepStartDateTime = _dt(utcnow())
                    ds.UnifiedProcedureStepPerformedProcedureSequence = [item]
            else:
                if cur == SCHEDULED:
                    raise UPSError(ST_NOT_IN_PROGRESS, "the UPS is not yet IN PROGRESS")
                if transaction_uid != row.transaction_uid:
                    raise UPSError(ST_WRONG_TRANSACTION, "the correct Transaction UID was not provided")
                if state == COMPLETED:
                    seq = ds.get("UnifiedProcedureStepPerformedProcedureSequence", None)
                    if seq and "PerformedProcedureStepEndDateTime" not in seq[0]:
                        seq[0].PerformedProcedureStepEndDateTime = _dt(utcnow())
                _check_final(ds, state)
                if state == CANCELED and "ProcedureStepCancellationDateTime" not in ds:
                    ds.ProcedureStepCancellationDateTime = _dt(utcnow())
                ds.ProcedureStepState = state
            row.state = state
            row.attrs = _dump(ds)
            row.updated_at = utcnow()
            subs = self._subscribers(s, uid)
            if state in FINAL:  # subscriptions without a deletion lock end with the item
                s.execute(sa.delete(UPSSubscription).where(UPSSubscription.ups_uid == uid,
                                                           UPSSubscription.deletion_lock.is_(False)))
        log.info("UPS %s %s -> %s (by %s)", uid, cur, state, by)
        self._emit(subs, uid, E_STATE, self._state_info(ds, state))
        return ST_SUCCESS

    def request_cancel(self, uid: str, info: Dataset, by: str) -> int:
        """N-ACTION type 2 (PS3.4 CC.2.2.4)."""
        with self._lock, self.sessionmaker.begin() as s:
            row = self._row(s, uid)
            ds = _load(row.attrs)
            if row.state == CANCELED:
                return ST_FINAL_WARNING_CANCELED
            if row.state == COMPLETED:
                raise UPSError(ST_ALREADY_COMPLETED, "the UPS is already COMPLETED")
            subs = self._subscribers(s, uid)
            if row.state == SCHEDULED:  # nobody performs it: cancel at once
                for kw in ("ReasonForCancellation", "ProcedureStepDiscontinuationReasonCodeSequence"):
                    if kw in info:
                        ds[kw] = info[kw]
                ds.ProcedureStepCancellationDateTime = _dt(utcnow())
                ds.ProcedureStepState = CANCELED
                row.state = CANCELED
                row.attrs = _dump(ds)
                row.updated_at = utcnow()
                s.execute(sa.delete(UPSSubscription).where(UPSSubscription.ups_uid == uid,
                                                           UPSSubscription.deletion_lock.is_(False)))
                cancelled = True
            else:
                cancelled = False
        if cancelled:
            log.info("UPS %s SCHEDULED -> CANCELED (requested by %s)", uid, by)
            self._emit(subs, uid, E_STATE, self._state_info(ds, CANCELED))
            return ST_SUCCESS
        # IN PROGRESS: the performer decides; it (and every watcher) is told.
        ev = Dataset()
        ev.RequestingAE = by
        for kw in ("ReasonForCancellation", "ContactDisplayName", "ContactURI"):
            if kw in info:
                ev[kw] = info[kw]
        log.info("UPS %s: cancel requested by %s (performer informed)", uid, by)
        self._emit(subs, uid, E_CANCEL_REQUESTED, ev)
        return ST_SUCCESS

    def subscribe(self, uid: str, receiving_ae: str, deletion_lock: bool) -> None:
        """N-ACTION type 3: to one item, or to all (GLOBAL) items."""
        receiving_ae = (receiving_ae or "").strip()
        if receiving_ae not in {sub.ae_title for sub in self.cfg.subscribers}:
            raise UPSError(ST_UNKNOWN_RECEIVING_AE, "Receiving AE-TITLE is unknown to this SCP")
        now = utcnow()
        target = GLOBAL if uid in (GLOBAL, GLOBAL_FILTERED) else uid
        reports: list[tuple[str, Dataset]] = []
        with self._lock, self.sessionmaker.begin() as s:
            if target != GLOBAL:
                rows = [self._row(s, uid)]
            else:
                rows = s.scalars(sa.select(UPSItem).where(UPSItem.state.not_in(FINAL))).all()
            for key in {target, *(r.sop_instance_uid for r in rows)}:
                sub = s.get(UPSSubscription, (receiving_ae, key))
                if sub is None:
                    s.add(UPSSubscription(ae_title=receiving_ae, ups_uid=key, deletion_lock=deletion_lock,
                                          created_at=now))
                else:
                    sub.deletion_lock = deletion_lock
            reports = [(r.sop_instance_uid, self._state_info(_load(r.attrs), r.state)) for r in rows]
        log.info("%s subscribed to %s", receiving_ae, "all UPS" if target == GLOBAL else f"UPS {uid}")
        for item_uid, info in reports:  # the current state first (CC.2.3.2)
            self._emit([receiving_ae], item_uid, E_STATE, info)

    def unsubscribe(self, uid: str, receiving_ae: str, suspend_only: bool = False) -> None:
        """N-ACTION type 4 (this item, or global and every item) or 5 (suspend global only)."""
        with self._lock, self.sessionmaker.begin() as s:
            q = sa.delete(UPSSubscription).where(UPSSubscription.ae_title == receiving_ae)
            if suspend_only:
                q = q.where(UPSSubscription.ups_uid == GLOBAL)
            elif uid not in (GLOBAL, GLOBAL_FILTERED):
                self._row(s, uid)
                q = q.where(UPSSubscription.ups_uid == uid)
            s.execute(q)
        log.info("%s unsubscribed from %s", receiving_ae, uid)

    # -- N-SET / N-GET / C-FIND --------------------------------------------------
    def set(self, uid: str, mods: Dataset, by: str) -> Dataset:
        with self._lock, self.sessionmaker.begin() as s:
            row = self._row(s, uid)
            if row.state in FINAL:
                raise UPSError(ST_NO_LONGER_UPDATABLE, f"the UPS is {row.state} and may no longer be updated")
            if "ProcedureStepState" in mods:
                raise UPSError(ST_INVALID_VALUE, "the state changes by N-ACTION, not N-SET")
            if row.state == IN_PROGRESS:
                if str(mods.get("TransactionUID", "") or "") != row.transaction_uid:
                    raise UPSError(ST_WRONG_TRANSACTION, "the correct Transaction UID was not provided")
            elif "TransactionUID" in mods and mods.TransactionUID:
                raise UPSError(ST_NOT_IN_PROGRESS, "the UPS is not yet IN PROGRESS")
            ds = _load(row.attrs)
            for elem in mods:
                if elem.tag in (Tag("TransactionUID"), Tag("SOPInstanceUID"), Tag("SOPClassUID")):
                    continue
                ds[elem.tag] = elem
            row.attrs = _dump(ds)
            row.updated_at = utcnow()
            if row.study_uid is None:
                row.study_uid = input_study_uid(ds)
            subs = self._subscribers(s, uid)
        if "ProcedureStepProgressInformationSequence" in mods:
            ev = Dataset()
            ev.ProcedureStepProgressInformationSequence = mods.ProcedureStepProgressInformationSequence
            self._emit(subs, uid, E_PROGRESS, ev)
        return ds

    def get(self, uid: str, tags: Optional[list] = None) -> Dataset:
        with self.sessionmaker() as s:
            row = s.get(UPSItem, uid)
            if row is None:
                raise UPSError(ST_NO_SUCH_UPS, "no such UPS instance")
            ds = _load(row.attrs)
        if not tags:
            return ds  # the Transaction UID is never returned (CC.2.7)
        out = Dataset()
        for t in tags:
            if Tag(t) in ds and Tag(t) != Tag("TransactionUID"):
                out[Tag(t)] = ds[Tag(t)]
        return out

    def find(self, query: Dataset) -> list[Dataset]:
        """C-FIND matching: single values (wildcards * and ?), universal matching for empty keys."""
        with self.sessionmaker() as s:
            q = sa.select(UPSItem).order_by(UPSItem.created_at)
            state = str(query.get("ProcedureStepState", "") or "").strip()
            if state and "*" not in state and "?" not in state:
                q = q.where(UPSItem.state == state.upper())
            rows = [(r.sop_instance_uid, r.attrs) for r in s.scalars(q).all()]
        out = []
        for _uid, attrs in rows:
            ds = _load(attrs)
            if not _matches(ds, query):
                continue
            res = Dataset()
            for elem in query:
                if elem.tag == Tag("TransactionUID"):
                    continue
                if elem.tag in ds:
                    res[elem.tag] = ds[elem.tag]
                else:
                    res[elem.tag] = elem.__class__(elem.tag, elem.VR, None) if elem.VR != "SQ" else elem
            res.SOPInstanceUID = ds.SOPInstanceUID
            out.append(res)
        return out

    def state_of(self, uid: str) -> Optional[dict]:
        with self.sessionmaker() as s:
            r = s.get(UPSItem, uid)
            return None if r is None else {"state": r.state, "owner": r.owner, "study_uid": r.study_uid,
                                           "transaction_uid": r.transaction_uid}

    # -- the node as performer ---------------------------------------------------
    def begin_study(self, study_uid: str) -> list[str]:
        """Processing of ``study_uid`` starts: claim its SCHEDULED work items (or create one)."""
        with self.sessionmaker() as s:
            rows = s.scalars(sa.select(UPSItem).where(UPSItem.study_uid == study_uid,
                                                      UPSItem.state.in_((SCHEDULED, IN_PROGRESS)))).all()
            todo = [(r.sop_instance_uid, r.state, r.owner) for r in rows]
        mine = [u for u, st, owner in todo if st == IN_PROGRESS and owner == NODE]  # resumed after a restart
        for u, st, _owner in todo:
            if st == SCHEDULED:
                try:
                    self.change_state(u, IN_PROGRESS, generate_uid(), NODE)
                    mine.append(u)
                except UPSError as exc:  # another performer won the race
                    log.info("UPS %s not claimed: %s", u, exc.comment)
        if not todo and self.cfg.create_for_studies:
            uid = self.create(None, work_item(study_uid), self.config.node.ae_title, owner=NODE)
            self.change_state(uid, IN_PROGRESS, generate_uid(), NODE)
            mine.append(uid)
        if mine:
            self._progress(mine, 10, "processing")
        return mine

    def _progress(self, uids: list[str], pct: int, text: str) -> None:
        for u in uids:
            st = self.state_of(u)
            if st is None or st["state"] != IN_PROGRESS:
                continue
            m = Dataset()
            m.TransactionUID = st["transaction_uid"]
            p = Dataset()
            p.ProcedureStepProgress = pct
            p.ProcedureStepProgressDescription = text
            m.ProcedureStepProgressInformationSequence = [p]
            try:
                self.set(u, m, NODE)
            except UPSError as exc:
                log.warning("UPS %s progress not set: %s", u, exc.comment)

    def finish_study(self, study_uid: str, outputs: list[dict]) -> list[str]:
        """The study's results are published: complete the node's work items with them as outputs."""
        done = []
        for u in self._node_items(study_uid):
            st = self.state_of(u)
            m = Dataset()
            m.TransactionUID = st["transaction_uid"]
            p = Dataset()
            p.ProcedureStepProgress = 100
            p.ProcedureStepProgressDescription = "completed"
            m.ProcedureStepProgressInformationSequence = [p]
            ds = self.get(u)
            seq = ds.get("UnifiedProcedureStepPerformedProcedureSequence", None)
            item = seq[0] if seq else Dataset()
            item.PerformedProcedureStepEndDateTime = _dt(utcnow())
            item.OutputInformationSequence = [_output_item(o, self.config.node.ae_title) for o in outputs]
            m.UnifiedProcedureStepPerformedProcedureSequence = [item]
            if self._close(u, m, COMPLETED, st["transaction_uid"]):
                done.append(u)
        return done

    def cancel_study(self, study_uid: str, reason: str) -> list[str]:
        done = []
        for u in self._node_items(study_uid):
            st = self.state_of(u)
            m = Dataset()
            m.TransactionUID = st["transaction_uid"]
            m.ReasonForCancellation = reason[:1024]
            if self._close(u, m, CANCELED, st["transaction_uid"]):
                done.append(u)
        return done

    def _close(self, u: str, mods: Dataset, state: str, txn: str) -> bool:
        """Set the node's final attributes on its work item, then move it to ``state``."""
        try:
            self.set(u, mods, NODE)
            self.change_state(u, state, txn, NODE)
            return True
        except UPSError as exc:
            log.warning("UPS %s not %s: %s", u, "completed" if state == COMPLETED else "canceled", exc.comment)
            return False

    def _node_items(self, study_uid: str) -> list[str]:
        with self.sessionmaker() as s:
            return list(s.scalars(sa.select(UPSItem.sop_instance_uid).where(
                UPSItem.study_uid == study_uid, UPSItem.state == IN_PROGRESS, UPSItem.owner == NODE)).all())

    def recover(self, results_root: Path) -> int:
        """At start-up: the node's IN PROGRESS items whose study was published (or failed) meanwhile."""
        with self.sessionmaker() as s:
            studies = set(s.scalars(sa.select(UPSItem.study_uid).where(
                UPSItem.state == IN_PROGRESS, UPSItem.owner == NODE)).all())
        n = 0
        for study in filter(None, studies):
            st = self.journal.get_study(study)
            if st is None:
                continue
            if st.state in (StudyState.REPORTED, StudyState.SENT):
                n += len(self.finish_study(study, outputs_in(results_root / study)))
            elif st.state == StudyState.FAILED:
                n += len(self.cancel_study(study, f"processing failed: {st.error or ''}"[:200]))
        if n:
            log.info("finished %d work item(s) left IN PROGRESS by a previous process", n)
        return n

    def _adopt_if_done(self, uid: str, study_uid: str) -> None:
        """A work item for a study already processed: complete it with those results (no re-processing)."""
        st = self.journal.get_study(study_uid)
        if st is None or st.state not in (StudyState.REPORTED, StudyState.SENT):
            return  # claimed when the study is processed
        root = Path(self.config.spool_dir) / RESULTS_DIR / study_uid
        outputs = outputs_in(root)
        if not outputs:
            return
        try:
            self.change_state(uid, IN_PROGRESS, generate_uid(), NODE)
        except UPSError:
            return
        self.finish_study(study_uid, outputs)


def ups_by_study(session_factory) -> dict[str, list[dict]]:
    """For ``cag-node studies --json``: each study's work items (UIDs and states only)."""
    out: dict[str, list[dict]] = {}
    with session_factory() as s:
        for r in s.scalars(sa.select(UPSItem).order_by(UPSItem.created_at)):
            if r.study_uid:
                out.setdefault(r.study_uid, []).append({
                    "sop_instance_uid": r.sop_instance_uid, "state": r.state,
                    "performer": r.owner, "created_by": r.created_by})
    return out


def _matches(ds: Dataset, query: Dataset) -> bool:
    for elem in query:
        if elem.VR == "SQ" or elem.tag in (Tag("SOPClassUID"), Tag("TransactionUID")):
            continue
        want = elem.value
        if want in (None, "", b"") or (isinstance(want, (list, tuple)) and not want):
            continue
        if elem.tag not in ds:
            return False
        have = ds[elem.tag].value
        if isinstance(want, str) and ("*" in want or "?" in want):
            if not fnmatch.fnmatchcase(str(have), want):
                return False
        elif isinstance(want, (list, tuple, MultiValue)):  # a list of UIDs
            if str(have) not in [str(w) for w in want]:
                return False
        elif str(have).strip() != str(want).strip():
            return False
    return True


def work_item(study_uid: str, *, label: str = "CAG AI report", worklist: str = "CAG-NODE",
              priority: str = "MEDIUM", start: Optional[str] = None, **attributes) -> Dataset:
    """A SCHEDULED UPS for processing a study (``attributes``: more keywords, e.g. the patient's);
    the node creates one per study it processes on its own (the defaults)."""
    ds = Dataset()
    ds.ProcedureStepState = SCHEDULED
    ds.ProcedureStepLabel = label
    ds.WorklistLabel = worklist
    ds.ScheduledProcedureStepPriority = priority
    ds.ScheduledProcedureStepStartDateTime = start or _dt(utcnow())
    ds.InputReadinessState = "READY"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.TypeOfInstances = "DICOM"
    ds.InputInformationSequence = [item]
    return ds


def _output_item(o: dict, ae_title: str) -> Dataset:
    item = Dataset()
    item.TypeOfInstances = "DICOM"
    item.StudyInstanceUID = o["study_uid"]
    item.SeriesInstanceUID = o["series_uid"]
    ref = Dataset()
    ref.ReferencedSOPClassUID = o["sop_class_uid"]
    ref.ReferencedSOPInstanceUID = o["sop_instance_uid"]
    item.ReferencedSOPSequence = [ref]
    r = Dataset()
    r.RetrieveAETitle = ae_title
    item.DICOMRetrievalSequence = [r]
    return item


def outputs_of(paths: Iterable) -> list[dict]:
    """Output references (UIDs only) of result files (SR, KOS)."""
    import pydicom

    out = []
    for p in paths:
        try:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True,
                                 specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                                "SeriesInstanceUID"])
        except Exception:
            log.warning("result %s unreadable: not referenced by the work item", p)
            continue
        out.append({"sop_class_uid": str(ds.SOPClassUID), "sop_instance_uid": str(ds.SOPInstanceUID),
                    "study_uid": str(ds.StudyInstanceUID), "series_uid": str(ds.SeriesInstanceUID)})
    return out


def outputs_in(results_dir: Path) -> list[dict]:
    """The newest SR and KOS in a study's results folder (recovery after a restart)."""
    if not results_dir.is_dir():
        return []
    newest = {}
    for p in results_dir.glob("*.dcm"):
        kind = p.name.split("_", 1)[0]
        if kind not in newest or p.stat().st_mtime > newest[kind].stat().st_mtime:
            newest[kind] = p
    return outputs_of(newest[k] for k in sorted(newest))
