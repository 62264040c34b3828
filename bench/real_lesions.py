"""The lesion model on real angiograms with expert vessel masks and stenosis boxes.

    .venv/bin/python bench/real_lesions.py --bundle models/demo --data DIR [--out DIR] [--json]

DIR is a folder of cases laid out as the public cad-ml "revised-dataset" (github czyjtu/cad-ml
@ 49e6d3a; no licence file, so it is never copied into this repository: fetch it and pass its
path).  Each ``caseN/`` holds ``representative_frame.dcm`` (one 512x512 XA frame),
``segmentation.png`` (the expert's mask of the main coronary vessels, painted at a constant
width, small branches left out), ``centreline.p`` (the mask's centreline as a networkx graph of
(row, column) nodes), ``labels.p`` (SYNTAX segment per centreline piece) and ``roi.p`` (boxes
around the significant stenoses, with their SYNTAX segments).  Skips cleanly when DIR is absent.

What it measures, per frame, then pooled (the model never saw a real frame):

* ``vessel_dice``: the predicted vessel mask (the bundle's threshold, at the stored resolution)
  against the expert mask.  The expert mask omits small branches and is wider than a thin lumen,
  so it is a floor, not the whole story; hence also
* ``centreline_recall``: the share of the expert's centreline points within ``--tol`` px of the
  predicted mask (does the model find the arteries?), and
* ``precision_near``: the share of predicted vessel pixels within ``--near`` px of the expert
  mask (how much of what it calls vessel is catheter, wire, edge or background);
* ``roi_recall``: the share of expert stenosis boxes (grown by ``--margin`` px) holding a found
  lesion, ``outside_per_frame``: found lesions in no box (false positives, or lesions the experts
  did not box), ``roi_vessel_agreement``: for found boxes, the found lesion's vessel (RCA, LM, LAD,
  LCx) against the box's SYNTAX segment's.

The side given to the lesion model is the case's own (from the SYNTAX segments), as if the
selector were right.  Pickles are read with an unpickler that admits only builtins, numpy
scalars and networkx graphs.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.lesions.cli import print_metrics  # noqa: E402

DEFAULT_DATA = ROOT.parent / "realdata" / "cadml" / "revised-dataset"

# the classes the cad-ml pickles need, nothing else (a pickle can name any callable)
_SAFE = {("builtins", "dict"), ("builtins", "list"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
         ("numpy._core.multiarray", "scalar"), ("networkx.classes.graph", "Graph"),
         ("networkx.classes.reportviews", "DegreeView"), ("networkx.classes.coreviews", "AdjacencyView")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _load(path: Path):
    with open(path, "rb") as fh:
        return _SafeUnpickler(fh).load()


def syntax_vessel(seg: str) -> str | None:
    """SYNTAX segment name -> vessel (RCA, LM, LAD, LCx); None when unknown."""
    s = str(seg).strip().lower()
    num = "".join(ch for ch in s if ch.isdigit())
    if not num:
        return None
    n = int(num)
    if n in (1, 2, 3, 4) or n == 16:
        return "RCA"
    if n == 5:
        return "LM"
    if n in (6, 7, 8, 9, 10):
        return "LAD"
    if n in (11, 12, 13, 14, 15):
        return "LCx"
    return None


def case_side(labels: dict, rois: list) -> str | None:
    segs = [str(v) for v in labels.values()] + [s for r in rois for s in r.get("form", {}).get("section", [])]
    vessels = {syntax_vessel(s) for s in segs} - {None}
    if not vessels:
        return None
    if vessels == {"RCA"}:
        return "RCA"
    if "RCA" not in vessels:
        return "LCA"
    return None  # both (a dominant system): leave the segments unrestricted


def to_stored(prob: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A model-grid map (letterboxed square) back onto the stored frame."""
    from PIL import Image

    s = max(rows, cols)
    im = Image.fromarray(prob.astype(np.float32), mode="F").resize((s, s), Image.BILINEAR)
    a = np.asarray(im)
    y0, x0 = (s - rows) // 2, (s - cols) // 2
    return a[y0:y0 + rows, x0:x0 + cols]


def evaluate(bundle: str, data: Path, tol: float = 3.0, near: float = 5.0, margin: float = 8.0,
             threads: int = 2, max_cases: int | None = None, out: Path | None = None) -> dict:
    from PIL import Image
    from scipy import ndimage

    from inference.frames import open_run
    from inference.lesions import LesionModel
    from inference.types import SEGMENTS

    lm = LesionModel(bundle, threads=threads)
    cases = sorted(p for p in data.iterdir() if (p / "representative_frame.dcm").is_file()
                   and (p / "segmentation.png").is_file())
    if max_cases:
        cases = cases[:max_cases]
    inter = psum = tsum = pixels = 0
    cl_hit = cl_tot = 0
    near_hit = pred_tot = 0
    dices = []
    n_roi = roi_found = outside = vessel_ok = vessel_n = 0
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for case in cases:
        truth = np.asarray(Image.open(case / "segmentation.png")) > 0
        rows, cols = truth.shape
        frame = open_run(case / "representative_frame.dcm").frame(1)
        if frame.shape != truth.shape:
            continue
        rois = _load(case / "roi.p") if (case / "roi.p").is_file() else []
        labels = _load(case / "labels.p") if (case / "labels.p").is_file() else {}
        side = case_side(labels, rois)
        fm = lm.maps([frame])[0]
        pred = to_stored(fm.vessel, rows, cols) >= lm.spec.vessel_threshold
        i = int(np.logical_and(pred, truth).sum())
        inter += i
        psum += int(pred.sum())
        tsum += int(truth.sum())
        pixels += truth.size
        dices.append(2 * i / max(1, pred.sum() + truth.sum()))
        d_pred = ndimage.distance_transform_edt(~pred)
        d_truth = ndimage.distance_transform_edt(~truth)
        near_hit += int((d_truth[pred] <= near).sum())
        pred_tot += int(pred.sum())
        if (case / "centreline.p").is_file():
            try:
                nodes = np.array([(int(r), int(c)) for r, c in _load(case / "centreline.p").nodes()])
            except Exception:  # noqa: BLE001 - no networkx, or another pickle: skip the figure
                nodes = np.zeros((0, 2), int)
            if len(nodes):
                nodes = nodes[(nodes[:, 0] < rows) & (nodes[:, 1] < cols)]
                cl_hit += int((d_pred[nodes[:, 0], nodes[:, 1]] <= tol).sum())
                cl_tot += len(nodes)
        found = lm.find(frame, "1.2.3", 1, maps=fm, side=side)
        boxes = []
        for r in rois:
            x0, x1 = sorted((float(r["start"]["x"]), float(r["end"]["x"])))
            y0, y1 = sorted((float(r["start"]["y"]), float(r["end"]["y"])))
            boxes.append((x0 - margin, y0 - margin, x1 + margin, y1 + margin,
                          r.get("form", {}).get("section", [])))
        inside = [False] * len(found)
        for bx0, by0, bx1, by1, secs in boxes:
            n_roi += 1
            hits = [k for k, f in enumerate(found) if bx0 <= f.x <= bx1 and by0 <= f.y <= by1]
            for k in hits:
                inside[k] = True
            if hits:
                roi_found += 1
                want = {syntax_vessel(s) for s in secs} - {None}
                if want:
                    vessel_n += 1
                    best = max(hits, key=lambda k: found[k].confidence)
                    vessel_ok += SEGMENTS[found[best].segment][1] in want
        outside += sum(1 for v in inside if not v)
        if out:
            g = (np.clip(frame, 0, 1) * 255).astype(np.uint8)
            rgb = np.stack([g, g, g], -1).astype(np.float32)
            rgb[truth & ~pred] = 0.5 * rgb[truth & ~pred] + 0.5 * np.array([60, 120, 255])
            rgb[pred & truth] = 0.5 * rgb[pred & truth] + 0.5 * np.array([0, 220, 0])
            rgb[pred & ~truth] = 0.5 * rgb[pred & ~truth] + 0.5 * np.array([255, 160, 0])
            Image.fromarray(rgb.astype(np.uint8)).save(out / f"{case.name}.png")
    n = len(dices)
    return {
        "cases": n,
        "vessel_dice": round(2 * inter / max(1, psum + tsum), 4),
        "vessel_dice_mean": round(float(np.mean(dices)), 4) if n else None,
        "centreline_recall": round(cl_hit / cl_tot, 4) if cl_tot else None,
        "precision_near": round(near_hit / pred_tot, 4) if pred_tot else None,
        "predicted_vessel_fraction": round(psum / max(1, pixels), 4),
        "expert_vessel_fraction": round(tsum / max(1, pixels), 4),
        "stenosis_boxes": n_roi,
        "roi_recall": round(roi_found / n_roi, 4) if n_roi else None,
        "outside_per_frame": round(outside / n, 3) if n else None,
        "roi_vessel_agreement": round(vessel_ok / vessel_n, 4) if vessel_n else None,
        "tolerances_px": {"centreline": tol, "near": near, "box_margin": margin},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(ROOT / "models" / "demo"))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default=None, help="write per-case overlays (green: both, orange: model only, "
                    "blue: expert only) here; they show third-party images: keep them out of the repository")
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    data = Path(args.data)
    if not data.is_dir():
        print(f"{data}: absent (the cad-ml revised-dataset, fetched by hand): nothing to measure")
        return 0
    m = evaluate(args.bundle, data, threads=args.threads, max_cases=args.max_cases,
                 out=Path(args.out) if args.out else None)
    print_metrics(m, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
