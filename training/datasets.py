"""Datasets for training: a builder for REAL (hospital) data and the train/val/test split.

Real data comes as
- a folder of DICOM runs (multi-frame XA, any layout, any file names),
- a CSV of frame labels with a header row ``file,frame,label`` (``file``: path relative to
  the folder, a bare file name, or the SOPInstanceUID; ``frame``: 1-based frame number;
  ``label``: one of ``inference.types.CLASS_NAMES``, e.g. ``LCA_better``; ``others`` and
  lower case are accepted),
- optionally a JSONL of reports, one line per study: ``{"study_uid": ...,
  "report": {"en": {findings, impression, recommendation}, "ja": {...}},
  "findings": [{vessel, segment, severity, side}], "treatment": "PCI"}``.

:func:`build_records` turns them into the same records as the synthetic ``labels.jsonl``
(one per run; frames without a label are ``None`` in ``frame_labels``), so the selector
and VLM trainers read hospital data and synthetic data alike.
:func:`split_records` splits by patient (then study, then run): no patient, study or run
is ever in two splits; deterministic for a seed.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from inference.types import CLASS_NAMES, LANGUAGES, SECTIONS

log = logging.getLogger(__name__)

__all__ = ["build_records", "split_records", "write_jsonl", "read_jsonl", "normalise_label", "scan_dicom_dir"]


def normalise_label(text: str) -> str:
    """'lca_better' / 'LCA-others' / 'RCA bad' -> canonical class name; ValueError otherwise."""
    t = str(text).strip().replace("-", "_").replace(" ", "_")
    side, _, q = t.partition("_")
    side = side.upper()
    q = q.lower()
    if q == "others":
        q = "other"
    name = f"{side}_{q}"
    if name not in CLASS_NAMES:
        raise ValueError(f"unknown frame label {text!r} (expected one of {', '.join(CLASS_NAMES)})")
    return name


def scan_dicom_dir(root: str | os.PathLike) -> dict[str, dict]:
    """Header summary of every DICOM file under ``root``: relative path -> attributes."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    root = Path(root)
    out: dict[str, dict] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() in (".csv", ".jsonl", ".json", ".txt", ".md", ".png", ".jpg"):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            log.debug("not DICOM: %s (%s)", p, exc)
            continue
        if "SOPInstanceUID" not in ds:
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = {
            "file": rel,
            "sop_instance_uid": str(ds.SOPInstanceUID),
            "study_uid": str(ds.get("StudyInstanceUID", "")),
            "series_uid": str(ds.get("SeriesInstanceUID", "")),
            "patient_id": str(ds.get("PatientID", "")),
            "n_frames": int(ds.get("NumberOfFrames", 1) or 1),
            "sop_class_uid": str(ds.get("SOPClassUID", "")),
            "primary_angle": _float(ds.get("PositionerPrimaryAngle")),
            "secondary_angle": _float(ds.get("PositionerSecondaryAngle")),
            "frame_time_ms": _float(ds.get("FrameTime")),
        }
    return out


def _float(v) -> Optional[float]:
    try:
        return None if v is None or v == "" else round(float(v), 2)
    except (TypeError, ValueError):
        return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _check_report(rep: dict, where: str) -> dict:
    out = {}
    for lang in LANGUAGES:
        if lang not in rep:
            continue
        sec = rep[lang]
        if isinstance(sec, str):
            sec = {"findings": sec}
        out[lang] = {k: str(sec.get(k, "") or "") for k in SECTIONS}
    if not out:
        raise ValueError(f"{where}: report has none of the languages {LANGUAGES}")
    return out


def _load_reports(path) -> dict[str, dict]:
    from training.synthetic.reports import treatment as rule_treatment

    reports: dict[str, dict] = {}
    for i, obj in enumerate(read_jsonl(path), 1):
        uid = obj.get("study_uid") or obj.get("StudyInstanceUID")
        if not uid:
            raise ValueError(f"{path}:{i}: no study_uid")
        rep = obj.get("report") or {k: obj[k] for k in LANGUAGES if k in obj}
        findings = list(obj.get("findings") or [])
        entry = {"report": _check_report(rep, f"{path}:{i}"), "findings": findings}
        if obj.get("treatment"):
            entry["treatment"] = obj["treatment"]
        elif "findings" in obj:  # structured findings given: the same rules as the synthetic data
            entry["treatment"] = rule_treatment(findings)
        reports[str(uid)] = entry
    return reports


def build_records(
    dicom_dir: str | os.PathLike,
    labels_csv: str | os.PathLike,
    reports_jsonl: str | os.PathLike | None = None,
    *,
    strict: bool = True,
    frame_base: int = 1,
) -> list[dict]:
    """Records like the synthetic labels.jsonl for a folder of real runs.

    ``strict``: an unknown file in the CSV, a frame out of range or a study without a
    report (when ``reports_jsonl`` is given) raises ValueError; otherwise it is skipped
    with a warning.  Runs with no labelled frame are left out.  ``laterality`` is the side
    most of the run's labelled frames carry."""
    root = Path(dicom_dir)
    headers = scan_dicom_dir(root)
    by_name: dict[str, list[str]] = defaultdict(list)
    by_uid: dict[str, str] = {}
    for rel, h in headers.items():
        by_name[Path(rel).name].append(rel)
        by_uid[h["sop_instance_uid"]] = rel
    reports = _load_reports(reports_jsonl) if reports_jsonl else {}

    def problem(msg: str) -> None:
        if strict:
            raise ValueError(msg)
        log.warning("%s (skipped)", msg)

    labels: dict[str, dict[int, str]] = defaultdict(dict)
    with open(labels_csv, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = {"file", "frame", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{labels_csv}: missing column(s) {sorted(missing)} (need file,frame,label)")
        for line, row in enumerate(reader, 2):
            key = (row["file"] or "").strip()
            rel = key if key in headers else by_uid.get(key)
            if rel is None and len(by_name.get(Path(key).name, [])) == 1:
                rel = by_name[Path(key).name][0]
            if rel is None:
                problem(f"{labels_csv}:{line}: no DICOM file matches {key!r}")
                continue
            try:
                frame = int(row["frame"]) - frame_base
                label = normalise_label(row["label"])
            except ValueError as exc:
                raise ValueError(f"{labels_csv}:{line}: {exc}") from None
            if not 0 <= frame < headers[rel]["n_frames"]:
                problem(f"{labels_csv}:{line}: frame {row['frame']} out of range for {rel} ({headers[rel]['n_frames']} frames)")
                continue
            labels[rel][frame] = label

    records = []
    for rel in sorted(labels):
        h = headers[rel]
        fl: list[Optional[str]] = [None] * h["n_frames"]
        for i, lab in labels[rel].items():
            fl[i] = lab
        sides = Counter(lab.split("_")[0] for lab in fl if lab)
        laterality = sorted(sides.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        rep = reports.get(h["study_uid"])
        if reports_jsonl and rep is None:
            problem(f"no report for study {h['study_uid']} ({rel})")
            if strict:
                continue
        findings = rep["findings"] if rep else []
        rec = {
            "file": rel,
            "study_uid": h["study_uid"],
            "sop_instance_uid": h["sop_instance_uid"],
            "series_uid": h["series_uid"],
            "patient_id": h["patient_id"],
            "laterality": laterality,
            "frame_labels": fl,
            "n_frames": h["n_frames"],
            "labelled_frames": sum(lab is not None for lab in fl),
            "findings": findings,
            "report": rep["report"] if rep else None,
            "treatment": rep.get("treatment") if rep else None,
            "run_findings": [f for f in findings if f.get("side") == laterality],
            "primary_angle": h["primary_angle"],
            "secondary_angle": h["secondary_angle"],
            "frame_time_ms": h["frame_time_ms"],
            "synthetic": False,
        }
        if sides and len(sides) > 1:
            log.warning("%s: frames labelled with both sides %s; laterality=%s", rel, dict(sides), laterality)
        records.append(rec)
    return records


def _groups(records: Sequence[dict]) -> list[list[int]]:
    """Connected groups of records sharing a patient, a study or a run (union-find)."""
    parent = list(range(len(records)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for i, r in enumerate(records):
        keys = []
        for field in ("patient_id", "study_uid", "sop_instance_uid", "file"):
            v = r.get(field)
            if v not in (None, ""):
                keys.append((field, str(v)))
        for k in keys:
            if k in first:
                a, b = find(i), find(first[k])
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[k] = i
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(records)):
        groups[find(i)].append(i)
    return list(groups.values())


def split_records(
    records: Sequence[dict],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    val_frac: float | None = None,
) -> tuple[list[dict], ...]:
    """Split run records into len(fractions) parts (e.g. train, val, test) by patient:
    all runs of a patient (and of a study, and every record of a run) land in the same
    part.  Deterministic for a seed and independent of the input order.  Parts are
    filled to their share of runs; every part with a positive fraction gets at least one
    group when there are enough groups.  ``val_frac=f`` is shorthand for
    ``fractions=(1 - f, f)`` (a (train, val) pair)."""
    if val_frac is not None:
        fractions = (1.0 - float(val_frac), float(val_frac))
    fr = np.asarray(fractions, float)
    if fr.ndim != 1 or len(fr) < 1 or (fr < 0).any() or fr.sum() <= 0:
        raise ValueError(f"bad fractions {fractions!r}")
    fr = fr / fr.sum()
    groups = _groups(records)

    def gkey(g):
        return min(
            (str(records[i].get("patient_id") or ""), str(records[i].get("study_uid") or ""), str(records[i].get("sop_instance_uid") or records[i].get("file") or ""))
            for i in g
        )

    groups.sort(key=gkey)
    order = np.random.default_rng(seed).permutation(len(groups))
    groups = [groups[i] for i in order]
    total = len(records)
    target = fr * total
    counts = np.zeros(len(fr))
    assign: list[list[int]] = [[] for _ in fr]
    # every positive part first gets one group (if possible), then the largest deficit wins
    positive = [k for k in range(len(fr)) if fr[k] > 0]
    gi = 0
    if len(groups) >= len(positive):
        for k in sorted(positive, key=lambda k: fr[k]):
            assign[k].append(gi)
            counts[k] += len(groups[gi])
            gi += 1
    for j in range(gi, len(groups)):
        deficit = np.where(fr > 0, (target - counts) / np.maximum(target, 1e-9), -np.inf)
        k = int(np.argmax(deficit))
        assign[k].append(j)
        counts[k] += len(groups[j])
    out = []
    for k in range(len(fr)):
        idx = sorted(i for j in assign[k] for i in groups[j])
        out.append([records[i] for i in idx])
    return tuple(out)
