"""What the node produced for a study, read back from its own SR and KOS files.

The study page shows the report *as the SR says it* (not a re-run of the
model, not a cache): runs with laterality, confidence and key frames, the
lesions with where they were seen, and each language's narrative.  The files
live in ``<spool>/results/<study>/{SR,KO}_<uid>.dcm`` (``Spool.results_dir``);
the newest SR is the current one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pydicom

from dicom_node.sr_templates import CagReport, KeyFrameRef  # noqa: F401  (KeyFrameRef: the pages use it)

log = logging.getLogger(__name__)



@dataclass
class RunView:
    sop_instance_uid: str
    laterality: str
    confidence: Optional[float]
    key_frames: list[KeyFrameRef] = field(default_factory=list)
    description: str = ""


@dataclass
class LesionView:
    name: str
    site: str
    finding: str
    stenosis_pct: Optional[float]
    confidence: Optional[float]
    sop_instance_uid: Optional[str]
    frame_number: Optional[int]
    x: Optional[float]
    y: Optional[float]
    comment: str = ""


@dataclass
class Narrative:
    language: str
    statements: list[str] = field(default_factory=list)
    findings: str = ""
    impression: str = ""
    recommendation: str = ""


@dataclass
class ResultFile:
    kind: str  # SR | KO
    path: Path
    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    mtime: float


@dataclass
class StudyReport:
    sr: ResultFile
    completion: str = ""
    verification: str = ""
    statements: list[str] = field(default_factory=list)
    narratives: list[Narrative] = field(default_factory=list)
    runs: list[RunView] = field(default_factory=list)
    lesions: list[LesionView] = field(default_factory=list)
    not_analysed: list[str] = field(default_factory=list)


def result_files(results_dir: Path) -> list[ResultFile]:
    """The SR and KOS files of a study, newest first (headers only)."""
    out = []
    if not results_dir.is_dir():
        return out
    for p in results_dir.glob("*.dcm"):
        kind = p.name.split("_", 1)[0]
        if kind not in ("SR", "KO"):
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SeriesInstanceUID",
                                                                            "SOPClassUID"])
            out.append(ResultFile(kind, p, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID),
                                  p.stat().st_mtime))
        except Exception as exc:  # a result we cannot read is listed by nobody
            log.warning("cannot read result %s: %s", p.name, exc.__class__.__name__)
    out.sort(key=lambda r: -r.mtime)
    return out


def read_report(sr: ResultFile) -> StudyReport:
    """The SR's content, read back through the SR templates (``dicom_node.sr_templates``)."""
    ds = pydicom.dcmread(sr.path)
    doc = CagReport.from_dataset(ds)
    rep = StudyReport(sr=sr, completion=str(ds.get("CompletionFlag", "")),
                      verification=str(ds.get("VerificationFlag", "")), statements=list(doc.statements),
                      not_analysed=list(doc.not_analysed))
    for n in doc.narratives:
        rep.narratives.append(Narrative(language=n.language, statements=n.statements, **n.sections))
    for r in doc.runs:
        rep.runs.append(RunView(sop_instance_uid=r.sop_instance_uid, laterality=r.laterality,
                                confidence=r.confidence, key_frames=r.key_frames, description=r.description))
    for m in doc.lesions:
        uid, frame, x, y = m.location
        rep.lesions.append(LesionView(name=m.name, site=m.site, finding=m.finding, stenosis_pct=m.stenosis_pct,
                                      confidence=m.confidence, sop_instance_uid=uid, frame_number=frame, x=x, y=y,
                                      comment=m.comment))
    return rep
