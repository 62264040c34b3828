"""Tiny labelled XA runs for tests and smoke checks (not the synthetic angiogram generator).

A run is a grey noisy background with a vertical dark "vessel" on the left (LCA) or the right
(RCA) whose contrast rises and falls over the run like a contrast injection; frame labels
follow the contrast (``*_better`` at the peak, ``*_bad`` on the flanks, ``*_other`` before and
after).  Written as real multi-frame XA DICOM files plus ``labels.jsonl`` in the
``cag-node synth`` format, so the whole train / export / select path can be exercised in
seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"


def contrast_curve(n: int, peak: Optional[float] = None) -> np.ndarray:
    t = np.arange(n, dtype=np.float64)
    peak = (n - 1) / 2 if peak is None else peak
    return np.exp(-0.5 * ((t - peak) / max(1.0, n / 6)) ** 2)


def toy_frames(side: str, n: int = 12, size: int = 64, seed: int = 0, bits: int = 12) -> tuple[np.ndarray, list[str]]:
    """(frames uint16 (n, size, size), labels) for one run."""
    rng = np.random.default_rng(seed)
    c = contrast_curve(n, peak=(n - 1) / 2 + rng.uniform(-1, 1))
    maxv = 2**bits - 1
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    x0 = size * (0.28 if side == "LCA" else 0.72) + rng.uniform(-2, 2)
    curve = x0 + 0.08 * size * np.sin(yy / size * np.pi * rng.uniform(1, 2))
    vessel = np.exp(-0.5 * ((xx - curve) / (size * 0.035)) ** 2)
    frames = np.empty((n, size, size), np.uint16)
    labels = []
    for i in range(n):
        img = 0.65 + 0.03 * rng.standard_normal((size, size)) - (0.08 + 0.45 * c[i]) * vessel
        frames[i] = np.clip(img * maxv, 0, maxv).astype(np.uint16)
        kind = "better" if c[i] > 0.75 else ("bad" if c[i] > 0.3 else "other")
        labels.append(f"{side}_{kind}")
    return frames, labels


def write_run(path: str | os.PathLike, frames: np.ndarray, *, bits: int = 12, photometric: str = "MONOCHROME2",
              window: Optional[tuple[float, float]] = None, study_uid: Optional[str] = None,
              series_uid: Optional[str] = None, sop_uid: Optional[str] = None, shutter: Optional[dict] = None,
              transfer_syntax: Optional[str] = None, patient_id: str = "TOY") -> Path:
    """Write a multi-frame XA image (uncompressed unless ``transfer_syntax``) and return its path."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    n, rows, cols = frames.shape
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = XA_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = XA_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "XA"
    ds.PatientID = patient_id
    ds.PatientName = "TOY^RUN"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = n
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if shutter:
        for k, v in shutter.items():
            setattr(ds, k, v)
    dtype = np.uint8 if bits <= 8 else np.uint16
    ds.PixelData = frames.astype(dtype).tobytes()
    if transfer_syntax:
        ds.compress(transfer_syntax, frames.astype(dtype))
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


def write_toy_dataset(out_dir: str | os.PathLike, n_studies: int = 8, runs_per_study: int = 2, n_frames: int = 12,
                      size: int = 64, seed: int = 0) -> list[dict]:
    """A labelled dataset folder (DICOM + labels.jsonl); every study has LCA and RCA runs."""
    from pydicom.uid import generate_uid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    recs = []
    for s in range(n_studies):
        study = generate_uid(entropy_srcs=[f"toy-study-{seed}-{s}"])
        for r in range(runs_per_study):
            side = "LCA" if (r + s) % 2 == 0 else "RCA"
            frames, labels = toy_frames(side, n_frames, size, seed=int(rng.integers(1 << 31)))
            sop = generate_uid(entropy_srcs=[f"toy-run-{seed}-{s}-{r}"])
            rel = f"{s:03d}/{r:02d}.dcm"
            write_run(out / rel, frames, study_uid=study, sop_uid=sop, patient_id=f"TOY{s:03d}")
            recs.append({"file": rel, "study_uid": study, "sop_instance_uid": sop, "series_uid": "",
                         "patient_id": f"TOY{s:03d}", "laterality": side, "frame_labels": labels,
                         "findings": [], "report": {}})
    with open(out / "labels.jsonl", "w", encoding="utf-8") as fh:
        for r in recs:
            fh.write(json.dumps(r) + "\n")
    return recs


_TINY: dict[str, Path] = {}


def build_tiny_bundle(work: str | os.PathLike, size: int = 32, steps: int = 30, seed: int = 0) -> dict:
    """Toy dataset + a tiny convnext_atto trained a few steps + exported bundle (memoised per process).

    Returns {"data": DIR, "bundle": DIR, "checkpoint": PATH, "train": summary}.
    """
    key = f"{size}-{steps}-{seed}"
    if key in _TINY:
        return json.loads((_TINY[key] / "tiny.json").read_text())
    from training.selector.export import export_bundle
    from training.selector.train import TrainConfig, train

    work = Path(work)
    data = work / "data"
    write_toy_dataset(data, n_studies=8, runs_per_study=2, n_frames=12, size=64, seed=seed)
    out = work / "train"
    summary = train(TrainConfig(data=str(data), out=str(out), size=size, steps=steps, batch=16, lr=2e-3,
                                augment="light", ls_init=1.0, seed=seed, eval_every=steps, progress=False, val_frac=0.25))
    bundle = work / "bundle"
    export_bundle(out / "best.pt", bundle, data=str(data))
    info = {"data": str(data), "bundle": str(bundle), "checkpoint": str(out / "last.pt"),
            "best": str(out / "best.pt"), "train": summary}
    (work / "tiny.json").write_text(json.dumps(info, default=str))
    _TINY[key] = work
    return info
