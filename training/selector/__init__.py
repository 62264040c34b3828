"""Selector training: timm ConvNeXt -> ONNX bundle (see ``training.selector.build_selector``)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

__all__ = ["build_selector"]


def build_selector(data_dir: str | Path, bundle_dir: str | Path, arch: str = "convnext_atto", size: int = 128,
                   steps: Optional[int] = None, epochs: Optional[int] = None, seed: int = 0, quick: bool = False,
                   batch: int = 32, lr: float = 2e-3, augment: str = "none", ls_init: float = 1.0, int8: bool = False,
                   threads: int = 2, work_dir: Optional[str | Path] = None, progress: bool = False,
                   eval_data: Optional[str | Path] = None, balance: str = "class",
                   ema: float = 0.0, normalize: str = "none", bg_swap: float = 0.0) -> dict:
    """Train a selector on ``data_dir`` (a `cag-node synth` folder), export it to
    ``bundle_dir/selector.onnx`` and write the manifest's selector section.

    Returns metrics: validation (held-out studies, torch) and, for the exported ONNX model run
    through ``inference.selector`` on the held-out runs, laterality F1 and key-frame accuracy.
    Defaults are sized for 2 CPU cores (a few minutes): ``steps`` 300 (``quick``: 40).
    """
    from training.selector.data import load_records, split_records
    from training.selector.evaluate import evaluate_bundle
    from training.selector.export import export_bundle
    from training.selector.train import TrainConfig, train

    t0 = time.monotonic()
    if steps is None and epochs is None:
        steps = 40 if quick else 300
    with tempfile.TemporaryDirectory(prefix="selector-train-") as td:
        out = Path(work_dir) if work_dir else Path(td)
        cfg = TrainConfig(data=str(data_dir), out=str(out), arch=arch, size=size, steps=steps,
                          epochs=epochs or 1, batch=batch, lr=lr, augment=augment, ls_init=ls_init, seed=seed, threads=threads,
                          eval_every=max(1, (steps or 100) // 3) if steps else None, progress=progress,
                          cache=str(out / "cache"), balance=balance, ema=ema, normalize=normalize,
                          bg_swap=bg_swap)
        summary = train(cfg)
        section = export_bundle(out / "best.pt", bundle_dir, int8=int8, data=str(data_dir), cache=str(out / "cache"),
                                metrics=summary["val_metrics"])
    # the deployed artefact on held-out studies (same split as training)
    recs = load_records(data_dir)
    _, val = split_records(recs, val_frac=cfg.val_frac, seed=seed)
    ev = evaluate_bundle(eval_data or data_dir, bundle_dir, threads=threads,
                         records=None if eval_data else val)
    result = {
        "arch": arch,
        "size": size,
        "steps": summary["steps"],
        "seconds": round(time.monotonic() - t0, 1),
        "train_seconds": summary["seconds"]["train"],
        "per_step_s": summary["seconds"]["per_step"],
        "val_runs": summary["val_runs"],
        "laterality_f1": ev["laterality_f1"],
        "key_frame_accuracy": ev["key_frame_accuracy"],
        "macro_f1": ev["macro_f1"],
        "frame_laterality_f1": ev["frame_laterality_f1"],
        "per_class_f1": ev["per_class_f1"],
        "torch_val": {k: summary["val_metrics"].get(k) for k in ("laterality_f1", "key_frame_accuracy", "macro_f1")},
        "sha256": section["sha256"],
        "precision": section["precision"],
        "parity": section["parity"],
    }
    log.info("selector built: %s", result)
    return result
