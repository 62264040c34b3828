"""Lesion-model training data: key frames of synthetic runs with their per-pixel targets.

The generator (``training.synthetic``, ``targets=N``) writes, for N key frames per run, the
vessel mask, the AHA segment map and the lesion list at the frame's own resolution.  Here each
target frame is read back from its DICOM run through the node's own frame path
(``inference.frames``: the display image the node would feed the model), letterboxed/resized to
the model size with ``model_frame`` (the serving path's step 1) and cached, once per data set
and model size, as ``lesion-cache-S.npz`` under the data folder:

* ``D`` (N, S, S) float16 display frames (augmented in training, then ``finish_input``);
* ``V`` (N, S, S) uint8 vessel mask, ``G`` (N, S, S) uint8 segment map (nearest resize);
* ``F`` (N, S, S) uint8 exposed field of each frame (``inference.frames.exposed_field``: the
  costly part of the flatfield normalisation, computed once here);
* ``L`` (M, 6) float32 lesions: frame row, col, row (model pixels), severity %, segment, visible;
* ``study`` (N,) study index (for splits), ``side`` (N,) 0 = LCA, 1 = RCA (the run's laterality).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from inference.frames import model_frame, read_frames
from inference.lesions import Geometry

log = logging.getLogger(__name__)

CACHE_VERSION = 3


@dataclass
class LesionSet:
    D: np.ndarray
    V: np.ndarray
    G: np.ndarray
    L: np.ndarray
    study: np.ndarray
    F: Optional[np.ndarray] = None
    side: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.D)

    def lesions_of(self, i: int) -> np.ndarray:
        return self.L[self.L[:, 0] == i]

    def subset(self, idx: np.ndarray) -> "LesionSet":
        idx = np.asarray(idx)
        remap = -np.ones(len(self), np.int64)
        remap[idx] = np.arange(len(idx))
        keep = np.isin(self.L[:, 0].astype(np.int64), idx)
        L = self.L[keep].copy()
        L[:, 0] = remap[L[:, 0].astype(np.int64)]
        return LesionSet(self.D[idx], self.V[idx], self.G[idx], L, self.study[idx],
                         None if self.F is None else self.F[idx], None if self.side is None else self.side[idx])


def _resize_nearest(a: np.ndarray, geo: Geometry) -> np.ndarray:
    """A label map on the stored frame -> the model grid (letterbox + nearest neighbour)."""
    S = geo.size
    c = ((np.arange(S) + 0.5) * geo.scale - geo.x0).astype(np.int64)
    r = ((np.arange(S) + 0.5) * geo.scale - geo.y0).astype(np.int64)
    out = np.zeros((S, S), a.dtype)
    ok_r = (r >= 0) & (r < a.shape[0])
    ok_c = (c >= 0) & (c < a.shape[1])
    out[np.ix_(ok_r, ok_c)] = a[np.ix_(r[ok_r], c[ok_c])]
    return out


def _spec_hash(root: Path, size: int) -> str:
    lab = root / "labels.jsonl"
    st = lab.stat()
    return hashlib.sha256(json.dumps([CACHE_VERSION, size, st.st_size, st.st_mtime_ns]).encode()).hexdigest()[:16]


def load_lesion_set(root: str | Path, size: int = 256, max_records: Optional[int] = None,
                    cache: bool = True) -> LesionSet:
    """All target frames of a synthetic set (generated with ``targets`` > 0) at model size."""
    from training.synthetic import load_records
    from training.synthetic.targets import load_targets

    root = Path(root)
    key = _spec_hash(root, size)
    cpath = root / f"lesion-cache-{size}.npz"
    if cache and cpath.is_file() and max_records is None:
        z = np.load(cpath)
        if str(z["key"]) == key:
            return LesionSet(z["D"], z["V"], z["G"], z["L"], z["study"], z["F"], z["side"])
    records = [r for r in load_records(root) if r.get("targets")]
    if max_records is not None:
        records = records[:max_records]
    if not records:
        raise ValueError(f"{root}: no run has lesion targets (generate with targets > 0)")
    D, V, G, L, study, side = [], [], [], [], [], []
    for rec in records:
        tg = load_targets(root, rec)
        frames = read_frames(root / rec["file"], [t[0] for t in tg])
        for number, vessel, segment, lesions in tg:
            fr = frames[number]
            geo = Geometry(fr.shape[0], fr.shape[1], size)
            i = len(D)
            D.append(model_frame(fr, {"input_size": size}).astype(np.float16))
            V.append(_resize_nearest(np.asarray(vessel, np.uint8), geo))
            G.append(_resize_nearest(np.asarray(segment, np.uint8), geo))
            study.append(int(rec.get("study_index", 0)))
            side.append(0 if rec.get("laterality") == "LCA" else 1)
            for les in lesions:
                col, row = geo.to_model(float(les["x"]), float(les["y"]))
                L.append([i, col, row, float(les["severity"]), float(les["segment"]), float(bool(les.get("visible", True)))])
    from inference.frames import exposed_field

    Dn = np.stack(D)
    F = np.concatenate([exposed_field(Dn[i:i + 64].astype(np.float32)).astype(np.uint8)
                        for i in range(0, len(Dn), 64)])
    ls = LesionSet(Dn, np.stack(V), np.stack(G), np.asarray(L, np.float32).reshape(-1, 6),
                   np.asarray(study, np.int64), F, np.asarray(side, np.uint8))
    if cache and max_records is None:
        np.savez(cpath, key=key, D=ls.D, V=ls.V, G=ls.G, L=ls.L, study=ls.study, F=ls.F, side=ls.side)
    log.info("lesion set %s: %d frames, %d lesions (%d visible)", root, len(ls), len(ls.L), int(ls.L[:, 5].sum()))
    return ls


def heatmap_targets(ls: LesionSet, idx: np.ndarray, size: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre heatmaps (B, S, S) (Gaussian peaks of height 1 at visible lesions) and the
    severity target (B, S, S) (severity/100 where the Gaussian > 0.3, else -1 = unsupervised)."""
    B = len(idx)
    H = np.zeros((B, size, size), np.float32)
    Sv = np.full((B, size, size), -1.0, np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for b, i in enumerate(idx):
        for _, col, row, sev, _seg, vis in ls.lesions_of(int(i)):
            if not vis:
                continue
            g = np.exp(-((xx - col) ** 2 + (yy - row) ** 2) / (2 * sigma * sigma))
            H[b] = np.maximum(H[b], g)
            Sv[b] = np.where(g > 0.3, np.float32(sev / 100.0), Sv[b])
    return H, Sv
