"""Selector runtime benchmark: ONNX Runtime (fp32, int8) vs torch eager, same model.

For each architecture (default convnext_atto and convnext_base at 256 px, random weights —
speed does not depend on them) it exports the model to ONNX, quantizes it (static QDQ for
atto..nano, dynamic MatMul-only for tiny/base, as ``cag-node export selector --int8``), and
measures, each backend in its own subprocess (so peak RSS is per backend):

* model throughput: frames/s at a fixed batch (inputs already preprocessed);
* per-run latency: ``Selector.select_run`` on a 24-frame 256x256 run (decode, display
  pipeline, candidates, model, ranking); torch uses the same pipeline with its model swapped in;
* peak RSS of the process.

Prints a table and the ORT/torch ratios; ``--json`` writes the raw numbers.

    .venv/bin/python bench/selector.py                 # atto + base, 256 px
    .venv/bin/python bench/selector.py --archs convnext_atto --seconds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _prepare(arch: str, size: int, work: Path) -> dict:
    """Export fp32 + int8 bundles for ``arch`` and a test run; returns paths."""
    import torch

    from inference.bundle import Preprocessing, SelectorSpec, sha256_file, update_manifest
    from training.selector.export import export_onnx, quantize
    from training.selector.model import create_model
    from training.selector.toy import toy_frames, write_run

    torch.manual_seed(0)
    model = create_model(arch)
    ck = work / f"{arch}.pt"
    torch.save({"model": model.state_dict(), "config": {"arch": arch, "channels": 1}}, ck)
    rng = np.random.default_rng(0)
    calib = ((rng.random((16, 1, size, size), dtype=np.float32) - 0.5) / 0.25).astype(np.float32)
    out = {"checkpoint": str(ck)}
    for prec in ("fp32", "int8"):
        b = work / f"{arch}-{prec}"
        b.mkdir(parents=True, exist_ok=True)
        fp32 = work / f"{arch}.fp32.onnx"
        if not fp32.exists():
            export_onnx(model, fp32, size)
        if prec == "fp32":
            (b / "selector.onnx").write_bytes(fp32.read_bytes())
            method = None
        else:
            method = quantize(fp32, b / "selector.onnx", "auto", arch, calib)
        sec = SelectorSpec(arch=arch, preprocessing=Preprocessing(input_size=size),
                           sha256=sha256_file(b / "selector.onnx")).model_dump()
        sec.update(precision=prec, quantization={"method": method} if method else None)
        update_manifest(b, selector=sec)
        out[prec] = str(b)
        out[f"{prec}_mb"] = round((b / "selector.onnx").stat().st_size / 1e6, 1)
    frames, _ = toy_frames("LCA", 24, size, seed=1)
    out["run"] = str(write_run(work / "run.dcm", frames))
    return out


def _peak_rss_mb() -> float:
    """Peak RSS of this process since exec (VmHWM; ru_maxrss would include the forked parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _one(backend: str, arch: str, prep: dict, size: int, batch: int, seconds: float, threads: int) -> dict:
    """Measure one backend (runs in its own process)."""
    from inference.selector import Selector

    x = np.random.default_rng(0).standard_normal((batch, 1, size, size)).astype(np.float32)
    if backend == "torch":
        import torch

        from training.selector.model import create_model

        torch.set_num_threads(threads)
        model = create_model(arch)
        model.load_state_dict(torch.load(prep["checkpoint"], map_location="cpu")["model"])
        model.eval()

        def infer(a: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return torch.softmax(model(torch.from_numpy(a)), 1).numpy()

        sel = Selector(prep["fp32"], threads=threads, batch_size=batch)
        sel.predict = lambda a: np.concatenate([infer(np.ascontiguousarray(a[i:i + batch]))  # type: ignore
                                                for i in range(0, len(a), batch)])
    else:
        sel = Selector(prep[backend], threads=threads, batch_size=batch, providers=["cpu"])

        def infer(a: np.ndarray) -> np.ndarray:
            return sel.predict(a)

    infer(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        infer(x)
        n += batch
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 2 * batch:
            break
    fps = n / dt
    sel.select_run(prep["run"])  # warm-up
    lat = []
    t0 = time.perf_counter()
    while len(lat) < 2 or (time.perf_counter() - t0 < seconds and len(lat) < 20):
        t = time.perf_counter()
        r = sel.select_run(prep["run"])
        lat.append(time.perf_counter() - t)
    return {
        "backend": backend,
        "arch": arch,
        "frames_per_s": round(fps, 2),
        "run_latency_s": round(float(np.median(lat)), 4),
        "run_candidates": len(r.candidates),
        "peak_rss_mb": _peak_rss_mb(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="convnext_atto,convnext_base")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write results to this JSON file")
    ap.add_argument("--_one", nargs=3, metavar=("BACKEND", "ARCH", "PREP_JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._one:
        backend, arch, prep = a._one
        print(json.dumps(_one(backend, arch, json.loads(Path(prep).read_text()), a.size, a.batch, a.seconds,
                              a.threads)))
        return 0
    import warnings

    warnings.filterwarnings("ignore")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-selector-") as td:
        for arch in a.archs.split(","):
            work = Path(td) / arch
            work.mkdir()
            t = time.perf_counter()
            prep = _prepare(arch, a.size, work)
            print(f"{arch}: exported + quantized in {time.perf_counter() - t:.1f}s "
                  f"(onnx fp32 {prep['fp32_mb']} MB, int8 {prep['int8_mb']} MB)", flush=True)
            pj = work / "prep.json"
            pj.write_text(json.dumps(prep))
            for backend in ("torch", "fp32", "int8"):
                cmd = [sys.executable, __file__, "--_one", backend, arch, str(pj), "--size", str(a.size),
                       "--batch", str(a.batch), "--seconds", str(a.seconds), "--threads", str(a.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
                if res.returncode != 0:
                    print(f"  {backend}: FAILED\n{res.stderr[-1500:]}", flush=True)
                    continue
                r = json.loads(res.stdout.strip().splitlines()[-1])
                r["onnx_mb"] = prep.get(f"{backend}_mb")
                results.append(r)
                print(f"  {backend:>5}: {r['frames_per_s']:8.2f} frames/s  run {r['run_latency_s']:.3f} s "
                      f"({r['run_candidates']} candidates)  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    print("\nratios vs torch eager (same model, same threads):")
    for arch in a.archs.split(","):
        by = {r["backend"]: r for r in results if r["arch"] == arch}
        if "torch" not in by:
            continue
        tb = by["torch"]
        for k in ("fp32", "int8"):
            if k in by:
                r = by[k]
                print(f"  {arch} ORT {k}: throughput x{r['frames_per_s'] / tb['frames_per_s']:.2f}, "
                      f"run latency x{tb['run_latency_s'] / r['run_latency_s']:.2f} faster, "
                      f"peak RSS x{r['peak_rss_mb'] / tb['peak_rss_mb']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k != "_one"},
                                            "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
