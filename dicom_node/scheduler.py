"""Study completion: a study is complete ``completion.quiet_seconds`` after its
last instance.

DICOM has no "end of study" signal, so completion is a quiet period, as in
mercure/Orthanc; unlike them, the deadline is derived from ``last_received`` in
the journal, so a restart re-arms every timer (``resume``) and nothing is lost
in memory.

One apscheduler ``date`` job per study.  Arming it on every instance would
churn the scheduler at hundreds of instances per second, so an instance only
arms a timer when none is pending; when a timer fires early (more instances
came meanwhile), the journal says when to look again and it re-arms itself.
The scheduler is shared: the outbox adds its own jobs to it.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Callable, Optional

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node.journal import Journal
from dicom_node.tables import StudyState

log = logging.getLogger(__name__)


class CompletionScheduler:
    def __init__(self, journal: Journal, quiet_seconds: float,
                 on_complete: Optional[Callable[[str], None]] = None):
        self.journal = journal
        self.quiet = float(quiet_seconds)
        self.on_complete = on_complete
        # Default (local) timezone: our run dates are timezone-aware UTC, and a
        # naive datetime another module passes means local time.
        self.scheduler = BackgroundScheduler(job_defaults={
            "misfire_grace_time": None, "coalesce": True, "max_instances": 1})
        self._pending: set[str] = set()
        # veto(study_uid) -> reason: do not process this study (a skipped DISCONTINUED MPPS)
        self.veto: Optional[Callable[[str], Optional[str]]] = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)

    def resume(self) -> int:
        """Re-arm a timer for every study the journal says is still receiving."""
        n = 0
        for st in self.journal.list_studies(states=[StudyState.RECEIVING]):
            self._arm(st.study_uid, st.last_received + timedelta(seconds=self.quiet), force=True)
            n += 1
        if n:
            log.info("re-armed completion timers for %d receiving stud%s", n, "y" if n == 1 else "ies")
        return n

    def sweep(self) -> int:
        """Arm a timer for every receiving study that has none here: studies other nodes (or
        receiver processes) received, so one that dies before the quiet period ends leaves no
        study uncompleted.  Several nodes completing one study is safe: the journal completes
        it once (``complete_study`` locks the study row).  Returns how many were armed."""
        n = 0
        for st in self.journal.list_studies(states=[StudyState.RECEIVING]):
            with self._lock:
                if st.study_uid in self._pending:
                    continue
            self._arm(st.study_uid, st.last_received + timedelta(seconds=self.quiet))
            n += 1
        return n

    def start_sweep(self, interval_s: float) -> None:
        """Run :meth:`sweep` every ``interval_s`` (nodes sharing a journal)."""
        self.scheduler.add_job(self._sweep_job, "interval", seconds=max(0.5, float(interval_s)),
                               id="completion-sweep", replace_existing=True)

    def _sweep_job(self) -> None:
        try:
            self.sweep()
        except Exception:
            log.exception("completion sweep failed")

    def instance_received(self, study_uid: str, last_received: datetime) -> None:
        """Called after each journaled instance (cheap when a timer is pending)."""
        self._arm(study_uid, last_received + timedelta(seconds=self.quiet))

    def _arm(self, study_uid: str, when: datetime, force: bool = False) -> None:
        with self._lock:
            if study_uid in self._pending and not force:
                return
            self._pending.add(study_uid)
        self.scheduler.add_job(self._fire, "date", run_date=when, args=[study_uid],
                               id=f"complete:{study_uid}", replace_existing=True)

    def _fire(self, study_uid: str) -> None:
        with self._lock:
            self._pending.discard(study_uid)
        try:
            why = self.veto(study_uid) if self.veto is not None else None
            if why:
                st = self.journal.get_study(study_uid)
                due = st.last_received + timedelta(seconds=self.quiet) if st is not None else None
                if due is not None and due > datetime.now(timezone.utc):
                    self._arm(study_uid, due)
                elif st is not None:
                    self.journal.fail_receiving(study_uid, "mpps", why)
                return
        except Exception:
            log.exception("completion veto check failed for study %s", study_uid)
        try:
            again = self.journal.complete_study(study_uid, self.quiet, now=datetime.now(timezone.utc))
        except Exception:
            log.exception("completion check failed for study %s; retrying", study_uid)
            again = datetime.now(timezone.utc) + timedelta(seconds=max(1.0, self.quiet))
        if isinstance(again, datetime):
            self._arm(study_uid, again)
        elif again is True and self.on_complete is not None:
            self.on_complete(study_uid)
