"""Evaluate a bundle's lesion model on a synthetic set with targets (as deployed: ONNX Runtime on
the frames the node decodes from the DICOM runs).

Per target frame the model's maps and lesions are compared with the generator's truth:

* ``vessel_dice``: Dice of the thresholded vessel map and the true lumen mask (model grid);
  ``vessel_f1_1px``: the same with one pixel of tolerance (relaxed precision: predicted pixels
  within 1 px of the lumen; relaxed recall: lumen pixels within 1 px of the prediction), because
  the lumen is ~3 px wide at 256 px and a mask one pixel too wide everywhere scores Dice 0.81;
* ``segment_pixel_accuracy``: AHA segment of true numbered-vessel pixels the model also calls
  vessel;
* a predicted lesion *matches* a visible true lesion when it lies within ``match_px`` stored
  pixels of its centre (greedy, strongest prediction first);
* ``lesion_sensitivity``: matched share of the visible true lesions >= 75 % (significant);
  ``lesion_sensitivity_all``: the same over all visible lesions (>= 50 %);
* ``false_positives_per_frame``: predictions matching no visible true lesion, per frame;
* ``segment_accuracy``: matched lesions whose AHA segment is right;
* ``severity_within_one_grade``: matched lesions whose grade (50/75/90/99/100) is at most one
  step from the truth; ``severity_exact`` the same at zero steps; ``severity_mae_pct``;
* ``qca_within_one_grade``: the same for the vessel-mask QCA estimate (1 - MLD / RD);
* ``latency_ms_per_frame``: the model and post-processing on this machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

GRADE_STEPS = (50, 75, 90, 99, 100)


def match_radius(shape) -> float:
    """A found lesion matches a true one within 4 % of the frame (at least 6 pixels)."""
    return max(6.0, 0.04 * max(shape))


def match_lesions(found, truth_xy, radius: float) -> tuple[dict, int]:
    """Greedy matching, the most confident found lesion first, each to the nearest still
    unmatched true centre (``truth_xy``: [(x, y), ...]) within ``radius``.  Returns
    ``({truth index: found lesion}, number of found lesions matching none)``."""
    pairs: dict = {}
    unmatched = 0
    for f in sorted(found, key=lambda f: -f.confidence):
        best, bd = None, radius
        for j, (x, y) in enumerate(truth_xy):
            if j in pairs:
                continue
            d = float(np.hypot(f.x - x, f.y - y))
            if d <= bd:
                best, bd = j, d
        if best is None:
            unmatched += 1
        else:
            pairs[best] = f
    return pairs, unmatched


def _grade_index(pct: float) -> int:
    return int(np.argmin([abs(g - pct) for g in GRADE_STEPS]))


def evaluate_lesions(data_dir: str | Path, bundle: str | Path, *, match_px: Optional[float] = None,
                     threads: int = 2, max_frames: Optional[int] = None, overlays: Optional[str | Path] = None,
                     n_overlays: int = 8) -> dict:
    from inference.frames import read_frames
    from inference.lesions import Geometry, LesionModel
    from training.synthetic import load_records
    from training.synthetic.targets import load_targets

    from .data import _resize_nearest

    data_dir = Path(data_dir)
    model = LesionModel(bundle, threads=threads)
    S = model.size
    spec = model.spec
    records = [r for r in load_records(data_dir) if r.get("targets")]
    if not records:
        raise ValueError(f"{data_dir}: no run has lesion targets (generate with targets > 0)")
    inter = union_sum = 0.0
    tol_p = tol_v = n_p = n_v = 0.0
    seg_ok = seg_n = 0
    n_frames = 0
    n_sig = hit_sig = n_vis = hit_vis = 0
    fps = 0
    matched: list[tuple[dict, object]] = []
    t_model = 0.0
    written = 0
    for rec in records:
        tg = load_targets(data_dir, rec)
        frames = read_frames(data_dir / rec["file"], [t[0] for t in tg])
        for number, vessel, segment, lesions in tg:
            if max_frames is not None and n_frames >= max_frames:
                break
            fr = frames[number]
            t0 = time.perf_counter()
            fm = model.maps([fr])[0]
            found = model.find(fr, rec["sop_instance_uid"], number, maps=fm, side=rec.get("laterality"))
            t_model += time.perf_counter() - t0
            n_frames += 1
            geo = Geometry(fr.shape[0], fr.shape[1], S)
            V = _resize_nearest(np.asarray(vessel, np.uint8), geo) > 0
            G = _resize_nearest(np.asarray(segment, np.uint8), geo)
            P = fm.vessel >= spec.vessel_threshold
            inter += float((P & V).sum())
            union_sum += float(P.sum() + V.sum())
            # relaxed (1 px tolerance) precision and recall: at 256 px half the lumen pixels are
            # edge pixels, so a mask one pixel too wide everywhere already scores Dice 0.81
            Vd, Pd = ndimage.binary_dilation(V), ndimage.binary_dilation(P)
            tol_p += float((P & Vd).sum())
            tol_v += float((V & Pd).sum())
            n_p += float(P.sum())
            n_v += float(V.sum())
            numbered = V & (G >= 1) & (G <= 15) & P
            seg_ok += int((fm.segment[numbered] == G[numbered]).sum())
            seg_n += int(numbered.sum())
            r_match = match_px if match_px is not None else match_radius(fr.shape)
            vis = [l for l in lesions if l.get("visible", True)]
            used, unmatched = match_lesions(found, [(l["x"], l["y"]) for l in vis], r_match)
            fps += unmatched
            matched += [(vis[j], f) for j, f in used.items()]
            n_vis += len(vis)
            hit_vis += len(used)
            sig = [j for j, l in enumerate(vis) if l["severity"] >= 75]
            n_sig += len(sig)
            hit_sig += sum(1 for j in sig if j in used)
            if overlays is not None and written < n_overlays and vis:
                _overlay(Path(overlays) / f"frame_{written:02d}.png", fr, fm, spec.vessel_threshold, found, vis)
                written += 1
        if max_frames is not None and n_frames >= max_frames:
            break
    g_true = np.array([_grade_index(l["severity"]) for l, _ in matched])
    g_pred = np.array([_grade_index(f.stenosis_pct) for _, f in matched])
    qca = []
    for l, f in matched:
        if f.reference_diameter_px and f.minimal_diameter_px is not None:
            qca.append((_grade_index(l["severity"]), _grade_index(100 * (1 - f.minimal_diameter_px / f.reference_diameter_px))))
    out = {
        "frames": n_frames,
        "vessel_dice": round(2 * inter / max(union_sum, 1.0), 4),
        "vessel_f1_1px": round(_f1(tol_p / max(n_p, 1.0), tol_v / max(n_v, 1.0)), 4),
        "segment_pixel_accuracy": round(seg_ok / max(seg_n, 1), 4),
        "lesions_visible": n_vis,
        "lesions_significant": n_sig,
        "lesion_sensitivity": round(hit_sig / max(n_sig, 1), 4),
        "lesion_sensitivity_all": round(hit_vis / max(n_vis, 1), 4),
        "false_positives_per_frame": round(fps / max(n_frames, 1), 4),
        "matched": len(matched),
        "segment_accuracy": round(float(np.mean([f.segment == int(l["segment"]) for l, f in matched])) if matched else 0.0, 4),
        "severity_within_one_grade": round(float(np.mean(np.abs(g_true - g_pred) <= 1)) if matched else 0.0, 4),
        "severity_exact": round(float(np.mean(g_true == g_pred)) if matched else 0.0, 4),
        "severity_mae_pct": round(float(np.mean([abs(l["severity"] - f.stenosis_pct) for l, f in matched])) if matched else 0.0, 2),
        "qca_within_one_grade": round(float(np.mean([abs(a - b) <= 1 for a, b in qca])) if qca else 0.0, 4),
        "latency_ms_per_frame": round(1000 * t_model / max(n_frames, 1), 1),
        "model_size": S,
        "peak_threshold": spec.peak_threshold,
    }
    return out


def lesion_concepts(bundle, threads: int = 2, min_confidence: float = 0.0):
    """``concepts_for(example)`` for ``training.vlm.evaluate``: the bundle's lesion model on the
    key frames a study's report is written from (as the node does: every lesion on a segment of
    the frame's side, one finding per segment), or None when the bundle has no lesion model."""
    from inference.frames import read_frame
    from inference.lesions import LesionModel
    from inference.reporting import findings_from_lesions

    try:
        model = LesionModel(bundle, threads=threads)
    except Exception:  # no lesions section: nothing to give
        return None

    def concepts_for(example) -> list:
        found = []
        for side, refs in example.images_by_side().items():
            for ref in refs:
                try:
                    frame = read_frame(ref.path, ref.frame)
                except Exception:
                    continue
                found += model.find(frame, "", ref.frame, side=side)
        return findings_from_lesions(found, min_confidence=min_confidence)

    return concepts_for


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _overlay(path: Path, frame: np.ndarray, fm, thr: float, found, truth) -> None:
    """Frame with the predicted vessel mask (green), true lesions (blue) and found ones (red)."""
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    g = (np.clip(frame, 0, 1) * 255).astype(np.uint8)
    rgb = np.stack([g, g, g], -1).astype(np.float32)
    m = np.asarray(Image.fromarray((fm.vessel >= thr).astype(np.uint8) * 255).resize(g.shape[::-1], Image.NEAREST)) > 0
    rgb[m] = rgb[m] * 0.5 + np.array([0, 200, 0]) * 0.5
    im = Image.fromarray(rgb.astype(np.uint8))
    d = ImageDraw.Draw(im)
    r = max(4, g.shape[0] // 40)
    for l in truth:
        d.ellipse([l["x"] - r - 2, l["y"] - r - 2, l["x"] + r + 2, l["y"] + r + 2], outline=(60, 120, 255), width=2)
    for f in found:
        d.ellipse([f.x - r, f.y - r, f.x + r, f.y + r], outline=(255, 40, 40), width=2)
        d.text((f.x + r + 2, f.y - r), f"#{f.segment} {f.stenosis_pct:.0f}%", fill=(255, 80, 80))
    im.save(path)


def format_metrics(m: dict) -> str:
    return json.dumps(m, indent=2)
