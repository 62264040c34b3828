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
        }
