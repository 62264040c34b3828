"""Vessel masks and lesions of a bundle's lesion model drawn on real angiograms (PNG).

    .venv/bin/python bench/lesion_overlays.py --bundle models/demo --out docs/img/lesions \
        [FILE.dcm ...]    # default: the coronary runs in ../shared/data/real-xa (skipped if absent)

For each run the selector picks the key frame (as the node does); the lesion model's vessel
mask (green, P >= the bundle's vessel threshold), its AHA segment colours and the lesions it
reports (red circles with segment and % stenosis) are drawn on the frame, and a contact sheet
``sheet.png`` puts them side by side.  The point is to *look*: the model is trained on synthetic
frames only, and this shows how far its masks carry over to real ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL = ROOT.parent / "shared" / "data" / "real-xa"
CORONARY = ("ballerina-sample2-XA.dcm", "barre-XA-MONO2-8-12x-catheter.dcm")


def overlay(frame: np.ndarray, fm, found, vessel_threshold: float, size: int):
    from PIL import Image, ImageDraw

    g = (np.clip(frame, 0, 1) * 255).astype(np.uint8)
    h, w = g.shape
    s = max(h, w)
    # the model's grid (letterboxed square) back onto the stored frame
    prob = np.asarray(Image.fromarray((fm.vessel * 255).astype(np.uint8)).resize((s, s), Image.BILINEAR))
    y0, x0 = (s - h) // 2, (s - w) // 2
    prob = prob[y0:y0 + h, x0:x0 + w] / 255.0
    seg = np.asarray(Image.fromarray(fm.segment).resize((s, s), Image.NEAREST))[y0:y0 + h, x0:x0 + w]
    rgb = np.stack([g, g, g], -1).astype(np.float32)
    m = prob >= vessel_threshold
    rng = np.random.default_rng(0)
    palette = rng.uniform(60, 255, (17, 3))
    palette[16] = (0, 200, 0)
    rgb[m] = 0.45 * rgb[m] + 0.55 * palette[seg[m]]
    im = Image.fromarray(rgb.astype(np.uint8))
    d = ImageDraw.Draw(im)
    r = max(5, h // 40)
    for les in found:
        d.ellipse([les.x - r, les.y - r, les.x + r, les.y + r], outline=(255, 40, 40), width=2)
        d.text((les.x + r + 2, les.y - r), f"#{les.segment} {les.stenosis_pct:.0f}%", fill=(255, 90, 90))
    return im


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--bundle", default=str(ROOT / "models" / "demo"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "lesions"))
    args = ap.parse_args(argv)
    from PIL import Image

    from inference.frames import open_run
    from inference.lesions import LesionModel
    from inference.selector import Selector

    files = [Path(f) for f in args.files] or [REAL / f for f in CORONARY if (REAL / f).is_file()]
    if not files:
        print("no real coronary runs found (../shared/data/real-xa absent): nothing to draw")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sel = Selector(args.bundle)
    lm = LesionModel(args.bundle)
    tiles = []
    for f in files:
        run = sel.select_run(str(f))
        if not run.ok:
            print(f"{f.name}: {run.error}")
            continue
        n = run.key_frames[0].frame_number
        frame = open_run(f).frame(n)
        fm = lm.maps([frame])[0]
        found = lm.find(frame, run.sop_instance_uid, n, maps=fm)
        im = overlay(frame, fm, found, lm.spec.vessel_threshold, lm.size)
        p = out / f"{f.stem}.png"
        im.save(p)
        tiles.append(im.resize((384, int(384 * im.height / im.width))))
        print(f"{f.name}: {run.laterality} frame {n}: vessel {float((fm.vessel >= lm.spec.vessel_threshold).mean()):.3f} "
              f"of the frame, {len(found)} lesion(s) {[(l.segment, round(l.stenosis_pct)) for l in found]} -> {p}")
    if tiles:
        sheet = Image.new("RGB", (384 * len(tiles), max(t.height for t in tiles)))
        for i, t in enumerate(tiles):
            sheet.paste(t, (384 * i, 0))
        sheet.save(out / "sheet.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
