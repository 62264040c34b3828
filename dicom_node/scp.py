"""The DICOM listener: C-ECHO and C-STORE over pynetdicom, optionally over TLS.

Its parts: :mod:`dicom_node.dicomheader` walks a received data set's raw header (pure, no I/O);
:mod:`dicom_node.pynetdicom_ext` holds the version-checked pynetdicom extensions (socket reads,
streaming reception into the spool), installed once by ``Node.start``; this module is the AE,
its association policy, TLS and the one durable store path (``StorageSCP.store``).

Why it looks the way it does:

* The C-STORE handler does as little as possible and returns fast: it never
  decodes the data set.  It walks the raw bytes once (element headers only,
  values skipped) to check the structure is complete and to pick out the few
  header values it needs (UIDs, Modality, NumberOfFrames, PatientID for a hash),
  writes File Meta + the raw bytes durably (``Spool.store``), journals the
  instance, and only then answers 0x0000.  A crash before the answer means the
  peer retries; a crash after it loses nothing.
* The data set is never held in memory: pynetdicom's chunked reception
  (``STORE_RECV_CHUNKED_DATASET``) appends each P-DATA fragment to
  ``<spool>/.tmp/rx-*.dcm`` (``RxFile``, already headed by our File Meta), the
  handler walks it through a read-only memory map, and ``Spool.adopt`` fsyncs
  and renames it into place.  Memory per association no longer grows with the
  instance size.
* Every storage SOP class pynetdicom knows (plus a few common private ones) is
  a *supported* context, with every transfer syntax we can store as received.
  Supported contexts are not limited to 128; only a requestor's proposal is.
  Non-angiography objects (CT, SR, KO, ...) are acknowledged and recorded as not
  processable, so a PACS forwarding a whole study sees no failure.
* Association policy: called AE must be ours (reject reason 7), calling AE must
  be allow-listed unless ``"*"`` (reason 3), the peer's IP must be in
  ``node.allowed_hosts`` when that is set (reason 1, no reason given).

Failure statuses (PS3.4 B.2.3): 0xA700 out of resources (disk below
``storage.min_free_mb`` or full); 0xC210 malformed data set; 0xC211 a required
UID missing; 0xC212 a UID unsafe as a path; 0xC213 unexpected local failure.
Each refusal is journaled in ``rejections`` and counted in the metrics.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.sop_class import Verification

from dicom_node import pynetdicom_ext
from dicom_node.config import Config
from dicom_node.dicomheader import (  # noqa: F401  (re-exported: the listener's walker)
    DEFLATED_LE, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, MalformedDataset, parse_header, processable)
from dicom_node.journal import Journal, RecordResult
from dicom_node.metrics import NodeMetrics
from dicom_node.pynetdicom_ext import RxFile
from dicom_node.spool import FileMeta, Spool, SpoolFull, uid_is_path_safe, uid_is_valid

log = logging.getLogger(__name__)

ST_SUCCESS = 0x0000
ST_OUT_OF_RESOURCES = 0xA700
ST_MALFORMED = 0xC210
ST_MISSING_UID = 0xC211
ST_UNSAFE_UID = 0xC212
ST_INTERNAL = 0xC213


# Stored exactly as received; none of them is decoded here.
TRANSFER_SYNTAXES = [
    EXPLICIT_LE, IMPLICIT_LE, DEFLATED_LE, EXPLICIT_BE,
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.51",  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.57",  # JPEG lossless P14
    "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 multi-component lossless
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 multi-component
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE lossless
    # Video (some cath systems export cine as MPEG-4/H.264): stored, not analysed.
    "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102",
    "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105",
    "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108",
]

# Private storage classes vendors commonly forward with a cath study.
PRIVATE_STORAGE_CLASSES = [
    "1.3.12.2.1107.5.9.1",  # Siemens CSA Non-Image Storage
    "1.2.840.113619.4.26",  # GE Private 3D Model Storage
    "1.2.840.113619.4.30",  # GE Advantage Workstation private
    "1.3.46.670589.2.5.1.1",  # Philips 3D Presentation State
    "1.3.46.670589.11.0.0.12.1",  # Philips private MR spectrum
    "1.3.46.670589.11.0.0.12.2",  # Philips private MR series data
    "1.3.46.670589.11.0.0.12.4",  # Philips private MR examcard
]


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows (its public ``AllStoragePresentationContexts``)
    and the private ones above."""
    return sorted({str(cx.abstract_syntax) for cx in AllStoragePresentationContexts} | set(PRIVATE_STORAGE_CLASSES))


# ---------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------
def build_ssl_context(config: Config) -> Optional[ssl.SSLContext]:
    """Server-side TLS context; with ``tls.ca`` the client must present a certificate it signed."""
    tls = config.node.tls
    if not tls.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(config.resolve(tls.cert)), str(config.resolve(tls.key)))
    if tls.ca:
        ctx.load_verify_locations(cafile=str(config.resolve(tls.ca)))
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _defer_tls_handshake(server, ctx: ssl.SSLContext, timeout: float) -> None:
    """Move the TLS handshake out of the accept loop.

    pynetdicom wraps accepted sockets with the default
    ``do_handshake_on_connect=True`` in the thread that accepts connections, so
    one client that connects and never speaks TLS (a port scanner, a plain-TCP
    peer) would block every other association.  Here the handshake happens on
    the first read, in the association's own thread, bounded by a timeout.
    """

    def get_request():
        sock, addr = server.socket.accept()
        sock.settimeout(timeout)
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    server.get_request = get_request


# ---------------------------------------------------------------------------
# The listener
# ---------------------------------------------------------------------------
_REJECT_REASONS = {(1, 1, 1): "host", (1, 1, 3): "calling_aet", (1, 1, 7): "called_aet",
                   (2, 3, 2): "too_many_associations"}

OnStored = Callable[[str, RecordResult], None]


@dataclass(frozen=True)
class StoreResult:
    """What ``StorageSCP.store`` did with one instance: a DIMSE status, and the reason of a refusal."""

    status: int
    reason: Optional[str]
    sop_class_uid: Optional[str] = None
    sop_instance_uid: Optional[str] = None
    study_uid: Optional[str] = None
    series_uid: Optional[str] = None
    size: int = 0
    processable: bool = False
    not_processed_reason: Optional[str] = None


class StorageSCP:
    """C-ECHO + C-STORE SCP writing into a Spool and a Journal."""

    def __init__(self, config: Config, spool: Spool, journal: Journal, metrics: NodeMetrics,
                 on_stored: Optional[OnStored] = None, workflow=None):
        """``workflow``: a ``dicom_node.workflow_scp.WorkflowHandlers`` (MPPS, UPS) served on the same AE."""
        self.config = config
        self.workflow = workflow
        self.spool = spool
        self.journal = journal
        self.metrics = metrics
        self.on_stored = on_stored
        self.modalities = [m.upper() for m in config.processing.modalities]
        self._networks = [ipaddress.ip_network(h, strict=False) for h in config.node.allowed_hosts]
        # pynetdicom_ext.install() (Node.start) decides; without it, reception is in memory
        self.streaming = pynetdicom_ext.streaming()
        self.ae = self._build_ae()
        self.server = None
        self._address: tuple[str, int] = (config.node.host, config.node.port)

    def _build_ae(self) -> AE:
        n = self.config.node
        ae = AE(ae_title=n.ae_title)
        ae._cag_scp = self  # received data sets stream into this SCP's spool (RxFile)
        ae.maximum_pdu_size = n.max_pdu
        ae.acse_timeout = n.acse_timeout
        ae.dimse_timeout = n.dimse_timeout
        ae.network_timeout = n.network_timeout
        ae.maximum_associations = n.max_associations
        ae.require_called_aet = True
        ae.require_calling_aet = [] if "*" in n.allowed_calling_aets else list(n.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for uid in storage_sop_classes():
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        if self.workflow is not None:
            for uid in self.workflow.sop_classes():
                ae.add_supported_context(uid, [EXPLICIT_LE, IMPLICIT_LE])
        return ae

    # -- lifecycle ----------------------------------------------------------
    def start(self, reuse_port: bool = False, first: bool = True) -> tuple[str, int]:
        """Listen; ``reuse_port``: bind with ``SO_REUSEPORT`` so that several receiver processes
        share the port (:mod:`dicom_node.receivers`).  The ``first`` of them checks that nothing
        else holds the port: ``SO_REUSEPORT`` would otherwise let a second node started on the
        same port by mistake share it silently instead of failing."""
        n = self.config.node
        if reuse_port and first and n.port:
            _check_port_free(n.host, n.port)
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        if self.workflow is not None:
            handlers.extend(self.workflow.handlers())
        ctx = build_ssl_context(self.config)
        if reuse_port:
            self.server = self.ae.make_server((n.host, n.port), evt_handlers=handlers, ssl_context=ctx,
                                              server_class=_ReusePortServer)
            threading.Thread(target=self.server.serve_forever, name="AcceptorServer-reuseport",
                             daemon=True).start()
            self.ae._servers.append(self.server)
        else:
            self.server = self.ae.start_server((n.host, n.port), block=False, evt_handlers=handlers,
                                               ssl_context=ctx)
        if ctx is not None:
            _defer_tls_handshake(self.server, ctx, n.acse_timeout)
        self.metrics.active_associations.set_function(lambda: len(self.server.active_associations)
                                                      if self.server else 0)
        self._address = tuple(self.server.server_address[:2])
        return self._address

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); port 0 in the config means a free one was picked."""
        return self._address

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish (up to ``grace_s``), abort the rest."""
        if self.server is None:
            return
        server, self.server = self.server, None
        server.shutdown()  # stops accepting and closes the listening socket
        deadline = time.monotonic() + grace_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            log.warning("aborting association from %s after %.0fs grace", assoc.requestor.ae_title, grace_s)
            assoc.abort()

    # -- association policy ------------------------------------------------
    def _on_requested(self, event) -> None:
        if not self._networks:
            return
        host = event.assoc.requestor.address
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and getattr(ip, "ipv4_mapped", None) is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
        if ip is not None and any(ip.version == net.version and ip in net for net in self._networks):
            return
        log.warning("association from %s (calling AE %s) rejected: host not allowed", host,
                    event.assoc.requestor.primitive.calling_ae_title)
        self.metrics.association(False, "host")
        event.assoc.acse.send_reject(0x01, 0x01, 0x01)
        event.assoc.kill()

    def _on_rejected(self, event) -> None:
        p = event.assoc.acceptor.primitive
        key = (p.result, p.result_source, p.diagnostic)
        reason = _REJECT_REASONS.get(key, "other")
        rq = event.assoc.requestor.primitive
        log.warning("association from %s rejected (%s): calling AE %s, called AE %s",
                    event.assoc.requestor.address, reason, rq.calling_ae_title, rq.called_ae_title)
        self.metrics.association(False, reason)

    def _on_accepted(self, event) -> None:
        a = event.assoc
        a._cag_stats = [0, 0, time.monotonic()]  # instances, bytes, start
        log.info("association accepted from %s:%s (calling AE %s)", a.requestor.address, a.requestor.port,
                 a.requestor.ae_title)
        self.metrics.association(True)

    def _on_conn_close(self, event) -> None:
        pynetdicom_ext.discard_unclaimed(event.assoc)

    def _on_closed(self, event) -> None:
        a = event.assoc
        pynetdicom_ext.discard_unclaimed(a)
        stats = getattr(a, "_cag_stats", None)
        if stats is None:
            return
        dt = max(1e-6, time.monotonic() - stats[2])
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        log.info("association from %s %s: %d instance(s), %.1f MB in %.2fs (%.1f MB/s)", a.requestor.ae_title,
                 how, stats[0], stats[1] / 1e6, dt, stats[1] / 1e6 / dt)

    # -- DIMSE --------------------------------------------------------------
    def _on_echo(self, event) -> int:
        return ST_SUCCESS

    def _refuse(self, status: int, reason: str, calling: str, sop_class: Optional[str], sop_inst: Optional[str]) -> int:
        log.warning("C-STORE from %s refused 0x%04X: %s", calling, status, reason)
        self.metrics.store_failed(status)
        try:
            self.journal.record_rejection(status=status, reason=reason, calling_aet=calling,
                                          sop_class_uid=sop_class, sop_instance_uid=sop_inst)
        except Exception:  # the refusal itself must still be answered
            log.exception("could not journal a rejection")
        return status

    def _on_store(self, event) -> int:
        t0 = time.perf_counter()
        req = event.request
        calling = event.assoc.requestor.ae_title
        ts = str(event.context.transfer_syntax)
        rq_class = str(req.AffectedSOPClassUID or "")
        rq_inst = str(req.AffectedSOPInstanceUID or "")
        rx = pynetdicom_ext.received_file(event)
        mm = None
        if rx is not None:  # streamed to <spool>/.tmp as it arrived
            if rx.refused:
                return self._refuse(ST_OUT_OF_RESOURCES, rx.refused, calling, rq_class, rq_inst)
            if rx.error is not None or rx.head is None:
                exc = rx.error
                status = (ST_OUT_OF_RESOURCES if exc is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT)
                          else ST_INTERNAL)
                rx.discard()
                return self._refuse(status, f"write failed: {exc}", calling, rq_class, rq_inst)
            try:
                mm, buf = pynetdicom_ext.map_dataset(rx)
            except (OSError, ValueError) as exc:
                rx.discard()
                return self._refuse(ST_INTERNAL, f"received file unreadable: {exc}", calling, rq_class, rq_inst)
        else:
            rx = None
            buf = req.DataSet.getbuffer()
        try:
            out = self.store(buf, ts, calling, rq_class, rq_inst, rx=rx)
        finally:
            buf.release()
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a view still held (e.g. by a traceback): closed when collected
                    pass
        if out.status == ST_SUCCESS:
            stats = getattr(event.assoc, "_cag_stats", None)
            if stats is not None:
                stats[0] += 1
                stats[1] += out.size
            self.metrics.store_seconds.observe(time.perf_counter() - t0)
        return out.status

    def store(self, buf, ts: str, calling: str, rq_class: str = "", rq_inst: str = "",
              rx: Optional[RxFile] = None) -> "StoreResult":
        """The one durable path of an incoming instance (C-STORE and DICOMweb STOW-RS).

        ``buf``: the data set (after File Meta) encoded in transfer syntax ``ts``;
        ``rx``: the already-written temp file holding it, adopted instead of copied.
        Walks the header, writes + fsyncs + renames into the spool, journals it and
        only then returns success; every refusal is journaled and counted.  Never
        raises: the result carries the status and, on refusal, the reason.
        """

        def refuse(status: int, reason: str, sop_class, sop_inst) -> StoreResult:
            self._refuse(status, reason, calling, sop_class, sop_inst)
            return StoreResult(status, reason, sop_class or None, sop_inst or None)

        try:
            try:
                hdr = parse_header(buf, ts)
            except MalformedDataset as exc:
                return refuse(ST_MALFORMED, f"malformed data set: {exc}", rq_class, rq_inst)
            study, series, inst = hdr.study_uid, hdr.series_uid, hdr.sop_instance_uid
            sop_class = hdr.sop_class_uid or rq_class
            missing = [n for n, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series),
                                      ("SOPInstanceUID", inst), ("SOPClassUID", sop_class)) if not v]
            if missing:
                return refuse(ST_MISSING_UID, f"missing {', '.join(missing)}", rq_class, rq_inst)
            for name, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series), ("SOPInstanceUID", inst)):
                if not uid_is_path_safe(uid):
                    return refuse(ST_UNSAFE_UID, f"{name} {uid[:80]!r} is unsafe as a path", sop_class, inst)
                if not uid_is_valid(uid):
                    log.debug("tolerating non-conformant %s %s", name, uid)
            if rq_inst and rq_inst != inst:
                log.warning("store from %s: requested SOP Instance UID %s differs from the data set's %s; "
                            "stored under the data set's", calling, rq_inst, inst)
            meta = FileMeta(sop_class_uid=sop_class, sop_instance_uid=inst, transfer_syntax=ts,
                            implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID,
                            implementation_version=PYNETDICOM_IMPLEMENTATION_VERSION, source_aet=calling)
            try:
                if rx is not None:
                    stored = self.spool.adopt(study, series, inst, meta, rx.path, rx.head)
                else:
                    stored = self.spool.store(study, series, inst, meta, buf)
            except SpoolFull as exc:
                return refuse(ST_OUT_OF_RESOURCES, str(exc), sop_class, inst)
            except OSError as exc:
                status = ST_OUT_OF_RESOURCES if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ST_INTERNAL
                return refuse(status, f"write failed: {exc}", sop_class, inst)
            ok, why = processable(hdr, sop_class, self.modalities)
            try:
                result = self.journal.record_instance(
                    study_uid=study, series_uid=series, sop_instance_uid=inst, sop_class_uid=sop_class,
                    modality=hdr.modality, transfer_syntax=ts, path=str(stored.path), size=stored.size,
                    calling_aet=calling, processable=ok, reason=why, n_frames=hdr.n_frames,
                    patient_hash=hdr.patient_hash)
            except Exception as exc:
                log.exception("journal write failed")
                return refuse(ST_INTERNAL, f"journal write failed: {exc.__class__.__name__}", sop_class, inst)
        except Exception as exc:  # never let the node die on one instance
            log.exception("store handler failed")
            return refuse(ST_INTERNAL, f"internal error: {exc.__class__.__name__}: {exc}", rq_class, rq_inst)
        self.metrics.stored(stored.size, ok)
        log.debug("stored %s (%s, %s, %d bytes) study %s from %s", inst, hdr.modality, ts, stored.size, study, calling)
        if self.on_stored is not None:
            try:
                self.on_stored(study, result)
            except Exception:  # scheduling is re-derived from the journal at restart
                log.exception("on_stored callback failed")
        return StoreResult(ST_SUCCESS, None, sop_class, inst, study, series, stored.size, ok, why)


def _check_port_free(host: str, port: int) -> None:
    """Raise ``OSError(EADDRINUSE)`` if (host, port) is taken (bind without SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as pynetdicom: TIME_WAIT is fine
        s.bind((host, port))


class _ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, bound with ``SO_REUSEPORT``: the kernel spreads
    connections over every process bound so."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()
