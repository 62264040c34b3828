"""The node's SR sub-trees as highdicom-style templates that read back what :mod:`dicom_node.sr`
wrote: ``Template.from_sequence(content_items)``, then plain properties.

- :class:`ReportNarrative` — one language's draft ("AI draft report text", 99CAG CAG010):
  its language, statements and the findings / impression / recommendation sections;
- :class:`AnalysedRun` — one run of "Key Images" (99CAG CAG021): laterality, confidence and the
  key frames (frame number, class, score);
- :class:`LesionMeasurement` — one TID 1501-style Measurement Group of "Findings": the lesion's
  tracking name, finding, site, % stenosis, certainty and where it was seen;
- :class:`CagReport` — the whole document's content (``CagReport.from_dataset(sr)``).

The web pages, the demo and the tests read SRs through these, not by walking the tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import highdicom as hd
from highdicom.sr.templates import Template
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node import sr

_CONFIDENCE = re.compile(r"confidence (\d+(?:\.\d+)?)")
_KEY_FRAME = re.compile(r"(\d+) \(([^,]+), (\d+(?:\.\d+)?)\)")
SIDE_BY_CODE = {sr.ARTERIES[side].value: side for side in sr.ARTERIES}
SECTION_BY_CODE = {c.value: section for section, c in sr.SECTION_CODES.items()}


def _code(item, attr: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    seq = item.get(attr)
    if not seq:
        return "", ""
    return str(seq[0].get("CodeValue", "")), str(seq[0].get("CodeMeaning", ""))


def _children(item) -> list:
    return list(item.get("ContentSequence", None) or [])


def _image_ref(item) -> tuple[Optional[str], Optional[int]]:
    ref = item.get("ReferencedSOPSequence")
    if not ref:
        return None, None
    r = ref[0]
    fn = r.get("ReferencedFrameNumber")
    if isinstance(fn, (list, MultiValue)):
        fn = fn[0] if fn else None
    return str(r.ReferencedSOPInstanceUID), int(fn) if fn not in (None, "") else None


class _Container(Template):
    """A template whose content is one CONTAINER item named ``CONCEPT``."""

    CONCEPT: hd.sr.CodedConcept

    @classmethod
    def from_sequence(cls, sequence: Sequence[Dataset], is_root: bool = False):
        items = hd.sr.ContentSequence.from_sequence(list(sequence), is_root=is_root)
        if len(items) != 1 or items[0].ValueType != "CONTAINER" or _code(items[0])[0] != cls.CONCEPT.value:
            raise ValueError(f"not a {cls.__name__}: expected one CONTAINER {cls.CONCEPT.meaning!r}")
        return cls(list(items), is_root=is_root)

    @property
    def container(self):
        return self[0]

    def _texts(self, code: str) -> list[str]:
        return [str(it.TextValue) for it in _children(self.container)
                if it.get("ValueType") == "TEXT" and _code(it)[0] == code]


class ReportNarrative(_Container):
    CONCEPT = sr.NARRATIVE

    @property
    def language(self) -> str:
        for it in _children(self.container):
            if _code(it)[0] == sr.LANGUAGE_CODE.value:
                return _code(it, "ConceptCodeSequence")[0]
        return ""

    @property
    def statements(self) -> list[str]:
        """The draft statement (and a discrepancy note, when the languages disagree)."""
        return self._texts(sr.COMMENT.value)

    @property
    def sections(self) -> dict[str, str]:
        """``{findings|impression|recommendation: text}``, the sections present."""
        return {SECTION_BY_CODE[_code(it)[0]]: str(it.TextValue) for it in _children(self.container)
                if it.get("ValueType") == "TEXT" and _code(it)[0] in SECTION_BY_CODE}

    def by_meaning(self) -> dict[str, str]:
        """Every text of the narrative by its concept's meaning, statements joined (for printing)."""
        out: dict[str, str] = {}
        for it in _children(self.container):
            if it.get("ValueType") == "TEXT":
                name, text = _code(it)[1], str(it.TextValue)
                out[name] = out[name] + "\n    " + text if name in out and text not in out[name] else text
        return out


@dataclass(frozen=True)
class KeyFrameRef:
    sop_instance_uid: str
    frame_number: int
    label: str = ""
    score: Optional[float] = None


class AnalysedRun(_Container):
    CONCEPT = sr.RUN

    @property
    def description(self) -> str:
        texts = self._texts(sr.COMMENT.value)
        return texts[0] if texts else ""

    @property
    def laterality(self) -> str:
        for it in _children(self.container):
            if _code(it)[0] == sr.TARGET_REGION.value:
                code, meaning = _code(it, "ConceptCodeSequence")
                return SIDE_BY_CODE.get(code, meaning)
        return ""

    @property
    def confidence(self) -> Optional[float]:
        m = _CONFIDENCE.search(self.description)
        return float(m.group(1)) if m else None

    @property
    def sop_instance_uid(self) -> str:
        return next((uid for uid, _ in self._images() if uid), "")

    def _images(self) -> list[tuple[Optional[str], Optional[int]]]:
        return [_image_ref(it) for it in _children(self.container) if it.get("ValueType") == "IMAGE"]

    @property
    def key_frames(self) -> list[KeyFrameRef]:
        """The IMAGE items' frames, with class and score from the comment ("frame (label, score)")."""
        details = {int(a): (b, float(c)) for a, b, c in _KEY_FRAME.findall(self.description.split("key frames", 1)[-1])}
        return [KeyFrameRef(uid, fn, *details.get(fn, ("", None))) for uid, fn in self._images() if fn is not None]


class LesionMeasurement(Template):
    """One lesion: a Measurement Group (DCM 125007) of "Findings"."""

    @classmethod
    def from_sequence(cls, sequence: Sequence[Dataset], is_root: bool = False):
        items = hd.sr.ContentSequence.from_sequence(list(sequence), is_root=is_root)
        if len(items) != 1 or _code(items[0])[0] != sr.MEASUREMENT_GROUP.value:
            raise ValueError("not a LesionMeasurement: expected one Measurement Group")
        return cls(list(items), is_root=is_root)

    def _find(self, code: str, value_type: Optional[str] = None):
        return next((it for it in _children(self[0]) if _code(it)[0] == code
                     and (value_type is None or it.get("ValueType") == value_type)), None)

    def _num(self, code: str) -> Optional[float]:
        it = self._find(code, "NUM")
        return float(it.MeasuredValueSequence[0].NumericValue) if it is not None else None

    @property
    def name(self) -> str:
        it = self._find(sr.TRACKING_ID.value)
        return str(it.TextValue) if it is not None else ""

    @property
    def finding(self) -> str:
        it = self._find(sr.FINDING.value)
        return _code(it, "ConceptCodeSequence")[1] if it is not None else ""

    @property
    def site(self) -> str:
        it = self._find(sr.FINDING_SITE.value)
        return _code(it, "ConceptCodeSequence")[1] if it is not None else ""

    @property
    def stenosis_pct(self) -> Optional[float]:
        return self._num(sr.DIAMETER_STENOSIS.value)

    @property
    def confidence(self) -> Optional[float]:
        return self._num(sr.CERTAINTY.value)

    @property
    def comment(self) -> str:
        it = self._find(sr.COMMENT.value, "TEXT")
        return str(it.TextValue) if it is not None else ""

    @property
    def location(self) -> tuple[Optional[str], Optional[int], Optional[float], Optional[float]]:
        """(SOP Instance UID, frame number, x, y) of the "Center" point the stenosis is inferred from."""
        num = self._find(sr.DIAMETER_STENOSIS.value, "NUM")
        for sc in _children(num) if num is not None else []:
            if sc.get("ValueType") == "SCOORD" and _code(sc)[0] == sr.CENTER.value:
                x, y = (float(p) for p in list(sc.GraphicData)[:2])
                for img in _children(sc):
                    uid, fn = _image_ref(img)
                    if uid:
                        return uid, fn, x, y
                return None, None, x, y
        return None, None, None, None


class CagReport:
    """The content of one of the node's SRs, read back."""

    def __init__(self, items: Sequence[Dataset]):
        self.statements: list[str] = []
        self.narratives: list[ReportNarrative] = []
        self.runs: list[AnalysedRun] = []
        self.lesions: list[LesionMeasurement] = []
        self.not_analysed: list[str] = []
        for item in items:
            code, vt = _code(item)[0], item.get("ValueType")
            if vt == "TEXT" and code == sr.COMMENT.value:
                self.statements.append(str(item.TextValue))
            elif vt == "CONTAINER" and code == sr.NARRATIVE.value:
                self.narratives.append(ReportNarrative.from_sequence([item]))
            elif vt == "CONTAINER" and code == sr.ANALYSED_RUNS.value:
                self.runs += [AnalysedRun.from_sequence([r]) for r in _children(item) if _code(r)[0] == sr.RUN.value]
            elif vt == "CONTAINER" and code == sr.LESION_FINDINGS.value:
                self.lesions += [LesionMeasurement.from_sequence([g]) for g in _children(item)
                                 if _code(g)[0] == sr.MEASUREMENT_GROUP.value]
            elif vt == "CONTAINER" and code == sr.NOT_ANALYSED.value:
                self.not_analysed += [str(t.TextValue) for t in _children(item) if t.get("ValueType") == "TEXT"]

    @classmethod
    def from_dataset(cls, ds: Dataset) -> "CagReport":
        return cls(ds.get("ContentSequence", None) or [])

    def narrative(self, language: str) -> Optional[ReportNarrative]:
        return next((n for n in self.narratives if n.language == language), None)
