"""What the node produced for a study, read back from its own SR and KOS files.

The study page shows the report *as the SR says it* (not a re-run of the
model, not a cache): runs with laterality, confidence and key frames, the
lesions with where they were seen, and each language's narrative.  The files
live in ``<spool>/results/<study>/{SR,KO}_<uid>.dcm`` (``Spool.results_dir``);
the newest SR is the current one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pydicom

log = logging.getLogger(__name__)

_CONF = re.compile(r"confidence (\d+(?:\.\d+)?)")
_KF = re.compile(r"(\d+) \(([^,]+), (\d+(?:\.\d+)?)\)")
SIDE_BY_CODE = {"50018008": "LCA", "13647002": "RCA"}
SECTION_BY_CODE = {"59776-5": "findings", "19005-8": "impression", "18783-1": "recommendation"}


@dataclass
class KeyFrameRef:
    sop_instance_uid: str
    frame_number: int
    label: str = ""
    score: Optional[float] = None


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


def _code(item, attr="ConceptNameCodeSequence") -> tuple[str, str]:
    seq = item.get(attr)
    if not seq:
        return "", ""
    return str(seq[0].get("CodeValue", "")), str(seq[0].get("CodeMeaning", ""))


def _image_ref(item) -> tuple[Optional[str], Optional[int]]:
    ref = item.get("ReferencedSOPSequence")
    if not ref:
        return None, None
    r = ref[0]
    fn = r.get("ReferencedFrameNumber")
    if isinstance(fn, (list, pydicom.multival.MultiValue)):
        fn = fn[0] if fn else None
    return str(r.ReferencedSOPInstanceUID), int(fn) if fn not in (None, "") else None


def read_report(sr: ResultFile) -> StudyReport:
    ds = pydicom.dcmread(sr.path)
    rep = StudyReport(sr=sr, completion=str(ds.get("CompletionFlag", "")),
                      verification=str(ds.get("VerificationFlag", "")))
    for item in ds.get("ContentSequence", []):
        code, meaning = _code(item)
        vt = item.get("ValueType")
        if vt == "TEXT" and code == "121106":
            rep.statements.append(str(item.TextValue))
        elif vt == "CONTAINER" and code == "CAG010":
            rep.narratives.append(_narrative(item))
        elif vt == "CONTAINER" and code == "121180":
            rep.runs.extend(_run(r) for r in item.get("ContentSequence", []) if _code(r)[0] == "CAG021")
        elif vt == "CONTAINER" and code == "121070":
            rep.lesions.extend(_lesion(g) for g in item.get("ContentSequence", []) if _code(g)[0] == "125007")
        elif vt == "CONTAINER" and code == "CAG030":
            rep.not_analysed.extend(str(t.TextValue) for t in item.get("ContentSequence", [])
                                    if t.get("ValueType") == "TEXT")
    return rep


def _narrative(c) -> Narrative:
    n = Narrative(language="")
    for it in c.get("ContentSequence", []):
        code, _ = _code(it)
        if code == "121049":
            n.language = _code(it, "ConceptCodeSequence")[0]
        elif it.get("ValueType") == "TEXT" and code == "121106":
            n.statements.append(str(it.TextValue))
        elif it.get("ValueType") == "TEXT" and code in SECTION_BY_CODE:
            setattr(n, SECTION_BY_CODE[code], str(it.TextValue))
    return n


def _run(c) -> RunView:
    side, desc, frames, sop = "", "", [], ""
    for it in c.get("ContentSequence", []):
        code, _ = _code(it)
        if code == "123014":
            side = SIDE_BY_CODE.get(_code(it, "ConceptCodeSequence")[0], _code(it, "ConceptCodeSequence")[1])
        elif it.get("ValueType") == "TEXT":
            desc = str(it.TextValue)
        elif it.get("ValueType") == "IMAGE":
            uid, fn = _image_ref(it)
            sop = uid or sop
            if fn is not None:
                frames.append(KeyFrameRef(uid, fn))
    m = _CONF.search(desc)
    # the comment lists "frame (label, score)" per key frame, in the same order
    tail = desc.split("key frames", 1)[-1]
    details = {int(a): (b, float(c)) for a, b, c in _KF.findall(tail)}
    for k in frames:
        if k.frame_number in details:
            k.label, k.score = details[k.frame_number]
    return RunView(sop_instance_uid=sop, laterality=side, confidence=float(m.group(1)) if m else None,
                   key_frames=frames, description=desc)


def _lesion(g) -> LesionView:
    v = LesionView(name="", site="", finding="", stenosis_pct=None, confidence=None, sop_instance_uid=None,
                   frame_number=None, x=None, y=None)
    for it in g.get("ContentSequence", []):
        code, _ = _code(it)
        vt = it.get("ValueType")
        if code == "112039":
            v.name = str(it.TextValue)
        elif code == "121071":
            v.finding = _code(it, "ConceptCodeSequence")[1]
        elif code == "363698007":
            v.site = _code(it, "ConceptCodeSequence")[1]
        elif code == "111012" and vt == "NUM":
            v.confidence = float(it.MeasuredValueSequence[0].NumericValue)
        elif code == "408715008" and vt == "NUM":
            v.stenosis_pct = float(it.MeasuredValueSequence[0].NumericValue)
            for sc in it.get("ContentSequence", []):
                if sc.get("ValueType") == "SCOORD" and _code(sc)[0] == "111010":
                    pts = [float(p) for p in sc.GraphicData]
                    v.x, v.y = pts[0], pts[1]
                    for img in sc.get("ContentSequence", []):
                        uid, fn = _image_ref(img)
                        if uid:
                            v.sop_instance_uid, v.frame_number = uid, fn
        elif code == "121106" and vt == "TEXT":
            v.comment = str(it.TextValue)
    return v
