"""The node: wires spool, journal, listener, completion scheduler, outbox,
admin endpoint and the processing worker pool together, and makes start-up
and shutdown safe.

Start-up order matters for restart safety:

1. remove stale temp files (never acknowledged, so never journaled);
2. jobs a dead process left ``running`` go back to ``queued``;
3. completion timers are re-armed from the journal's ``last_received``;
4. only then does the listener accept associations, and workers claim jobs.

Processing is ``dicom_node.pipeline.process_study(context, study_uid)``, handed a
:class:`~dicom_node.context.NodeContext`; it is imported lazily so a node without it
still receives, completes studies and leaves them ``waiting`` (logged once).  The
pipeline moves its study through the journal's transitions itself; if it raises, the
job and the study are failed here (``Journal.abandon_job``).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import sqlalchemy as sa

from dicom_node import pynetdicom_ext, receivers
from dicom_node.admin import AdminServer
from dicom_node.config import Config
from dicom_node.context import Models, NodeContext
from dicom_node.journal import Journal, RecordResult
from dicom_node.metrics import NodeMetrics
from dicom_node.scheduler import CompletionScheduler
from dicom_node.scp import StorageSCP
from dicom_node.spool import RESULTS_DIR, Spool
from dicom_node.tables import OutboxState, StudyState

log = logging.getLogger(__name__)

WORKER_POLL_S = 1.0


class Node:
    def __init__(self, config: Config, bundle_dir: Optional[str | Path] = None,
                 process_fn: Optional[Callable] = None):
        """``process_fn(context, study_uid)`` (a :class:`~dicom_node.context.NodeContext`) replaces
        ``dicom_node.pipeline.process_study`` (embedding, tests); by default the pipeline module
        is used when present."""
        self.config = config
        self.bundle_dir = Path(bundle_dir).resolve() if bundle_dir else config.bundle_dir
        self.metrics = NodeMetrics()
        self.journal: Optional[Journal] = None
        self.spool: Optional[Spool] = None
        self.scp: Optional[StorageSCP] = None
        self.completion: Optional[CompletionScheduler] = None
        self.admin: Optional[AdminServer] = None
        self.web = None  # dicom_node.web.server.WebServer when web.enabled
        self.outbox = None
        self.mpps = None  # dicom_node.mpps.MPPSService when mpps.enabled
        self.ups = None  # dicom_node.ups.UPSService when ups.enabled
        self._mpps_forwarder = None
        self.receivers = None  # dicom_node.receivers.ReceiverPool when node.processes > 1
        self._ups_events = None
        self.models = Models(config, self.bundle_dir)
        self.context: Optional[NodeContext] = None  # built at start: what processing is handed
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._workers: list[threading.Thread] = []
        self._pipeline_fn: Optional[Callable] = process_fn
        self._pipeline_missing_logged = False
        self._started = False

    # -- public attributes ---------------------------------------------------
    @property
    def scheduler(self):
        """The shared apscheduler BackgroundScheduler (the outbox adds its jobs here)."""
        return self.completion.scheduler if self.completion else None

    @property
    def address(self) -> tuple[str, int]:
        return self.scp.address

    @property
    def port(self) -> int:
        return self.scp.address[1]

    @property
    def admin_port(self) -> Optional[int]:
        return self.admin.port if self.admin else None

    @property
    def bundle(self):
        """The model bundle, loaded on first use (receiving never needs it)."""
        return self.models.bundle

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "Node":
        """Start everything; on failure (e.g. the port is taken) undo what started and re-raise."""
        try:
            return self._start()
        except BaseException:
            self._started = True  # let stop() tear down the parts that did start
            try:
                self.stop(grace_s=0)
            except Exception:
                log.debug("cleanup after a failed start failed", exc_info=True)
            raise

    def _start(self) -> "Node":
        cfg = self.config
        self.spool = Spool(cfg.spool_dir, fsync=cfg.storage.fsync, min_free_mb=cfg.storage.min_free_mb)
        self.spool.clean_stale_temp()
        self.journal = Journal(cfg.journal_url, owner=cfg.node_id, lease_s=cfg.node.lease_s)
        requeued = self.journal.requeue_running_jobs()
        if requeued:
            log.info("re-queued %d job(s) left running by a previous process", requeued)

        self.completion = CompletionScheduler(self.journal, cfg.completion.quiet_seconds,
                                              on_complete=self._on_complete)
        self.completion.start()
        self.completion.resume()
        # Several nodes (or receiver processes) on one journal: a study another one received is
        # completed here too if that one dies before its quiet period ends.
        self.completion.start_sweep(max(1.0, min(cfg.completion.quiet_seconds, cfg.node.lease_s / 3)))
        # Leases on the jobs this process runs (docs/scale-out.md); the outbox renews its own.
        self.completion.scheduler.add_job(self._renew_leases, "interval", seconds=cfg.node.lease_s / 3,
                                          id="job-leases", replace_existing=True)
        self._start_outbox()
        self.context = NodeContext(config=cfg, journal=self.journal, spool=self.spool, models=self.models,
                                   metrics=self.metrics, outbox=self.outbox)
        workflow = self._start_workflow()

        pynetdicom_ext.install()  # once per process: socket reads, streaming reception into the spool
        self.scp = StorageSCP(cfg, self.spool, self.journal, self.metrics, on_stored=self._on_stored,
                              workflow=workflow)
        extra = cfg.receiver_processes - 1
        if extra and not receivers.reuse_port_supported():
            log.warning("node.processes: SO_REUSEPORT is not available here; receiving in one process")
            extra = 0
        host, port = self.scp.start(reuse_port=extra > 0)
        if extra:
            # bound first, so port 0 is resolved; the extras bind the same port
            self.receivers = receivers.ReceiverPool(cfg, port, extra).start()
        if cfg.admin.enabled:
            self.admin = AdminServer(cfg.admin.host, cfg.admin.port, self.metrics, self.health)
            self.admin.start()
        if cfg.web.enabled:
            # imported only when enabled: a node without the web extras runs as before
            from dicom_node.web.server import WebServer

            self.web = WebServer(self)
            self.web.start()
        if cfg.processing.enabled:
            for i in range(cfg.processing.workers):
                t = threading.Thread(target=self._worker, name=f"cag-worker-{i}", daemon=True)
                t.start()
                self._workers.append(t)
        self._started = True
        log.info("listening on %s:%d as %s%s (%d receiver process%s); admin %s; web %s; spool %s; journal %s", host, port,
                 cfg.node.ae_title, " (TLS)" if cfg.node.tls.enabled else "", extra + 1, "" if not extra else "es",
                 f"{self.admin.host}:{self.admin.port}" if self.admin else "disabled",
                 self.web.url if self.web else "disabled", self.spool.root, _safe_url(cfg.journal_url))
        return self

    def _start_outbox(self) -> None:
        try:
            mod = importlib.import_module("dicom_node.outbox")
        except ModuleNotFoundError as exc:
            if exc.name != "dicom_node.outbox":
                raise
            log.info("no outbox module: results stay in the spool")
            return
        self.outbox = mod.Outbox(self.config, self.journal.sessionmaker, on_study_sent=self._on_study_sent,
                                 on_study_failed=self._on_study_send_failed)
        self.outbox.start(self.completion.scheduler)
        # A crash after a row was marked sent but before the study was: finish it now.
        for st in self.journal.list_studies(states=[StudyState.REPORTED]):
            if self.outbox.study_state(st.study_uid) == OutboxState.SENT:
                self._on_study_sent(st.study_uid)

    def _start_workflow(self):
        """MPPS and UPS services (their state is in the journal; resumed before the listener starts)."""
        cfg = self.config
        if cfg.mpps.enabled:
            from dicom_node.mpps import MPPSForwarder, MPPSService

            if cfg.mpps.forward_to:
                dest = next(d for d in cfg.destinations if d.name == cfg.mpps.forward_to)
                self._mpps_forwarder = MPPSForwarder(cfg, dest)
            self.mpps = MPPSService(cfg, self.journal, self.completion.scheduler, self._complete_now,
                                    forward=self._mpps_forwarder)
            self.completion.veto = self.mpps.veto
            self.mpps.resume()
        if cfg.ups.enabled:
            from dicom_node.ups import EventSender, UPSService

            self._ups_events = EventSender(cfg)
            self.ups = UPSService(cfg, self.journal, self.completion.scheduler, self._ups_events)
            try:
                self.ups.recover(self.spool.root / RESULTS_DIR)
            except Exception:
                log.exception("UPS recovery failed; the work items stay IN PROGRESS")
        if self.mpps is None and self.ups is None:
            return None
        from dicom_node.workflow_scp import WorkflowHandlers

        return WorkflowHandlers(self.mpps, self.ups)

    def _complete_now(self, study_uid: str) -> bool:
        """A study is complete because its MPPS says so (no quiet period)."""
        done = self.journal.complete_study(study_uid, 0.0)
        if done is True:
            self._on_complete(study_uid)
        return done is True

    def stop(self, grace_s: float = 30.0) -> None:
        """Graceful: stop accepting, let in-flight C-STOREs finish, leave jobs journaled."""
        if not self._started:
            return
        self._started = False
        log.info("stopping: no new associations; waiting up to %.0fs for in-flight ones", grace_s)
        if self.web:
            try:
                self.web.stop()  # finishes in-flight requests (a STOW being stored completes)
            except Exception:
                log.exception("web server stop failed")
        if self.receivers is not None:  # SIGTERM first: they finish in-flight associations meanwhile
            for p in self.receivers.procs:
                if p.is_alive():
                    p.terminate()
        if self.scp:
            self.scp.stop(grace_s)
        if self.receivers is not None:
            try:
                self.receivers.stop(grace_s)
            except Exception:
                log.exception("stopping the receiver processes failed")
        self._stop.set()
        self._wake.set()
        for t in self._workers:
            t.join(timeout=1.0)
        busy = [t.name for t in self._workers if t.is_alive()]
        if busy:
            # Their jobs stay 'running' in the journal and are re-queued at the next start.
            log.warning("leaving %d processing job(s) in flight; they resume at next start", len(busy))
        for part in (self._ups_events, self._mpps_forwarder):
            if part is not None:
                try:
                    part.stop()
                except Exception:
                    log.exception("stopping %s failed", part.__class__.__name__)
        if self.outbox is not None:
            try:
                self.outbox.stop()
            except Exception:
                log.exception("outbox stop failed")
        if self.completion:
            try:
                self.completion.shutdown()
            except Exception:  # not started
                pass
        if self.admin:
            self.admin.stop()
        if self.journal and not busy:
            self.journal.close()
        log.info("stopped")

    def request_stop(self) -> None:
        """Signal-safe: ask ``run_forever`` to return."""
        self._stop.set()

    def run_forever(self) -> None:
        while not self._stop.wait(0.5):
            pass

    # -- callbacks --------------------------------------------------------------
    def _on_stored(self, study_uid: str, result: RecordResult) -> None:
        if result.reopened:
            log.info("study %s reopened by a late instance", study_uid)
        self.completion.instance_received(study_uid, result.last_received)
        if self.mpps is not None and result.sop_instance_uid:
            self.mpps.instance_stored(result.sop_instance_uid)

    def _renew_leases(self) -> None:
        try:
            self.journal.renew_leases()
        except Exception:  # a journal outage: the lease may lapse, another node then takes over
            log.exception("renewing job leases failed")

    def _on_complete(self, study_uid: str) -> None:
        self.metrics.studies_completed.inc()
        self.metrics.jobs.labels(outcome="queued").inc()
        self._wake.set()

    def _on_study_sent(self, study_uid: str) -> None:
        self.journal.mark_sent(study_uid)  # only from reported: not if reopened meanwhile

    def _on_study_send_failed(self, study_uid: str, error: str) -> None:
        self.journal.mark_delivery_failed(study_uid, error)

    def health(self) -> dict:
        h = {"status": "ok", "ae_title": self.config.node.ae_title,
             "port": self.scp.address[1] if self.scp and self.scp.server else None,
             "outbox": self.outbox is not None, "pipeline": self._pipeline() is not None}
        try:
            with self.journal.engine.connect() as c:
                c.execute(sa.text("SELECT 1"))
        except Exception as exc:
            h.update(status="error", journal=str(exc.__class__.__name__))
        if not self._started:
            h["status"] = "stopping"
        return h

    # -- processing ---------------------------------------------------------------
    def _pipeline(self) -> Optional[Callable]:
        if self._pipeline_fn is None:
            if importlib.util.find_spec("dicom_node.pipeline") is None:
                if not self._pipeline_missing_logged:
                    log.info("no pipeline module: complete studies stay 'waiting'")
                    self._pipeline_missing_logged = True
                return None
            self._pipeline_fn = importlib.import_module("dicom_node.pipeline").process_study
        return self._pipeline_fn

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                fn = self._pipeline()
            except Exception:
                if not self._pipeline_missing_logged:
                    log.exception("the pipeline module does not import; complete studies stay 'waiting'")
                    self._pipeline_missing_logged = True
                fn = None
            job = self.journal.claim_job() if fn is not None else None
            if job is None:
                self._wake.wait(WORKER_POLL_S)
                self._wake.clear()
                continue
            self._run_job(fn, job)

    def _run_job(self, fn: Callable, job) -> None:
        log.info("processing study %s (job %d, attempt %d)", job.study_uid, job.id, job.attempts)
        t0 = time.monotonic()
        self._ups_begin(job.study_uid)
        try:
            summary = fn(self.context, job.study_uid)
        except Exception as exc:
            err = f"{exc.__class__.__name__}: {exc}"[:2000]
            log.error("processing study %s failed: %s", job.study_uid, err)
            if self.journal.abandon_job(job.id, job.study_uid, err):  # not if reopened meanwhile
                self._ups_end(job.study_uid, None, error=err)
            self.metrics.jobs.labels(outcome="failed").inc()
            return
        if not self.journal.finish_job(job.id):
            log.warning("study %s: job %d was taken over by another node while it ran (lease lapsed); "
                        "its results are that node's", job.study_uid, job.id)
            self.metrics.jobs.labels(outcome="taken_over").inc()
            return
        self._ups_end(job.study_uid, summary)
        self.metrics.jobs.labels(outcome="done").inc()
        log.info("study %s processed in %.1fs", job.study_uid, time.monotonic() - t0)


    # -- UPS: the node as performer of its studies' work items ------------------------
    def _ups_begin(self, study_uid: str) -> None:
        if self.ups is None:
            return
        try:
            self.ups.begin_study(study_uid)
        except Exception:
            log.exception("claiming the work items of study %s failed", study_uid)

    def _ups_end(self, study_uid: str, summary, error: Optional[str] = None) -> None:
        """Complete (results published) or cancel (failed) the node's work items of a study."""
        if self.ups is None:
            return
        try:
            if error is not None:
                self.ups.cancel_study(study_uid, f"processing failed: {error}"[:200])
                return
            st = self.journal.get_study(study_uid)
            if st is None or st.state not in (StudyState.REPORTED, StudyState.SENT):
                return  # stale (reopened) or still running: the next processing finishes them
            from dicom_node.ups import outputs_in, outputs_of

            results = summary.get("results") if isinstance(summary, dict) else None
            outputs = (outputs_of(r["path"] for r in results) if results
                       else outputs_in(self.spool.results_dir(study_uid)))
            self.ups.finish_study(study_uid, outputs)
        except Exception:
            log.exception("updating the work items of study %s failed", study_uid)


def _safe_url(url: str) -> str:
    """The journal URL without a password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable URL)"
