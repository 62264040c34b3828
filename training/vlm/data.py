"""VLM training data: key frames + reference reports, per study.

Two sources, both normalised to :class:`StudyExample`:

* synthetic ``labels.jsonl`` (one record per run: ``file``, ``study_uid``, ``patient_id``,
  ``laterality``, ``frame_labels``, ``findings``, ``report``): the key-frame candidates of a
  run are its ``<side>_better`` frames;
* a hospital JSONL (one record per study)::

    {"study_uid": "...", "patient_id": "...",
     "images": [{"file": "run1.dcm", "frame": 12, "side": "LCA"}, {"file": "k.png", "side": "RCA"}],
     "report": {"en": {"findings": ..., "impression": ..., "recommendation": ...}, "ja": {...}},
     "findings": [{"side": "LCA", "vessel": "LAD", "segment": 6, "severity": 90}],   # optional
     "split": "train"}                                                                 # optional

  DICOM paths are read with ``inference.frames`` (exactly as the node reads them), other
  image files with Pillow.

Splits are by patient (else study), so no patient's runs fall in two splits.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from inference.types import LANGUAGES, SIDES
from inference.keyimages import select_images

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class FrameRef:
    path: str
    frame: int = 1  # 1-based; ignored for plain image files


@dataclass
class StudyExample:
    study_uid: str
    patient_id: str
    runs: dict[str, list[list[FrameRef]]]  # side -> runs -> candidate key frames (best/central first)
    report: dict[str, dict]  # language -> {findings, impression, recommendation}
    findings: list[dict] = field(default_factory=list)
    split: Optional[str] = None
    treatment: Optional[str] = None  # CABG | PCI | medical (structured truth, when known)

    def images_by_side(self, rng: Optional[random.Random] = None) -> dict[str, list[FrameRef]]:
        """One key frame per run (the first candidate, or a random one with ``rng``)."""
        out: dict[str, list[FrameRef]] = {}
        for side, runs in self.runs.items():
            for cands in runs:
                if cands:
                    out.setdefault(side, []).append(rng.choice(cands) if rng else cands[0])
        return out

    def frames(self, max_images: int, rng: Optional[random.Random] = None) -> tuple[list[FrameRef], list[str]]:
        """The frames the model sees (the serving policy's ``inference.keyimages.select_images``)."""
        return select_images(self.images_by_side(rng), max_images)


def read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def _central_first(idx: list[int]) -> list[int]:
    """Order frame numbers by distance from the middle of the run of candidates."""
    if not idx:
        return idx
    mid = idx[len(idx) // 2]
    return sorted(idx, key=lambda i: (abs(i - mid), i))


def _runs_from_labels(records: list[dict], root: Path, max_candidates: int = 4) -> list[StudyExample]:
    studies: dict[str, StudyExample] = {}
    for r in records:
        side = r.get("laterality")
        if side not in SIDES:
            continue
        better = [i + 1 for i, lab in enumerate(r.get("frame_labels") or []) if lab == f"{side}_better"]
        if not better:
            continue
        refs = [FrameRef(str(root / r["file"]), f) for f in _central_first(better)[:max_candidates]]
        uid = r.get("study_uid") or r["file"]
        ex = studies.get(uid)
        if ex is None:
            ex = studies[uid] = StudyExample(
                study_uid=uid, patient_id=str(r.get("patient_id") or uid), runs={},
                report=r.get("report") or {}, findings=list(r.get("findings") or []), split=r.get("split"),
                treatment=r.get("treatment"))
        ex.runs.setdefault(side, []).append(refs)
    return list(studies.values())


def _studies_from_hospital(records: list[dict], root: Path) -> list[StudyExample]:
    out = []
    for r in records:
        runs: dict[str, list[list[FrameRef]]] = {}
        for im in r.get("images") or []:
            p = Path(im["file"])
            p = p if p.is_absolute() else root / p
            side = im.get("side") or im.get("laterality") or "LCA"
            runs.setdefault(side, []).append([FrameRef(str(p), int(im.get("frame", 1)))])
        uid = r.get("study_uid") or f"study-{len(out)}"
        out.append(StudyExample(study_uid=uid, patient_id=str(r.get("patient_id") or uid), runs=runs,
                                report=r.get("report") or {}, findings=list(r.get("findings") or []),
                                split=r.get("split"), treatment=r.get("treatment")))
    return out


def load_examples(data: str | Path) -> list[StudyExample]:
    """Studies from a dataset directory (``labels.jsonl``) or a JSONL file (either format)."""
    data = Path(data)
    path = data / "labels.jsonl" if data.is_dir() else data
    if not path.is_file():
        raise FileNotFoundError(f"no labels.jsonl / JSONL at {data}")
    records = read_jsonl(path)
    root = path.parent
    if records and "frame_labels" in records[0]:
        studies = _runs_from_labels(records, root)
    else:
        studies = _studies_from_hospital(records, root)
    studies = [s for s in studies if s.runs and all(l in s.report for l in LANGUAGES[:1])]
    studies.sort(key=lambda s: s.study_uid)
    return studies


def _bucket(key: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_examples(studies: list[StudyExample], val_frac: float = 0.2, test_frac: float = 0.0,
                   seed: int = 0) -> dict[str, list[StudyExample]]:
    """Patient-level split (an explicit ``split`` on a record wins)."""
    out: dict[str, list[StudyExample]] = {"train": [], "val": [], "test": []}
    for s in studies:
        if s.split in out:
            out[s.split].append(s)
            continue
        b = _bucket(s.patient_id, seed)
        out["test" if b < test_frac else "val" if b < test_frac + val_frac else "train"].append(s)
    return out


class FrameCache:
    """Loads frames (DICOM via inference.frames, or image files) once, keeps them small."""

    def __init__(self, size: Optional[int] = None):
        self.size = size
        self._cache: dict[FrameRef, np.ndarray] = {}

    def _small(self, a: np.ndarray) -> np.ndarray:
        if self.size and max(a.shape) > 2 * self.size:
            from PIL import Image

            # Keep twice the model resolution: the processor does the final resize.
            img = Image.fromarray(a.astype(np.float32), mode="F").resize((2 * self.size, 2 * self.size),
                                                                         Image.BILINEAR)
            a = np.asarray(img, dtype=np.float32)
        return a

    def __call__(self, ref: FrameRef) -> np.ndarray:
        a = self._cache.get(ref)
        if a is None:
            a = self._cache[ref] = self._small(load_frame(ref))
        return a

    def preload(self, refs) -> None:
        """Decode many frames at once: each DICOM run is opened once for all its frames."""
        by_path: dict[str, set[int]] = {}
        for r in refs:
            if r not in self._cache:
                by_path.setdefault(r.path, set()).add(r.frame)
        for path, frames in by_path.items():
            if Path(path).suffix.lower() in IMAGE_SUFFIXES:
                for f in frames:
                    self(FrameRef(path, f))
                continue
            from inference.frames import open_run

            order = sorted(frames)
            run = open_run(path)
            for f, a in zip(order, run.iter_frames([f - 1 for f in order])):
                self._cache[FrameRef(path, f)] = self._small(np.asarray(a, dtype=np.float32))


def load_frame(ref: FrameRef) -> np.ndarray:
    p = Path(ref.path)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(p) as im:
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    from inference.frames import read_frame

    return np.asarray(read_frame(p, ref.frame), dtype=np.float32)


def report_corpus(studies: list[StudyExample]) -> list[str]:
    """All reference report texts (EN + JA), formatted as the model writes them."""
    from inference.vlm.base import format_report

    out = []
    for s in studies:
        for lang, sec in s.report.items():
            if lang in LANGUAGES:
                out.append(format_report(sec, lang))
    return out
