"""Reception throughput: cag-node (durable: fsync per instance + journal) vs
dcmtk storescp (+B, bit-preserving, no fsync) on the same files.

    .venv/bin/python bench/reception.py [--quick] [--keep DIR]

Generates multi-frame 8-bit XA runs (full: 12 x 512x512x60 and 4 x
1024x1024x30; --quick: 6 and 2) into a temp dir, sends them with dcmtk
storescu in one association and with 4 concurrent storescu processes, and
prints MB/s, instances/s, receiver CPU seconds per GB (utime+stime of the
receiver's whole process tree: its live receiver processes and the reaped
storescp --fork children, from /proc) and the ratio node/storescp, each the
median of --repeat interleaved runs.  The node runs receive-only (MPPS/UPS off)
with node.processes auto (one receiver process per core); --single adds
node.processes 1.  Both receivers write into the same temp filesystem.

Each measurement starts a fresh receiver and sends instances it has not stored
before (replacing stored files costs the kernel less than writing new ones, for
either receiver).  --warm first sends an untimed warm-up (4 small runs of other
UIDs over 4 concurrent associations, so every receiver process likely takes
one) and measures after it: a node that has received before.  storescp --fork
forks a fresh child per association either way.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from benchlib import free_port, stop_process  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CAG_NODE = ROOT / ".venv" / "bin" / "cag-node"
CLK = os.sysconf("SC_CLK_TCK")


def make_run(path: Path, study: str, rows: int, frames: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.12.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "XA"
    ds.PatientID = "BENCH"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = (0x0018, 0x1063)
    ds.FrameTime = 66.7
    ds.PixelData = rng.integers(0, 255, size=(frames, rows, rows), dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its whole process tree: the live descendants (the node's
    receiver processes) and the reaped ones (storescp --fork children, via cutime/cstime)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is state (field 3); utime=14, stime=15, cutime=16, cstime=17
    own = sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK
    return own + sum(cpu_seconds(c) for c in _children(pid))


@dataclass
class Receiver:
    name: str
    proc: subprocess.Popen
    port: int
    out_dir: Path

    def stop(self) -> None:
        stop_process(self.proc, 30)


def start_node(work: Path, fsync: bool = True, processes="auto") -> Receiver:
    d = Path(tempfile.mkdtemp(prefix="node-", dir=work))
    cfg = {
        "node": {"ae_title": "CAGNODE", "port": 0, "allowed_calling_aets": ["*"], "max_pdu": 0,
                 "max_associations": 16, "processes": processes},
        # a receive-only node, as in the earlier figures (MPPS/UPS add nothing to C-STORE)
        "mpps": {"enabled": False},
        "ups": {"enabled": False},
        "storage": {"path": str(d / "spool"), "journal": f"sqlite:///{d / 'journal.db'}", "min_free_mb": 64,
                    "fsync": fsync},
        "completion": {"quiet_seconds": 3600},
        "processing": {"enabled": False},
        "admin": {"enabled": False},
        "destinations": [],
        "logging": {"level": "WARNING"},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([str(CAG_NODE), "serve", "--config", str(d / "config.yaml")], stdout=subprocess.PIPE,
                            stderr=open(d / "node.log", "wb"))
    line = proc.stdout.readline().decode()
    m = re.search(r"listening on \S+:(\d+)", line)
    if not m:
        raise RuntimeError(f"node did not start: {line!r} {(d / 'node.log').read_text()}")
    name = "cag-node" + ("" if processes == "auto" else f" p={processes}") + ("" if fsync else " (no fsync)")
    return Receiver(name, proc, int(m.group(1)), d / "spool")


def start_storescp(work: Path) -> Receiver:
    d = Path(tempfile.mkdtemp(prefix="storescp-", dir=work))
    port = free_port()
    proc = subprocess.Popen(["storescp", "--fork", "+B", "-aet", "CAGNODE", "-od", str(d), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    return Receiver("storescp +B", proc, port, d)


def send(port: int, files: list[Path], parallel: int) -> float:
    chunks = [files[i::parallel] for i in range(parallel)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "MODALITY", "-aec", "CAGNODE", "127.0.0.1", str(port),
                               *map(str, c)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in chunks]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed (rc {p.returncode}): {err.decode()[-500:]}")
    return time.perf_counter() - t0


def measure(start, work: Path, files: list[Path], parallel: int, warmup: list[Path] = ()) -> dict:
    rx = start(work)
    try:
        time.sleep(0.3)
        if warmup:  # untimed, and its CPU is not counted
            send(rx.port, list(warmup), min(4, len(warmup)))
            time.sleep(0.5)
        cpu0 = cpu_seconds(rx.proc.pid)
        try:
            wall = send(rx.port, files, parallel)
        except RuntimeError:
            log = rx.out_dir.parent / "node.log"
            if log.exists():
                print(log.read_text()[-3000:], file=sys.stderr)
            raise
        time.sleep(0.2)  # let forked storescp children be reaped
        cpu = cpu_seconds(rx.proc.pid) - cpu0
    finally:
        rx.stop()
    nbytes = sum(f.stat().st_size for f in files)
    stored = [p for p in rx.out_dir.rglob("*") if p.is_file() and p.parent.name != ".tmp"]
    assert len(stored) == len(files) + len(warmup), (rx.name, len(stored))
    shutil.rmtree(rx.out_dir, ignore_errors=True)
    return {"receiver": rx.name, "parallel": parallel, "wall_s": wall, "MB_s": nbytes / 1e6 / wall,
            "inst_s": len(files) / wall, "cpu_s_per_GB": cpu / (nbytes / 1e9)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 + 2 runs instead of 12 + 4")
    ap.add_argument("--nofsync", action="store_true", help="also measure the node without fsync")
    ap.add_argument("--keep", help="generate into / reuse this directory")
    ap.add_argument("--repeat", type=int, default=3,
                    help="measure each receiver this many times, interleaved; report the median (default 3)")
    ap.add_argument("--single", action="store_true", help="also measure the node with node.processes: 1")
    ap.add_argument("--warm", action="store_true",
                    help="send an untimed warm-up to each fresh receiver first (see above)")
    args = ap.parse_args(argv)
    n512, n1024 = (6, 2) if args.quick else (12, 4)
    work = Path(tempfile.mkdtemp(prefix="cag-bench-"))
    src = Path(args.keep) if args.keep else work / "src"
    src.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.dcm"))
    if len(files) != n512 + n1024:
        for f in files:
            f.unlink()
        study = generate_uid()
        for i in range(n512):
            make_run(src / f"run512_{i:02d}.dcm", study, 512, 60, i)
        for i in range(n1024):
            make_run(src / f"run1024_{i:02d}.dcm", study, 1024, 30, 100 + i)
        files = sorted(src.glob("*.dcm"))
    warmup: list[Path] = []
    if args.warm:
        wd = work / "warmup"
        wd.mkdir()
        study = generate_uid()
        for i in range(4):
            make_run(wd / f"warm_{i}.dcm", study, 512, 10, 200 + i)
        warmup = sorted(wd.glob("*.dcm"))
    total = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {total / 1e6:.0f} MB; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{'warm (after an untimed warm-up)' if warmup else 'cold (fresh receivers)'}", flush=True)
    results = []
    starters = [start_node, start_storescp]
    if args.nofsync:
        starters.insert(1, lambda w: start_node(w, fsync=False))
    if args.single:
        starters.insert(1, lambda w: start_node(w, processes=1))
    try:
        for parallel in (1, 4):
            runs: dict[int, list[dict]] = {}
            for _ in range(max(1, args.repeat)):  # interleaved: drift of a shared machine hits all alike
                for k, start in enumerate(starters):
                    runs.setdefault(k, []).append(measure(start, work, files, parallel, warmup))
            for k in range(len(starters)):
                rs = runs[k]
                r = dict(rs[0], **{key: float(np.median([x[key] for x in rs]))
                                   for key in ("wall_s", "MB_s", "inst_s", "cpu_s_per_GB")})
                results.append(r)
                print(f"{r['receiver']:<22} x{parallel}: {r['MB_s']:7.1f} MB/s {r['inst_s']:6.2f} inst/s "
                      f"{r['cpu_s_per_GB']:6.2f} CPU s/GB (median of {len(rs)}; MB/s "
                      f"{min(x['MB_s'] for x in rs):.0f}-{max(x['MB_s'] for x in rs):.0f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nratios node (node.processes auto = {os.cpu_count()}) / storescp --fork +B "
          "(throughput >1 = node faster; CPU >1 = node costlier):")
    for parallel in (1, 4):
        node = next(r for r in results if r["receiver"] == "cag-node" and r["parallel"] == parallel)
        scp = next(r for r in results if r["receiver"] == "storescp +B" and r["parallel"] == parallel)
        print(f"  x{parallel}: throughput {node['MB_s'] / scp['MB_s']:.2f}, "
              f"CPU per GB {node['cpu_s_per_GB'] / scp['cpu_s_per_GB']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
