"""The DICOM listener: C-ECHO and C-STORE over pynetdicom, optionally over TLS.

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
import hashlib
import ipaddress
import logging
import mmap
import os
import ssl
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

from pydicom.uid import UID
from pynetdicom import AE, _config as pnd_config, evt
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.sop_class import Verification, _STORAGE_CLASSES

from dicom_node.config import Config
from dicom_node.journal import Journal, RecordResult
from dicom_node.metrics import NodeMetrics
from dicom_node.spool import FileMeta, Spool, SpoolFull, _write_all, uid_is_path_safe, uid_is_valid

log = logging.getLogger(__name__)

# pynetdicom's "standard" DIMSE/PDU log handlers cost time per PDU; we log ourselves.
pnd_config.LOG_HANDLER_LEVEL = "none"

ST_SUCCESS = 0x0000
ST_OUT_OF_RESOURCES = 0xA700
ST_MALFORMED = 0xC210
ST_MISSING_UID = 0xC211
ST_UNSAFE_UID = 0xC212
ST_INTERNAL = 0xC213

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"

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
    return sorted(set(_STORAGE_CLASSES.values()) | set(PRIVATE_STORAGE_CLASSES))


# ---------------------------------------------------------------------------
# Raw data set walking (no pydicom decode)
# ---------------------------------------------------------------------------
class MalformedDataset(ValueError):
    pass


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32

TAG_SOP_CLASS = 0x00080016
TAG_SOP_INSTANCE = 0x00080018
TAG_MODALITY = 0x00080060
TAG_PATIENT_ID = 0x00100020
TAG_STUDY_UID = 0x0020000D
TAG_SERIES_UID = 0x0020000E
TAG_N_FRAMES = 0x00280008
TAG_PIXEL_DATA = 0x7FE00010
TAG_FLOAT_PIXEL_DATA = 0x7FE00008
TAG_DOUBLE_PIXEL_DATA = 0x7FE00009
_WANTED = {TAG_SOP_CLASS, TAG_SOP_INSTANCE, TAG_MODALITY, TAG_PATIENT_ID, TAG_STUDY_UID, TAG_SERIES_UID,
           TAG_N_FRAMES}
_PIXELS = {TAG_PIXEL_DATA, TAG_FLOAT_PIXEL_DATA, TAG_DOUBLE_PIXEL_DATA}


def _walk(buf: memoryview, pos: int, end: int, implicit: bool, e: str, found: Optional[dict], depth: int,
          nested: bool) -> int:
    """Walk one data set's element headers; return the position after it.

    ``nested``: an item of undefined length, which must end with an Item
    Delimitation item.  Values are skipped, except top-level wanted tags.
    """
    if depth > _MAX_DEPTH:
        raise MalformedDataset("sequences nested too deep")
    hdr = struct.Struct(e + "HHI")
    short = struct.Struct(e + "HH2sH")
    while pos < end:
        if end - pos < 8:
            if not nested and not any(buf[pos:end]):  # tolerate trailing zero padding
                return end
            raise MalformedDataset(f"truncated element header at offset {pos}")
        group, elem, length = hdr.unpack_from(buf, pos)
        tag = (group << 16) | elem
        if group == 0xFFFE:
            if nested and elem == 0xE00D:
                return pos + 8
            raise MalformedDataset(f"unexpected delimiter ({group:04X},{elem:04X}) at offset {pos}")
        vr = None
        if implicit:
            pos += 8
        else:
            _, _, vr, length16 = short.unpack_from(buf, pos)
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise MalformedDataset(f"invalid VR at offset {pos}")
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise MalformedDataset(f"truncated element header at offset {pos}")
                (length,) = struct.unpack_from(e + "I", buf, pos + 8)
                pos += 12
            else:
                length = length16
                pos += 8
        if length == _UNDEFINED:
            if vr is not None and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                raise MalformedDataset(f"undefined length with VR {vr!r} at offset {pos}")
            # UN of undefined length holds an implicit-VR LE sequence (PS3.5 6.2.2)
            items_implicit = implicit or vr == b"UN"
            pos = _skip_items(buf, pos, end, items_implicit, "<" if vr == b"UN" else e, depth + 1)
            if found is not None and tag in _PIXELS:
                found[tag] = b""
            continue
        if pos + length > end:
            raise MalformedDataset(f"element ({group:04X},{elem:04X}) runs past the end of the data set "
                                   f"({length} bytes at offset {pos} of {end})")
        if found is not None and (tag in _WANTED or tag in _PIXELS):
            found[tag] = bytes(buf[pos:pos + length]) if tag in _WANTED else b""
        pos += length
    if nested:
        raise MalformedDataset("item without its delimiter")
    return pos


def _skip_items(buf: memoryview, pos: int, end: int, implicit: bool, e: str, depth: int) -> int:
    """Skip the items of an undefined-length sequence or encapsulated pixel data."""
    hdr = struct.Struct(e + "HHI")
    while True:
        if end - pos < 8:
            raise MalformedDataset(f"truncated sequence at offset {pos}")
        group, elem, length = hdr.unpack_from(buf, pos)
        if group != 0xFFFE:
            raise MalformedDataset(f"expected an item at offset {pos}")
        pos += 8
        if elem == 0xE0DD:
            return pos
        if elem != 0xE000:
            raise MalformedDataset(f"unexpected ({group:04X},{elem:04X}) in a sequence")
        if length == _UNDEFINED:
            pos = _walk(buf, pos, end, implicit, e, None, depth + 1, nested=True)
        else:
            if pos + length > end:
                raise MalformedDataset(f"item runs past the end of the data set at offset {pos}")
            pos += length


@dataclass(frozen=True)
class Header:
    """The few header values the listener needs (no PHI kept besides a hash)."""

    sop_class_uid: Optional[str]
    sop_instance_uid: Optional[str]
    study_uid: Optional[str]
    series_uid: Optional[str]
    modality: Optional[str]
    n_frames: Optional[int]
    has_pixels: bool
    patient_hash: Optional[str]


def _text(b: Optional[bytes]) -> Optional[str]:
    if b is None:
        return None
    s = b.rstrip(b"\x00 ").lstrip(b" ").decode("ascii", "replace")
    return s or None


def parse_header(data: memoryview | bytes, transfer_syntax: str) -> Header:
    """Check the raw data set is structurally complete and extract the header values."""
    buf = memoryview(data)
    if transfer_syntax == DEFLATED_LE:
        try:
            buf = memoryview(zlib.decompress(buf, -zlib.MAX_WBITS))
        except zlib.error as exc:
            raise MalformedDataset(f"deflated data set does not inflate: {exc}") from None
    implicit = transfer_syntax == IMPLICIT_LE
    e = ">" if transfer_syntax == EXPLICIT_BE else "<"
    found: dict[int, bytes] = {}
    try:
        _walk(buf, 0, len(buf), implicit, e, found, 0, nested=False)
    except struct.error as exc:  # pragma: no cover - guarded by length checks
        raise MalformedDataset(str(exc)) from None
    n_frames = None
    nf = _text(found.get(TAG_N_FRAMES))
    if nf:
        try:
            n_frames = int(nf)
        except ValueError:
            n_frames = None
    pid = found.get(TAG_PATIENT_ID)
    phash = hashlib.sha256(pid.rstrip(b"\x00 ")).hexdigest()[:16] if pid else None
    modality = _text(found.get(TAG_MODALITY))
    return Header(
        sop_class_uid=_text(found.get(TAG_SOP_CLASS)),
        sop_instance_uid=_text(found.get(TAG_SOP_INSTANCE)),
        study_uid=_text(found.get(TAG_STUDY_UID)),
        series_uid=_text(found.get(TAG_SERIES_UID)),
        modality=modality.upper() if modality else None,
        n_frames=n_frames,
        has_pixels=bool(_PIXELS & found.keys()),
        patient_hash=phash,
    )


def processable(header: Header, sop_class_uid: str, modalities: list[str]) -> tuple[bool, Optional[str]]:
    """Is this instance a run the pipeline analyses?  (False, reason) otherwise."""
    if (header.modality or "") not in modalities:
        return False, f"modality {header.modality or '(none)'} is not processed"
    name = UID(sop_class_uid).name if sop_class_uid else ""
    if "Image Storage" not in name:
        return False, f"SOP class {sop_class_uid} is not an image"
    if not header.has_pixels:
        return False, "no pixel data"
    return True, None


# ---------------------------------------------------------------------------
# Faster socket reads
# ---------------------------------------------------------------------------
_PREALLOC_MAX = 32 * 1024 * 1024


def _fast_recv(self, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with ``recv_into`` instead of 4 KiB ``recv`` calls.

    pynetdicom 3.0 reads a PDU 4096 bytes per Python-level call, which makes the
    receiver CPU-bound on large multi-frame instances.  Same contract: return
    what was read (shorter only when the peer closed the connection).  The
    buffer is preallocated up to 32 MiB; beyond that (a PDU length announced by
    a peer is untrusted) it grows as data actually arrives.
    """
    sock = self.socket
    if nr_bytes <= _PREALLOC_MAX:
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        try:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if not n:
                    break
                got += n
        finally:
            view.release()
        if got < nr_bytes:
            del buf[got:]
        return buf
    out = bytearray()
    chunk = bytearray(1 << 20)
    view = memoryview(chunk)
    try:
        while len(out) < nr_bytes:
            n = sock.recv_into(view, min(len(chunk), nr_bytes - len(out)))
            if not n:
                break
            out += view[:n]
    finally:
        view.release()
    return out


def install_fast_recv() -> None:
    """Patch pynetdicom's socket read (pinned pynetdicom 3.0.x only)."""
    import pynetdicom
    from pynetdicom.transport import AssociationSocket

    if pynetdicom.__version__.startswith("3.0.") and AssociationSocket.recv is not _fast_recv:
        AssociationSocket.recv = _fast_recv


# ---------------------------------------------------------------------------
# Streaming reception
# ---------------------------------------------------------------------------
RX_PREFIX = "rx-"


class RxFile:
    """Where pynetdicom streams an incoming C-STORE data set (``STORE_RECV_CHUNKED_DATASET``).

    Stands in for the ``NamedTemporaryFile`` pynetdicom would create in the
    system temp directory: the file is ``<spool>/.tmp/rx-*.dcm`` (same
    filesystem as the spool, so accepting it is an fsync and a rename), its
    File Meta group is the node's own (``FileMeta``, built from the request's
    UIDs and the calling AE, so in the usual case the file is already what the
    spool stores), and the P-DATA fragments are appended as they arrive: memory
    no longer grows with the instance size.  A write error (disk full) is
    remembered rather than raised in pynetdicom's DUL thread (which would abort
    the association) and the partial file is removed at once; the handler then
    answers 0xA700.  When the spool is already below ``storage.min_free_mb``
    at the start of a data set, nothing is written at all.
    """

    def __init__(self, spool: Spool, calling_aet: str):
        self.path = spool.tmp / f"{RX_PREFIX}{uuid.uuid4().hex}.dcm"
        self.name = str(self.path)
        self.file = self  # pynetdicom calls ``.file.flush()`` after each fragment
        self.calling_aet = calling_aet
        self.head: Optional[bytes] = None  # preamble + File Meta as written
        self.error: Optional[OSError] = None
        self.refused: Optional[str] = None
        self.claimed = False  # a C-STORE handler took it (pynetdicom then unlinks it)
        self._f = None
        if not spool.has_space():
            self.refused = f"free space below storage.min_free_mb={spool.min_free_mb}"
            return
        try:
            self._f = open(self.path, "xb", buffering=0)
        except OSError as exc:
            self.error = exc

    def write(self, data) -> int:
        n = len(data)
        if self._f is not None:
            try:
                _write_all(self._f, memoryview(data))
            except OSError as exc:
                self.error = exc
                self.discard()
        return n

    def write_head(self, head: bytes) -> None:
        """pynetdicom has written the 128-byte preamble and ``DICM``; add the File Meta group."""
        self.head = head
        self.write(head[len(b"\x00" * 128 + b"DICM"):])

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        if self._f is None:
            raise ValueError("no file")
        return self._f.fileno()

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            f.close()

    def discard(self) -> None:
        """Close and remove (nothing was acknowledged from it)."""
        self.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


_pnd_orig: dict = {}


def _rx_target():
    """(StorageSCP, Association) when the running thread is the DUL thread of one of our associations."""
    assoc = getattr(threading.current_thread(), "assoc", None)  # pynetdicom's DULServiceProvider
    scp = getattr(getattr(assoc, "ae", None), "_cag_scp", None)
    return (scp, assoc) if scp is not None else (None, None)


def _rx_named_temporary_file(*args, **kwargs):
    scp, assoc = _rx_target()
    if scp is None:  # another in-process SCP (a test's or the demo PACS): pynetdicom's default
        return _pnd_orig["NamedTemporaryFile"](*args, **kwargs)
    rx = RxFile(scp.spool, assoc.requestor.ae_title)
    pending = assoc.__dict__.setdefault("_cag_rx", set())
    pending.add(rx)
    return rx


def _rx_create_file_meta(**kwargs):
    if _rx_target()[0] is None:
        return _pnd_orig["create_file_meta"](**kwargs)
    return dict(kwargs)  # consumed by _rx_write_file_meta_info (never decoded/validated by pydicom)


def _rx_write_file_meta_info(fp, file_meta, *args, **kwargs):
    if not isinstance(fp, RxFile) or not isinstance(file_meta, dict):
        return _pnd_orig["write_file_meta_info"](fp, file_meta, *args, **kwargs)
    meta = FileMeta(sop_class_uid=str(file_meta.get("sop_class_uid") or ""),
                    sop_instance_uid=str(file_meta.get("sop_instance_uid") or ""),
                    transfer_syntax=str(file_meta.get("transfer_syntax") or ""),
                    implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID,
                    implementation_version=PYNETDICOM_IMPLEMENTATION_VERSION, source_aet=fp.calling_aet)
    fp.write_head(meta.encode())


def install_streaming_reception() -> bool:
    """Turn on pynetdicom's chunked C-STORE reception, with its files in our spools.

    ``STORE_RECV_CHUNKED_DATASET`` is process-wide: other in-process SCPs then
    get ``event.dataset`` decoded from a temp file in the system temp dir
    (pynetdicom's own behaviour).  Only pinned pynetdicom 3.0.x is patched;
    otherwise reception stays in memory (the handler supports both).
    """
    import pynetdicom
    from pynetdicom import dimse_messages as dm

    if not pynetdicom.__version__.startswith("3.0."):
        return False
    if not all(hasattr(dm, n) for n in ("NamedTemporaryFile", "create_file_meta", "write_file_meta_info")):
        return False  # pragma: no cover
    if dm.NamedTemporaryFile is not _rx_named_temporary_file:
        _pnd_orig.update(NamedTemporaryFile=dm.NamedTemporaryFile, create_file_meta=dm.create_file_meta,
                         write_file_meta_info=dm.write_file_meta_info)
        dm.NamedTemporaryFile = _rx_named_temporary_file
        dm.create_file_meta = _rx_create_file_meta
        dm.write_file_meta_info = _rx_write_file_meta_info
    pnd_config.STORE_RECV_CHUNKED_DATASET = True
    return True


def _discard_unclaimed(assoc) -> None:
    """Remove data sets that were being received when the association ended (never acknowledged)."""
    pending = assoc.__dict__.get("_cag_rx")
    if not pending:
        return
    for rx in list(pending):
        if not rx.claimed:
            rx.discard()
            pending.discard(rx)


def _map_dataset(rx: RxFile) -> tuple[mmap.mmap, memoryview]:
    """The received data set (after the head) as a read-only memory map: parsed without being read."""
    with open(rx.path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mm, memoryview(mm)[len(rx.head):]


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
        install_fast_recv()
        self.streaming = install_streaming_reception()
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
    def start(self) -> tuple[str, int]:
        n = self.config.node
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
        _discard_unclaimed(event.assoc)

    def _on_closed(self, event) -> None:
        a = event.assoc
        _discard_unclaimed(a)
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
        rx = getattr(req, "_dataset_file", None)
        mm = None
        if isinstance(rx, RxFile):  # streamed to <spool>/.tmp as it arrived
            rx.claimed = True
            pending = event.assoc.__dict__.get("_cag_rx")
            if pending is not None:
                pending.discard(rx)
            if rx.refused:
                return self._refuse(ST_OUT_OF_RESOURCES, rx.refused, calling, rq_class, rq_inst)
            if rx.error is not None or rx.head is None:
                exc = rx.error
                status = (ST_OUT_OF_RESOURCES if exc is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT)
                          else ST_INTERNAL)
                rx.discard()
                return self._refuse(status, f"write failed: {exc}", calling, rq_class, rq_inst)
            try:
                mm, buf = _map_dataset(rx)
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
