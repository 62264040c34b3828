"""Result types that cross the boundary from ``inference`` to its callers.

Plain dataclasses (JSON-friendly through ``to_dict``) so that the node, the CLI
and the training module's evaluation all speak the same shapes, and so that the
SR builder can be tested with results constructed by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

#: The selector's six classes, in the order of the model's output logits.
CLASS_NAMES: tuple[str, ...] = (
    "LCA_better",
    "LCA_bad",
    "LCA_other",
    "RCA_better",
    "RCA_bad",
    "RCA_other",
)
SIDES: tuple[str, ...] = ("LCA", "RCA")
LANGUAGES: tuple[str, ...] = ("en", "ja")
SECTIONS: tuple[str, ...] = ("findings", "impression", "recommendation")

Laterality = Literal["LCA", "RCA"]


@dataclass
class KeyFrame:
    """One key frame of a run: 1-based frame number, its class and score (P(side_better))."""

    frame_number: int
    label: str
    score: float

    def __post_init__(self) -> None:
        if self.frame_number < 1:
            raise ValueError(f"KeyFrame.frame_number must be 1-based, got {self.frame_number}")


@dataclass
class RunSelection:
    """The selector's answer for one run (one multi-frame instance)."""

    file: str
    sop_instance_uid: str
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    n_frames: int = 0
    laterality: Optional[Laterality] = None
    confidence: float = 0.0
    key_frames: list[KeyFrame] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)  # 1-based frame numbers
    error: Optional[str] = None  # set when the run could not be analysed (e.g. undecodable)

    @property
    def ok(self) -> bool:
        return self.error is None and self.laterality is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        # The CLI contract: key_frames are 1-based frame numbers, best first.
        d["key_frames"] = [k.frame_number for k in self.key_frames]
        d["key_frame_details"] = [asdict(k) for k in self.key_frames]
        return d


#: AHA segment -> (side, territory vessel, English name, Japanese name).  Segments 1-15 of the
#: AHA classification (Austen 1975) as used in Japanese cath-lab reports; the lesion model, the
#: templated report and the SR's finding sites all use this table.
SEGMENTS: dict[int, tuple[str, str, str, str]] = {
    1: ("RCA", "RCA", "proximal RCA", "RCA近位部"),
    2: ("RCA", "RCA", "mid RCA", "RCA中間部"),
    3: ("RCA", "RCA", "distal RCA", "RCA遠位部"),
    4: ("RCA", "RCA", "posterior descending artery", "後下行枝"),
    5: ("LCA", "LM", "left main", "左主幹部"),
    6: ("LCA", "LAD", "proximal LAD", "LAD近位部"),
    7: ("LCA", "LAD", "mid LAD", "LAD中間部"),
    8: ("LCA", "LAD", "distal LAD", "LAD遠位部"),
    9: ("LCA", "LAD", "first diagonal branch", "第1対角枝"),
    10: ("LCA", "LAD", "second diagonal branch", "第2対角枝"),
    11: ("LCA", "LCx", "proximal LCx", "LCx近位部"),
    12: ("LCA", "LCx", "obtuse marginal branch", "鈍縁枝"),
    13: ("LCA", "LCx", "distal LCx", "LCx遠位部"),
    14: ("LCA", "LCx", "posterolateral branch", "後側壁枝"),
    15: ("LCA", "LCx", "posterior descending branch of the LCx", "LCx後下行枝"),
}

#: The Japanese AHA % diameter stenosis grades a report uses (100 = total occlusion).
GRADES: tuple[int, ...] = (25, 50, 75, 90, 99, 100)


def grade_of(stenosis_pct: float) -> int:
    """The AHA grade a measured % diameter stenosis is reported as (the nearest grade)."""
    return min(GRADES, key=lambda g: (abs(g - float(stenosis_pct)), g))


@dataclass
class LesionFinding:
    """One stenosis the lesion model saw on one key frame of one run.

    Coordinates follow DICOM SCOORD image-relative convention on the *stored* frame
    (the run's Columns x Rows): ``x`` is the column, ``y`` the row, (0.0, 0.0) is the
    top-left corner of the top-left pixel, so the centre of pixel (c, r) is (c + 0.5, r + 0.5).
    ``polyline`` (same convention) follows the vessel centreline through the lesion, when known.
    """

    sop_instance_uid: str  # the run (multi-frame instance) it was seen on
    frame_number: int  # 1-based frame of that run
    segment: int  # AHA segment 1-15
    stenosis_pct: float  # % diameter stenosis, QCA style (100 = occlusion)
    x: float
    y: float
    confidence: float = 0.0
    polyline: list[tuple[float, float]] = field(default_factory=list)
    reference_diameter_px: Optional[float] = None
    minimal_diameter_px: Optional[float] = None

    def __post_init__(self) -> None:
        if self.segment not in SEGMENTS:
            raise ValueError(f"LesionFinding.segment must be an AHA segment 1-15, got {self.segment}")
        if self.frame_number < 1:
            raise ValueError(f"LesionFinding.frame_number must be 1-based, got {self.frame_number}")
        if not 0.0 <= float(self.stenosis_pct) <= 100.0:
            raise ValueError(f"LesionFinding.stenosis_pct must be 0-100, got {self.stenosis_pct}")

    @property
    def side(self) -> str:
        return SEGMENTS[self.segment][0]

    @property
    def vessel(self) -> str:
        return SEGMENTS[self.segment][1]

    @property
    def grade(self) -> int:
        return grade_of(self.stenosis_pct)

    def finding(self) -> dict:
        """The report-level finding (the shape training.synthetic uses): vessel, segment, severity, side."""
        return {"vessel": self.vessel, "segment": self.segment, "severity": self.grade, "side": self.side}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(side=self.side, vessel=self.vessel, grade=self.grade)
        d["polyline"] = [list(p) for p in self.polyline]
        return d


@dataclass
class ReportText:
    """One language's report.  ``format_ok`` is False when the model ignored the template
    (its whole text then sits in ``findings``)."""

    findings: str
    impression: str = ""
    recommendation: str = ""
    format_ok: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModelInfo:
    """What produced a result: names the bundle, both models and the Device UID (IHE AIR)."""

    name: str
    version: str
    device_uid: str
    selector: str = ""
    vlm: str = ""
    adapter: str = ""
    synthetic_demo: bool = False  # a demo bundle trained on synthetic data
    lesions: str = ""  # the lesion model (arch version), when the bundle has one

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StudyResult:
    """Everything the node encodes into SR + KOS for one study."""

    study_instance_uid: str
    runs: list[RunSelection]
    report: dict[str, ReportText]  # language code -> text
    model: ModelInfo
    not_analysed: list[dict] = field(default_factory=list)  # {sop_instance_uid, reason}
    # What the language drafts disagree on (inference.vlm.findings.language_discrepancies).
    discrepancies: list[str] = field(default_factory=list)
    # What the lesion model saw on the key frames (empty when the bundle has no lesion model).
    lesions: list[LesionFinding] = field(default_factory=list)

    @property
    def lateralities(self) -> list[str]:
        return sorted({r.laterality for r in self.runs if r.laterality})

    def to_dict(self) -> dict:
        return {
            "study_instance_uid": self.study_instance_uid,
            "runs": [r.to_dict() for r in self.runs],
            "report": {k: v.to_dict() for k, v in self.report.items()},
            "model": self.model.to_dict(),
            "not_analysed": list(self.not_analysed),
            "discrepancies": list(self.discrepancies),
            "lesions": [l.to_dict() for l in self.lesions],
        }
