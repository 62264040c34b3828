"""Selector data: labels.jsonl runs -> preprocessed frames, cached as numpy arrays.

Frames are read through ``inference.frames`` and turned into model input with
``inference.frames.preprocess`` — the very functions the node serves with — so there is no
train/serve skew.  The cache (``X`` float16 (N, C, S, S) model input; ``D`` float16 (N, S, S),
the same frames letterboxed and resized but not yet normalised, which training augments and
then finishes with ``inference.frames.finish_input``; labels, run ids, frame indices and the
per-frame mean/variance used for candidate sampling) is keyed by the preprocessing spec and
the content of labels.jsonl, and stored as ``.npy`` files (memory-mapped when read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from inference.frames import FrameError, finish_input, model_frame, open_run
from inference.types import CLASS_NAMES

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when inference.frames / preprocess change behaviour
CLASS_INDEX = {c: i for i, c in enumerate(CLASS_NAMES)}


def load_records(data_dir: str | os.PathLike) -> list[dict]:
    """The runs of a dataset folder (``labels.jsonl``, one JSON object per run)."""
    data_dir = Path(data_dir)
    lf = data_dir / "labels.jsonl"
    if not lf.is_file():
        raise FileNotFoundError(f"{lf} not found (create a dataset with `cag-node synth OUT --studies N`)")
    recs = []
    for ln, line in enumerate(lf.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        for k in ("file", "frame_labels"):
            if k not in r:
                raise ValueError(f"{lf}:{ln}: missing {k!r}")
        bad = [c for c in r["frame_labels"] if c not in CLASS_INDEX]
        if bad:
            raise ValueError(f"{lf}:{ln}: unknown frame labels {sorted(set(bad))}")
        r.setdefault("study_uid", r.get("sop_instance_uid", r["file"]))
        r.setdefault("laterality", _majority_side(r["frame_labels"]))
        recs.append(r)
    return recs


def _majority_side(labels: Sequence[str]) -> str:
    n_lca = sum(1 for c in labels if c.startswith("LCA"))
    return "LCA" if n_lca >= len(labels) - n_lca else "RCA"


def split_records(records: list[dict], val_frac: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split by study (so no run, and no study, is in both splits); deterministic per seed.

    Uses ``training.datasets.split_records`` when the synthetic/real-data area provides it.
    """
    try:  # the dataset area's splitter, if present
        from training.datasets import split_records as _shared  # type: ignore

        out = _shared(records, val_frac=val_frac, seed=seed)
        if isinstance(out, (tuple, list)) and len(out) == 2:
            return list(out[0]), list(out[1])
        if isinstance(out, dict) and "train" in out:
            return list(out["train"]), list(out.get("val") or out.get("test") or [])
    except Exception:
        pass
    studies = sorted({r["study_uid"] for r in records})
    rng = random.Random(seed)
    rng.shuffle(studies)
    # stratify by laterality mix so both splits see both sides
    n_val = max(1, int(round(len(studies) * val_frac))) if len(studies) > 1 else 0
    val_st = set(studies[:n_val])
    train = [r for r in records if r["study_uid"] not in val_st]
    val = [r for r in records if r["study_uid"] in val_st]
    return train, val


@dataclass
class FrameSet:
    """Preprocessed frames of a set of runs."""

    X: np.ndarray  # (N, C, S, S) float16, normalised model input
    y: np.ndarray  # (N,) int64 class index
    run: np.ndarray  # (N,) int32 index into records
    frame: np.ndarray  # (N,) int32 0-based frame index within its run
    mean: np.ndarray  # (N,) float64 per-frame mean (modality values), for candidates
    var: np.ndarray  # (N,) float64
    D: Optional[np.ndarray] = None  # (N, S, S) float16 display frames before finish_input (augmentation)
    records: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(len(self.y))

    def subset_runs(self, run_ids: Sequence[int]) -> "FrameSet":
        keep = np.isin(self.run, np.asarray(list(run_ids)))
        remap = {int(r): i for i, r in enumerate(sorted(set(int(r) for r in run_ids)))}
        new_run = np.array([remap[int(r)] for r in self.run[keep]], dtype=np.int32)
        recs = [self.records[r] for r in sorted(remap)]
        return FrameSet(np.asarray(self.X[keep]), self.y[keep], new_run, self.frame[keep], self.mean[keep],
                        self.var[keep], None if self.D is None else np.asarray(self.D[keep]), recs, list(self.errors))


def _spec_dict(spec: Any) -> dict:
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    return {k: spec.get(k, "none" if k == "normalize" else None)
            for k in ("input_size", "channels", "mean", "std", "normalize")}


def _cache_key(data_dir: Path, spec: dict) -> str:
    h = hashlib.sha256()
    h.update((data_dir / "labels.jsonl").read_bytes())
    h.update(json.dumps(spec, sort_keys=True).encode())
    h.update(str(CACHE_VERSION).encode())
    return h.hexdigest()[:16]


def build_frameset(data_dir: str | os.PathLike, spec: Any, cache_dir: Optional[str | os.PathLike] = None,
                   records: Optional[list[dict]] = None, progress: bool = False) -> FrameSet:
    """All labelled frames of ``data_dir`` preprocessed with ``spec``; cached under ``cache_dir``
    (default ``DATA_DIR/.cache``) and reused when labels.jsonl and the spec are unchanged."""
    data_dir = Path(data_dir)
    sd = _spec_dict(spec)
    recs = records if records is not None else load_records(data_dir)
    key = _cache_key(data_dir, sd)
    cdir = Path(cache_dir) if cache_dir else data_dir / ".cache"
    base = cdir / f"selector-{sd['input_size']}-{key}"
    meta_f = base.with_suffix(".json")
    if meta_f.is_file() and records is None:
        try:
            meta = json.loads(meta_f.read_text())
            arrs = {k: np.load(f"{base}.{k}.npy", mmap_mode="r" if k in ("X", "D") else None)
                    for k in ("X", "D", "y", "run", "frame", "mean", "var")}
            log.info("selector data: %d frames from cache %s", len(arrs["y"]), base)
            return FrameSet(records=recs, errors=meta.get("errors", []), **arrs)
        except Exception as exc:
            log.warning("selector cache %s unusable (%s); rebuilding", base, exc)

    size, ch = int(sd["input_size"]), int(sd["channels"] or 1)
    total = sum(len(r["frame_labels"]) for r in recs)
    X = np.zeros((total, ch, size, size), np.float16)
    D = np.zeros((total, size, size), np.float16)
    y = np.zeros(total, np.int64)
    run = np.zeros(total, np.int32)
    frame = np.zeros(total, np.int32)
    mean = np.zeros(total, np.float64)
    var = np.zeros(total, np.float64)
    errors: list[str] = []
    n = 0
    it = enumerate(recs)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(recs), desc="frames", unit="run")
    for ri, r in it:
        labels = r["frame_labels"]
        try:
            rn = open_run(data_dir / r["file"])
            k = 0
            for disp, st in rn.iter_frames_with_stats():
                if k >= len(labels):
                    break
                d = model_frame(disp, sd)  # exactly preprocess(), in its two steps
                D[n] = d
                X[n] = finish_input(d, sd)
                y[n] = CLASS_INDEX[labels[k]]
                run[n], frame[n], mean[n], var[n] = ri, st.index, st.mean, st.var
                n += 1
                k += 1
            if k != len(labels):
                errors.append(f"{r['file']}: {k} frames decoded, {len(labels)} labels")
        except FrameError as exc:
            errors.append(str(exc))
            log.warning("skipping run: %s", exc)
    arrs = dict(X=X[:n], D=D[:n], y=y[:n], run=run[:n], frame=frame[:n], mean=mean[:n], var=var[:n])
    if records is None:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            for k, v in arrs.items():
                np.save(f"{base}.{k}.npy", v)
            meta_f.write_text(json.dumps({"spec": sd, "frames": n, "runs": len(recs), "errors": errors}))
        except OSError as exc:
            log.warning("cannot write selector cache %s: %s", base, exc)
    return FrameSet(records=recs, errors=errors, **arrs)


def split_frameset(fs: FrameSet, val_frac: float = 0.2, seed: int = 0) -> tuple[FrameSet, FrameSet]:
    """Split a FrameSet by study (see :func:`split_records`)."""
    train_r, val_r = split_records(fs.records, val_frac=val_frac, seed=seed)
    pos = {r["file"]: i for i, r in enumerate(fs.records)}
    tr_ids = [pos[r["file"]] for r in train_r]
    va_ids = [pos[r["file"]] for r in val_r]
    return fs.subset_runs(tr_ids), fs.subset_runs(va_ids)
