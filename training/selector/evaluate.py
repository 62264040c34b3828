"""Selector metrics and ``cag-node evaluate selector``.

Metrics (frame level): confusion matrix (rows = truth, columns = prediction, in
``CLASS_NAMES`` order), per-class F1, macro F1, accuracy, laterality F1 of the frame's side.
Run level (exactly what the node does: candidates, aggregation, key-frame ranking from
``inference.selector``): laterality F1 (macro over LCA/RCA) and accuracy, and key-frame
accuracy = fraction of runs whose top key frame is labelled ``<true side>_better``.

``evaluate_bundle`` runs the ONNX model of a bundle through ``inference.selector.Selector``
on every run of a dataset folder, so it measures the artefact that is deployed.

``evaluate_labelled_runs`` does the same for REAL runs a hospital has labelled itself: a CSV
``file,laterality[,key_frame]`` (``cag-node evaluate selector --labels CSV``).  It scores each
run exactly as the node does (``Selector.select_run``) and reports run-level laterality
accuracy / F1 / confusion and, where a reader gave a key frame, how often the model's top key
frame lies within ``key_frame_tolerance`` frames of it.
"""

from __future__ import annotations

import csv
import json
import logging
import re
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


# -- labelled REAL runs (cag-node evaluate selector --labels CSV) ---------------------------

LABEL_SIDES = {"lca": "LCA", "left": "LCA", "rca": "RCA", "right": "RCA"}
_INT_RE = re.compile(r"^\+?\d+(\.0*)?$")  # "12", also "12.0" (pandas writes ints of a column with gaps so)


class LabelsError(ValueError):
    """A malformed labels CSV (``--labels``); the message names the file, the line and the column."""


def read_labels_csv(csv_path: str | Path) -> list[dict]:
    """Rows of a labels CSV with a header ``file,laterality[,key_frame]`` (other columns ignored).

    ``file``: a DICOM run, relative paths resolved against the CSV's folder; ``laterality``:
    LCA / RCA / left / right, any case; ``key_frame``: optional 1-based frame number (may be
    empty).  Returns ``[{"line", "file", "path", "laterality", "key_frame"}]``; raises
    ``LabelsError`` on a missing column, an unknown laterality or a key frame that is not a
    positive integer.
    """
    csv_path = Path(csv_path)
    where = f"--labels {csv_path}"
    if not csv_path.is_file():
        raise LabelsError(f"{where}: no such file")
    base = csv_path.resolve().parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in ("file", "laterality") if c not in header]
            if missing:
                raise LabelsError(f"{where}: missing column(s) {', '.join(repr(c) for c in missing)} "
                                  f"(header must be file,laterality[,key_frame]; found {','.join(header) or 'nothing'})")
            reader.fieldnames = header
            rows = []
            for row in reader:
                line = reader.line_num
                vals = {k: (v or "").strip() if isinstance(v, str) else "" for k, v in row.items() if k is not None}
                if not any(vals.values()):
                    continue  # a line of empty cells
                f = vals.get("file", "")
                if not f:
                    raise LabelsError(f"{where}: line {line}: empty 'file'")
                lat = vals.get("laterality", "")
                side = LABEL_SIDES.get(lat.lower())
                if side is None:
                    raise LabelsError(f"{where}: line {line}: laterality {lat!r} is not LCA/RCA (or left/right)")
                kf_text = vals.get("key_frame", "")
                kf = None
                if kf_text:
                    if not _INT_RE.match(kf_text) or int(float(kf_text)) < 1:
                        raise LabelsError(f"{where}: line {line}: key_frame {kf_text!r} is not a positive "
                                          "integer (a 1-based frame number)")
                    kf = int(float(kf_text))
                path = Path(f).expanduser()
                if not path.is_absolute():
                    path = base / path
                rows.append({"line": line, "file": f, "path": str(path), "laterality": side, "key_frame": kf})
    except UnicodeDecodeError as exc:
        raise LabelsError(f"{where}: not a UTF-8 text CSV ({exc})") from None
    except csv.Error as exc:
        raise LabelsError(f"{where}: {exc}") from None
    if not rows:
        raise LabelsError(f"{where}: no rows")
    return rows


def labelled_run_metrics(per_run: Sequence[dict], key_frame_tolerance: int = 2) -> dict:
    """Metrics of per-run results ``{truth, predicted (None = unreadable), key_frames, key_frame_truth}``.

    A run without a prediction counts as wrong (in the confusion matrix, as the other side:
    ``run_level``).  Adds ``key_frame_hit`` to each row that has a reader's key frame.
    """
    tol = int(key_frame_tolerance)
    kf_rows = [r for r in per_run if r.get("key_frame_truth") is not None]
    for r in per_run:
        kt = r.get("key_frame_truth")
        kfs = r.get("key_frames") or []
        r["key_frame_hit"] = None if kt is None else bool(kfs) and abs(int(kfs[0]) - int(kt)) <= tol
    rl = run_level([r["truth"] for r in per_run], [r.get("predicted") for r in per_run],
                   [bool(r["key_frame_hit"]) for r in kf_rows])
    cm = np.asarray(rl["laterality_confusion"], dtype=np.int64).reshape(2, 2)
    f1 = f1_from_confusion(cm)
    m = {
        "runs": rl["runs"],
        "accuracy": rl["laterality_accuracy"],
        "f1": {s: round(float(v), 4) for s, v in zip(SIDES, f1)},
        "macro_f1": rl["laterality_f1"],
        "confusion": cm.tolist(),
        "classes": list(SIDES),
    }
    if kf_rows:
        m["key_frame_runs"] = len(kf_rows)
        m["key_frame_tolerance"] = tol
        m["key_frame_agreement"] = rl["key_frame_accuracy"]
        m["key_frame_exact"] = round(float(np.mean(
            [bool(r.get("key_frames")) and int(r["key_frames"][0]) == int(r["key_frame_truth"]) for r in kf_rows])), 4)
    return m


def evaluate_labelled_runs(csv_path: str | Path, bundle_dir: str | Path, *, threads: int = 2, batch_size: int = 16,
                           min_gap: int = 5, max_key_frames: int = 2, key_frame_tolerance: int = 2,
                           progress: bool = False) -> dict:
    """Score every run of a labels CSV (``file,laterality[,key_frame]``) with the bundle's selector,
    exactly as the node does, and compare with the labels.  An unreadable run is listed in
    ``errors`` and counted as wrong; the evaluation goes on.  ``LabelsError`` on a bad CSV."""
    from inference.selector import Selector

    if int(key_frame_tolerance) < 0:
        raise LabelsError(f"--key-frame-tolerance {key_frame_tolerance}: must be >= 0")
    rows = read_labels_csv(csv_path)
    sel = Selector(bundle_dir, threads=threads, batch_size=batch_size)
    t0 = time.monotonic()
    per_run: list[dict] = []
    errors: list[dict] = []
    warnings: list[str] = []
    it: Iterable = rows
    if progress:
        from tqdm import tqdm

        it = tqdm(rows, desc="evaluate", unit="run")
    for row in it:
        try:
            rs = sel.select_run(row["path"], min_gap=min_gap, max_key_frames=max_key_frames)
            err = rs.error or (None if rs.laterality is not None else f"{Path(row['path']).name}: no laterality")
        except Exception as exc:  # select_run never raises; belt and braces, one run never stops the rest
            rs, err = None, f"{type(exc).__name__}: {exc}"
        ok = rs is not None and err is None
        if not ok:
            errors.append({"file": row["file"], "line": row["line"], "reason": err})
        elif row["key_frame"] is not None and rs.n_frames and row["key_frame"] > rs.n_frames:
            warnings.append(f"line {row['line']}: key_frame {row['key_frame']} > {rs.n_frames} frames of {row['file']}")
        per_run.append({
            "file": row["file"],
            "truth": row["laterality"],
            "predicted": rs.laterality if ok else None,
            "confidence": rs.confidence if ok else None,
            "key_frames": [k.frame_number for k in rs.key_frames] if ok else [],
            "key_frame_truth": row["key_frame"],
            "n_frames": rs.n_frames if rs is not None else 0,
            "error": err,
        })
    dt = time.monotonic() - t0
    m = labelled_run_metrics(per_run, key_frame_tolerance)
    m["errors"] = errors
    if warnings:
        m["warnings"] = warnings
    m["per_run"] = per_run
    m["seconds"] = round(dt, 2)
    m["bundle"] = str(bundle_dir)
    m["labels"] = str(csv_path)
    return m


def format_labelled_metrics(m: dict) -> str:
    f1 = m.get("f1", {})
    lines = [
        f"labelled runs {m.get('runs')}  errors {len(m.get('errors', []))}  ({m.get('seconds')} s)",
        f"laterality accuracy {m.get('accuracy')}  macro F1 {m.get('macro_f1')}  "
        + "  ".join(f"F1 {s} {f1.get(s)}" for s in m.get("classes", SIDES)),
        "confusion (rows truth, cols prediction):",
        "  truth\\pred " + " ".join(f"{c:>5}" for c in m.get("classes", SIDES)),
    ]
    for c, row in zip(m.get("classes", SIDES), m.get("confusion", [])):
        lines.append(f"  {c:<10} " + " ".join(f"{v:5d}" for v in row))
    if m.get("key_frame_runs"):
        lines.append(f"key frame ({m['key_frame_runs']} runs with a reader's frame): within "
                     f"+/-{m.get('key_frame_tolerance')} frames {m.get('key_frame_agreement')}  "
                     f"exact {m.get('key_frame_exact')}")
    for e in m.get("errors", [])[:5]:
        f, reason = str(e.get("file")), str(e.get("reason"))
        lines.append(f"error: line {e.get('line')}: " + (reason if Path(f).name in reason else f"{f}: {reason}"))
    if len(m.get("errors", [])) > 5:
        lines.append(f"... {len(m['errors']) - 5} more errors (--json lists them all)")
    for w in m.get("warnings", [])[:5]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def main_evaluate(args) -> int:
    labels = getattr(args, "labels", None)
    if labels:
        try:
            m = evaluate_labelled_runs(labels, args.bundle, threads=args.threads, batch_size=args.batch_size,
                                       min_gap=args.min_gap, max_key_frames=args.max_key_frames,
                                       key_frame_tolerance=getattr(args, "key_frame_tolerance", 2),
                                       progress=not args.json and sys.stderr.isatty())
        except LabelsError as exc:
            print(f"cag-node evaluate selector: {exc}", file=sys.stderr)
            return 2
        sal_dir = getattr(args, "saliency", None)
        if sal_dir:
            from training.selector.saliency import save_saliency

            rows = read_labels_csv(labels)
            # the evaluation's own choice of side and key frame: no run is scored twice
            picks = [(pr["predicted"], pr["key_frames"][0]) if pr["predicted"] and pr["key_frames"] else None
                     for pr in m["per_run"]]
            m["saliency"] = save_saliency(args.bundle, [r["path"] for r in rows], sal_dir,
                                          truths=[r["laterality"] for r in rows], threads=args.threads,
                                          picks=picks)
        print(json.dumps(m, indent=2) if args.json else format_labelled_metrics(m))
        return 0
    if not getattr(args, "data", None):
        print("cag-node evaluate selector: one of --data DIR or --labels CSV is required", file=sys.stderr)
        return 2
    m = evaluate_bundle(args.data, args.bundle, threads=args.threads, batch_size=args.batch_size,
                        min_gap=args.min_gap, max_key_frames=args.max_key_frames,
                        progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(format_metrics(m))
    return 0
