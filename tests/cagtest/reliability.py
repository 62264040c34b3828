"""Helpers of the reliability / security tests (imported by conftest.py and the tests).

Everything here drives the node from the outside, as a hospital would: the node
runs as a subprocess (``cag-node serve --config FILE``), instances go in over
DICOM with pynetdicom (acknowledgements counted at the SCU side), results are
received by a small pynetdicom SCP whose behaviour the test controls (down,
refusing, slow), and the node's view of the world is read with
``cag-node studies --json --config FILE``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import pydicom
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cagtest.dicom import xa_dataset
from cagtest.net import free_port, wait_for  # noqa: F401  (the reliability tests import them from here)
from cagtest.pacs import VERIFICATION, RecordingSCP  # noqa: F401  (RecordingSCP: the reliability tests import it from here)

ROOT = Path(__file__).resolve().parents[2]
CAG = str(Path(sys.executable).with_name("cag-node"))
XA = "1.2.840.10008.5.1.4.1.1.12.1"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
MODALITY_AET = "MODALITY"
NODE_AET = "CAGNODE"
# Where the test is about reception, the outbox or crash safety rather than the report, the VLM is
# switched off (the SR is still built and sent, with empty report text): the tiny VLM on 2 shared
# CPU cores costs seconds per study.  The kill -9 rounds and the PHI test keep the real VLM.
NO_VLM = {"backend": "none"}


# ---------------------------------------------------------------------------
# Synthetic XA runs (pure pydicom: no dependency on the synthetic-data module)
# ---------------------------------------------------------------------------
def make_xa(path: Path, *, study_uid: str, series_uid: Optional[str] = None, sop_uid: Optional[str] = None,
            rows: int = 64, cols: int = 64, frames: int = 12, seed: int = 0,
            patient_name: str = "Rel^Test", patient_id: str = "REL0001", birth_date: str = "19700101",
            accession: str = "", extra: Optional[Callable[[Dataset], None]] = None) -> Path:
    """A small but valid multi-frame 8-bit XA run (``cagtest.dicom.xa_dataset``): a dark
    vessel-like stripe moving over noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(90, 170, size=(rows, cols), dtype=np.uint8)
    arr = np.empty((frames, rows, cols), dtype=np.uint8)
    for f in range(frames):
        fr = base.copy()
        c = (f * cols) // max(frames, 1)
        fr[:, max(0, c - 2):c + 2] = 30 + (f % 7) * 5
        arr[f] = fr
    ds = xa_dataset(study_uid, series_uid, sop_uid, pixels=arr, patient_name=patient_name, patient_id=patient_id,
                    birth_date=birth_date, accession=accession, Manufacturer="cag-node reliability tests")
    if extra:
        extra(ds)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(out_dir: Path, n_runs: int = 3, *, seed: int = 0, **kw) -> tuple[str, list[Path]]:
    study_uid = generate_uid()
    files = []
    for i in range(n_runs):
        files.append(make_xa(Path(out_dir) / f"run{i:02d}.dcm", study_uid=study_uid, seed=seed * 100 + i, **kw))
    return study_uid, files


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# ---------------------------------------------------------------------------
# The node as a subprocess
# ---------------------------------------------------------------------------
def node_config(workdir: Path, *, port: Optional[int] = None, bundle: Optional[Path] = None,
                destinations: Optional[list[dict]] = None, **sections) -> dict:
    """A config dict for a test node in ``workdir`` (sections merged key by key)."""
    workdir = Path(workdir)
    cfg = {
        "node": {"processes": 1, "ae_title": NODE_AET, "host": "127.0.0.1", "port": port or free_port(),
                 "allowed_calling_aets": [MODALITY_AET, "ORTHANC"], "dimse_timeout": 30,
                 "acse_timeout": 10, "network_timeout": 30},
        "storage": {"path": str(workdir / "spool"), "journal": f"sqlite:///{workdir / 'journal.db'}",
                    "min_free_mb": 16},
        "completion": {"quiet_seconds": 1},
        "processing": {"enabled": bundle is not None},
        "models": {"bundle": str(bundle) if bundle else str(workdir / "no-bundle")},
        "destinations": destinations or [],
        "outbox": {"retry_base_s": 0.5, "retry_max_s": 2, "poll_s": 0.3},
        "admin": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
        "logging": {"level": "INFO"},
    }
    if bundle is not None and not _bundle_has_vlm(Path(bundle)):
        cfg["vlm"] = {"backend": "none"}  # a selector-only bundle: SRs without report text
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def _bundle_has_vlm(bundle: Path) -> bool:
    try:
        return bool(json.loads((bundle / "manifest.json").read_text()).get("vlm"))
    except (OSError, ValueError):
        return True


class NodeProc:
    """``cag-node serve --config`` in a subprocess; its output is appended to ``node.log``."""

    def __init__(self, workdir: Path, cfg: dict):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.cfg_path = self.workdir / "config.yaml"
        self.log_path = self.workdir / "node.log"
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0

    @property
    def port(self) -> int:
        return int(self.cfg["node"]["port"])

    def write_config(self) -> None:
        self.cfg_path.write_text(yaml.safe_dump(self.cfg, sort_keys=False), encoding="utf-8")

    def start(self, timeout: float = 60.0, wait: bool = True) -> "NodeProc":
        self.write_config()
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts + 1} {_dt.datetime.now().isoformat()} =====\n".encode())
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([CAG, "serve", "--config", str(self.cfg_path)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                                     start_new_session=True)
        log.close()
        self.starts += 1
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            if echo(self.port, timeout=2):
                return
            time.sleep(0.2)
        raise RuntimeError(f"node not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([CAG, *args, "--config", str(self.cfg_path)], capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir)

    def studies(self) -> list[dict]:
        r = self.cli("studies", "--json")
        if r.returncode != 0:
            raise RuntimeError(f"cag-node studies failed ({r.returncode}): {r.stderr[-2000:]}")
        data = json.loads(r.stdout)
        if isinstance(data, dict):
            data = data.get("studies", data)
        return list(data)

    def study(self, study_uid: str) -> Optional[dict]:
        for s in self.studies():
            if s.get("study_uid", s.get("StudyInstanceUID")) == study_uid:
                return s
        return None

    def wait_state(self, study_uid: str, states: Iterable[str] = ("sent",), timeout: float = 120,
                   bad: Iterable[str] = ("failed",)) -> dict:
        states, bad = set(states), set(bad)
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            st = self.study(study_uid)
            if st and st.get("state") in states:
                return st
            if st and st.get("state") in bad:
                raise AssertionError(f"study {study_uid} is {st.get('state')}: {st}\n{self.log_tail()}")
            time.sleep(0.4)
        raise AssertionError(f"study {study_uid} did not reach {sorted(states)} in {timeout:.0f} s: {st}\n"
                             f"{self.log_tail()}")


def study_state(s: dict) -> str:
    return s.get("state", "")


# ---------------------------------------------------------------------------
# SCU side
# ---------------------------------------------------------------------------
def echo(port: int, host: str = "127.0.0.1", calling: str = MODALITY_AET, called: str = NODE_AET,
         timeout: float = 5, **assoc_kw) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    try:
        assoc = ae.associate(host, port, ae_title=called, **assoc_kw)
    except Exception:
        return False
    if not assoc.is_established:
        return False
    try:
        st = assoc.send_c_echo()
        return bool(st) and int(st.Status) == 0
    finally:
        with contextlib.suppress(Exception):
            assoc.release()


def associate_store(port: int, *, calling: str = MODALITY_AET, called: str = NODE_AET,
                    classes: Iterable[str] = (XA,), timeout: float = 30, host: str = "127.0.0.1", **assoc_kw):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_pdu_size = 0
    for c in classes:  # one context per transfer syntax: a data set can be sent in any of them
        for ts in (ExplicitVRLittleEndian, "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"):
            ae.add_requested_context(c, ts)
    return ae.associate(host, port, ae_title=called, max_pdu=0, **assoc_kw)


def send_files(port: int, files: Iterable[Path], *, acked: Optional[dict] = None, stop: Optional[threading.Event] = None,
               timeout: float = 30, **kw) -> dict[str, int]:
    """Send files on one association; returns {SOPInstanceUID: status} of the answered ones.

    ``acked`` (if given) is filled as responses arrive, so a caller killing the node
    mid-way still knows exactly which instances were acknowledged (status 0x0000).
    A dropped association ends the loop silently.
    """
    out: dict[str, int] = {} if acked is None else acked
    files = list(files)
    try:
        assoc = associate_store(port, timeout=timeout, **kw)
    except Exception:
        return out
    if not assoc.is_established:
        return out
    try:
        for f in files:
            if stop is not None and stop.is_set():
                break
            if not assoc.is_established:
                break
            ds = pydicom.dcmread(f)
            try:
                st = assoc.send_c_store(ds)
            except Exception:
                break
            if st and "Status" in st:
                out[str(ds.SOPInstanceUID)] = int(st.Status)
            else:
                break
    finally:
        with contextlib.suppress(Exception):
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()
    return out


@contextlib.contextmanager
def chunked_send():
    """pynetdicom sends a file's dataset bytes exactly as they are in the file (no decode)."""
    from pynetdicom import _config

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def write_raw_part10(path: Path, body: bytes, *, sop_class: str = XA, sop_uid: Optional[str] = None,
                     ts: str = ExplicitVRLittleEndian) -> Path:
    """A Part 10 file whose data set is exactly ``body`` (whatever it is)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1234.1"
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=False)
    Path(path).write_bytes(b"\x00" * 128 + b"DICM" + buf.getvalue() + body)
    return Path(path)


def outbox_documents_at_least_once() -> bool:
    """True when dicom_node/outbox.py documents that a result may reach a PACS more than once."""
    p = ROOT / "dicom_node" / "outbox.py"
    if not p.is_file():
        return False
    text = p.read_text(encoding="utf-8").lower()
    return "at-least-once" in text or "at least once" in text


def assert_results_once(pacs: RecordingSCP, study_uids: Iterable[str]) -> None:
    """One SR per study processing reached the PACS; a re-sent SR UID only if the outbox documents it."""
    problems = []
    for su in study_uids:
        srs = pacs.srs(su)
        if len(srs) != 1:
            problems.append(f"study {su}: {len(srs)} distinct SR instances at the PACS {srs}")
    repeated = {u: n for u, n in pacs.stored.items() if n > 1}
    if repeated and not outbox_documents_at_least_once():
        problems.append(f"result instances stored more than once (outbox does not document at-least-once): "
                        f"{repeated}")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------
# TLS: a CA, a server certificate and client certificates (cryptography)
# ---------------------------------------------------------------------------
def make_pki(out: Path) -> dict[str, Path]:
    """ca.pem, server.pem/-key.pem (SAN localhost, 127.0.0.1), client.pem/-key.pem (signed by the CA),
    rogue.pem/-key.pem (a client certificate from another, untrusted CA)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - _dt.timedelta(hours=1)).not_valid_after(now + _dt.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(cn, ca_key, ca_cert, server: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - _dt.timedelta(hours=1)).not_valid_after(now + _dt.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    def write(stem, key, cert):
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (out / f"{stem}-key.pem").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

    ca_key, ca_cert = ca("cag-node test CA")
    rogue_ca_key, rogue_ca_cert = ca("rogue CA")
    write("ca", None, ca_cert)
    write("server", *leaf("localhost", ca_key, ca_cert, True))
    write("client", *leaf("MODALITY", ca_key, ca_cert, False))
    write("rogue", *leaf("MODALITY", rogue_ca_key, rogue_ca_cert, False))
    return {k: out / f"{k}.pem" for k in ("ca", "server", "client", "rogue")} | {
        "server_key": out / "server-key.pem", "client_key": out / "client-key.pem", "rogue_key": out / "rogue-key.pem"}


def client_tls(pki: dict, cert: Optional[str] = "client"):
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if cert:
        ctx.load_cert_chain(str(pki[cert]), str(pki[f"{cert}_key"]))
    return (ctx, "localhost")


# ---------------------------------------------------------------------------
# Fast read-only looks at the node's journal (polling through the CLI costs a
# Python start-up per call; the final checks use `cag-node studies --json`).
# ---------------------------------------------------------------------------
def _db(node: NodeProc):
    import sqlite3

    url = node.cfg["storage"]["journal"]
    assert url.startswith("sqlite:///")
    con = sqlite3.connect(f"file:{url[len('sqlite:///'):]}?mode=ro", uri=True, timeout=10)
    return con


def db_query(node: NodeProc, sql: str, args: tuple = ()) -> list[tuple]:
    import sqlite3

    for _ in range(20):
        try:
            con = _db(node)
            try:
                return con.execute(sql, args).fetchall()
            finally:
                con.close()
        except sqlite3.OperationalError as exc:  # table not created yet / locked
            last = exc
            time.sleep(0.1)
    raise last


def db_study(node: NodeProc, study_uid: str) -> tuple[Optional[str], Optional[str]]:
    """(state, stage) of a study, or (None, None)."""
    try:
        rows = db_query(node, "SELECT state, stage FROM studies WHERE study_uid = ?", (study_uid,))
    except Exception:
        return None, None
    return rows[0] if rows else (None, None)


def db_outbox(node: NodeProc, study_uid: str) -> list[tuple]:
    """(sop_instance_uid, destination, state, attempts, last_error) rows of a study."""
    try:
        return db_query(node, "SELECT sop_instance_uid, destination, state, attempts, last_error FROM outbox "
                              "WHERE study_uid = ? ORDER BY id", (study_uid,))
    except Exception:
        return []


def db_instance_path(node: NodeProc, sop_uid: str) -> Optional[str]:
    try:
        rows = db_query(node, "SELECT path FROM instances WHERE sop_instance_uid = ?", (sop_uid,))
    except Exception:
        return None
    return rows[0][0] if rows else None
