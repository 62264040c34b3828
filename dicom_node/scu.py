"""C-STORE SCU: send result files to one destination over one association.

:func:`store_files` is a generator: it yields one :class:`StoreOutcome` per file
*as soon as the peer has answered*, so that the caller (the outbox) can journal
the success before the next file goes out.  Every outcome is classified:

* ``success`` — 0x0000;
* ``warning`` — 0x0001, 0xBxxx (coercion, elements discarded, ...): stored, logged;
* ``retry``   — 0xA7xx out of resources, 0xC0xx cannot understand, 0x0110 processing
  failure, any other/unknown failure, no answer (timeout, aborted association),
  association rejected, connection refused;
* ``failed``  — permanent: 0xA9xx data set does not match SOP class, 0x0122 SOP
  class not supported (also: no presentation context accepted), 0x0124 not
  authorised, 0x0117 invalid SOP instance, 0x0211/0x0212 unrecognised operation;
  a file that cannot be read.

TLS is optional per destination (``destinations[].tls``): ``ca`` verifies the
peer, ``cert``/``key`` present a client certificate.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.config import Destination

log = logging.getLogger(__name__)

SUCCESS = "success"
WARNING = "warning"
RETRY = "retry"
FAILED = "failed"

_PERMANENT = {
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
}


@dataclass
class StoreOutcome:
    path: str
    status: Optional[int]  # DIMSE status, None when there was no answer
    category: str  # success | warning | retry | failed
    message: str

    @property
    def stored(self) -> bool:
        return self.category in (SUCCESS, WARNING)


def classify_status(status: Optional[int]) -> tuple[str, str]:
    """(category, human-readable reason) for a C-STORE response status."""
    if status is None:
        return RETRY, "no response from peer (timeout or association aborted)"
    if status == 0x0000:
        return SUCCESS, "success"
    if status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return WARNING, f"warning status 0x{status:04X}"
    if 0xA700 <= status <= 0xA7FF:
        return RETRY, f"out of resources (0x{status:04X})"
    if 0xA900 <= status <= 0xA9FF:
        return FAILED, f"data set does not match SOP class (0x{status:04X})"
    if 0xC000 <= status <= 0xCFFF:
        return RETRY, f"cannot understand (0x{status:04X})"
    if status in _PERMANENT:
        return FAILED, f"{_PERMANENT[status]} (0x{status:04X})"
    if status == 0x0110:
        return RETRY, "processing failure (0x0110)"
    return RETRY, f"failure status 0x{status:04X}"


def ssl_context(tls, resolve=lambda p: Path(p)) -> ssl.SSLContext:
    """Client-side TLS context for a destination's ``tls`` settings."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(resolve(tls.ca)) if tls.ca else None)
    if tls.cert and tls.key:
        ctx.load_cert_chain(str(resolve(tls.cert)), str(resolve(tls.key)))
    return ctx


def dimse_status(st) -> Optional[int]:
    """The Status of a DIMSE response dataset, None when there was no (usable) answer."""
    return int(st.Status) if st is not None and "Status" in st else None


@contextmanager
def association(calling_ae: str, host: str, port: int, called_ae: str, sop_class: str, timeout: float):
    """One association proposing one SOP class (the MPPS forwarder, UPS event reports);
    ConnectionError when it is not established; released on the way out."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(sop_class)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError("association not established")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


class QueuedSender:
    """Items delivered in order by one daemon thread, so that a DIMSE handler only queues
    (it must return fast); a subclass defines ``_deliver(item)``, which may raise nothing it
    wants the thread to survive.  Call ``super().__init__`` last: it starts the thread."""

    def __init__(self, name: str):
        self._q: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._t = threading.Thread(target=self._loop, name=name, daemon=True)
        self._t.start()

    def _put(self, item: tuple) -> None:
        self._q.put(item)

    def stop(self) -> None:
        self._q.put(None)
        self._t.join(5)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            self._deliver(item)

    def _deliver(self, item: tuple) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _file_info(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    ts = str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
    return str(ds.SOPClassUID), ts


def store_files(
    destination: Destination,
    paths: Sequence[str | Path],
    *,
    calling_ae: str,
    acse_timeout: float = 30.0,
    dimse_timeout: float = 60.0,
    network_timeout: float = 60.0,
    max_pdu: int = 0,
    resolve=lambda p: Path(p),
) -> Iterator[StoreOutcome]:
    """Send ``paths`` to ``destination`` on one association, yielding an outcome per file."""
    paths = [Path(p) for p in paths]
    infos: dict[Path, tuple[str, str]] = {}
    sendable: list[Path] = []
    for p in paths:
        try:
            infos[p] = _file_info(p)
            sendable.append(p)
        except Exception as exc:  # missing or unreadable file: permanent for this row
            yield StoreOutcome(str(p), None, FAILED, f"cannot read {p}: {exc}")
    if not sendable:
        return

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = acse_timeout
    ae.dimse_timeout = dimse_timeout
    ae.network_timeout = network_timeout
    ae.maximum_pdu_size = max_pdu
    contexts: dict[str, list[str]] = {}
    for sop_class, ts in infos.values():
        lst = contexts.setdefault(sop_class, [])
        for t in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if t not in lst:
                lst.append(t)
    for sop_class, tss in list(contexts.items())[:128]:
        ae.add_requested_context(sop_class, tss)

    kwargs = {}
    if destination.tls.enabled:
        kwargs["tls_args"] = (ssl_context(destination.tls, resolve), destination.host)
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, **kwargs)
    except Exception as exc:  # e.g. TLS setup errors
        for p in sendable:
            yield StoreOutcome(str(p), None, RETRY, f"cannot associate with {where}: {exc}")
        return
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # the peer accepted none of our SOP classes: the same as 0x0122, permanent
            for p in sendable:
                yield StoreOutcome(str(p), 0x0122, FAILED,
                                   f"SOP class {infos[p][0]} not supported by {where} "
                                   "(no presentation context accepted)")
            return
        if assoc.is_rejected:
            why = "association rejected"
        elif assoc.is_aborted:
            why = "association aborted"
        else:
            why = "connection failed (refused or timed out)"
        for p in sendable:
            yield StoreOutcome(str(p), None, RETRY, f"{why} by {where}")
        return
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        accepted_classes = {a for a, _ in accepted}
        for i, p in enumerate(sendable):
            sop_class, _ts = infos[p]
            if sop_class not in accepted_classes:
                yield StoreOutcome(str(p), 0x0122, FAILED,
                                   f"SOP class {sop_class} not supported by {where} (no presentation context accepted)")
                continue
            if not assoc.is_established:
                for q in sendable[i:]:
                    yield StoreOutcome(str(q), None, RETRY, f"association with {where} lost")
                return
            try:
                ds = dcmread(p)
                rsp = assoc.send_c_store(ds)
            except Exception as exc:
                yield StoreOutcome(str(p), None, RETRY, f"sending to {where} failed: {exc}")
                continue
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            category, message = classify_status(status)
            comment = rsp.get("ErrorComment") if rsp is not None else None
            if comment:
                message += f": {comment}"
            if category == WARNING:
                log.warning("C-STORE of %s to %s: %s (stored)", p.name, where, message)
            yield StoreOutcome(str(p), status, category, message)
    finally:
        if assoc.is_established:
            assoc.release()


__all__ = ["StoreOutcome", "classify_status", "store_files", "ssl_context",
           "SUCCESS", "WARNING", "RETRY", "FAILED"]
