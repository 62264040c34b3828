"""Per-pixel training targets of a synthetic run (for a lesion / segmentation model).

For a key frame of a run, at the frame's own resolution (``spec.size``):

- ``vessel``: uint8 (H, W) 0/1, the opacified lumen: pixel centres within the projected
  (stenosed) lumen radius (at least 0.5 px) of a centreline sample that is opacified at that
  frame (concentration >= 0.25, filled, reference radius >= 0.45 mm), inside the collimated
  field;
- ``segment``: uint8 (H, W), 0 background, 1-15 the AHA segment of the vessel pixel's
  sample (the one nearest relative to its radius), 16 unnumbered branches (septals, twigs);
- ``lesions``: the run side's lesions projected on the frame (DICOM SCOORD convention: x =
  column, y = row, (0, 0) the top-left corner of the top-left pixel).

The geometry is :func:`render.run_geometry`, the one :func:`render.render_frames` renders
with (C-arm with the centring table position, per-frame pans on the canvas, cardiac
deformation, the same vessel resampling), and nothing is drawn from a random generator:
turning targets on does not change a pixel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .anatomy import STEP_MM, Anatomy
from .lesions import Lesion, apply_lesions
from .render import RunGeometry, RunSpec, concentration, deform, field_mask, run_geometry

OPACIFIED = 0.25  # min concentration of an opacified sample
MIN_RADIUS_MM = 0.45  # min reference radius of a sample in the targets (the renderer's "visible")
MIN_RADIUS_PX = 0.5  # min projected lumen radius (a tight stenosis stays a 1-px neck)
UNNUMBERED = 16  # segment label of vessel pixels on unnumbered branches
N_POLYLINE = 5  # points of a lesion's polyline


@dataclass
class FrameTargets:
    frame: int  # 1-based frame number
    vessel: np.ndarray  # uint8 (H, W) 0/1
    segment: np.ndarray  # uint8 (H, W) 0..16
    lesions: list = field(default_factory=list)


@dataclass
class _RunContext:
    anatomy: Anatomy
    lesions: list
    spec: RunSpec
    geo: RunGeometry
    field: np.ndarray  # (H, W) bool, open field
    radii: list  # per branch: stenosed radius (stored centreline samples)
    filled: list


def _context(anatomy: Anatomy, lesions: list[Lesion], spec: RunSpec, geometry: Optional[RunGeometry] = None) -> _RunContext:
    geo = geometry if geometry is not None else run_geometry(anatomy, lesions, spec)
    fm, _ = field_mask(spec, spec.size)
    radii, filled, _ = apply_lesions(anatomy.tree(spec.side), lesions)
    return _RunContext(anatomy, lesions, spec, geo, fm > 0.5, radii, filled)


def _project(ctx: _RunContext, local: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heart-local points at frame ``f`` -> (col, row) frame pixel indices (pixel centre at
    integers, as the renderer splats) and magnification."""
    heart = ctx.anatomy.heart
    k = float(ctx.geo.ks[f])
    cx, cy, mag = ctx.geo.carm.project(heart.to_patient(deform(local, heart, k)))
    dx, dy = ctx.geo.pans[f]
    return cx + dx, cy + dy, mag


def _rasterise(col, row, r_px, labels, shape) -> tuple[np.ndarray, np.ndarray]:
    """Union of discs (col, row, radius r_px) -> (mask bool, label uint8): each covered pixel
    gets the label of the disc with the smallest distance / radius."""
    H, W = shape
    best = np.full(H * W, np.inf, np.float32)
    lab = np.zeros(H * W, np.uint8)
    if len(col) == 0:
        return np.zeros(shape, bool), lab.reshape(shape)
    hw = np.ceil(r_px).astype(np.int64)
    ic = np.rint(col).astype(np.int64)
    ir = np.rint(row).astype(np.int64)
    ok = (ic + hw >= 0) & (ic - hw < W) & (ir + hw >= 0) & (ir - hw < H)
    idxs, scores, labs = [], [], []
    for h in np.unique(hw[ok]):
        m = ok & (hw == h)
        off = np.arange(-h, h + 1)
        pc = ic[m, None, None] + off[None, None, :]
        pr = ir[m, None, None] + off[None, :, None]
        d2 = (pc - col[m, None, None]) ** 2 + (pr - row[m, None, None]) ** 2
        s = d2 / (r_px[m, None, None] ** 2)
        inside = (s <= 1.0) & (pc >= 0) & (pc < W) & (pr >= 0) & (pr < H)
        lin = np.broadcast_to(pr * W + pc, inside.shape)[inside]
        idxs.append(lin)
        scores.append(s[inside].astype(np.float32))
        labs.append(np.broadcast_to(labels[m, None, None], inside.shape)[inside])
    if not idxs:
        return np.zeros(shape, bool), lab.reshape(shape)
    idx = np.concatenate(idxs)
    sc = np.concatenate(scores)
    lb = np.concatenate(labs)
    np.minimum.at(best, idx, sc)
    win = sc == best[idx]
    lab[idx[win]] = lb[win]
    mask = np.isfinite(best).reshape(shape)
    return mask, lab.reshape(shape)


def _opacified(ctx: _RunContext, f: int) -> np.ndarray:
    vs = ctx.geo.vs
    conc = concentration(vs, ctx.spec, float(ctx.geo.times[f]))
    return (conc >= OPACIFIED) & vs.filled & (vs.ref >= MIN_RADIUS_MM)


def _lesion_dict(ctx: _RunContext, les: Lesion, f: int, opac: np.ndarray) -> dict:
    tree = ctx.anatomy.tree(ctx.spec.side)
    b = tree.branches[les.branch]
    n = len(b.pts)
    i0 = int(np.clip(les.index, 0, n - 1))
    half = les.length_mm / STEP_MM / 2  # the extent apply_lesions narrows
    lo = int(np.clip(np.ceil(i0 - half), 0, n - 1))
    hi = int(np.clip(np.floor(i0 + half), 0, n - 1))
    ext = np.arange(lo, hi + 1)
    col, row, mag = _project(ctx, b.pts[ext], f)
    c = int(np.searchsorted(ext, i0))
    px = ctx.geo.carm.pixel_mm
    x, y = float(col[c]) + 0.5, float(row[c]) + 0.5  # SCOORD: pixel centre (c, r) = (c+.5, r+.5)
    length = float(np.hypot(np.diff(col), np.diff(row)).sum())
    pl = np.unique(np.rint(np.linspace(0, len(ext) - 1, min(N_POLYLINE, len(ext)))).astype(int))
    vs = ctx.geo.vs
    near = (vs.branch == les.branch) & (vs.index >= i0 - 3) & (vs.index <= i0)  # at / just before
    H = W = ctx.spec.size
    inside = 0 <= x < W and 0 <= y < H and bool(ctx.field[int(y), int(x)])
    return {
        "segment": int(les.segment),
        "vessel": les.vessel,
        "severity": int(les.severity),
        "x": round(x, 2),
        "y": round(y, 2),
        "length_px": round(length, 2),
        "reference_diameter_px": round(float(2 * b.radius[i0] * mag[c] / px), 2),
        "minimal_diameter_px": round(float(2 * ctx.radii[les.branch][i0] * mag[c] / px), 2),
        "polyline": [[round(float(col[j]) + 0.5, 2), round(float(row[j]) + 0.5, 2)] for j in pl],
        "visible": bool(inside and opac[near].any()),
    }


def _frame(ctx: _RunContext, f: int) -> FrameTargets:
    n = ctx.spec.size
    vs = ctx.geo.vs
    opac = _opacified(ctx, f)
    col, row, mag = _project(ctx, vs.local[opac], f)
    scale = mag / ctx.geo.carm.pixel_mm
    r_px = np.maximum(vs.radius[opac] * scale, MIN_RADIUS_PX)
    # discs of radius R every step_px cover a tube of radius sqrt(R^2 - step_px^2 / 4)
    r_eff = np.sqrt(r_px**2 + (0.5 * vs.step * scale) ** 2)
    seg = vs.segment[opac].astype(np.uint8)
    seg[seg == 0] = UNNUMBERED
    mask, lab = _rasterise(col, row, r_eff, seg, (n, n))
    mask &= ctx.field
    lab[~mask] = 0
    les = [_lesion_dict(ctx, l, f, opac) for l in ctx.lesions if l.side == ctx.spec.side]
    return FrameTargets(f + 1, mask.astype(np.uint8), lab, les)


def frame_targets(anatomy: Anatomy, lesions: list[Lesion], spec: RunSpec, frame_index: int,
                  geometry: Optional[RunGeometry] = None) -> FrameTargets:
    """Targets of frame ``frame_index`` (0-based) of the run rendered from (anatomy, lesions,
    spec); ``geometry``: a :func:`render.run_geometry` of that run to re-use."""
    return _frame(_context(anatomy, lesions, spec, geometry), int(frame_index))


def run_targets(anatomy: Anatomy, lesions: list[Lesion], spec: RunSpec, frame_indices: Sequence[int]) -> list[FrameTargets]:
    """Targets of several frames (0-based indices) of one run (the geometry computed once)."""
    if len(frame_indices) == 0:
        return []
    ctx = _context(anatomy, lesions, spec)
    return [_frame(ctx, int(f)) for f in frame_indices]


def key_frames(labels: Sequence[str], fill: Sequence[float], side: str, n: int) -> list[int]:
    """0-based key frames of a run: up to ``n`` of its ``{side}_better`` frames spread evenly
    (the highest fill among them included); without a better frame the frame with the highest
    fill if it has contrast (label not ``_other``); none otherwise."""
    if n <= 0 or not labels:
        return []
    fill = np.asarray(fill, float)
    better = [i for i, lab in enumerate(labels) if lab == f"{side}_better"]
    if not better:
        i = int(np.argmax(fill))
        return [] if labels[i].endswith("_other") else [i]
    best = max(better, key=lambda i: fill[i])
    if len(better) <= n:
        return better
    pos = [int(p) for p in np.rint(np.linspace(0, len(better) - 1, n))]
    j = better.index(best)
    if j not in pos:
        pos[int(np.argmin([abs(p - j) for p in pos]))] = j
    return sorted({better[p] for p in pos})


# ----------------------------------------------------------------------------- storage


def targets_path(run_rel: str) -> str:
    """``study_XXXXX/run_YY.dcm`` -> ``study_XXXXX/run_YY_targets.npz``."""
    stem = run_rel[:-4] if run_rel.endswith(".dcm") else run_rel
    return stem + "_targets.npz"


def save_targets(path: str | os.PathLike, targets: Sequence[FrameTargets]) -> None:
    """``np.savez_compressed``: ``frames`` (K,) int 1-based, ``vessel``/``segment`` (K,H,W) uint8."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        frames=np.array([t.frame for t in targets], np.int32),
        vessel=np.stack([t.vessel for t in targets]).astype(np.uint8),
        segment=np.stack([t.segment for t in targets]).astype(np.uint8),
    )


def targets_record(rel: str, targets: Sequence[FrameTargets]) -> dict:
    """The labels.jsonl ``targets`` entry of a run (``file`` None without key frames)."""
    return {
        "file": rel if targets else None,
        "frames": [int(t.frame) for t in targets],
        "lesions": [t.lesions for t in targets],
    }


def load_targets(root: str | os.PathLike, record: dict) -> list[tuple[int, np.ndarray, np.ndarray, list]]:
    """The targets of a labels.jsonl record: [(frame number 1-based, vessel (H,W) uint8,
    segment (H,W) uint8, lesions [dict])]; [] when the record has none."""
    t = record.get("targets")
    if not t or not t.get("file"):
        return []
    with np.load(Path(root) / t["file"]) as z:
        frames, vessel, segment = z["frames"], z["vessel"], z["segment"]
    if [int(f) for f in frames] != [int(f) for f in t["frames"]]:
        raise ValueError(f"{t['file']}: frames {frames.tolist()} != record {t['frames']}")
    return [(int(f), vessel[i], segment[i], list(t["lesions"][i])) for i, f in enumerate(frames)]


# ----------------------------------------------------------------------------- overlay

#: tint per segment label (0 unused, 1-4 RCA, 5 LM, 6-10 LAD, 11-15 LCx, 16 unnumbered)
PALETTE = np.array([
    [0, 0, 0],
    [255, 80, 80], [255, 150, 60], [255, 220, 60], [200, 120, 255],  # RCA 1-4
    [255, 255, 255],  # LM 5
    [60, 160, 255], [60, 220, 255], [60, 255, 200], [120, 255, 80], [200, 255, 80],  # LAD 6-10
    [255, 90, 200], [255, 140, 140], [255, 60, 120], [220, 160, 255], [255, 200, 120],  # LCx 11-15
    [150, 150, 150],  # unnumbered
], np.uint8)


def overlay_png(frame: np.ndarray, vessel: np.ndarray, segment: np.ndarray, lesions: list, path: str | os.PathLike,
                alpha: float = 0.45, scale: int = 1, outline: bool = False) -> None:
    """An RGB PNG: ``frame`` (grey, uint8 or uint16) with the vessel mask tinted by segment
    (``outline``: only the mask's boundary, the rendered vessel stays visible inside it; an
    upscaled image (``scale``) draws the boundary on the pixel edges) and the lesions
    marked (a ring at the centre sized by the reference diameter, the polyline, the grade;
    visible lesions yellow, invisible ones dim), for docs and debugging."""
    from PIL import Image, ImageDraw
    from scipy.ndimage import binary_erosion

    g = np.asarray(frame, np.float32)
    if g.max() > 255:
        g = g * (255.0 / max(float(g.max()), 1.0))
    m = np.asarray(vessel) > 0
    seg = np.clip(np.asarray(segment), 0, len(PALETTE) - 1)
    if scale > 1:
        g, m, seg = (np.kron(a, np.ones((scale, scale), a.dtype)) for a in (g, m, seg))
    rgb = np.repeat(g[..., None], 3, axis=2)
    tint = PALETTE[seg].astype(np.float32)
    if outline:
        m = m & ~binary_erosion(m, border_value=0)
        rgb[m] = tint[m]
    else:
        rgb[m] = (1 - alpha) * rgb[m] + alpha * tint[m]
    img = Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    dr = ImageDraw.Draw(img)
    for les in lesions:
        col = (255, 255, 0) if les.get("visible") else (120, 120, 60)
        x, y = les["x"] * scale, les["y"] * scale
        pl = [(px * scale, py * scale) for px, py in les.get("polyline") or []]
        if len(pl) >= 2:
            dr.line(pl, fill=(255, 0, 255), width=1)
        r = max(3.0, 0.5 * les.get("reference_diameter_px", 4.0) * scale + 3)
        dr.ellipse([x - r, y - r, x + r, y + r], outline=col, width=1)
        dr.text((x + r + 1, y - r), f"#{les['segment']} {les['severity']}%", fill=col)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
