"""Occlusion saliency of the selector: where in a frame does the side decision come from?

Why occlusion rather than Grad-CAM: it needs only the deployed ONNX model (no torch, no
gradients), and it asks the question a reader asks — "if this part of the image were not
there, would the model still say left?".  Each patch of the model-sized display frame is
replaced by a blur of itself (the vessels and wires in it vanish, the brightness stays), the
frame goes through the bundle's own preprocessing, and the drop in P(predicted side) is the
patch's saliency.  A model that reads the coronary tree lights up on the vessels; one that
reads a shortcut lights up on the catheter entry, the collimator edge or a corner.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from inference.frames import finish_input, model_frame, smooth
from inference.types import CLASS_NAMES, SIDES

log = logging.getLogger(__name__)

_SIDE_IDX = {s: [i for i, c in enumerate(CLASS_NAMES) if c.startswith(s)] for s in SIDES}


def occlusion_map(selector: Any, frame: np.ndarray, side: Optional[str] = None, patch: int = 0,
                  stride: int = 0) -> tuple[np.ndarray, str, float]:
    """(saliency (S, S) >= 0, side, P(side) of the intact frame) for one display frame.

    ``side`` defaults to the side the model names; ``patch``/``stride`` default to 1/8 and
    1/16 of the model's input size.
    """
    spec = selector.preprocessing
    d = model_frame(frame, spec)
    s = d.shape[-1]
    patch = patch or max(4, s // 8)
    stride = stride or max(2, s // 16)
    p0 = selector.predict(finish_input(d, spec)[None])[0]
    if side is None:
        side = max(SIDES, key=lambda k: float(p0[_SIDE_IDX[k]].sum()))
    base = float(p0[_SIDE_IDX[side]].sum())
    fill = smooth(d, max(2, patch // 2))
    starts = list(range(0, max(1, s - patch + 1), stride))
    if starts[-1] != s - patch:
        starts.append(max(0, s - patch))
    batch, boxes = [], []
    for y in starts:
        for x in starts:
            o = d.copy()
            o[y:y + patch, x:x + patch] = fill[y:y + patch, x:x + patch]
            batch.append(o)
            boxes.append((y, x))
    probs = selector.predict(finish_input(np.stack(batch), spec))
    drop = base - probs[:, _SIDE_IDX[side]].sum(axis=1)
    sal = np.zeros((s, s), np.float64)
    cnt = np.zeros((s, s), np.float64)
    for (y, x), v in zip(boxes, drop):
        sal[y:y + patch, x:x + patch] += max(float(v), 0.0)
        cnt[y:y + patch, x:x + patch] += 1
    return (sal / np.maximum(cnt, 1)).astype(np.float32), side, base


def overlay(frame: np.ndarray, sal: np.ndarray, size: int = 256) -> np.ndarray:
    """RGB uint8 picture: the frame in grey with the saliency in red on top (normalised to its max)."""
    from PIL import Image

    from inference.frames import resize_square

    g = resize_square(np.clip(frame, 0, 1), size)
    h = np.asarray(Image.fromarray(sal.astype(np.float32)).resize((size, size), Image.BILINEAR), np.float32)
    h = h / max(float(h.max()), 1e-6)
    rgb = np.stack([g, g, g], -1) * (1 - 0.6 * h[..., None])
    rgb[..., 0] += 0.6 * h
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def save_saliency(bundle: Any, files: Iterable[str | Path], out_dir: str | Path, *,
                  truths: Optional[Sequence[Optional[str]]] = None, threads: int = 2,
                  size: int = 256, picks: Optional[Sequence[Optional[tuple[str, int]]]] = None) -> list[dict]:
    """For each run: its top key frame (as the node picks it) with the occlusion saliency of the
    side the model names, written as ``OUT/<stem>.png``; and a contact sheet ``OUT/sheet.png``.
    Returns one row per file (file, side, confidence, truth, frame, png).  ``picks``: the
    (side, key frame number) the selector already chose for each file (e.g. by an evaluation),
    so the runs are not scored again; ``None`` entries are scored here."""
    from PIL import Image, ImageDraw

    from inference.frames import open_run
    from inference.selector import Selector

    sel = bundle if hasattr(bundle, "select_run") else Selector(bundle, threads=threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [Path(f) for f in files]
    truths = list(truths) if truths is not None else [None] * len(files)
    picks = list(picks) if picks is not None else [None] * len(files)
    rows, tiles = [], []
    for f, truth, pick in zip(files, truths, picks):
        try:
            if pick is None:
                rs = sel.select_run(f)
                pick = (rs.laterality, rs.key_frames[0].frame_number if rs.key_frames else 1)
            side0, fn = pick
            frame = open_run(f).frame(fn)
        except Exception as exc:  # one unreadable run does not stop the rest
            log.warning("saliency: %s: %s", f.name, exc)
            rows.append({"file": str(f), "error": str(exc)})
            continue
        sal, side, p = occlusion_map(sel, frame, side0)
        img = Image.fromarray(overlay(frame, sal, size))
        txt = f"{side} {p:.2f}" + (f" (truth {truth})" if truth else "")
        ImageDraw.Draw(img).text((4, 4), txt, fill=(255, 255, 0) if truth in (None, side) else (255, 64, 64))
        png = out / f"{f.stem}.png"
        img.save(png)
        tiles.append(np.asarray(img))
        rows.append({"file": str(f), "side": side, "confidence": round(p, 4), "truth": truth, "frame": fn,
                     "png": str(png)})
    if tiles:
        cols = min(6, len(tiles))
        blank = np.zeros_like(tiles[0])
        grid = [tiles[i:i + cols] + [blank] * (cols - len(tiles[i:i + cols])) for i in range(0, len(tiles), cols)]
        Image.fromarray(np.vstack([np.hstack(r) for r in grid])).save(out / "sheet.png")
    return rows
