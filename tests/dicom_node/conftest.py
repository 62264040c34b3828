"""Fixtures for the node-core tests: small generated XA runs, node configs,
and a real ``cag-node serve`` subprocess.

Every node binds port 0 (the ready line / ``Node.address`` tells the real
port), so parallel test runs never collide.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[2]
CAG_NODE = str(ROOT / ".venv" / "bin" / "cag-node")
if not Path(CAG_NODE).exists():  # e.g. another venv layout
    CAG_NODE = str(Path(sys.executable).parent / "cag-node")

XA_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
READY = re.compile(r"cag-node listening on (\S+):(\d+) as (\S+).*\(admin (?:(\S+):(\d+)|disabled)\)")


def make_dataset(study_uid: Optional[str] = None, series_uid: Optional[str] = None,
                 sop_uid: Optional[str] = None, *, modality: str = "XA", sop_class: str = XA_CLASS,
                 frames: int = 8, size: int = 64, seed: int = 0) -> Dataset:
    """A small multi-frame 8-bit X-ray angiography run (synthetic, no PHI)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "SYN0001"
    ds.PatientBirthDate = "19500101"
    ds.StudyDate = "20260101"
    ds.AccessionNumber = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    if frames > 1 or modality == "XA":
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = (0x0018, 0x1063)
        ds.FrameTime = 66.7
    arr = rng.integers(0, 255, size=(frames, size, size), dtype=np.uint8)
    ds.PixelData = arr.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_dataset(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta group (what goes on the wire)."""
    from pydicom.filereader import _read_file_meta_info

    with open(path, "rb") as f:
        f.seek(132)
        _read_file_meta_info(f)
        return f.read()


@pytest.fixture
def study_dir(tmp_path) -> tuple[Path, str, list[str]]:
    """Three XA runs of one study (two series) as files."""
    study = generate_uid()
    s1, s2 = generate_uid(), generate_uid()
    uids = []
    d = tmp_path / "study"
    for i, series in enumerate([s1, s1, s2]):
        ds = make_dataset(study, series, seed=i)
        uids.append(ds.SOPInstanceUID)
        write_dataset(ds, d / f"run{i}.dcm")
    return d, study, uids


def node_config(tmp_path: Path, **over) -> dict:
    """A loopback test config: port 0, admin port 0, processing off, no destinations."""
    cfg = {
        "node": {"ae_title": "CAGNODE", "host": "127.0.0.1", "port": 0,
                 "allowed_calling_aets": ["MODALITY", "ORTHANC", "STORESCU", "ECHOSCU", "PYSCU"]},
        "storage": {"path": str(tmp_path / "spool"), "journal": f"sqlite:///{tmp_path / 'journal.db'}",
                    "min_free_mb": 1},
        "completion": {"quiet_seconds": 30},
        "processing": {"enabled": False},
        "admin": {"host": "127.0.0.1", "port": 0},
        "destinations": [],
    }
    for dotted, value in over.items():
        keys = dotted.split("__")
        d = cfg
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return p


@dataclass
class NodeProcess:
    """A real ``cag-node serve`` subprocess."""

    config_path: Path
    proc: Optional[subprocess.Popen] = None
    host: str = "127.0.0.1"
    port: int = 0
    admin_port: Optional[int] = None
    ready_line: str = ""
    log_path: Optional[Path] = None
    stdout_lines: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> "NodeProcess":
        self.log_path = self.config_path.with_suffix(f".{int(time.time() * 1000)}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([CAG_NODE, "serve", "--config", str(self.config_path), "--grace", "10"],
                                     stdout=subprocess.PIPE, stderr=self._log, cwd=self.config_path.parent)
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in buf:
                    line = buf.split(b"\n", 1)[0].decode()
                    m = READY.search(line)
                    if m:
                        self.ready_line = line
                        self.host, self.port = m.group(1), int(m.group(2))
                        self.admin_port = int(m.group(5)) if m.group(5) else None
                        return self
            if self.proc.poll() is not None:
                break
        self.kill9()
        raise RuntimeError(f"node did not become ready: {buf!r}\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def make_node(tmp_path):
    nodes = []

    def _make(process_fn=None, **over):
        from dicom_node.config import parse_config
        from dicom_node.node import Node

        cfg = parse_config(node_config(tmp_path, **over), base_dir=tmp_path)
        n = Node(cfg, process_fn=process_fn).start()
        nodes.append(n)
        return n

    yield _make
    for n in nodes:
        n.stop(grace_s=2)


def wait_for(pred, timeout=10.0, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return pred()


@pytest.fixture
def node_proc(tmp_path):
    """Factory: ``node_proc(cfg_dict)`` starts a serve subprocess; all are stopped at teardown."""
    procs: list[NodeProcess] = []

    def _start(cfg: dict, name: str = "config.yaml") -> NodeProcess:
        p = NodeProcess(write_config(tmp_path, cfg, name)).start()
        procs.append(p)
        return p

    yield _start
    for p in procs:
        p.kill9()


def run_tool(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


# storescu (dcmtk 3.6.7) proposes uncompressed syntaxes unless told which
# compressed one to propose; HTJ2K it does not know at all.
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2": [], "1.2.840.10008.1.2.1": [], "1.2.840.10008.1.2.2": ["-xb"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.4.50": ["-xy"], "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"], "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"], "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"], "1.2.840.10008.1.2.5": ["-xr"],
}


def storescu_cmd(port: int, files: list[Path], *, aet: str = "STORESCU", aec: str = "CAGNODE",
                 extra: Optional[list[str]] = None) -> list[str]:
    return ["storescu", "-aet", aet, "-aec", aec, *(extra or []), "127.0.0.1", str(port), *map(str, files)]


def pyscu_send(port: int, paths: list[Path], *, aet: str = "PYSCU", aec: str = "CAGNODE",
               ssl_context=None, stop_after: Optional[int] = None,
               statuses: Optional[list] = None) -> list[Optional[int]]:
    """Send files with pynetdicom *as they are on disk* (chunked: the data set
    bytes after the File Meta group go on the wire unchanged).  Returns one
    status per file (None: no response, e.g. the association died)."""
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    _config.STORE_SEND_CHUNKED_DATASET = True
    metas = [split_dataset(Path(p))[0] for p in paths]
    ae = AE(ae_title=aet)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    pairs = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas})
    assert len(pairs) <= 128, "split into several associations"
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, ts)
    tls_args = (ssl_context, None) if ssl_context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title=aec, tls_args=tls_args)
    if not assoc.is_established:
        raise ConnectionRefusedError(f"association not established (rejected={assoc.is_rejected})")
    statuses = [] if statuses is None else statuses  # the caller may watch it fill
    try:
        for p in paths:
            if not assoc.is_established:
                break
            st = assoc.send_c_store(Path(p))
            statuses.append(int(st.Status) if "Status" in st else None)
            if stop_after is not None and len(statuses) >= stop_after:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses
