"""Encode a :class:`~inference.types.StudyResult` as a DICOM Comprehensive SR.

The document follows the "Result encoding" section of ``design.md`` (IHE AI
Results as far as a text report allows):

* one Comprehensive SR (1.2.840.10008.5.1.4.1.1.88.33) in the source study,
  ``SpecificCharacterSet`` ISO_IR 192 so English and Japanese share one document;
* a coded title from CID 7000 (LOINC 18745-0 "Cardiac Catheterization Report"
  by default, or the private ``TITLE_CAG_AI_REPORT``);
* an observer context naming the algorithm as a Device observer (TID 1002/1004,
  Device Observer UID = the bundle's Device UID) and TID 4019 Algorithm
  Identification (name, version, parameters);
* a plain "AI-generated draft, not verified" statement (and, for a bundle
  trained on synthetic data, a statement saying so);
* one CONTAINER per language, tagged with TID 1204 "Language of Content Item and
  Descendants" (RFC 5646 ``en`` / ``ja``), holding Findings / Impressions /
  Recommendations TEXT items (LOINC 59776-5, 19005-8, 18783-1);
* one CONTAINER per analysed run with the imaged coronary artery as a CODE
  (SCT "Left Coronary Artery" / "Right Coronary Artery") and every key frame as
  an IMAGE item with ``ReferencedFrameNumber``;
* a "Findings" CONTAINER (DCM 121070) with one TID 1501-style "Measurement Group"
  per lesion the lesion model saw: Tracking Identifier/UID, Finding (SCT Stenosis or
  Occlusion, CID 3810), Finding Site (the AHA segment as a CID 3014 coronary artery
  segment, see :data:`SEGMENT_SITES`), NUM "Lumen Diameter Stenosis" (SCT 408715008, %)
  INFERRED FROM an SCOORD POINT "Center" (and a POLYLINE "Centerline" when known)
  SELECTED FROM the run's IMAGE with ``ReferencedFrameNumber``, NUM "Certainty of
  Finding" (the lesion model's confidence, 0-1) and a Comment in words (see
  :func:`lesion_findings`);
* a CONTAINER listing the runs that were not analysed and why;
* ``ContributingEquipmentSequence`` (purpose "Processing Equipment", with the
  Device UID, Manufacturer, SoftwareVersions), ``CompletionFlag`` PARTIAL or
  COMPLETE, ``VerificationFlag`` UNVERIFIED, ``PreliminaryFlag`` PRELIMINARY,
  ``CurrentRequestedProcedureEvidenceSequence`` listing every source instance and
  ``PredecessorDocumentsSequence`` when the study was re-processed.

Real headers are incomplete: highdicom raises on absent PatientName, PatientID,
PatientBirthDate, PatientSex, AccessionNumber, StudyID, StudyDate, StudyTime or
ReferringPhysicianName.  :func:`prepare_evidence` copies the source headers and
adds the absent Type 2 attributes *empty* — it never invents PHI.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import highdicom as hd
import highdicom.coding_schemes  # noqa: F401  (loads hd.coding_schemes)
import numpy as np
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    ImageContentItem,
    NumContentItem,
    RelationshipTypeValues,
    ScoordContentItem,
    TextContentItem,
    UIDRefContentItem,
)
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, TM

from inference.types import (
    SECTIONS,
    SEGMENTS,
    KeyFrame,
    LesionFinding,
    ModelInfo,
    RunSelection,
    StudyResult,
)

log = logging.getLogger(__name__)

COMPREHENSIVE_SR_UID = "1.2.840.10008.5.1.4.1.1.88.33"
CHARSET = "ISO_IR 192"
MANUFACTURER = "cag-node"

# --------------------------------------------------------------------------
# Codes.  Standard codes are checked against pydicom's copy of PS3.16 in the
# tests; private ones use the coding scheme 99CAG (declared in the
# CodingSchemeIdentificationSequence of every object that uses them).
# --------------------------------------------------------------------------
PRIVATE_SCHEME = "99CAG"


def _c(value: str, scheme: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


TITLE_CATH_REPORT = _c("18745-0", "LN", "Cardiac Catheterization Report")  # CID 7000
TITLE_CAG_AI_REPORT = _c("CAG001", PRIVATE_SCHEME, "Coronary angiography AI report")

SECTION_CODES: dict[str, CodedConcept] = {
    "findings": _c("59776-5", "LN", "Findings"),
    "impression": _c("19005-8", "LN", "Impressions"),
    "recommendation": _c("18783-1", "LN", "Recommendations"),
}
LANGUAGE_CODE = _c("121049", "DCM", "Language of Content Item and Descendants")
LANGUAGES: dict[str, CodedConcept] = {
    "en": _c("en", "RFC5646", "English"),
    "ja": _c("ja", "RFC5646", "Japanese"),
}
COMMENT = _c("121106", "DCM", "Comment")
TARGET_REGION = _c("123014", "DCM", "Target Region")
KEY_FRAME = _c("121080", "DCM", "Best illustration of finding")
ARTERIES: dict[str, CodedConcept] = {
    "LCA": _c("50018008", "SCT", "Left Coronary Artery"),
    "RCA": _c("13647002", "SCT", "Right Coronary Artery"),
}
PROCESSING_EQUIPMENT = _c("109102", "DCM", "Processing Equipment")  # CID 7005

NARRATIVE = _c("CAG010", PRIVATE_SCHEME, "AI draft report text")
ANALYSED_RUNS = _c("121180", "DCM", "Key Images")  # CID 7001 section heading
RUN = _c("CAG021", PRIVATE_SCHEME, "Angiographic run")
NOT_ANALYSED = _c("CAG030", PRIVATE_SCHEME, "Runs not analysed")

# --- lesion findings (TID 1501-style Measurement Group per lesion) -------------------------
LESION_FINDINGS = _c("121070", "DCM", "Findings")  # the QCA templates' (TID 3214) findings container
MEASUREMENT_GROUP = _c("125007", "DCM", "Measurement Group")  # TID 1501
TRACKING_ID = _c("112039", "DCM", "Tracking Identifier")
TRACKING_UID = _c("112040", "DCM", "Tracking Unique Identifier")
FINDING = _c("121071", "DCM", "Finding")
FINDING_SITE = _c("363698007", "SCT", "Finding Site")
# CID 3810 Vascular Morphology (the value set of TID 3908 "Associated Morphology"); the
# meanings are PS3.16's own spelling.
STENOSIS = _c("415582006", "SCT", "stenosis")
OCCLUSION = _c("26036001", "SCT", "occlusion")
# TID 3105 row 5 / QCA: % diameter stenosis (SRT R-101BB), in UCUM %.
DIAMETER_STENOSIS = _c("408715008", "SCT", "Lumen Diameter Stenosis")
PERCENT = _c("%", "UCUM", "Percent")
# The lesion model's confidence, 0-1 (the CAD templates' "Certainty of Finding", CID 6048).
CERTAINTY = _c("111012", "DCM", "Certainty of Finding")
NO_UNITS = _c("1", "UCUM", "no units")
CENTER = _c("111010", "DCM", "Center")  # CID 219 Geometry Graphical Representation
CENTERLINE = _c("130490", "DCM", "Centerline")  # CID 219
SOURCE_OF_MEASUREMENT = _c("121112", "DCM", "Source of Measurement")

#: AHA segment (1-15) -> Finding Site.  From PS3.16 CID 3014 "Coronary Artery Segment"
#: (SNOMED CT), except:
#: * 12 (obtuse marginal branch): CID 3014 has only the numbered 1st/2nd/3rd marginal
#:   branches and "Marginal Coronary Artery" (22765000), which SNOMED CT defines as the
#:   marginal branch of the *right* coronary artery; AHA 12 is any obtuse marginal of the
#:   LCx, so it gets a private 99CAG code;
#: * 14 (posterolateral branch): CID 3014 has only the numbered 1st/2nd/3rd left
#:   posterolateral branches; the un-numbered "Left Posterolateral Circumflex Coronary
#:   Artery" (57823005) is a standard code of CID 3015 "Coronary Artery" and CID 3604
#:   "Arterial Lesion Location" (the value set TID 3105/3214 give a lesion's Finding Site).
SEGMENT_SITES: dict[int, CodedConcept] = {
    1: _c("91083009", "SCT", "Proximal Right Coronary Artery"),
    2: _c("450960006", "SCT", "Mid Right Coronary Artery"),
    3: _c("41879009", "SCT", "Distal Right Coronary Artery"),
    4: _c("53655008", "SCT", "Posterior Descending Right Coronary Artery"),
    5: _c("3227004", "SCT", "Left Main Coronary Artery"),
    6: _c("68787002", "SCT", "Proximal Left Anterior Descending Coronary Artery"),
    7: _c("91748002", "SCT", "Mid Left Anterior Descending Coronary Artery"),
    8: _c("36672000", "SCT", "Distal Left Anterior Descending Coronary Artery"),
    9: _c("91750005", "SCT", "1st Diagonal Coronary Artery"),
    10: _c("91751009", "SCT", "2nd Diagonal Coronary Artery"),
    11: _c("52433000", "SCT", "Proximal Circumflex Coronary Artery"),
    12: _c("CAG112", PRIVATE_SCHEME, "Obtuse Marginal Circumflex Coronary Artery (AHA 12)"),
    13: _c("6511003", "SCT", "Distal Circumflex Coronary Artery"),
    14: _c("57823005", "SCT", "Left Posterolateral Circumflex Coronary Artery"),
    15: _c("91760001", "SCT", "Left Posterior Descending Circumflex Coronary Artery"),
}

CODING_SCHEMES = [
    hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="cag-node private codes",
        responsible_organization="cag-node project",
    )
]

DRAFT_STATEMENT = {
    "en": "AI-generated draft, not verified. It must be reviewed by a physician before any clinical use.",
    "ja": "AIが生成した未確認の下書きです。臨床使用の前に必ず医師が確認してください。",
}
DISCREPANCY_STATEMENT = {
    "en": "The English and Japanese drafts disagree; check both against the images: ",
    "ja": "英語と日本語の下書きの内容が一致しません。画像と照合して確認してください（詳細は英語の注記）。",
}
DEMO_STATEMENT = {
    "en": ("Written by a demonstration model trained on synthetic data only; "
           "it is not a medical device and its content is not clinically meaningful."),
    "ja": "合成データのみで学習したデモ用モデルが作成しました。医療機器ではなく、内容に臨床的な意味はありません。",
}
SECTION_LABELS = {
    "en": {"findings": "Findings", "impression": "Impression", "recommendation": "Recommendation"},
    "ja": {"findings": "所見", "impression": "印象", "recommendation": "推奨"},
}

# Type 2 attributes highdicom reads from the first evidence dataset (Patient /
# General Study modules): absent ones are added empty.
TYPE2_HEADER = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


class EncodingError(ValueError):
    """The result or the source headers cannot be encoded; the message names the attribute."""


# --------------------------------------------------------------------------
# Source headers
# --------------------------------------------------------------------------
def header_copy(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without pixel data (group 0x7FE0 and float/double pixel data)."""
    out = Dataset()
    for elem in ds:  # decodes raw elements with ds's character set
        if elem.tag.group == 0x7FE0:
            continue
        out.add(copy.deepcopy(elem))
    if getattr(ds, "file_meta", None) is not None:
        out.file_meta = copy.deepcopy(ds.file_meta)
    return out


def prepare_evidence(
    source_datasets: Sequence[Dataset],
    study_instance_uid: str | None = None,
    *,
    strict: bool = False,
) -> list[Dataset]:
    """Header copies of the sources, ready to be highdicom evidence.

    Adds absent Type 2 Patient/Study attributes *empty* (never an invented
    value), blanks values highdicom rejects (see :func:`_sanitize`), puts the most
    complete header first and fills its gaps from the other instances of the study.

    A source without StudyInstanceUID/SeriesInstanceUID/SOPClassUID/SOPInstanceUID,
    or from another study, cannot be evidence: with ``strict`` that raises
    :class:`EncodingError` naming the attribute; otherwise it is left out with a
    warning (a broken header must not cost the study its report) — unless nothing
    is left, which raises.  Duplicated SOP Instance UIDs are dropped.
    """
    if not source_datasets:
        raise EncodingError("source_datasets: at least one source instance is needed")
    out: list[Dataset] = []
    seen: set[str] = set()
    problems: list[str] = []
    study = study_instance_uid
    for i, ds in enumerate(source_datasets):
        problem = None
        if not isinstance(ds, Dataset):
            problem = f"source_datasets[{i}]: expected a pydicom Dataset, got {type(ds).__name__}"
        else:
            for kw in REQUIRED_UIDS:
                if not str(ds.get(kw, "") or "").strip():
                    problem = f"source_datasets[{i}]: {kw} is absent or empty"
                    break
            if problem is None:
                study = study or ds.StudyInstanceUID
                if ds.StudyInstanceUID != study:
                    problem = (f"source_datasets[{i}]: StudyInstanceUID {ds.StudyInstanceUID} is not the "
                               f"study of the result ({study})")
        if problem is not None:
            if strict:
                raise EncodingError(problem)
            log.warning("%s; left out of the evidence", problem)
            problems.append(problem)
            continue
        if ds.SOPInstanceUID in seen:
            continue
        seen.add(ds.SOPInstanceUID)
        h = header_copy(ds)
        for kw in TYPE2_HEADER:
            if kw not in h or h[kw].value is None:
                setattr(h, kw, "")
        _sanitize(h)
        out.append(h)
    if not out:
        raise EncodingError("; ".join(problems) or "source_datasets: no usable source instance")
    # highdicom copies Patient/Study attributes from the first evidence item: put the most
    # complete header first and fill its gaps from the other instances of the same study.
    out.sort(key=lambda h: -sum(1 for kw in TYPE2_HEADER if str(h.get(kw, "") or "")))
    first = out[0]
    for kw in TYPE2_HEADER:
        if not str(first.get(kw, "") or ""):
            donor = next((h for h in out[1:] if str(h.get(kw, "") or "")), None)
            if donor is not None:
                first[kw] = copy.deepcopy(donor[kw])
    return out


def _sanitize(h: Dataset) -> None:
    """Blank values highdicom (rightly) rejects: a PatientSex outside M/F/O, unparsable dates/times.

    Blanking an invalid Type 2 value keeps the object valid without inventing anything;
    it is logged so the site can fix its modality.
    """
    sex = str(h.get("PatientSex", "") or "").strip().upper()
    if sex not in ("", "M", "F", "O"):
        log.warning("source %s: PatientSex %r is not M/F/O; left empty in the result", h.SOPInstanceUID, sex)
        h.PatientSex = ""
    for kw, parse in (("StudyDate", DA), ("PatientBirthDate", DA), ("StudyTime", TM)):
        raw = h.get(kw)
        if raw is None or str(raw) == "":
            continue
        try:
            parse(str(raw).strip())
        except Exception:
            log.warning("source %s: %s %r is not a valid %s; left empty", h.SOPInstanceUID, kw, str(raw),
                        parse.__name__)
            h[kw].value = ""


def _check_text(value: str, where: str) -> str:
    if not isinstance(value, str):
        raise EncodingError(f"{where}: expected text, got {type(value).__name__}")
    # UT allows 2^32-2 bytes; a report longer than 64 KiB is a model gone wrong.
    if len(value.encode("utf-8")) > 65536:
        raise EncodingError(f"{where}: text longer than 64 KiB")
    return value


def _ensure_uid(value: str | None, where: str) -> str:
    uid = value or generate_uid()
    if len(uid) > 64 or not all(p.isdigit() for p in uid.split(".")):
        raise EncodingError(f"{where}: {uid!r} is not a valid DICOM UID")
    return uid


# --------------------------------------------------------------------------
# Content pieces shared with kos.py
# --------------------------------------------------------------------------
def device_observer_context(model: ModelInfo) -> hd.sr.ObserverContext:
    """TID 1002 observer context: the algorithm as a Device, identified by its Device UID."""
    if not model.device_uid:
        raise EncodingError("result.model.device_uid: the bundle's Device UID is required")
    _ensure_uid(model.device_uid, "result.model.device_uid")
    return hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=model.device_uid,
            name=(model.name or "cag-node model")[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.version}".strip()[:64],
        ),
    )


def software_versions(model: ModelInfo) -> list[str]:
    from dicom_node import __version__ as node_version  # noqa: PLC0415

    out = [f"cag-node {node_version}", f"{model.name} {model.version}"]
    out += [f"{part} {value}" for part, value in _model_parts(model, ("selector", "vlm", "adapter", "lesions"))]
    return [s[:64] for s in out]


def _model_parts(model: ModelInfo, parts) -> list[tuple[str, str]]:
    """(part, version) of each of ``parts`` the model has."""
    return [(p, getattr(model, p)) for p in parts if getattr(model, p, "")]


def contributing_equipment(model: ModelInfo) -> hd.ContributingEquipment:
    """IHE AIR: the algorithm as contributing equipment (with its Device UID)."""
    eq = hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=f"{model.name} {model.version}".strip()[:64],
        software_versions=software_versions(model),
        contribution_datetime=datetime.datetime.now(),
        contribution_description=("AI key-frame selection and draft report"
                                  + (" (demo model trained on synthetic data)" if model.synthetic_demo else "")),
    )
    eq.DeviceUID = model.device_uid
    return eq


def key_frame_references(
    result: StudyResult, evidence: Sequence[Dataset]
) -> list[tuple[RunSelection, Dataset, list[KeyFrame]]]:
    """(run, source header, key frames) for every analysed run, validated against the sources."""
    by_uid = {ds.SOPInstanceUID: ds for ds in evidence}
    out = []
    for i, run in enumerate(result.runs):
        if not run.ok:
            continue
        if run.laterality not in ARTERIES:
            raise EncodingError(f"result.runs[{i}].laterality: {run.laterality!r} is not one of {sorted(ARTERIES)}")
        ds = by_uid.get(run.sop_instance_uid)
        if ds is None:
            raise EncodingError(
                f"result.runs[{i}].sop_instance_uid {run.sop_instance_uid} is not among the source_datasets"
            )
        n_frames = int(ds.get("NumberOfFrames", 0) or 0) or run.n_frames or 1
        for kf in run.key_frames:
            if not 1 <= kf.frame_number <= n_frames:
                raise EncodingError(
                    f"result.runs[{i}].key_frames: frame {kf.frame_number} outside 1..{n_frames} "
                    f"(NumberOfFrames of {run.sop_instance_uid})"
                )
        out.append((run, ds, list(run.key_frames)))
    return out


def not_analysed_lines(result: StudyResult) -> list[str]:
    lines = []
    for run in result.runs:
        if not run.ok:
            why = run.error or "laterality could not be determined"
            lines.append(f"{run.sop_instance_uid}: {why}")
    for i, item in enumerate(result.not_analysed):
        if not isinstance(item, dict) or "sop_instance_uid" not in item:
            raise EncodingError(f"result.not_analysed[{i}]: expected {{sop_instance_uid, reason}}")
        lines.append(f"{item['sop_instance_uid']}: {item.get('reason') or 'not analysed'}")
    return lines


# --------------------------------------------------------------------------
# SR
# --------------------------------------------------------------------------
def _text(name: CodedConcept, value: str, where: str,
          rel: RelationshipTypeValues = RelationshipTypeValues.CONTAINS) -> TextContentItem:
    return TextContentItem(name=name, value=_check_text(value, where), relationship_type=rel)


def _language_container(lang: str, text, model: ModelInfo, disagree: bool = False) -> ContainerContentItem:
    where = f"result.report[{lang!r}]"
    if lang not in LANGUAGES:
        raise EncodingError(f"{where}: language must be one of {sorted(LANGUAGES)}")
    c = ContainerContentItem(name=NARRATIVE, relationship_type=RelationshipTypeValues.CONTAINS)
    items = list(hd.sr.LanguageOfContentItemAndDescendants(LANGUAGES[lang]))
    statement = DRAFT_STATEMENT[lang] + (" " + DEMO_STATEMENT[lang] if model.synthetic_demo else "")
    items.append(_text(COMMENT, statement, where))
    if disagree and lang in DISCREPANCY_STATEMENT and lang != "en":
        items.append(_text(COMMENT, DISCREPANCY_STATEMENT[lang], where))
    for section in SECTIONS:
        value = getattr(text, section, "") or ""
        if value.strip():
            items.append(_text(SECTION_CODES[section], value.strip(), f"{where}.{section}"))
    c.ContentSequence = hd.sr.ContentSequence(items)
    return c


def _run_container(run: RunSelection, ds: Dataset, key_frames: list[KeyFrame]) -> ContainerContentItem:
    c = ContainerContentItem(name=RUN, relationship_type=RelationshipTypeValues.CONTAINS)
    series = ds.get("SeriesNumber", "")
    desc = (f"Run {ds.SOPInstanceUID} (series {series}, instance {ds.get('InstanceNumber', '')}): "
            f"{run.laterality}, confidence {run.confidence:.2f}; key frames "
            + (", ".join(f"{k.frame_number} ({k.label}, {k.score:.2f})" for k in key_frames) or "none"))
    items = [
        CodeContentItem(name=TARGET_REGION, value=ARTERIES[run.laterality],
                        relationship_type=RelationshipTypeValues.CONTAINS),
        _text(COMMENT, desc, "result.runs"),
    ]
    items.extend(frame_items(KEY_FRAME, ds, key_frames))
    c.ContentSequence = hd.sr.ContentSequence(items)
    return c


def frame_items(name: CodedConcept, ds: Dataset, key_frames: list[KeyFrame]) -> list[ImageContentItem]:
    """One CONTAINS IMAGE item per key frame of run ``ds`` (the SR's Key Images, the KOS)."""
    return [ImageContentItem(name=name, referenced_sop_class_uid=ds.SOPClassUID,
                             referenced_sop_instance_uid=ds.SOPInstanceUID,
                             referenced_frame_numbers=[kf.frame_number],
                             relationship_type=RelationshipTypeValues.CONTAINS) for kf in key_frames]


def _number(value, where: str, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise EncodingError(f"{where}: expected a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise EncodingError(f"{where}: {value!r} is not a finite number")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo:g}..{hi:g}" if lo is not None and hi is not None else (
            f">= {lo:g}" if lo is not None else f"<= {hi:g}")
        raise EncodingError(f"{where}: {v:g} outside {rng}")
    return v


def _point(x, y, ds: Dataset, x_name: str, y_name: str) -> tuple[float, float]:
    """(x, y) checked against the run's Columns x Rows (SCOORD image-relative: 0..Columns, 0..Rows)."""
    cols = int(ds.get("Columns", 0) or 0)
    rows = int(ds.get("Rows", 0) or 0)
    fx = _number(x, x_name + (f" (Columns {cols})" if cols else ""), 0.0, float(cols) if cols else None)
    fy = _number(y, y_name + (f" (Rows {rows})" if rows else ""), 0.0, float(rows) if rows else None)
    return fx, fy


class _Lesion:
    """A validated lesion with what it is encoded against."""

    def __init__(self, index: int, lesion: LesionFinding, run: RunSelection, ds: Dataset,
                 key_frames: list[KeyFrame], point: tuple[float, float],
                 polyline: list[tuple[float, float]], stenosis: float, confidence: float):
        self.index, self.lesion, self.run, self.ds, self.key_frames = index, lesion, run, ds, key_frames
        self.point, self.polyline, self.stenosis, self.confidence = point, polyline, stenosis, confidence

    @property
    def is_key_frame(self) -> bool:
        return any(k.frame_number == self.lesion.frame_number for k in self.key_frames)


def validate_lesions(
    result: StudyResult, runs: Sequence[tuple[RunSelection, Dataset, list[KeyFrame]]]
) -> list[_Lesion]:
    """Check ``result.lesions`` against the analysed runs (see :func:`key_frame_references`).

    Every lesion must lie on an analysed run (a multi-frame instance among the evidence), on a
    frame 1..NumberOfFrames of that run (the header's, else the selector's n_frames) and inside
    its Columns x Rows; a lesion's frame need not be a key frame.  Raises :class:`EncodingError`
    naming the attribute (``result.lesions[2].frame_number: ...``).
    """
    lesions = result.lesions
    if lesions is None:
        return []
    if not isinstance(lesions, (list, tuple)):
        raise EncodingError(f"result.lesions: expected a list of LesionFinding, got {type(lesions).__name__}")
    by_uid = {run.sop_instance_uid: (run, ds, kfs) for run, ds, kfs in runs}
    out = []
    for i, les in enumerate(lesions):
        where = f"result.lesions[{i}]"
        if not isinstance(les, LesionFinding):
            raise EncodingError(f"{where}: expected LesionFinding, got {type(les).__name__}")
        ref = by_uid.get(les.sop_instance_uid)
        if ref is None:
            raise EncodingError(f"{where}.sop_instance_uid: {les.sop_instance_uid} is not among the analysed runs")
        run, ds, kfs = ref
        if isinstance(les.segment, bool) or les.segment not in SEGMENTS:
            raise EncodingError(f"{where}.segment: {les.segment!r} is not an AHA segment 1-15")
        frame = les.frame_number
        if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
            raise EncodingError(f"{where}.frame_number: expected an integer, got {type(frame).__name__}")
        n_frames = int(ds.get("NumberOfFrames", 0) or 0) or int(run.n_frames or 0)
        if frame < 1 or (n_frames and frame > n_frames):
            raise EncodingError(f"{where}.frame_number: frame {frame} outside 1..{n_frames or 'n'} "
                                f"(NumberOfFrames of {les.sop_instance_uid})")
        stenosis = _number(les.stenosis_pct, f"{where}.stenosis_pct", 0.0, 100.0)
        confidence = _number(les.confidence, f"{where}.confidence", 0.0, 1.0)
        point = _point(les.x, les.y, ds, f"{where}.x", f"{where}.y")
        polyline = []
        pts = les.polyline or []
        if not isinstance(pts, (list, tuple)):
            raise EncodingError(f"{where}.polyline: expected a list of (x, y), got {type(pts).__name__}")
        if len(pts) == 1:
            raise EncodingError(f"{where}.polyline: a polyline needs at least 2 points, got 1")
        for j, pt in enumerate(pts):
            if not isinstance(pt, (list, tuple)) or len(pt) != 2:
                raise EncodingError(f"{where}.polyline[{j}]: expected an (x, y) pair, got {pt!r}")
            polyline.append(_point(pt[0], pt[1], ds, f"{where}.polyline[{j}] x", f"{where}.polyline[{j}] y"))
        for kw in ("reference_diameter_px", "minimal_diameter_px"):
            if getattr(les, kw) is not None:
                _number(getattr(les, kw), f"{where}.{kw}", 0.0, None)
        if les.side != run.laterality:
            log.warning("%s: AHA segment %d is on the %s but run %s was classified %s", where, les.segment,
                        les.side, run.sop_instance_uid, run.laterality)
        out.append(_Lesion(i, les, run, ds, kfs, point, polyline, stenosis, confidence))
    return out


def _fmt(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _lesion_comment(v: _Lesion) -> str:
    les = v.lesion
    _side, vessel, name_en, _name_ja = SEGMENTS[les.segment]
    grade = les.grade
    words = "total occlusion" if grade == 100 else f"{grade}% stenosis"
    text = (f"Lesion {v.index + 1}: AHA segment {les.segment} ({name_en}, {vessel}): {_fmt(v.stenosis)}% "
            f"diameter stenosis, graded {words}; lesion model confidence {v.confidence:.2f}. "
            f"Seen on frame {les.frame_number} of run {les.sop_instance_uid}")
    if not v.is_key_frame:
        frames = ", ".join(str(k.frame_number) for k in v.key_frames) or "none"
        text += f" (not one of the run's key frames: {frames})"
    text += "."
    diam = []
    if les.reference_diameter_px is not None:
        diam.append(f"reference diameter {_fmt(float(les.reference_diameter_px))} px")
    if les.minimal_diameter_px is not None:
        diam.append(f"minimal lumen diameter {_fmt(float(les.minimal_diameter_px))} px")
    if diam:
        text += " " + ", ".join(diam).capitalize() + "."
    if les.side != v.run.laterality:
        text += f" Note: the segment is on the {les.side} but the run was classified {v.run.laterality}."
    return text


def _frame_image(v: _Lesion) -> ImageContentItem:
    return ImageContentItem(
        name=SOURCE_OF_MEASUREMENT,
        referenced_sop_class_uid=v.ds.SOPClassUID,
        referenced_sop_instance_uid=v.ds.SOPInstanceUID,
        referenced_frame_numbers=[int(v.lesion.frame_number)],
        relationship_type=RelationshipTypeValues.SELECTED_FROM,
    )


def _scoord(name: CodedConcept, graphic_type: str, points: list[tuple[float, float]], v: _Lesion):
    item = ScoordContentItem(
        name=name,
        graphic_type=graphic_type,
        graphic_data=np.asarray(points, dtype=float),
        relationship_type=RelationshipTypeValues.INFERRED_FROM,
    )
    item.ContentSequence = hd.sr.ContentSequence([_frame_image(v)])
    return item


def _lesion_group(v: _Lesion, sr_uid: str) -> ContainerContentItem:
    les = v.lesion
    group = ContainerContentItem(name=MEASUREMENT_GROUP, relationship_type=RelationshipTypeValues.CONTAINS)
    stenosis = NumContentItem(name=DIAMETER_STENOSIS, value=round(v.stenosis, 1), unit=PERCENT,
                              relationship_type=RelationshipTypeValues.CONTAINS)
    where = [_scoord(CENTER, "POINT", [v.point], v)]
    if v.polyline:
        where.append(_scoord(CENTERLINE, "POLYLINE", v.polyline, v))
    stenosis.ContentSequence = hd.sr.ContentSequence(where)
    items = [
        TextContentItem(name=TRACKING_ID, value=f"Lesion {v.index + 1}",
                        relationship_type=RelationshipTypeValues.HAS_OBS_CONTEXT),
        UIDRefContentItem(name=TRACKING_UID,
                          value=generate_uid(entropy_srcs=[sr_uid, "lesion", str(v.index)]),
                          relationship_type=RelationshipTypeValues.HAS_OBS_CONTEXT),
        CodeContentItem(name=FINDING, value=OCCLUSION if les.grade == 100 else STENOSIS,
                        relationship_type=RelationshipTypeValues.CONTAINS),
        CodeContentItem(name=FINDING_SITE, value=SEGMENT_SITES[les.segment],
                        relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD),
        stenosis,
        NumContentItem(name=CERTAINTY, value=round(v.confidence, 3), unit=NO_UNITS,
                       relationship_type=RelationshipTypeValues.CONTAINS),
        _text(COMMENT, _lesion_comment(v), f"result.lesions[{v.index}]"),
    ]
    group.ContentSequence = hd.sr.ContentSequence(items)
    return group


LESION_STATEMENT = ("Stenoses detected by the AI lesion model (draft, not verified); each is located on the "
                    "frame it was seen on. Certainty of Finding is the model's confidence (0-1).")


def lesion_findings(lesions: Sequence[_Lesion], model: ModelInfo, sr_uid: str) -> ContainerContentItem:
    """The "Findings" container: the lesion model as TID 4019, a statement, one group per lesion."""
    c = ContainerContentItem(name=LESION_FINDINGS, relationship_type=RelationshipTypeValues.CONTAINS)
    items = list(hd.sr.AlgorithmIdentification(
        name=(model.name or "cag-node")[:64],
        version=model.version or "0",
        parameters=["component=lesion model"],
        manufacturer=MANUFACTURER,
    ))
    items.append(_text(COMMENT, LESION_STATEMENT, "result.lesions"))
    items.extend(_lesion_group(v, sr_uid) for v in lesions)
    c.ContentSequence = hd.sr.ContentSequence(items)
    return c


def algorithm_parameters(result: StudyResult, extra: Optional[dict] = None) -> list[str]:
    m = result.model
    params = [f"{part}={value}" for part, value in _model_parts(m, ("selector", "vlm", "adapter"))]
    params.append(f"languages={','.join(sorted(result.report))}")
    params.append(f"synthetic_demo={str(m.synthetic_demo).lower()}")
    for k, v in (extra or {}).items():
        params.append(f"{k}={v}")
    return params


def is_complete(result: StudyResult) -> bool:
    """COMPLETE when every run was analysed, nothing in scope was skipped and every report is well-formed.

    A ``not_analysed`` item with ``"expected": True`` (e.g. a non-XA instance, a single
    frame: out of scope by design) does not make the document PARTIAL; any other does.
    """
    return (
        bool(result.runs)
        and all(r.ok for r in result.runs)
        and not [n for n in result.not_analysed if not (isinstance(n, dict) and n.get("expected"))]
        and bool(result.report)
        and all(t.format_ok and (t.findings or "").strip() for t in result.report.values())
    )


def build_sr(
    source_datasets: Sequence[Dataset],
    result: StudyResult,
    *,
    predecessor: Optional[Dataset] = None,
    series_uid: Optional[str] = None,
    instance_number: int = 1,
    series_number: int = 990,
    sop_instance_uid: Optional[str] = None,
    title: CodedConcept = TITLE_CATH_REPORT,
    complete: Optional[bool] = None,
    parameters: Optional[dict] = None,
    institution_name: Optional[str] = None,
) -> Dataset:
    """Build the Comprehensive SR for ``result`` in the study of ``source_datasets``.

    ``source_datasets``: headers (pixel data not needed) of the study's instances;
    every run referenced by ``result`` must be among them.  ``predecessor``: the
    SR this one replaces (re-processing after late runs) → PredecessorDocumentsSequence.
    ``complete``: override the CompletionFlag (default :func:`is_complete`).
    Returns a :class:`highdicom.sr.ComprehensiveSR` (a pydicom Dataset) ready to save.
    """
    if not isinstance(result, StudyResult):
        raise EncodingError(f"result: expected StudyResult, got {type(result).__name__}")
    if not isinstance(instance_number, int) or instance_number < 1:
        raise EncodingError(f"instance_number: must be a positive integer, got {instance_number!r}")
    evidence = prepare_evidence(source_datasets, result.study_instance_uid)
    series_uid = _ensure_uid(series_uid, "series_uid")
    sop_uid = _ensure_uid(sop_instance_uid, "sop_instance_uid")
    model = result.model
    if not result.report:
        raise EncodingError("result.report: no report text in any language")

    runs = key_frame_references(result, evidence)
    lesions = validate_lesions(result, runs)
    items: list = []
    items.extend(hd.sr.LanguageOfContentItemAndDescendants(LANGUAGES["en"]))
    items.extend(device_observer_context(model))
    items.extend(hd.sr.AlgorithmIdentification(
        name=(model.name or "cag-node")[:64],
        version=model.version or "0",
        parameters=algorithm_parameters(result, parameters),
        manufacturer=MANUFACTURER,
    ))
    statement = DRAFT_STATEMENT["en"] + (" " + DEMO_STATEMENT["en"] if model.synthetic_demo else "")
    items.append(_text(COMMENT, statement, "statement"))
    discrepancies = list(result.discrepancies or [])
    for i, line in enumerate(discrepancies):
        if not isinstance(line, str) or not line.strip():
            raise EncodingError(f"result.discrepancies[{i}]: expected a non-empty string")
    if discrepancies:
        items.append(_text(COMMENT, DISCREPANCY_STATEMENT["en"] + "; ".join(discrepancies) + ".",
                           "result.discrepancies"))
    for lang in [lang for lang in ("en", "ja") if lang in result.report] + sorted(
        set(result.report) - {"en", "ja"}
    ):
        items.append(_language_container(lang, result.report[lang], model, disagree=bool(discrepancies)))
    if runs:
        analysed = ContainerContentItem(name=ANALYSED_RUNS, relationship_type=RelationshipTypeValues.CONTAINS)
        analysed.ContentSequence = hd.sr.ContentSequence([_run_container(*r) for r in runs])
        items.append(analysed)
    if lesions:
        items.append(lesion_findings(lesions, model, sop_uid))
    lines = not_analysed_lines(result)
    if lines:
        na = ContainerContentItem(name=NOT_ANALYSED, relationship_type=RelationshipTypeValues.CONTAINS)
        na.ContentSequence = hd.sr.ContentSequence(
            [_text(COMMENT, line, "result.not_analysed") for line in lines]
        )
        items.append(na)

    root = ContainerContentItem(name=title)
    root.ContentSequence = hd.sr.ContentSequence(items)

    previous = None
    if predecessor is not None:
        for kw in REQUIRED_UIDS:
            if not predecessor.get(kw):
                raise EncodingError(f"predecessor: {kw} is absent")
        if predecessor.StudyInstanceUID != evidence[0].StudyInstanceUID:
            raise EncodingError("predecessor: StudyInstanceUID is not the study of the new SR")
        previous = [predecessor]

    now = datetime.datetime.now()
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=is_complete(result) if complete is None else bool(complete),
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=previous,
        coding_schemes=CODING_SCHEMES,
        **document_identity(model, now, "AI draft report (not verified)"),
    )
    return _finish(sr)


def document_identity(model: ModelInfo, now: datetime.datetime, series_description: str) -> dict:
    """Keyword arguments shared by our SR and KOS: who made it (IHE AIR), when, the charset."""
    return dict(
        contributing_equipment=[contributing_equipment(model)],
        specific_character_set=CHARSET,
        series_description=series_description,
        manufacturer_model_name=f"{model.name} {model.version}".strip()[:64],
        software_versions=software_versions(model),
        content_date=now.date(),
        content_time=now.time(),
        series_date=now.date(),
        series_time=now.time(),
    )


def _finish(ds: Dataset) -> Dataset:
    """Final touches common to SR and KOS: the character set that carries Japanese."""
    ds.SpecificCharacterSet = CHARSET
    return ds


def save(ds: Dataset, path: str | Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (with a preamble and file meta)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def render_html(path: str | Path, out_html: str | Path, *, timeout: float = 60.0) -> Path:
    """Render an SR (or KOS) file to HTML with dcmtk's ``dsr2html`` (UTF-8 output)."""
    exe = shutil.which("dsr2html")
    if exe is None:
        raise RuntimeError("dsr2html (dcmtk) is not on PATH")
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "+U8", str(path), str(out_html)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out_html.is_file():
        # older dcmtk without +U8 / -Ee: retry plainly
        proc = subprocess.run([exe, str(path), str(out_html)], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out_html.is_file():
            raise RuntimeError(f"dsr2html failed on {path}: {proc.stderr.strip() or proc.stdout.strip()}")
    return out_html


def iter_content(ds: Dataset) -> Iterable[Dataset]:
    """Depth-first iteration over every content item of an SR dataset."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from iter_content(item)


__all__ = [
    "EncodingError",
    "build_sr",
    "prepare_evidence",
    "render_html",
    "save",
    "is_complete",
    "iter_content",
    "TITLE_CATH_REPORT",
    "TITLE_CAG_AI_REPORT",
    "SEGMENT_SITES",
    "validate_lesions",
]
