"""Selector metrics and ``cag-node evaluate selector``.

Metrics (frame level): confusion matrix (rows = truth, columns = prediction, in
``CLASS_NAMES`` order), per-class F1, macro F1, accuracy, laterality F1 of the frame's side.
Run level (exactly what the node does: candidates, aggregation, key-frame ranking from
``inference.selector``): laterality F1 (macro over LCA/RCA) and accuracy, and key-frame
accuracy = fraction of runs whose top key frame is labelled ``<true side>_better``.

``evaluate_bundle`` runs the ONNX model of a bundle through ``inference.selector.Selector``
on every run of a dataset folder, so it measures the artefact that is deployed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from inference.candidates import find_candidates
from inference.selector import aggregate_laterality, rank_key_frames
from inference.types import CLASS_NAMES, SIDES

log = logging.getLogger(__name__)


def _f1(tp: float, fp: float, fn: float) -> float:
    d = 2 * tp + fp + fn
    return float(2 * tp / d) if d else 0.0


def confusion(y_true: Sequence[int], y_pred: Sequence[int], n: int) -> np.ndarray:
    cm = np.zeros((n, n), np.int64)
    for t, p in zip(y_true, y_pred):
        cm[int(t), int(p)] += 1
    return cm


def f1_from_confusion(cm: np.ndarray) -> list[float]:
    out = []
    for i in range(cm.shape[0]):
        tp = cm[i, i]
        out.append(_f1(tp, cm[:, i].sum() - tp, cm[i, :].sum() - tp))
    return out


def frame_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    y_true = np.asarray(y_true, dtype=np.int64)
    pred = np.asarray(probs).argmax(axis=1)
    cm = confusion(y_true, pred, len(CLASS_NAMES))
    f1 = f1_from_confusion(cm)
    side_t = np.array([0 if CLASS_NAMES[i].startswith("LCA") else 1 for i in y_true])
    side_p = np.array([0 if CLASS_NAMES[i].startswith("LCA") else 1 for i in pred])
    scm = confusion(side_t, side_p, 2)
    present = [i for i in range(len(CLASS_NAMES)) if cm[i, :].sum() > 0]
    return {
        "frames": int(len(y_true)),
        "accuracy": float((pred == y_true).mean()) if len(y_true) else 0.0,
        "per_class_f1": {c: round(f, 4) for c, f in zip(CLASS_NAMES, f1)},
        "macro_f1": round(float(np.mean([f1[i] for i in present])) if present else 0.0, 4),
        "frame_laterality_f1": round(float(np.mean(f1_from_confusion(scm))), 4),
        "frame_laterality_accuracy": round(float((side_t == side_p).mean()) if len(y_true) else 0.0, 4),
        "confusion_matrix": cm.tolist(),
        "classes": list(CLASS_NAMES),
    }


def run_level(true_side: Sequence[str], pred_side: Sequence[Optional[str]], key_ok: Sequence[bool]) -> dict:
    t = [SIDES.index(s) for s in true_side]
    p = [SIDES.index(s) if s in SIDES else 1 - ti for s, ti in zip(pred_side, t)]  # no answer = wrong
    cm = confusion(t, p, 2)
    return {
        "runs": len(t),
        "laterality_f1": round(float(np.mean(f1_from_confusion(cm))), 4) if t else 0.0,
        "laterality_accuracy": round(float(np.mean([a == b for a, b in zip(t, p)])), 4) if t else 0.0,
        "laterality_confusion": cm.tolist(),
        "key_frame_accuracy": round(float(np.mean(key_ok)), 4) if len(key_ok) else 0.0,
    }


def frameset_metrics(fs: Any, probs: np.ndarray, min_gap: int = 5, max_key_frames: int = 2) -> dict:
    """Frame and run-level metrics of torch/ORT probabilities over a ``data.FrameSet``."""
    m = frame_metrics(fs.y, probs)
    ts, ps, ok = [], [], []
    for ri, rec in enumerate(fs.records):
        sel = np.where(fs.run == ri)[0]
        if len(sel) == 0:
            continue
        sel = sel[np.argsort(fs.frame[sel])]
        cand = find_candidates(fs.mean[sel], fs.var[sel], min_gap)
        idx = [int(fs.frame[sel[c]]) for c in cand]
        pr = probs[sel[cand]]
        side, _ = aggregate_laterality(pr)
        kf = rank_key_frames(idx, pr, side, max_key_frames)
        true = rec["laterality"]
        ts.append(true)
        ps.append(side)
        top = kf[0].frame_number - 1 if kf else -1
        ok.append(top >= 0 and rec["frame_labels"][top] == f"{true}_better")
    m.update(run_level(ts, ps, ok))
    return m


def evaluate_bundle(data_dir: str | Path, bundle_dir: str | Path, *, threads: int = 2, batch_size: int = 16,
                    min_gap: int = 5, max_key_frames: int = 2, records: Optional[list[dict]] = None,
                    progress: bool = False) -> dict:
    """Run the bundle's ONNX selector (the deployed path) on every run of ``data_dir``."""
    from inference.selector import Selector
    from training.selector.data import CLASS_INDEX, load_records

    data_dir = Path(data_dir)
    recs = records if records is not None else load_records(data_dir)
    sel = Selector(bundle_dir, threads=threads, batch_size=batch_size)
    y_all, p_all = [], []
    ts, ps, ok, errors = [], [], [], []
    t0 = time.monotonic()
    n_frames = 0
    it: Iterable = recs
    if progress:
        from tqdm import tqdm

        it = tqdm(recs, desc="evaluate", unit="run")
    for rec in it:
        path = data_dir / rec["file"]
        try:
            run, idx, probs = sel.score_run(path, min_gap=min_gap, all_frames=True)
        except Exception as exc:
            errors.append(f"{rec['file']}: {exc}")
            ts.append(rec["laterality"])
            ps.append(None)
            ok.append(False)
            continue
        labels = rec["frame_labels"]
        k = min(len(labels), len(idx))
        y_all += [CLASS_INDEX[c] for c in labels[:k]]
        p_all.append(probs[:k])
        n_frames += len(idx)
        cand = [c for c in sel.last_candidates if c < len(idx)]
        pr = probs[cand]
        side, _ = aggregate_laterality(pr)
        kf = rank_key_frames(cand, pr, side, max_key_frames)
        ts.append(rec["laterality"])
        ps.append(side)
        top = kf[0].frame_number - 1 if kf else -1
        ok.append(0 <= top < len(labels) and labels[top] == f"{rec['laterality']}_better")
    dt = time.monotonic() - t0
    probs_all = np.concatenate(p_all) if p_all else np.zeros((0, len(CLASS_NAMES)))
    m = frame_metrics(np.array(y_all, dtype=np.int64), probs_all)
    m.update(run_level(ts, ps, ok))
    m["errors"] = errors
    m["seconds"] = round(dt, 2)
    m["frames_per_s"] = round(n_frames / dt, 1) if dt > 0 else 0.0
    m["bundle"] = str(bundle_dir)
    m["data"] = str(data_dir)
    return m


def format_metrics(m: dict) -> str:
    lines = [
        f"runs {m.get('runs')}  frames {m.get('frames')}",
        f"laterality F1 (run) {m.get('laterality_f1')}  accuracy {m.get('laterality_accuracy')}",
        f"key-frame accuracy {m.get('key_frame_accuracy')}",
        f"frame accuracy {m.get('accuracy'):.4f}  macro F1 {m.get('macro_f1')}  "
        f"frame laterality F1 {m.get('frame_laterality_f1')}",
        "per-class F1: " + ", ".join(f"{k} {v}" for k, v in m.get("per_class_f1", {}).items()),
        "confusion (rows truth, cols prediction; " + " ".join(CLASS_NAMES) + "):",
    ]
    for c, row in zip(CLASS_NAMES, m.get("confusion_matrix", [])):
        lines.append(f"  {c:<11} " + " ".join(f"{v:5d}" for v in row))
    if m.get("errors"):
        lines.append(f"errors: {len(m['errors'])}: " + "; ".join(m["errors"][:3]))
    return "\n".join(lines)


def main_evaluate(args) -> int:
    m = evaluate_bundle(args.data, args.bundle, threads=args.threads, batch_size=args.batch_size,
                        min_gap=args.min_gap, max_key_frames=args.max_key_frames,
                        progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(format_metrics(m))
    return 0
