"""Export the lesion model to ONNX with a parity check, and build it into a bundle.

``torch.onnx.export(dynamo=False)``, opset 17, input ``input`` (N, 1, S, S) with a dynamic batch
axis, output ``maps`` (N, 20, S, S).  Parity: ONNX Runtime against torch eager on real
validation frames, max |map difference| and agreement of the thresholded vessel masks; the
export fails when they disagree beyond ``tol``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17


def export_onnx(model, path: str | Path, size: int, channels: int = 1) -> Path:
    import torch

    path = Path(path)
    model.eval()
    torch.onnx.export(
        model, (torch.zeros(1, channels, size, size),), str(path), dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["maps"],
        dynamic_axes={"input": {0: "batch"}, "maps": {0: "batch"}},
    )
    return path


def parity(model, onnx_path: Path, x: np.ndarray, threads: int = 2) -> dict:
    import torch

    from inference.selector import ort_session

    s = ort_session(onnx_path, threads, ["cpu"])  # as served, on the CPU
    with torch.inference_mode():
        a = np.concatenate([model(torch.from_numpy(x[i:i + 4])).numpy() for i in range(0, len(x), 4)])
    b = np.concatenate([s.run(None, {"input": x[i:i + 4]})[0] for i in range(0, len(x), 4)])
    return {
        "samples": int(len(x)),
        "max_abs_diff": float(np.abs(a - b).max()),
        "vessel_mask_agreement": float(((a[:, 0] > 0) == (b[:, 0] > 0)).mean()),
    }


def calibrate_threshold(bundle_dir: Path, ls, idx: np.ndarray, max_fp: float = 0.4,
                        grid=tuple(np.round(np.arange(0.05, 0.61, 0.025), 3))) -> dict:
    """The heatmap peak threshold for the bundle: on validation frames (studies not trained on),
    the lowest threshold whose false positives per frame stay <= ``max_fp``, i.e. the most
    sensitive operating point within the false-positive budget.  Returns the table."""
    from inference.lesions import LesionModel

    from .evaluate import match_lesions, match_radius

    lm = LesionModel(bundle_dir)
    S = lm.size
    r_match = match_radius((S, S))
    frames = [ls.D[i].astype(np.float32) for i in idx]
    maps = []
    for i in range(0, len(frames), 8):
        maps += lm.maps(frames[i:i + 8])
    rows = []
    for thr in grid:
        lm.spec.peak_threshold = float(thr)
        fp = n_sig = hit_sig = 0
        for k, i in enumerate(idx):
            side = None if ls.side is None else ("LCA", "RCA")[int(ls.side[i])]
            found = lm.find(frames[k], "", 1, maps=maps[k], side=side)
            truth = [(c + 0.5, r + 0.5, sev) for _, c, r, sev, _, vis in ls.lesions_of(int(i)) if vis]
            used, unmatched = match_lesions(found, [t[:2] for t in truth], r_match)
            fp += unmatched
            sig = [j for j, t in enumerate(truth) if t[2] >= 75]
            n_sig += len(sig)
            hit_sig += sum(j in used for j in sig)
        rows.append({"threshold": float(thr), "sensitivity": round(hit_sig / max(n_sig, 1), 4),
                     "false_positives_per_frame": round(fp / max(len(idx), 1), 4)})
    ok = [r for r in rows if r["false_positives_per_frame"] <= max_fp]
    best = min(ok, key=lambda r: r["threshold"]) if ok else max(rows, key=lambda r: r["threshold"])
    return {"chosen": best, "max_fp": max_fp, "frames": int(len(idx)), "table": rows}


def build_lesions(data_dir: str | Path, bundle_dir: str | Path, *, arch: str = "unet_tiny", size: int = 256,
                  steps: int = 800, batch: int = 12, lr: float = 3e-3, crop: int = 128, seed: int = 0,
                  whole_every: int = 0, fade: float = 0.0, normalize: str = "flatfield",
                  augment: str = "sim2real", time_budget_s: Optional[float] = None, quick: bool = False,
                  threads: Optional[int] = None, tol: float = 1e-2) -> dict:
    """Train on ``data_dir`` (a synthetic set with targets), export ``bundle_dir/lesions.onnx``
    and write the manifest's ``lesions`` section.  Returns the training summary."""
    from inference.bundle import LesionSpec, Preprocessing, sha256_file, update_manifest
    from inference.frames import finish_input

    from .data import load_lesion_set
    from .model import HEADS
    from .train import LesionTrainConfig, split_by_study, train_lesion_model

    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ls = load_lesion_set(data_dir, size)
    t_data = time.monotonic() - t0
    cfg = LesionTrainConfig(arch=arch, size=size, normalize=normalize, steps=steps, batch=batch, lr=lr, seed=seed,
                            crop=crop if crop < size else 0, whole_every=whole_every, fade=fade,
                            augment=augment, time_budget_s=time_budget_s, threads=threads)
    model, hist = train_lesion_model(ls, cfg, progress=True)
    path = export_onnx(model, bundle_dir / "lesions.onnx", size, channels=3 if cfg.coords else 1)
    _, va = split_by_study(ls, cfg.val_fraction, seed)
    sample = va[:8] if len(va) else np.arange(min(8, len(ls)))
    x = finish_input(ls.D[sample].astype(np.float32), cfg.preprocessing())
    if cfg.coords:
        from inference.lesions import add_coords

        x = add_coords(x)
    par = parity(model, path, x)
    if par["max_abs_diff"] > tol or par["vessel_mask_agreement"] < 0.999:
        raise RuntimeError(f"lesion model ONNX parity failed: {par}")
    spec = LesionSpec(
        file=path.name, arch=arch, heads=[list(h) for h in HEADS], coords=cfg.coords,
        preprocessing=Preprocessing(**cfg.preprocessing()), sha256=sha256_file(path), version="1",
        training={k: v for k, v in hist.items() if k not in ("train",)} | {
            "frames": int(len(ls)), "lesions": int(len(ls.L)), "data_seconds": round(t_data, 1),
            "final_train_loss": hist["train"][-1] if hist["train"] else None},
        metrics={"onnx_parity": par},
    )
    update_manifest(bundle_dir, lesions=spec)
    # the operating point, on validation studies
    cal = calibrate_threshold(bundle_dir, ls, va[:120] if len(va) else sample)
    spec.peak_threshold = cal["chosen"]["threshold"]
    spec.metrics["threshold_calibration"] = cal
    update_manifest(bundle_dir, lesions=spec)
    summary = {"frames": int(len(ls)), "seconds": round(time.monotonic() - t0, 1), "parity": par,
               "threshold": cal["chosen"],
               "steps": hist["steps"], "val": hist["val"][-1] if hist["val"] else None}
    (bundle_dir / "lesions-training.json").write_text(json.dumps(hist, indent=1, default=str))
    return summary
