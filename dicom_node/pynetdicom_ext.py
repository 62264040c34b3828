"""The node's extensions to pynetdicom, installed once per process by :func:`install`.

Two things pynetdicom 3.0 does not do the way a DICOM node needs them:

* **Socket reads**: ``AssociationSocket.recv`` reads a PDU 4096 bytes per Python call, which
  makes the receiver CPU-bound on large multi-frame instances; :func:`_fast_recv` reads with
  ``recv_into`` instead (same contract).
* **Data-set PDUs**: pynetdicom copies each P-DATA-TF PDU five times in Python on its way to
  the file (read buffer, ``bytes()``, PDU decode, PDV item, fragment slice) and passes it through
  its event queue, state machine and DIMSE decoder: the receiver's user CPU per GB is mostly
  that.  :func:`_read_pdu_data` writes the fragments of a data set that is already being
  streamed into an :class:`RxFile` straight from one reusable receive buffer; every other PDU
  (association set-up, the command set, the data set's last fragment, anything unusual) takes
  pynetdicom's own path unchanged.
* **Streaming reception** into the spool: with ``STORE_RECV_CHUNKED_DATASET`` pynetdicom writes
  each incoming C-STORE data set to a ``NamedTemporaryFile`` in the system temp directory with
  a File Meta group it builds with pydicom.  For the node's own listener the file is instead an
  :class:`RxFile` in ``<spool>/.tmp`` (same filesystem as the spool, so accepting it is an
  fsync and a rename) headed by the node's own File Meta.  Other in-process SCPs (a test's, a
  demo PACS) keep pynetdicom's behaviour.  The handler finds its file through the public
  ``Event.dataset_path`` (:func:`received_file`).

It also turns pynetdicom's per-PDU log handlers off (the node logs itself).  The patches
replace module attributes of pynetdicom, so they are version-checked: only the pinned
pynetdicom 3.0.x is patched (:data:`SUPPORTED`); on any other version :func:`install` changes
nothing, and the listener receives in memory as pynetdicom does by default.  ``Node.start``
calls :func:`install` (``cag-node serve`` and the demo start a Node); nothing is patched at
import time.
"""

from __future__ import annotations

import copy
import logging
import mmap
import os
import struct
import threading
import uuid
from typing import Optional

import pynetdicom
from pynetdicom import evt as _evt
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom import _config as pnd_config
from pynetdicom import transport
from pynetdicom.presentation import PresentationContext

from dicom_node.spool import FileMeta, Spool, _write_all

log = logging.getLogger(__name__)

SUPPORTED = "3.0."  # pynetdicom versions whose internals these patches match
_installed: Optional[bool] = None
_install_lock = threading.Lock()


def supported(version: str = pynetdicom.__version__) -> bool:
    return version.startswith(SUPPORTED)


def install() -> bool:
    """Install the socket read and streaming reception once per process; returns whether
    streaming reception is on (False, changing nothing, on an unsupported pynetdicom)."""
    global _installed
    with _install_lock:
        if _installed is None:
            # pynetdicom's "standard" DIMSE/PDU log handlers cost time per PDU; the node logs itself
            pnd_config.LOG_HANDLER_LEVEL = "none"
            if not supported():
                log.warning("pynetdicom %s is not %sx: receiving in memory, with pynetdicom's own socket reads",
                            pynetdicom.__version__, SUPPORTED)
                _installed = False
            else:
                _install_fast_recv()
                _install_fast_pdata()
                _install_context_copy()
                _installed = _install_streaming_reception()
        return _installed


def _copy_contexts(obj, memo=None):
    """``copy.deepcopy`` for the one thing pynetdicom's transport deep-copies: the server's
    supported presentation contexts, once per association.  A generic deepcopy of the node's
    178 contexts x 27 transfer syntaxes re-validates every UID and costs ~20-40 ms of CPU per
    association (measured), a large share of a small association's cost; a UID is an immutable
    str, so copying each context's own fields is the same copy, ~50x cheaper."""
    if isinstance(obj, list) and obj and all(type(c) is PresentationContext for c in obj):
        out = []
        for c in obj:
            n = PresentationContext.__new__(PresentationContext)
            d = dict(c.__dict__)
            d["_transfer_syntax"] = list(d.get("_transfer_syntax") or [])
            n.__dict__.update(d)
            out.append(n)
        return out
    return copy.deepcopy(obj, memo)


def _install_context_copy() -> None:
    transport.deepcopy = _copy_contexts


def streaming() -> bool:
    """Whether :func:`install` turned streaming reception on."""
    return bool(_installed)


_PREALLOC_MAX = 32 * 1024 * 1024


def _recv_exact(sock, view: memoryview) -> int:
    """Fill ``view`` from ``sock``; the bytes read (fewer only when the peer closed)."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            break
        got += k
    return got


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
        with memoryview(buf) as view:
            got = _recv_exact(sock, view)
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


def _install_fast_recv() -> None:
    from pynetdicom.transport import AssociationSocket

    if AssociationSocket.recv is not _fast_recv:
        AssociationSocket.recv = _fast_recv


# ---------------------------------------------------------------------------
# Data-set fragments straight to the file
# ---------------------------------------------------------------------------
_FAST_PDU_MAX = 4 * 1024 * 1024  # larger (announced, untrusted) PDU lengths take pynetdicom's path
fast_pdus = 0  # P-DATA-TF PDUs written by the fast path in this process (tests, diagnostics)


def _streaming_file(dul):
    """The :class:`RxFile` the association's current C-STORE data set is being streamed into, when
    the next PDU may go straight to it: our listener's association, no earlier PDU or event still
    queued (so the order of fragments is kept), no handler bound to the per-PDU events."""
    assoc = dul.assoc
    if getattr(getattr(assoc, "ae", None), "_cag_scp", None) is None:
        return None
    msg = getattr(getattr(assoc, "dimse", None), "message", None)
    rx = getattr(msg, "_data_set_file", None)
    if not isinstance(rx, RxFile) or not dul.event_queue.empty() or not dul._recv_pdu.empty():
        return None
    if assoc.get_handlers(_evt.EVT_DATA_RECV) or assoc.get_handlers(_evt.EVT_PDU_RECV):
        return None
    return rx, msg.context_id


def _pdv_fragments(buf: memoryview, n: int, context_id) -> Optional[list[tuple[int, int]]]:
    """(start, end) of each PDV's data in ``buf[:n]`` when every PDV is a data-set fragment that
    is not the last one, on the message's presentation context; else None (pynetdicom decides)."""
    out, off = [], 0
    while off < n:
        if off + 6 > n:
            return None
        length = int.from_bytes(buf[off:off + 4], "big")
        end = off + 4 + length
        if length < 2 or end > n or buf[off + 4] != context_id or buf[off + 5] & 3:
            return None
        out.append((off + 6, end))
        off = end
    return out or None


def _read_pdu_data(self) -> None:
    """``DULServiceProvider._read_pdu_data`` with the fast path for data-set fragments.

    Same contract as pynetdicom 3.0's: read one PDU, put its FSM event and the decoded PDU on the
    queues (Evt17 when the connection closes mid-PDU, Evt19 for an unknown or undecodable PDU).
    A P-DATA-TF PDU whose fragments all continue a data set being streamed to an RxFile is
    instead written to the file; the state machine has nothing to do for it (DT-2 in Sta6
    changes no state) and the idle timer restarts as for any PDU read.  As such a PDU queues no
    event, the reactor would sleep its 1 ms loop delay after each one; so while more data is
    already waiting on the socket, the next PDU is read here (at most ``_FAST_BURST`` in a row,
    then the reactor checks its timers and queues as usual).
    """
    for _ in range(_FAST_BURST):
        if not _read_one_pdu(self) or self._kill_thread or not self.socket.ready:
            return


_FAST_BURST = 64


def _read_one_pdu(self) -> bool:
    """Read one PDU; True when it went straight to the file (nothing queued)."""
    target = _streaming_file(self)
    if target is None:
        _pnd_orig["_read_pdu_data"](self)
        return False
    rx, context_id = target
    try:
        header = self.socket.recv(6)
    except (OSError, TimeoutError):
        return _closed(self)
    if len(header) != 6:
        self.event_queue.put("Evt17")
        return False
    pdu_type, _, length = struct.unpack(">BBL", header)
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
        log.error("unknown PDU type 0x%02X received", pdu_type)
        self.event_queue.put("Evt19")
        return False
    if pdu_type != 0x04 or length > _FAST_PDU_MAX:
        try:
            data = self.socket.recv(length)
        except (OSError, TimeoutError):
            return _closed(self)
        _queue_pdu(self, header + data, length)
        return False
    buf = self.__dict__.get("_cag_buf")
    if buf is None or len(buf) < length:
        buf = self.__dict__["_cag_buf"] = bytearray(max(length, 1 << 17))
    view = memoryview(buf)
    try:
        try:
            got = _recv_exact(self.socket.socket, view[:length])
        except (OSError, TimeoutError):
            return _closed(self)
        if got != length:
            self.event_queue.put("Evt17")
            return False
        frags = _pdv_fragments(view, length, context_id)
        if frags is None:  # the last fragment, a command, another context, malformed: pynetdicom's path
            _queue_pdu(self, header + view[:length], length)
            return False
        for a, b in frags:
            rx.write(view[a:b])
        global fast_pdus
        fast_pdus += 1
        return True
    finally:
        view.release()


def _closed(self) -> bool:
    log.error("connection closed before the entire PDU was received")
    self.event_queue.put("Evt17")
    return False


def _queue_pdu(self, raw: bytearray, length: int) -> None:
    """The tail of pynetdicom's ``_read_pdu_data`` for a PDU read in full: decode, queue."""
    if len(raw) != 6 + length:
        self.event_queue.put("Evt17")
        return
    try:
        pdu, event = self._decode_pdu(raw)
        self.event_queue.put(event)
    except Exception:
        log.exception("unable to decode the received PDU")
        self.event_queue.put("Evt19")
        return
    self._recv_pdu.put(pdu)


def _install_fast_pdata() -> None:
    from pynetdicom.dul import DULServiceProvider

    if DULServiceProvider._read_pdu_data is not _read_pdu_data:
        _pnd_orig["_read_pdu_data"] = DULServiceProvider._read_pdu_data
        DULServiceProvider._read_pdu_data = _read_pdu_data


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


def _install_streaming_reception() -> bool:
    """Turn on pynetdicom's chunked C-STORE reception, with the node's files in its spool.

    ``STORE_RECV_CHUNKED_DATASET`` is process-wide: other in-process SCPs then get
    ``event.dataset`` decoded from a temp file in the system temp dir (pynetdicom's own
    behaviour).
    """
    from pynetdicom import dimse_messages as dm

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


def discard_unclaimed(assoc) -> None:
    """Remove data sets that were being received when the association ended (never acknowledged)."""
    pending = assoc.__dict__.get("_cag_rx")
    if not pending:
        return
    for rx in list(pending):
        if not rx.claimed:
            rx.discard()
            pending.discard(rx)


def map_dataset(rx: RxFile) -> tuple[mmap.mmap, memoryview]:
    """The received data set (after the head) as a read-only memory map: parsed without being read."""
    with open(rx.path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mm, memoryview(mm)[len(rx.head):]


def received_file(event) -> "Optional[RxFile]":
    """The :class:`RxFile` a C-STORE event's data set was streamed into (None: received in
    memory, or by another SCP), found by the public ``Event.dataset_path``; the handler claims it
    (pynetdicom then only unlinks it, a no-op once the spool renamed it)."""
    try:
        path = event.dataset_path
    except AttributeError:
        return None
    pending = event.assoc.__dict__.get("_cag_rx")
    if not pending or path is None:
        return None
    for rx in list(pending):
        if rx.name == str(path):
            rx.claimed = True
            pending.discard(rx)
            return rx
    return None
