#!/usr/bin/env python
"""Benchmark: peak RSS of the node on a 10-run 1024x1024 study (it must not hold whole runs in memory).

The node runs as a subprocess (``cag-node serve --config``, the demo models,
processing on, a dcmtk ``storescp`` as destination); its RSS (with any child
processes) is sampled with psutil every 20 ms from start-up until the study is
``sent``.  Reported: idle RSS after start-up, peak during reception, peak during
processing (selector + VLM + SR), and the same study received by dcmtk
``storescp`` as the peer measured in the same run (ratio = node peak / storescp
peak).  The growth over idle is also given in units of one run's size: a node
that holds a whole run in memory shows >= 1.0 there.  With a bundle, a small warm-up
study is processed first so that the models are loaded, and growth is measured
over that baseline (the models' own memory is not the study's).

    .venv/bin/python bench/memory.py [--quick] [--frames N] [--bundle DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from pydicom.uid import generate_uid

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from e2e import Node, ensure_bundle  # noqa: E402
from benchlib import work_dir  # noqa: E402
from large_instance import StoreSCP, machine, make_large_xa  # noqa: E402


class RSSSampler:
    def __init__(self, pid: int, interval: float = 0.02):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.phase = "start"
        self.peak: dict[str, int] = {}
        self.last = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        try:
            total = self.proc.memory_info().rss
            for c in self.proc.children(recursive=True):
                try:
                    total += c.memory_info().rss
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return 0

    def _run(self):
        while not self._stop.is_set():
            r = self._rss()
            self.last = r
            if r > self.peak.get(self.phase, 0):
                self.peak[self.phase] = r
            time.sleep(self.interval)

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join(5)


def storescu(files, port, called):
    r = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])


def study_state(node, su: str):
    """(state, stage, error) of a study, as ``cag-node studies --json`` tells (not SQL on the journal)."""
    try:
        row = next((r for r in node.studies() if r["study_uid"] == su), None)
    except (RuntimeError, ValueError):
        return (None, None, None)
    return (row["state"], row["stage"], row["error"]) if row else (None, None, None)


MB = 1024 * 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 frames per run instead of 60")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--bundle", type=Path, default=HERE.parent / "models" / "demo")
    ap.add_argument("--no-process", action="store_true", help="reception only (no bundle needed)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if shutil.which("storescu") is None:
        print("dcmtk is required", file=sys.stderr)
        return 1
    frames = args.frames or (16 if args.quick else 60)
    bundle = None if args.no_process else args.bundle.resolve()
    if bundle is not None:
        ensure_bundle(bundle, args.quick)
    with work_dir(args.work, "cag-bench-mem-") as work:
        su = generate_uid()
        t0 = time.perf_counter()
        files = [make_large_xa(work / "study" / f"run{i:02d}.dcm", args.size, args.size, frames, su, seed=i)
                 for i in range(args.runs)]
        run_mb = max(f.stat().st_size for f in files) / MB
        study_mb = sum(f.stat().st_size for f in files) / MB
        print(f"study: {args.runs} runs of {args.size}x{args.size}x{frames} 8-bit, {run_mb:.0f} MiB per run, "
              f"{study_mb:.0f} MiB in all (generated in {time.perf_counter() - t0:.0f} s)", flush=True)

        # peer: dcmtk storescp receiving the same study
        with StoreSCP(work / "peer") as peer:
            ps = RSSSampler(peer.proc.pid).start()
            ps.phase = "reception"
            t0 = time.perf_counter()
            storescu(files, peer.port, peer.aet)
            peer_s = time.perf_counter() - t0
            ps.stop()
            peer_peak = ps.peak.get("reception", 0)
        print(f"peer storescp: peak RSS {peer_peak / MB:.0f} MiB, reception {peer_s:.1f} s", flush=True)

        with StoreSCP(work / "dest") as dest:
            cfg = Node.config(work / "node", bundle=bundle, quiet=2.0,
                              destinations=[{"name": "dest", "ae_title": dest.aet, "host": "127.0.0.1",
                                             "port": dest.port}],
                              storage={"min_free_mb": 1024}, logging={"level": "WARNING"})
            node = Node(work / "node", cfg).start()
            try:
                s = RSSSampler(node.proc.pid).start()
                time.sleep(1.5)
                idle = s.last
                loaded = idle
                if bundle is not None:
                    # warm-up: one small run processed end to end, so the models are loaded (a serving
                    # node keeps them); growth is then measured over this "models loaded" baseline
                    s.phase = "warm-up"
                    wsu = generate_uid()
                    warm = make_large_xa(work / "warm" / "w.dcm", 256, 256, 12, wsu, seed=99)
                    storescu([warm], node.port, "CAGNODE")
                    deadline = time.monotonic() + 900
                    while time.monotonic() < deadline and study_state(node, wsu)[0] not in ("sent", "failed"):
                        time.sleep(0.3)
                    time.sleep(1.0)
                    loaded = s.last
                    print(f"node: idle {idle / MB:.0f} MiB; after a warm-up study (models loaded) "
                          f"{loaded / MB:.0f} MiB", flush=True)
                s.phase = "reception"
                t0 = time.perf_counter()
                storescu(files, node.port, "CAGNODE")
                recv_s = time.perf_counter() - t0
                s.phase = "waiting"  # the quiet period
                before_proc = None
                state = None
                t1 = time.perf_counter()
                if bundle is not None:
                    deadline = time.monotonic() + 3600
                    while time.monotonic() < deadline:
                        state, stage, err = study_state(node, su)
                        if state in ("sent", "failed"):
                            break
                        if state == "processing" and stage:
                            if before_proc is None:
                                before_proc = s.last
                            s.phase = f"processing:{stage}"
                        time.sleep(0.1)
                    if state != "sent":
                        print(f"study ended {state}: {err}", file=sys.stderr)
                proc_s = time.perf_counter() - t1
                s.stop()
            finally:
                node.stop()
        peak_recv = s.peak.get("reception", 0)
        stage_peaks = {k.split(":", 1)[1]: v for k, v in s.peak.items() if k.startswith("processing:")}
        peak_proc = max([0, *stage_peaks.values()])
        before_proc = before_proc or loaded
        peak = max(peak_recv, peak_proc)
        rows = {
            "idle_MiB": round(idle / MB), "models_loaded_MiB": round(loaded / MB),
            "peak_reception_MiB": round(peak_recv / MB),
            "peak_by_stage_MiB": {k: round(v / MB) for k, v in stage_peaks.items()},
            "reception_growth_in_runs": round((peak_recv - loaded) / (run_mb * MB), 2),
            "processing_growth_in_runs": round((peak_proc - loaded) / (run_mb * MB), 2) if bundle else None,
            "rss_before_processing_MiB": round(before_proc / MB),
            "processing_growth_over_its_start_in_runs": round((peak_proc - before_proc) / (run_mb * MB), 2)
            if bundle else None,
            "peak_processing_MiB": round(peak_proc / MB) if bundle else None,

            "reception_s": round(recv_s, 1), "processing_s": round(proc_s, 1) if bundle else None,
            "final_state": state, "peer_storescp_peak_MiB": round(peer_peak / MB), "peer_reception_s": round(peer_s, 1),
            "ratio_peak_vs_storescp": round(peak / max(1, peer_peak), 1),
            "run_MiB": round(run_mb), "study_MiB": round(study_mb),
        }
        print(f"node: idle {idle / MB:.0f} MiB; peak during reception {peak_recv / MB:.0f} MiB "
              f"({recv_s:.1f} s); peak during processing {peak_proc / MB:.0f} MiB ({proc_s:.1f} s, {state})")
        print(f"peak by stage: {rows['peak_by_stage_MiB']}")
        print(f"growth over the models-loaded baseline, in runs of {run_mb:.0f} MiB: reception "
              f"{rows['reception_growth_in_runs']}, processing {rows['processing_growth_in_runs']} "
              f"(study {study_mb:.0f} MiB); processing over the RSS it started from "
              f"({before_proc / MB:.0f} MiB): {rows['processing_growth_over_its_start_in_runs']}")
        print(f"ratio node peak / storescp peak (same study, same run): x{rows['ratio_peak_vs_storescp']}")
        out = {"benchmark": "memory", "runs": args.runs, "shape": [frames, args.size, args.size], **rows,
               "bundle": str(bundle) if bundle else None, "machine": machine(),
               "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
        print(json.dumps(out))
        return 0 if (bundle is None or state == "sent") else 1


if __name__ == "__main__":
    sys.exit(main())
