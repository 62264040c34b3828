"""The lesion model in ONNX Runtime (no torch): key frame -> vessel mask, AHA segments and the
stenoses on it, each with a QCA-style measurement.

The model (``training.lesions``) outputs one tensor ``maps`` (N, C, S, S) holding the dense
heads the bundle's ``LesionSpec.heads`` names: ``vessel`` (lumen logit), ``segment`` (17
logits: 0 background, 1-15 AHA segments, 16 other branches), ``heatmap`` (lesion-centre logit)
and ``severity`` (% diameter stenosis / 100 at lesion centres).  :func:`decode_maps` turns them
into lesions:

* a lesion is a local maximum of the centre heatmap >= ``peak_threshold``, at least
  ``min_distance`` model pixels from a stronger one; its confidence is the peak's probability;
* its AHA segment is the majority segment of the vessel pixels around it (numbered ones only);
* its % diameter stenosis is the severity head at the peak; the vessel mask's own diameter
  profile gives the minimal lumen diameter at the lesion and a reference diameter from the
  healthy lumen a little away from it along the same segment (QCA: reference and minimal
  lumen diameter), reported in stored-frame pixels.

Coordinates come back on the stored frame in DICOM SCOORD convention (``LesionFinding``):
the model sees the frame letterboxed to a square and resized to S, and that mapping is undone.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from inference.frames import preprocess
from inference.types import SEGMENTS, LesionFinding

log = logging.getLogger(__name__)


class LesionModelError(RuntimeError):
    """The lesion model cannot be loaded or run."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))).astype(np.float32)


def head_slices(heads: Sequence[Sequence[Any]]) -> dict[str, slice]:
    out, i = {}, 0
    for name, c in heads:
        out[str(name)] = slice(i, i + int(c))
        i += int(c)
    return out


@dataclass
class FrameMaps:
    """Decoded heads of one frame at model resolution (S, S)."""

    vessel: np.ndarray  # P(vessel), float32
    segment: np.ndarray  # uint8: 0 background, 1-15 AHA, 16 other branch (argmax on vessel pixels)
    heatmap: np.ndarray  # P(lesion centre), float32
    severity: np.ndarray  # % stenosis / 100, float32
    segment_logits: Optional[np.ndarray] = None  # (16, S, S): classes 1-16

    def segments_of(self, side: Optional[str]) -> np.ndarray:
        """The segment map with the choice restricted to ``side``'s AHA segments (and 16, other
        branches): the selector, which sees the whole run, knows the side better than a pixel."""
        if side is None or self.segment_logits is None:
            return self.segment
        allowed = [k for k in range(1, 16) if SEGMENTS[k][0] == side] + [16]
        pick = np.argmax(self.segment_logits[[k - 1 for k in allowed]], axis=0)
        return np.asarray(allowed, np.uint8)[pick]


@dataclass
class ModelLesion:
    """A lesion in model pixel coordinates (column, row of the model grid, 0-based centres)."""

    col: float
    row: float
    segment: int
    stenosis_pct: float
    confidence: float
    minimal_diameter: Optional[float] = None  # model pixels
    reference_diameter: Optional[float] = None


@dataclass
class Geometry:
    """How a stored frame (rows x cols) maps onto the model's S x S input (letterbox + resize)."""

    rows: int
    cols: int
    size: int
    scale: float = field(init=False)  # stored pixels per model pixel
    x0: int = field(init=False)  # letterbox offsets (stored pixels) of the frame in its square
    y0: int = field(init=False)

    def __post_init__(self) -> None:
        s = max(self.rows, self.cols)
        self.scale = s / float(self.size)
        self.y0, self.x0 = (s - self.rows) // 2, (s - self.cols) // 2

    def to_stored(self, col: float, row: float) -> tuple[float, float]:
        """Model pixel centre (col, row) -> SCOORD (x, y) on the stored frame."""
        return ((col + 0.5) * self.scale - self.x0, (row + 0.5) * self.scale - self.y0)

    def to_model(self, x: float, y: float) -> tuple[float, float]:
        """SCOORD (x, y) on the stored frame -> model pixel (col, row)."""
        return ((x + self.x0) / self.scale - 0.5, (y + self.y0) / self.scale - 0.5)


def add_coords(x: np.ndarray, frame_size: Optional[int] = None, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """(B, 1, S, S) model input -> (B, 3, S, S): the image plus the pixel's row and column in the
    model frame, scaled to [-1, 1] (CoordConv).  An AHA segment is partly *where* a vessel lies
    in the projection, which convolutions alone cannot see.  ``frame_size``/``offset``: the
    whole frame's size and the window's (row, column) origin when ``x`` is a crop (training)."""
    b, _, h, w = x.shape
    n = frame_size or h
    r0, c0 = offset
    ramp = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    yy = np.broadcast_to(ramp[r0:r0 + h].reshape(1, 1, h, 1), (b, 1, h, w))
    xx = np.broadcast_to(ramp[c0:c0 + w].reshape(1, 1, 1, w), (b, 1, h, w))
    return np.ascontiguousarray(np.concatenate([x.astype(np.float32), yy, xx], axis=1))


def split_maps(maps: np.ndarray, heads: Sequence[Sequence[Any]]) -> FrameMaps:
    """One frame's raw output (C, S, S) -> probabilities / labels per head."""
    sl = head_slices(heads)
    vessel = _sigmoid(maps[sl["vessel"]][0])
    seg_logits = maps[sl["segment"]]
    segment = (np.argmax(seg_logits[1:], axis=0) + 1).astype(np.uint8)  # numbered or "other"
    heat = _sigmoid(maps[sl["heatmap"]][0])
    sev = np.clip(maps[sl["severity"]][0], 0.0, 1.0).astype(np.float32)
    return FrameMaps(vessel, segment, heat, sev, seg_logits[1:].astype(np.float32))


def _peaks(heat: np.ndarray, threshold: float, min_distance: int) -> list[tuple[int, int, float]]:
    from scipy.ndimage import maximum_filter

    k = 2 * max(1, int(min_distance)) + 1
    mx = maximum_filter(heat, size=k, mode="constant", cval=0.0)
    rr, cc = np.nonzero((heat >= mx) & (heat >= threshold))
    vals = heat[rr, cc]
    order = np.argsort(-vals)
    kept: list[tuple[int, int, float]] = []
    for i in order:  # plateaus give several maxima: keep the first of each neighbourhood
        r, c = int(rr[i]), int(cc[i])
        if all((r - r2) ** 2 + (c - c2) ** 2 > min_distance ** 2 for r2, c2, _ in kept):
            kept.append((r, c, float(vals[i])))
    return kept


def _segment_at(segment: np.ndarray, vessel_mask: np.ndarray, r: int, c: int, radius: int = 4) -> int:
    """The majority numbered segment of the vessel pixels within ``radius`` (then 2x, 4x)."""
    h, w = segment.shape
    for rad in (radius, 2 * radius, 4 * radius):
        r0, r1, c0, c1 = max(0, r - rad), min(h, r + rad + 1), max(0, c - rad), min(w, c + rad + 1)
        seg = segment[r0:r1, c0:c1][vessel_mask[r0:r1, c0:c1]]
        seg = seg[(seg >= 1) & (seg <= 15)]
        if seg.size:
            return int(np.bincount(seg, minlength=16).argmax())
    return 0


def qca_diameters(vessel_mask: np.ndarray, segment: np.ndarray, r: int, c: int, seg: int,
                  near: int = 3, ring: tuple[int, int] = (6, 18)) -> tuple[Optional[float], Optional[float]]:
    """Minimal and reference lumen diameter (model pixels) at a lesion, from the vessel mask.

    The local lumen diameter is twice the distance transform on the mask's ridge.  Minimal =
    the ridge diameter nearest the lesion centre (within ``near`` px; 0 where the lumen closes);
    reference = the median ridge diameter of the same segment in a ring around it (healthy
    lumen on both sides of the lesion), as QCA interpolates a reference from the segment."""
    from scipy.ndimage import distance_transform_edt, maximum_filter

    h, w = vessel_mask.shape
    R = ring[1] + 2
    r0, r1, c0, c1 = max(0, r - R), min(h, r + R + 1), max(0, c - R), min(w, c + R + 1)
    m = vessel_mask[r0:r1, c0:c1]
    if not m.any():
        return None, None
    dt = distance_transform_edt(m)
    ridge = m & (dt >= maximum_filter(dt, size=3)) & (dt > 0)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    d = np.hypot(yy - r, xx - c)
    near_px = ridge & (d <= near)
    mld = float(2 * dt[near_px].max() - 1) if near_px.any() else 0.0
    ring_px = ridge & (d >= ring[0]) & (d <= ring[1]) & (segment[r0:r1, c0:c1] == seg)
    if not ring_px.any():
        return max(mld, 0.0), None
    ref = float(np.median(2 * dt[ring_px] - 1))
    return max(mld, 0.0), max(ref, 1.0)


def decode_maps(fm: FrameMaps, peak_threshold: float = 0.3, min_distance: int = 6,
                vessel_threshold: float = 0.5, side: Optional[str] = None) -> list[ModelLesion]:
    """The lesions of one frame (model coordinates), strongest first; ``side`` (the run's
    laterality) restricts the AHA segments to that side's."""
    mask = fm.vessel >= vessel_threshold
    segments = fm.segments_of(side)
    out: list[ModelLesion] = []
    for r, c, p in _peaks(fm.heatmap, peak_threshold, min_distance):
        seg = _segment_at(segments, mask, r, c)
        if seg == 0:  # a peak away from any numbered vessel: not a coronary lesion we can name
            continue
        r0, r1, c0, c1 = max(0, r - 1), r + 2, max(0, c - 1), c + 2
        sev = float(np.mean(fm.severity[r0:r1, c0:c1])) * 100.0
        mld, ref = qca_diameters(mask, segments, r, c, seg)
        out.append(ModelLesion(float(c), float(r), seg, float(np.clip(sev, 0.0, 100.0)), p, mld, ref))
    return out


class LesionModel:
    """``LesionModel(bundle, threads=2, providers=["auto"])``: the bundle's lesion model."""

    def __init__(self, bundle: Any, threads: int = 2, providers: Sequence[str] | None = ("auto",)):
        from inference.bundle import Bundle, BundleError
        from inference.selector import ort_session

        if isinstance(bundle, (str, os.PathLike)):
            bundle = Bundle.load(bundle)
        spec = bundle.manifest.lesions
        if spec is None:
            raise BundleError(f"bundle {bundle.root}: no lesions section in the manifest")
        self.bundle, self.spec = bundle, spec
        self.size = int(spec.preprocessing.input_size)
        path = bundle.lesions_path
        try:
            self.session = ort_session(path, threads, providers)
        except Exception as exc:
            raise LesionModelError(f"cannot load lesion model {path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.coords = bool(spec.coords)
        n_out = self.session.get_outputs()[0].shape[1]
        want = sum(int(c) for _, c in spec.heads)
        if isinstance(n_out, int) and n_out != want:
            raise LesionModelError(f"lesion model has {n_out} output channels, the manifest's heads {want}")

    def maps(self, frames: Sequence[np.ndarray]) -> list[FrameMaps]:
        """Display frames (H, W) in [0, 1] -> decoded heads at model resolution."""
        if not frames:
            return []
        x = np.stack([preprocess(f, self.spec.preprocessing) for f in frames])
        if self.coords:
            x = add_coords(x)
        out = self.session.run(None, {self.input_name: x})[0]
        return [split_maps(o, self.spec.heads) for o in out]

    def find(self, frame: np.ndarray, sop_instance_uid: str, frame_number: int,
             maps: Optional[FrameMaps] = None, side: Optional[str] = None) -> list[LesionFinding]:
        """The stenoses on one display frame, as findings on the stored frame; ``side``: the
        run's laterality (the segments are then that side's)."""
        fm = maps if maps is not None else self.maps([frame])[0]
        geo = Geometry(int(frame.shape[0]), int(frame.shape[1]), self.size)
        out = []
        for les in decode_maps(fm, self.spec.peak_threshold, self.spec.min_distance, self.spec.vessel_threshold,
                               side=side):
            x, y = geo.to_stored(les.col, les.row)
            x = float(np.clip(x, 0.0, geo.cols))
            y = float(np.clip(y, 0.0, geo.rows))
            out.append(LesionFinding(
                sop_instance_uid=sop_instance_uid, frame_number=int(frame_number), segment=les.segment,
                stenosis_pct=round(les.stenosis_pct, 1), x=round(x, 2), y=round(y, 2),
                confidence=round(les.confidence, 4),
                minimal_diameter_px=None if les.minimal_diameter is None else round(les.minimal_diameter * geo.scale, 2),
                reference_diameter_px=None if les.reference_diameter is None else round(les.reference_diameter * geo.scale, 2),
            ))
        return out


def lesions_on_key_frames(model: LesionModel, runs: Sequence[Any], frames_at=None,
                          min_confidence: float = 0.0) -> list[LesionFinding]:
    """Lesions on every key frame of the analysed runs (``RunSelection`` objects), those of
    confidence >= ``min_confidence``.  Segments are chosen among the run's side's (the selector,
    which sees the whole run, names the side).  ``frames_at(path, [frame numbers]) -> {frame
    number: display frame}``: default :func:`inference.frames.read_frames`."""
    from inference.frames import read_frames

    frames_at = frames_at or read_frames
    out: list[LesionFinding] = []
    for run in runs:
        if not getattr(run, "ok", False) or not run.key_frames:
            continue
        numbers = [k.frame_number for k in run.key_frames]
        decoded = frames_at(run.file, numbers)
        for n in numbers:
            if n in decoded:
                out += [les for les in model.find(decoded[n], run.sop_instance_uid, n, side=run.laterality)
                        if les.confidence >= min_confidence]
    return out
