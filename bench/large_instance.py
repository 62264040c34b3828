#!/usr/bin/env python
"""Benchmark: one large multi-frame XA instance in and out, against dcmtk.

pynetdicom used naively moved a 208 MB multi-frame in 19 s where dcmtk took
0.5 s (pynetdicom issue 650).  This measures, on the same generated file
(default 1024x1024x200 8-bit XA = 200 MiB of pixels) and in the same run:

* **dcmtk** (the yardstick): ``storescu`` -> ``storescp +B`` (no fsync);
* **node receive**: ``storescu`` -> ``cag-node serve`` (the shipped write path:
  raw bytes, fsync on; also fsync off for a like-for-like figure);
* **node send**: the outbox SCU ``dicom_node.scu.store_files`` -> ``storescp +B``, and for
  comparison pynetdicom sending the file's bytes undecoded (``STORE_SEND_CHUNKED_DATASET``);
* **stock pynetdicom** (reference, unless ``--no-stock``): a default ``AE``
  (16 KiB PDU) ``send_c_store(dcmread(file))`` -> ``storescp``, and a default
  pynetdicom SCP that decodes and saves ``event.dataset`` <- ``storescu``.

Each figure is the median of ``--repeat`` transfers; every ratio is against the
dcmtk transfer measured in this run (ratio 1.0 = as fast as dcmtk; 2.0 = twice
the time).

    .venv/bin/python bench/large_instance.py [--quick] [--frames N] [--repeat R] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import clear_dir, emit, free_port, stop_process, wait_port, work_dir  # noqa: E402,F401  (e2e imports some from here)
CAG = str(Path(sys.executable).with_name("cag-node"))
XA = "1.2.840.10008.5.1.4.1.1.12.1"


def make_large_xa(path: Path, rows: int, cols: int, frames: int, study_uid: str | None = None,
                  seed: int = 1) -> Path:
    """An 8-bit multi-frame XA whose pixel data is a cheap moving pattern (not compressible to nothing)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = XA
    ds.SOPClassUID = XA
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality = "XA"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^Large", "BENCH1", "", "O"
    ds.AccessionNumber, ds.StudyID, ds.StudyDate, ds.StudyTime = "", "1", "20260101", "120000"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.FrameIncrementPointer = (0x0018, 0x1063)
    ds.FrameTime = 66.7
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, size=(rows, cols), dtype=np.uint8)
    buf = bytearray(rows * cols * frames)
    mv = memoryview(buf)
    n = rows * cols
    for f in range(frames):
        fr = np.roll(base, f * 3, axis=1)
        c = (f * 7) % cols
        fr[:, c:c + 8] = 25  # a dark "vessel" moving across the run
        mv[f * n:(f + 1) * n] = fr.tobytes()
    ds.PixelData = bytes(buf)
    del buf, mv
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


class StoreSCP:
    """dcmtk storescp +B into a folder (emptied between transfers)."""

    def __init__(self, out_dir: Path, aet: str = "BENCHSCP"):
        self.out_dir, self.aet, self.port = out_dir, aet, free_port()
        self.proc = None

    def __enter__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["storescp", "--aetitle", self.aet, "+B", "-od", str(self.out_dir),
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 20, self.proc)
        return self

    def clear(self):
        clear_dir(self.out_dir)

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)


def storescu(path: Path, port: int, called: str, calling: str = "MODALITY") -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), str(path)],
                       capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"storescu failed: {r.stderr[-2000:]}")
    return dt


class NodeServe:
    """``cag-node serve`` (reception only) in a subprocess."""

    def __init__(self, work: Path, fsync: bool = True):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.cfg = {
            "node": {"processes": 1, "port": self.port, "allowed_calling_aets": ["MODALITY"]},
            "storage": {"path": str(work / "spool"), "journal": f"sqlite:///{work / 'journal.db'}",
                        "min_free_mb": 1024, "fsync": fsync},
            "completion": {"quiet_seconds": 3600},
            "processing": {"enabled": False},
            "admin": {"port": free_port()},
            "logging": {"level": "WARNING"},
        }
        self.proc = None

    def __enter__(self):
        cfg = self.work / "config.yaml"
        cfg.write_text(yaml.safe_dump(self.cfg))
        self.log = open(self.work / "node.log", "ab")
        self.proc = subprocess.Popen([CAG, "serve", "--config", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, 90, self.proc)
        return self

    def clear(self):
        spool = self.work / "spool"
        for d in spool.iterdir():
            if d.is_dir() and not d.name.startswith("."):
                shutil.rmtree(d)

    def __exit__(self, *exc):
        stop_process(self.proc, 30)
        self.log.close()


def send_with_node_scu(path: Path, port: int, aet: str) -> float:
    from dicom_node.config import Destination
    from dicom_node.scu import store_files

    dest = Destination(name="bench", ae_title=aet, host="127.0.0.1", port=port)
    t0 = time.perf_counter()
    outcomes = list(store_files(dest, [path], calling_ae="CAGNODE"))
    dt = time.perf_counter() - t0
    if not outcomes or not outcomes[0].stored:
        raise RuntimeError(f"node SCU failed: {outcomes}")
    return dt


def send_with_pynetdicom_chunked(path: Path, port: int, aet: str) -> float:
    """pynetdicom sending the file's bytes as they are (STORE_SEND_CHUNKED_DATASET, send_c_store(path))."""
    from pynetdicom import _config

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return _send_once(lambda: path, port, aet, "CHUNKED")
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


def send_with_stock_pynetdicom(path: Path, port: int, aet: str) -> float:
    return _send_once(lambda: pydicom.dcmread(path), port, aet, "STOCK")


def _send_once(what, port: int, aet: str, calling: str) -> float:
    """Seconds to send ``what()`` (a path or a data set, made inside the timing) on one association."""
    from pynetdicom import AE

    t0 = time.perf_counter()
    obj = what()
    ae = AE(ae_title=calling)
    ae.add_requested_context(XA, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise RuntimeError(f"{calling}: association failed")
    st = assoc.send_c_store(obj)
    assoc.release()
    dt = time.perf_counter() - t0
    if not st or int(st.Status) != 0:
        raise RuntimeError(f"{calling} send failed: {st}")
    return dt


class StockSCP:
    """pynetdicom's documented storage SCP example: decode event.dataset and save it."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.port = out_dir, free_port()
        out_dir.mkdir(parents=True, exist_ok=True)

    def _on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(self.out_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    def __enter__(self):
        from pynetdicom import AE, evt
        from pynetdicom.presentation import StoragePresentationContexts

        ae = AE(ae_title="STOCKSCP")
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def clear(self):
        clear_dir(self.out_dir)

    def __exit__(self, *exc):
        self.server.shutdown()


def median_of(fn, repeat: int, clear=None) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeat):
        times.append(fn())
        if clear:
            clear()
    return statistics.median(times), times


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        import psutil

        mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPU(s){mem}, Linux {platform.release()}, " \
           f"Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 frames (40 MiB), 1 repeat, no stock pynetdicom")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=None, help="frames of 1024x1024 (default 200, quick 40)")
    ap.add_argument("--repeat", type=int, default=None, help="transfers per figure (default 3, quick 1)")
    ap.add_argument("--no-stock", action="store_true", help="skip the stock pynetdicom reference figures")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        print("dcmtk (storescu, storescp) is required", file=sys.stderr)
        return 1
    frames = args.frames or (40 if args.quick else 200)
    repeat = args.repeat or (1 if args.quick else 3)
    stock = not (args.no_stock or args.quick)

    with work_dir(args.work, "cag-bench-large-") as work:
        src = work / "large.dcm"
        t0 = time.perf_counter()
        make_large_xa(src, args.rows, args.rows, frames)
        size = src.stat().st_size
        print(f"generated {src.name}: {args.rows}x{args.rows}x{frames} 8-bit XA, {size / 1e6:.1f} MB "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        rows: list[dict] = []

        def add(name, med, times, note=""):
            rows.append({"name": name, "seconds": round(med, 3), "runs": [round(t, 3) for t in times],
                         "MB_per_s": round(size / 1e6 / med, 1), "note": note})
            print(f"  {name:<44} {med:7.2f} s  {size / 1e6 / med:7.1f} MB/s  {note}", flush=True)

        with StoreSCP(work / "storescp") as scp:
            med, ts = median_of(lambda: storescu(src, scp.port, scp.aet), repeat, scp.clear)
            add("dcmtk storescu -> storescp +B", med, ts, "yardstick (no fsync)")
            dcmtk = med
            med, ts = median_of(lambda: send_with_node_scu(src, scp.port, scp.aet), repeat, scp.clear)
            add("node SCU (dicom_node.scu) -> storescp +B", med, ts, "outbox sender")
            med, ts = median_of(lambda: send_with_pynetdicom_chunked(src, scp.port, scp.aet), repeat, scp.clear)
            add("pynetdicom send_c_store(path), chunked -> storescp", med, ts, "raw file bytes, no decode")
            if stock:
                med, ts = median_of(lambda: send_with_stock_pynetdicom(src, scp.port, scp.aet), repeat, scp.clear)
                add("stock pynetdicom SCU -> storescp +B", med, ts, "default AE, dcmread + send_c_store")
        for fsync in (True, False):
            with NodeServe(work / f"node-fsync-{fsync}", fsync=fsync) as node:
                med, ts = median_of(lambda: storescu(src, node.port, "CAGNODE"), repeat, node.clear)
                add(f"storescu -> cag-node serve (fsync {'on' if fsync else 'off'})", med, ts,
                    "shipped default" if fsync else "like-for-like with storescp")
        if stock:
            with StockSCP(work / "stockscp") as sscp:
                med, ts = median_of(lambda: storescu(src, sscp.port, "STOCKSCP"), repeat, sscp.clear)
                add("storescu -> stock pynetdicom SCP", med, ts, "decode event.dataset + save_as")

        for r in rows:
            r["ratio_vs_dcmtk"] = round(r["seconds"] / dcmtk, 2)
        print("\nratios (time / dcmtk storescu->storescp, same run):")
        for r in rows:
            print(f"  {r['name']:<44} x{r['ratio_vs_dcmtk']:.2f}")
        out = {"benchmark": "large_instance", "file_bytes": size, "shape": [frames, args.rows, args.rows],
               "repeat": repeat, "machine": machine(), "rows": rows,
               "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        return emit(out, args.json)


if __name__ == "__main__":
    sys.exit(main())
