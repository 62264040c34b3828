#!/usr/bin/env python
"""Benchmark: end to end, last instance received -> SR stored in Orthanc.

A 4-run synthetic angiography study goes to a node (``cag-node serve`` as a
subprocess, the demo models) with dcmtk ``storescu``; the node's destination is
a real Orthanc.  Measured per study:

* ``latency``: from the SCU's last C-STORE acknowledgement to the moment the SR
  is found in Orthanc (REST, polled every 50 ms), **minus the configured quiet
  period** (``completion.quiet_seconds``, by design time spent waiting);
* the node's own per-stage timings (``cag-node studies --json``);
* the peer figure of the same run: ``storescu`` of the same 4 runs straight into
  the same Orthanc (what the PACS needs just to take the study in), and the
  ratio ``latency / peer``.

    .venv/bin/python bench/e2e.py [--quick] [--bundle DIR] [--studies N] [--json OUT]

``--bundle`` defaults to ./models/demo; it is built (``training.demo.build_demo_bundle``,
``quick`` with ``--quick``) when absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from benchlib import emit, free_port, stop_process, wait_port, work_dir  # noqa: E402
from large_instance import CAG, machine  # noqa: E402

QUIET_S = 2.0


class Node:
    """``cag-node serve --config`` in a subprocess, with a config of ours."""

    def __init__(self, work: Path, cfg: dict):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.port = cfg["node"]["port"]
        self.cfg_path = work / "config.yaml"
        self.proc = None

    @staticmethod
    def config(work: Path, *, bundle: Path | None, destinations: list[dict], quiet: float = QUIET_S,
               **over) -> dict:
        cfg = {
            "node": {"processes": 1, "port": free_port(), "allowed_calling_aets": ["MODALITY", "ORTHANC"]},
            "storage": {"path": str(work / "spool"), "journal": f"sqlite:///{work / 'journal.db'}",
                        "min_free_mb": 512},
            "completion": {"quiet_seconds": quiet},
            "processing": {"enabled": bundle is not None},
            "models": {"bundle": str(bundle) if bundle else str(work / "none")},
            "destinations": destinations,
            "outbox": {"retry_base_s": 0.5, "poll_s": 0.1},
            "admin": {"port": free_port()},
            "logging": {"level": "INFO"},
        }
        for k, v in over.items():
            cfg.setdefault(k, {}).update(v)
        return cfg

    def start(self, timeout: float = 120) -> "Node":
        self.cfg_path.write_text(yaml.safe_dump(self.cfg))
        self.log = open(self.work / "node.log", "ab")
        self.proc = subprocess.Popen([CAG, "serve", "--config", str(self.cfg_path)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        wait_port(self.port, timeout, self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc, 60)
        if self.proc:
            self.log.close()
        self.proc = None

    def studies(self) -> list[dict]:
        r = subprocess.run([CAG, "studies", "--json", "--config", str(self.cfg_path)], capture_output=True,
                           text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        return json.loads(r.stdout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def ensure_bundle(bundle: Path, quick: bool) -> None:
    from inference.bundle import Bundle, BundleError

    try:
        Bundle.load(bundle)
        return
    except BundleError:
        pass
    from training.demo import build_demo_bundle

    print(f"building the demo bundle into {bundle} (quick={quick}); minutes on 2 cores", flush=True)
    t0 = time.perf_counter()
    build_demo_bundle(bundle, quick=quick)
    print(f"bundle built in {time.perf_counter() - t0:.0f} s", flush=True)


def make_4run_study(out: Path, seed: int, quick: bool) -> list[Path]:
    """Four runs of one synthetic study (the synthetic-data module, as the demo uses)."""
    try:
        from training.synthetic import generate_dataset

        recs = generate_dataset(out, 1, seed, size=128 if quick else 256, frames=16 if quick else 24,
                                runs_per_study=4, progress=False)
        return [out / r["file"] for r in recs]
    except ImportError:
        from large_instance import make_large_xa
        from pydicom.uid import generate_uid

        su = generate_uid()
        return [make_large_xa(out / f"run{i}.dcm", 256, 256, 24, su, seed=seed * 10 + i) for i in range(4)]


def storescu(files: list[Path], port: int, called: str) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"storescu: {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def send_and_time(files: list[Path], port: int) -> float:
    """Send on one association with pynetdicom; returns the monotonic time of the last acknowledgement."""
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = 0
    dss = [pydicom.dcmread(f) for f in files]
    for ds in dss:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CAGNODE", max_pdu=0)
    if not assoc.is_established:
        raise RuntimeError("association with the node failed")
    last = None
    try:
        for ds in dss:
            st = assoc.send_c_store(ds)
            if not st or int(st.Status) != 0:
                raise RuntimeError(f"C-STORE refused: {st}")
            last = time.monotonic()
    finally:
        assoc.release()
    return last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 study, 128x128x16 runs (quick bundle if built here)")
    ap.add_argument("--bundle", type=Path, default=ROOT / "models" / "demo")
    ap.add_argument("--studies", type=int, default=None, help="studies measured (default 3, quick 1)")
    ap.add_argument("--quiet", type=float, default=QUIET_S, help="completion.quiet_seconds of the node")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    for tool in ("storescu", "Orthanc"):
        if shutil.which(tool) is None:
            print(f"{tool} is required", file=sys.stderr)
            return 1
    n_studies = args.studies or (1 if args.quick else 3)
    bundle = args.bundle.resolve()
    ensure_bundle(bundle, args.quick)

    from dicom_node.orthanc import OrthancProcess

    with work_dir(args.work, "cag-bench-e2e-") as work:
        results = []
        node_port = free_port()
        orthanc = OrthancProcess(work / "orthanc", node_port=node_port)
        orthanc.start()
        try:
            cfg = Node.config(work / "node", bundle=bundle, quiet=args.quiet,
                              destinations=[{"name": "orthanc", "ae_title": orthanc.aet, "host": "127.0.0.1",
                                             "port": orthanc.dicom_port}])
            cfg["node"]["port"] = node_port
            with Node(work / "node", cfg) as node:
                # warm-up study: loads the models once (a serving node keeps them loaded)
                warm = make_4run_study(work / "warm", 999, args.quick)
                su_w = str(pydicom.dcmread(warm[0], stop_before_pixels=True).StudyInstanceUID)
                send_and_time(warm, node.port)
                _wait_sr(orthanc, su_w, 900)
                for i in range(n_studies):
                    files = make_4run_study(work / f"s{i}", 4242 + i, args.quick)
                    su = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                    mb = sum(f.stat().st_size for f in files) / 1e6
                    t_last = send_and_time(files, node.port)
                    t_sr = _wait_sr(orthanc, su, 900)
                    latency = t_sr - t_last - args.quiet
                    st = next(s for s in node.studies() if s["study_uid"] == su)
                    # the peer: the same 4 runs straight into Orthanc
                    peer = storescu(files, orthanc.dicom_port, orthanc.aet)
                    results.append({"study": i, "runs": len(files), "MB": round(mb, 1),
                                    "latency_s": round(latency, 2), "peer_storescu_to_orthanc_s": round(peer, 2),
                                    "ratio": round(latency / peer, 1), "stages": st.get("timings", {}),
                                    "state": st["state"]})
                    print(f"study {i}: {len(files)} runs, {mb:.1f} MB: last ack -> SR in Orthanc "
                          f"{latency + args.quiet:.2f} s - quiet {args.quiet:g} s = {latency:.2f} s; "
                          f"peer (storescu -> Orthanc, same files) {peer:.2f} s; ratio x{latency / peer:.1f}; "
                          f"stages {st.get('timings')}", flush=True)
        finally:
            orthanc.stop()
        lat = statistics.median(r["latency_s"] for r in results)
        peer = statistics.median(r["peer_storescu_to_orthanc_s"] for r in results)
        out = {"benchmark": "e2e", "bundle": str(bundle), "quick": args.quick, "quiet_seconds": args.quiet,
               "median_latency_s": lat, "median_peer_s": peer, "ratio": round(lat / peer, 1),
               "studies": results, "machine": machine(),
               "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        print(f"\nmedian latency (last instance -> SR in Orthanc, minus quiet period): {lat:.2f} s; "
              f"peer storescu -> Orthanc of the same study: {peer:.2f} s; ratio x{lat / peer:.1f}")
        return emit(out, args.json)


def _wait_sr(orthanc, study_uid: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if orthanc.find(study_uid, "SR"):
                return time.monotonic()
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no SR for {study_uid} in Orthanc after {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
