"""Pictures for docs/sim-to-real.md: real vs synthetic frames, before and after the selector's
frame normalisation, and occlusion saliency of a bundle on real coronary runs.

    .venv/bin/python bench/sim2real_figures.py [--bundle models/demo] [--out docs/img]
        [--real DIR_OR_CSV ...]

Real frames come from ``../shared/data/real-xa`` (the two coronary runs; skipped when absent)
and from any extra DICOM folders or labels CSVs given with ``--real``: those pictures are
written to ``--out`` like the others, so keep third-party data without a licence out of the
repository (write them elsewhere with ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
REAL_XA = ROOT.parent / "shared" / "data" / "real-xa"
CORONARY = ["ballerina-sample2-XA.dcm", "barre-XA-MONO2-8-12x-catheter.dcm"]


def _tile(a: np.ndarray, size: int, text: str = "") -> np.ndarray:
    from inference.frames import resize_square

    img = Image.fromarray((np.clip(resize_square(np.asarray(a, np.float32), size), 0, 1) * 255).astype(np.uint8))
    img = img.convert("RGB")
    if text:
        ImageDraw.Draw(img).text((4, 4), text, fill=(255, 255, 0))
    return np.asarray(img)


def _grid(tiles: list[np.ndarray], cols: int) -> Image.Image:
    blank = np.zeros_like(tiles[0])
    rows = [tiles[i:i + cols] + [blank] * (cols - len(tiles[i:i + cols])) for i in range(0, len(tiles), cols)]
    return Image.fromarray(np.vstack([np.hstack(r) for r in rows]))


def real_frames(extra: list[str]) -> list[tuple[str, Path, np.ndarray]]:
    from inference.frames import open_run

    files: list[tuple[str, Path]] = []
    for name in CORONARY:
        if (REAL_XA / name).is_file():
            files.append(("real " + name.split("-")[0], REAL_XA / name))
    for e in extra:
        p = Path(e)
        if p.suffix.lower() == ".csv":
            with open(p, newline="") as fh:
                for row in list(csv.DictReader(fh))[:12]:
                    files.append((f"real {row.get('laterality', '')}", p.parent / row["file"]))
        elif p.is_dir():
            files += [("real", f) for f in sorted(p.glob("*.dcm"))[:12]]
    out = []
    for label, f in files:
        run = open_run(f)
        k = run.n_frames // 2
        out.append((label, f, run.frame(k + 1)))
    return out


def synthetic_frames(n: int = 6, size: int = 512) -> list[tuple[str, np.ndarray]]:
    from training.synthetic import render_run

    out = []
    for i in range(n):
        side = "LCA" if i % 2 == 0 else "RCA"
        frames, labels, meta = render_run(100 + i, side=side, size=size, n_frames=24)
        best = [k for k, c in enumerate(labels) if c.endswith("better")] or [len(labels) // 2]
        out.append((f"synthetic {side} {meta.get('view', '')}", frames[best[len(best) // 2]].astype(np.float32) / 255))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="bundle for the saliency pictures (skipped when not given)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--real", nargs="*", default=[], help="extra real DICOM folders or labels CSVs")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from inference.frames import flatfield, resize_square

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real = real_frames(args.real)
    synth = synthetic_frames()
    pairs = [(t, f) for t, _, f in real] + synth
    raw = [_tile(f, args.size, t) for t, f in pairs]
    norm = [_tile(flatfield(resize_square(f, 96)), args.size, t + " / flatfield 96 px") for t, f in pairs]
    cols = len(pairs)
    _grid(raw + norm, cols).save(out / "real-vs-synthetic.png")
    print(f"wrote {out / 'real-vs-synthetic.png'} ({len(real)} real, {len(synth)} synthetic frames)")
    if args.bundle and real:
        from training.selector.saliency import save_saliency

        rows = save_saliency(args.bundle, [f for _, f, _ in real], out / "saliency", size=args.size)
        for r in rows:
            print("saliency", Path(r["file"]).name, r.get("side"), r.get("confidence"), r.get("png", r.get("error")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
