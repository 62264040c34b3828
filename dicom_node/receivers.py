"""Extra receiver processes on the node's port (``node.processes``): every core for reception.

Python receives one association at a time per core (the GIL), so one process tops out well
below ``storescp --fork``.  The node's first process binds the DICOM port with ``SO_REUSEPORT``;
each extra process (started with the ``spawn`` method: nothing of the parent's threads or
sockets is inherited) binds the same port the same way, and the kernel spreads incoming
connections over them.  An extra process runs only the receive stage: its own
:class:`~dicom_node.spool.Spool`, :class:`~dicom_node.journal.Journal` (the same database:
SQLite in WAL mode on one machine, PostgreSQL for many) and completion timers, and the same
:class:`~dicom_node.scp.StorageSCP`, so an instance is acknowledged only after it is fsynced and
journalled, exactly as in the first process.  MPPS and UPS requests are served by whichever
process the association reaches (their state is in the journal, see ``_workflow``).  Jobs,
sending, the admin and web endpoints stay in the first process; the journal is the boundary
between the stages, as ever.

An extra process dies with its parent (``PR_SET_PDEATHSIG``), so a SIGKILL of the node leaves
no orphan on the port; SIGTERM lets its in-flight associations finish.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0


def reuse_port_supported() -> bool:
    return hasattr(socket, "SO_REUSEPORT")


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _receiver_main(config_data: dict, base_dir: str, port: int, index: int, conn) -> None:
    """Entry point of one extra receiver process."""
    _die_with_parent()
    from dicom_node import pynetdicom_ext
    from dicom_node.config import parse_config
    from dicom_node.journal import Journal
    from dicom_node.logging_setup import setup_logging
    from dicom_node.metrics import NodeMetrics
    from dicom_node.scheduler import CompletionScheduler
    from dicom_node.scp import StorageSCP
    from dicom_node.spool import Spool

    config_data = dict(config_data)
    config_data["node"] = dict(config_data["node"], port=port)
    cfg = parse_config(config_data, base_dir=Path(base_dir), source="(receiver process)")
    setup_logging(cfg)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first process decides (Ctrl-C goes to the group)
    journal = Journal(cfg.journal_url, owner=cfg.node_id, lease_s=cfg.node.lease_s)
    spool = Spool(cfg.spool_dir, fsync=cfg.storage.fsync, min_free_mb=cfg.storage.min_free_mb)
    completion = CompletionScheduler(journal, cfg.completion.quiet_seconds)
    completion.start()
    workflow, mpps, senders = _workflow(cfg, journal, completion)

    def on_stored(study_uid, result):
        completion.instance_received(study_uid, result.last_received)
        if mpps is not None and result.sop_instance_uid:
            mpps.instance_stored(result.sop_instance_uid)

    pynetdicom_ext.install()
    scp = StorageSCP(cfg, spool, journal, NodeMetrics(), on_stored=on_stored, workflow=workflow)
    try:
        scp.start(reuse_port=True, first=False)
    except Exception as exc:
        conn.send(("error", f"{exc.__class__.__name__}: {exc}"))
        raise
    conn.send(("ready", os.getpid()))
    conn.close()
    log.debug("receiver process %d (pid %d) listening on port %d", index, os.getpid(), port)
    stop.wait()
    scp.stop(grace_s=30.0)
    for sender in senders:
        try:
            sender.stop()
        except Exception:
            log.exception("stopping %s failed", sender.__class__.__name__)
    completion.shutdown()
    journal.close()


def _workflow(cfg, journal, completion):
    """MPPS and UPS requests that arrive on this process's associations: their state is in the
    journal, so any process serves them.  An MPPS is watched by every process (``recheck``),
    so one that dies leaves none unwatched; UPS event reports go from the process that made the
    change.  Start-up recovery (``UPSService.recover``) and the node's own work items stay in
    the first process.  Returns (handlers or None, the MPPS service or None, senders to stop)."""
    mpps = ups = None
    senders = []
    if cfg.mpps.enabled:
        from dicom_node.mpps import MPPSForwarder, MPPSService

        forwarder = None
        if cfg.mpps.forward_to:
            dest = next(d for d in cfg.destinations if d.name == cfg.mpps.forward_to)
            forwarder = MPPSForwarder(cfg, dest)
            senders.append(forwarder)
        mpps = MPPSService(cfg, journal, completion.scheduler,
                           lambda su: journal.complete_study(su, 0.0) is True, forward=forwarder)
        completion.veto = mpps.veto
        mpps.resume()
    if cfg.ups.enabled:
        from dicom_node.ups import EventSender, UPSService

        events = EventSender(cfg)
        senders.append(events)
        ups = UPSService(cfg, journal, completion.scheduler, events)
    if mpps is None and ups is None:
        return None, None, senders
    from dicom_node.workflow_scp import WorkflowHandlers

    return WorkflowHandlers(mpps, ups), mpps, senders


class ReceiverPool:
    """The extra receiver processes of one node (started after the first process has bound)."""

    def __init__(self, config, port: int, count: int):
        self.config = config
        self.port = int(port)
        self.count = int(count)
        self.procs: list[mp.Process] = []

    def start(self) -> "ReceiverPool":
        ctx = mp.get_context("spawn")
        data = self.config.model_dump(mode="json")
        waiting = []
        for i in range(1, self.count + 1):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_receiver_main, name=f"cag-receiver-{i}", daemon=True,
                            args=(data, str(self.config.base_dir), self.port, i, child))
            p.start()
            child.close()
            self.procs.append(p)
            waiting.append((p, parent))
        for p, conn in waiting:
            if not conn.poll(READY_TIMEOUT_S):
                raise RuntimeError(f"receiver process {p.name} did not start in {READY_TIMEOUT_S:.0f} s")
            try:
                what, detail = conn.recv()
            except EOFError:
                raise RuntimeError(f"receiver process {p.name} exited at start (code {p.exitcode})") from None
            if what != "ready":
                raise RuntimeError(f"receiver process {p.name} failed to start: {detail}")
        log.info("%d extra receiver process(es) on port %d", self.count, self.port)
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def alive(self) -> int:
        return sum(p.is_alive() for p in self.procs)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM (in-flight associations finish), then kill what is left after ``grace_s``."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(grace_s + 5)
            if p.is_alive():
                log.warning("receiver process %s did not stop; killing it", p.name)
                p.kill()
                p.join(5)
        self.procs = []


__all__ = ["ReceiverPool", "reuse_port_supported"]
