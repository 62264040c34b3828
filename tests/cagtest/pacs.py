"""Destination PACS for the tests: dcmtk's storescp (:class:`StoreSCP`, a real peer) and one
pynetdicom storage SCP whose answers the test scripts (:class:`RecordingSCP`)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from cagtest.net import free_port

def stopped_after(create):
    """For a fixture (``yield from``): ``make(...)`` creates a peer with ``create(...)``; every peer
    made is stopped at teardown."""
    made = []

    def make(*args, **kwargs):
        peer = create(*args, **kwargs)
        made.append(peer)
        return peer

    try:
        yield make
    finally:
        for peer in made:
            peer.stop()


SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.5.1.4.1.1.88.11"}
VERIFICATION = "1.2.840.10008.1.1"
PACS_AET = "RELPACS"


class StoreSCP:
    """dcmtk storescp as a subprocess, a real PACS stand-in (optionally refusing every association)."""

    def __init__(self, root: Path, aet: str = "STORESCP", refuse: bool = False, bit_preserving: bool = False):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = free_port()
        args = ["storescp", "--aetitle", aet, "-od", str(self.root)]
        if refuse:
            args.append("--refuse")
        if bit_preserving:
            args.append("+B")  # write the data sets as received
        self.proc = subprocess.Popen(args + [str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("storescp did not come up")

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_file())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if storescp is still there after 5 s."""
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class RecordingSCP:
    """Stores what it receives; ``statuses`` are answered in turn (then 0x0000); ``delay_s``
    (a list, consumed per request, then 0) makes it slow.

    ``stored`` counts successful stores per SOP Instance UID (the handler returned 0x0000);
    ``requests`` counts every C-STORE request seen.
    """

    def __init__(self, out_dir: Path, port: Optional[int] = None, ae_title: str = PACS_AET,
                 statuses: Optional[list[int]] = None, delays: Optional[list[float]] = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.statuses = list(statuses or [])
        self.delays = list(delays or [])
        self.stored: Counter = Counter()
        self.requests: Counter = Counter()
        self.by_class: dict[str, str] = {}
        self.study_of: dict[str, str] = {}
        self.answered: list[tuple[str, int]] = []  # (SOP Instance UID, status) per request, in order
        self._lock = threading.Lock()
        self._server = None

    def _on_store(self, event):
        with self._lock:
            delay = self.delays.pop(0) if self.delays else 0.0
            status = self.statuses.pop(0) if self.statuses else 0x0000
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.requests[uid] += 1
        if delay:
            time.sleep(delay)
        with self._lock:
            self.answered.append((uid, status))
        if status != 0x0000:
            return status
        ds = event.dataset
        ds.file_meta = event.file_meta
        n = self.stored[uid]
        ds.save_as(self.out_dir / f"{uid}.{n}.dcm", enforce_file_format=True)
        with self._lock:
            self.stored[uid] += 1
            self.by_class[uid] = str(ds.SOPClassUID)
            self.study_of[uid] = str(ds.StudyInstanceUID)
        return 0x0000

    def start(self) -> "RecordingSCP":
        from pynetdicom import AE, evt
        from pynetdicom.presentation import AllStoragePresentationContexts

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(VERIFICATION)
        ae.maximum_pdu_size = 0
        ae.dimse_timeout = ae.network_timeout = 60
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def destination(self, name: str = "pacs") -> dict:
        return {"name": name, "ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}

    def srs(self, study_uid: Optional[str] = None) -> dict[str, int]:
        """{SR SOP Instance UID: times stored} (for one study if given)."""
        return {u: n for u, n in self.stored.items() if self.by_class.get(u) in SR_CLASSES
                and (study_uid is None or self.study_of.get(u) == study_uid)}


class SilentPeer:
    """Accepts TCP connections and never answers: a hung PACS or a hung remote model."""

    def __init__(self, port: int = 0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the loop thread
        except OSError:
            pass
        self.sock.close()
        time.sleep(0.2)
        for c in list(self.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
