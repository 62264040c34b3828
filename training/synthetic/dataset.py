"""Synthetic studies: several runs (LCA and RCA) of one synthetic patient, with a
study-level ground truth (lesions -> findings -> bilingual report -> treatment).

Determinism: everything about study ``index`` of a dataset with seed ``seed`` derives
from ``np.random.default_rng([seed, index, ...])`` and the UIDs from a hash of
(seed, index, run), dates are fixed: the same seed gives byte-identical DICOM files,
independent of how many studies are generated or of the number of workers.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .anatomy import child_rng, sample_anatomy
from .dicom_writer import COMPRESSIONS, det_uid, write_xa
from .lesions import sample_lesions
from .projection import CArm
from .render import LCA_VIEWS, RCA_VIEWS, json_params, render_frames, run_labels, sample_run_spec
from .reports import make_report, treatment

_BASE_DATE = np.datetime64("2025-01-06")


#: ``geometry`` of :func:`generate_study`
GEOMETRIES = ("typical", "broad")


def _pick_views(rng, views, k):
    w = np.array([v[2] for v in views], float)
    idx = rng.choice(len(views), size=min(k, len(views)), replace=False, p=w / w.sum())
    out = []
    for i in idx:
        p, s, _ = views[int(i)]
        out.append((p + rng.normal(0, 5), s + rng.normal(0, 4)))
    return out


def _broaden_views(rng, picked: list) -> list:
    """``geometry="broad"``: each run's projection, with probability 1/2, is replaced by a view drawn
    from both sides' typical views (plus AP, RAO 45, LAO 60), and every angle is jittered more
    (sd 10 / 8 degrees instead of 5 / 4).

    Why: real diagnostic runs are filmed at a continuum of angles (the 114 real right
    coronaries of docs/sim-to-real.md go from RAO 36 to LAO 47, caudal 17 to cranial 32), while
    the typical view lists differ per side, so a model trained on them can take the projection of
    the chest and heart for the side; 2/3 of real RAO right coronaries were called left.  With
    the sides sharing views, only the vessel tree tells them apart.  ``rng`` is a child generator:
    the study's other draws are unchanged."""
    pool = [(p, s) for p, s, _ in LCA_VIEWS + RCA_VIEWS] + [(0.0, 0.0), (-45.0, 0.0), (60.0, 0.0)]
    out = []
    for p, s in picked:
        if rng.random() < 0.5:
            p, s = pool[int(rng.integers(len(pool)))]
        out.append((float(np.clip(p + rng.normal(0, 10), -60, 70)), float(np.clip(s + rng.normal(0, 8), -40, 45))))
    return out


def study_sides(n_runs: int, rng) -> list[str]:
    n_rca = 1 if n_runs <= 3 else (1 if n_runs == 4 and rng.random() < 0.5 else 2)
    n_rca = min(n_rca, n_runs - 1) if n_runs > 1 else 0
    return ["LCA"] * (n_runs - n_rca) + ["RCA"] * n_rca


def generate_study(
    seed: "int | np.random.Generator",
    index: int = 0,
    *,
    size: int = 512,
    frames: int | tuple = (30, 45),
    runs_per_study: int | tuple = (4, 6),
    pattern: Optional[str] = None,
    with_pixels: bool = True,
    bits: int = 8,
    domain: str = "wide",
    targets: int = 0,
    geometry: str = "typical",
) -> dict:
    """One synthetic study in memory.

    Returns ``{"study": {...patient/study attrs, findings, report, treatment},
    "runs": [{"frames": uint8 (F,H,W), "labels": [...], "meta": {...}, "uids": {...}}]}``.
    ``frames``/``runs_per_study`` may be an int or an inclusive (lo, hi) range.
    ``pattern`` forces a disease pattern: normal | mild | 1v | 2v | 3v | lm.
    ``seed`` may be a numpy Generator (a seed is drawn from it).  ``bits``: 8 (uint8 frames)
    or 10/12 (uint16 frames, written as BitsStored 10/12 in 16).  ``domain``: "wide"
    (domain randomisation, default) or "narrow" (the original generator, byte for byte).
    ``targets``: per-pixel targets (vessel mask, AHA segment map, projected lesions) for up
    to that many key frames per run (:func:`targets.key_frames`), in ``run["targets"]`` (a
    list of :class:`targets.FrameTargets`); 0 = off (the default), and off without pixels.
    They draw nothing from the generators: the frames are the same either way.
    ``geometry``: "typical" (default: each side's usual projections, jittered 5/4 degrees, and
    the heart's axis within a few degrees) or "broad" (the sides share projections with wider
    jitter, :func:`_broaden_views`, and the heart is tilted and turned,
    :func:`anatomy.sample_anatomy` ``pose="broad"``)."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, not {geometry!r}")
    spread = geometry
    if isinstance(seed, np.random.Generator):
        seed = int(seed.integers(2**31))
    rng = np.random.default_rng([int(seed), int(index)])
    anatomy = sample_anatomy(rng, domain=domain, pose=geometry)
    lesions = sample_lesions(anatomy, rng, pattern=pattern)
    findings = [l.finding() for l in lesions]
    n_runs = runs_per_study if isinstance(runs_per_study, int) else int(rng.integers(runs_per_study[0], runs_per_study[1] + 1))
    sides = study_sides(n_runs, rng)
    views = {
        "LCA": _pick_views(rng, LCA_VIEWS, sides.count("LCA")),
        "RCA": _pick_views(rng, RCA_VIEWS, sides.count("RCA")),
    }
    if spread == "broad":
        vrng = child_rng(rng)
        views = {side: _broaden_views(vrng, v) for side, v in views.items()}
    age = int(rng.integers(45, 86))
    sex = "M" if rng.random() < 0.7 else "F"
    date = _BASE_DATE + np.timedelta64(int(index % 3000), "D")
    ds_date = str(date).replace("-", "")
    birth = str(date - np.timedelta64(int(age * 365.25 + rng.integers(0, 300)), "D")).replace("-", "")
    pid = f"SYN{int(seed) % 100000:05d}{int(index):05d}"
    study = {
        "seed": int(seed),
        "index": int(index),
        "study_uid": det_uid("cag-synth", seed, index, "study"),
        "patient_id": pid,
        "patient_name": f"SYNTH^PATIENT{int(index):05d}",
        "birth_date": birth,
        "sex": sex,
        "age": age,
        "weight": int(rng.integers(50, 95)),
        "height": round(float(rng.uniform(1.5, 1.85)), 2),
        "date": ds_date,
        "time": "090000",
        "study_id": f"{int(index) + 1}",
        "accession": f"SA{int(seed) % 10000:04d}{int(index):06d}",
        "dominance": anatomy.heart.dominance,
        "findings": findings,
        "report": make_report(findings),
        "treatment": treatment(findings),
        "lesions": [l.to_dict() for l in lesions],
        "domain": domain,
        "anatomy": json_params(anatomy),
    }
    if spread != "typical":
        study["geometry"] = spread
    runs = []
    counters = {"LCA": 0, "RCA": 0}
    for r, side in enumerate(sides):
        rrng = np.random.default_rng([int(seed), int(index), r + 1])
        view = views[side][counters[side] % max(1, len(views[side]))]
        counters[side] += 1
        nf = frames if isinstance(frames, int) else int(rrng.integers(frames[0], frames[1] + 1))
        spec = sample_run_spec(rrng, side, size=size, n_frames=nf, view=view, domain=domain)
        if with_pixels:
            px, labels, meta = render_frames(anatomy, lesions, spec, rrng, bits=bits)
        else:  # labels only (fast): same timing model, no pixels
            labels, fills, _ = run_labels(anatomy, lesions, spec)
            px, meta = None, {"fill": [round(x, 3) for x in fills], "view": spec.view, "spec": spec.to_dict(),
                              "anatomy": json_params(anatomy)}
        carm = CArm(spec.primary, spec.secondary, spec.sid, spec.sod, spec.fov_mm, size)
        t = 9 * 3600 + 5 * 60 + r * 95
        run = {
            "side": side,
            "run_index": r + 1,
            "series_number": r + 1,
            "series_uid": det_uid("cag-synth", seed, index, "series", r + 1),
            "sop_instance_uid": det_uid("cag-synth", seed, index, "sop", r + 1),
            "time": f"{t // 3600:02d}{t % 3600 // 60:02d}{t % 60:02d}",
            "view": spec.view,
            "primary": spec.primary,
            "secondary": spec.secondary,
            "frame_time_ms": spec.frame_time_ms,
            "heart_rate": spec.heart_rate,
            "kvp": spec.kvp,
            "ma": spec.ma,
            "exposure_ms": spec.exposure_ms,
            "fov_mm": spec.fov_mm,
            "sid": spec.sid,
            "sod": spec.sod,
            "collimation": spec.collimation,
            "intensity": spec.intensity,
            "contrast_ml": 8 if side == "LCA" else 6,
            "patient_orientation": carm.patient_orientation(),
            "pan": spec.pan if any(p != (0, 0) for p in spec.pan) else None,
            "bits": bits,
        }
        entry = {"frames": px, "labels": labels, "meta": meta, "run": run, "spec": spec}
        if targets and with_pixels:
            from .targets import key_frames, run_targets

            entry["targets"] = run_targets(anatomy, lesions, spec, key_frames(labels, meta["fill"], side, int(targets)))
        runs.append(entry)
    return {"study": study, "runs": runs}


def _record(study: dict, run: dict, rel: str, labels: list[str], meta: dict) -> dict:
    r = run["run"]
    side = r["side"]
    return {
        "file": rel,
        "study_uid": study["study_uid"],
        "sop_instance_uid": r["sop_instance_uid"],
        "series_uid": r["series_uid"],
        "patient_id": study["patient_id"],
        "laterality": side,
        "frame_labels": labels,
        "n_frames": len(labels),
        "findings": study["findings"],
        "report": study["report"],
        "treatment": study["treatment"],
        "run_findings": [f for f in study["findings"] if f["side"] == side],
        "view": r["view"],
        "primary_angle": round(float(r["primary"]), 1),
        "secondary_angle": round(float(r["secondary"]), 1),
        "frame_time_ms": r["frame_time_ms"],
        "bits_stored": r.get("bits", 8),
        "fill": meta["fill"],
        "quality": run["spec"].quality,
        "domain": study.get("domain", "wide"),
        "hardware": sorted(k for k in ("sternal_wires", "clips", "lead") if study["anatomy"]["hardware"].get(k)),
        "compression": r.get("compression", "none"),
        "jpeg_quality": r.get("jpeg_quality"),
        "dominance": study["dominance"],
        "study_index": study["index"],
        "run_index": r["run_index"],
        "seed": study["seed"],
        "synthetic": True,
    }


def run_compression(compression: str, seed: int, index: int, run_index: int, jpeg_quality=None) -> tuple[str, Optional[int]]:
    """Transfer syntax of one run: (compression, JPEG quality or None).  ``mixed``: none or
    jpeg at random (50/50); the JPEG quality is ``jpeg_quality`` or drawn from 70-95.  The
    draws come from their own generator of (seed, study, run): the pixels do not change."""
    if compression not in COMPRESSIONS + ("mixed",):
        raise ValueError(f"unknown compression {compression!r} ({'|'.join(COMPRESSIONS + ('mixed',))})")
    if compression not in ("jpeg", "mixed"):
        return compression, None
    crng = np.random.default_rng([int(seed), int(index), int(run_index), 0x4A504547])
    coin, q = crng.random(), int(crng.integers(70, 96))
    kind = "jpeg" if compression == "jpeg" or coin < 0.5 else "none"
    if kind == "none":
        return "none", None
    return "jpeg", int(jpeg_quality) if jpeg_quality is not None else q


def _write_study(args) -> tuple[list[dict], dict]:
    out_dir, seed, index, opts = args
    compression = opts.pop("compression", "none")
    jpeg_quality = opts.pop("jpeg_quality", None)
    if compression in ("jpeg", "mixed") and opts.get("bits", 8) != 8:
        raise ValueError(f"compression={compression!r} (JPEG baseline) needs bits=8, not {opts.get('bits')}")
    st = generate_study(seed, index, **opts)
    study = st["study"]
    recs = []
    for run in st["runs"]:
        rel = f"study_{index:05d}/run_{run['run']['run_index']:02d}.dcm"
        comp, q = run_compression(compression, seed, index, run["run"]["run_index"], jpeg_quality)
        run["run"]["compression"] = comp
        run["run"]["jpeg_quality"] = q
        write_xa(Path(out_dir) / rel, run["frames"], study, run["run"], compression=comp, jpeg_quality=q or 90)
        rec = _record(study, run, rel, run["labels"], run["meta"])
        if "targets" in run:  # per-pixel targets of the key frames, next to the run's DICOM
            from .targets import save_targets, targets_path, targets_record

            trel = targets_path(rel)
            if run["targets"]:
                save_targets(Path(out_dir) / trel, run["targets"])
            rec["targets"] = targets_record(trel, run["targets"])
        recs.append(rec)
    srec = {
        "study_uid": study["study_uid"],
        "patient_id": study["patient_id"],
        "findings": study["findings"],
        "report": study["report"],
        "treatment": study["treatment"],
        "dominance": study["dominance"],
        "files": [r["file"] for r in recs],
        "lateralities": [r["laterality"] for r in recs],
        "study_index": index,
        "seed": seed,
    }
    return recs, srec


def generate_dataset(
    out_dir: str | os.PathLike,
    n_studies: int,
    seed: int = 0,
    *,
    workers: int = 1,
    progress: bool = True,
    start: int = 0,
    **opts,
) -> list[dict]:
    """Write ``n_studies`` synthetic studies under ``out_dir`` (DICOM XA multi-frame, one
    series per run) plus ``labels.jsonl`` (one record per run) and ``studies.jsonl`` (one
    per study).  Options: size, frames, runs_per_study, pattern, bits (8|10|12), compression
    (none|rle|jpegls lossless, jpeg = JPEG baseline lossy, mixed = none or jpeg per run),
    jpeg_quality (int; default: drawn from 70-95 per run), domain (wide|narrow), targets
    (int, default 0 = off: per-pixel targets of up to that many key frames per run in
    ``study_XXXXX/run_YY_targets.npz`` and a ``targets`` entry in the run's record, see
    :mod:`training.synthetic.targets`).  Returns the records written to labels.jsonl."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), int(seed), i, dict(opts)) for i in range(start, start + n_studies)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_studies, unit="study", desc="synth")
    records: list[dict] = []
    studies: list[dict] = []

    def _collect(res_iter: Iterable):
        for recs, srec in res_iter:
            records.extend(recs)
            studies.append(srec)
            if bar is not None:
                bar.update(1)

    if workers and workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            _collect(ex.map(_write_study, jobs))
    else:
        _collect(map(_write_study, jobs))
    if bar is not None:
        bar.close()
    with open(out / "labels.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(out / "studies.jsonl", "w", encoding="utf-8") as fh:
        for s in studies:
            fh.write(json.dumps(s, ensure_ascii=False) + "\n")
    return records


def load_records(path: str | os.PathLike) -> list[dict]:
    """Read a labels.jsonl (or a directory containing one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "labels.jsonl"
    with open(p, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
