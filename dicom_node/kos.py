"""Key Object Selection document that flags the key frames of a study.

highdicom's :class:`~highdicom.ko.KeyObjectSelection` references whole
instances only; a key frame of a multi-frame run needs a frame-level reference.
:func:`build_kos` therefore builds the TID 2010 content with highdicom and then
replaces each whole-instance IMAGE item by one IMAGE item per key frame carrying
``ReferencedFrameNumber`` (PS3.3 C.18.4 Image Reference Macro), in the order the
selector ranked them.  The description TEXT says it is an unverified AI
selection (and, for a demo bundle, that the model was trained on synthetic data).

Only the instances that are actually referenced are evidence
(``CurrentRequestedProcedureEvidenceSequence`` of a KOS must list exactly the
referenced instances).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Optional

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

from dicom_node.sr import (
    document_identity,
    DEMO_STATEMENT,
    MANUFACTURER,
    EncodingError,
    _ensure_uid,
    _finish,
    device_observer_context,
    frame_items,
    key_frame_references,
    prepare_evidence,
)
from inference.types import StudyResult

KOS_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"

# CID 7010 Key Object Selection Document Titles
TITLE_FOR_REPORT_ATTACHMENT = CodedConcept("113020", "DCM", "For Report Attachment")
TITLE_OF_INTEREST = CodedConcept("113000", "DCM", "Of Interest")
_CID_7010 = {"113000", "113001", "113002", "113003", "113004", "113005", "113006", "113007",
             "113008", "113009", "113010", "113013", "113018", "113020", "113021", "113030",
             "113031", "113032", "113033", "113034", "113035", "113036", "113037", "113038",
             "113039"}
SOURCE = CodedConcept("260753009", "SCT", "Source")


def kos_description(result: StudyResult) -> str:
    parts = []
    for run in result.runs:
        if run.ok and run.key_frames:
            frames = ", ".join(str(k.frame_number) for k in run.key_frames)
            parts.append(f"{run.laterality} run {run.sop_instance_uid}: frames {frames}")
    text = ("Key frames selected by AI (draft, not verified): " + ("; ".join(parts) or "none") + ".")
    if result.model.synthetic_demo:
        text += " " + DEMO_STATEMENT["en"]
    return text[:1024]


def build_kos(source_datasets: Sequence[Dataset], result: StudyResult, *, series_uid: Optional[str] = None,
              instance_number: int = 1, series_number: int = 991, sop_instance_uid: Optional[str] = None,
              title: CodedConcept = TITLE_FOR_REPORT_ATTACHMENT, institution_name: Optional[str] = None) -> Dataset:
    """Build a KOS that references every key frame of ``result`` (frame-level).

    Raises :class:`~dicom_node.sr.EncodingError` when there is no key frame to
    flag, when a referenced run is not among ``source_datasets``, or when the
    title is not from CID 7010.
    """
    if not isinstance(result, StudyResult):
        raise EncodingError(f"result: expected StudyResult, got {type(result).__name__}")
    if title.value not in _CID_7010 or title.scheme_designator != "DCM":
        raise EncodingError(f"title: {title.value} ({title.meaning}) is not a CID 7010 KOS title")
    if not isinstance(instance_number, int) or instance_number < 1:
        raise EncodingError(f"instance_number: must be a positive integer, got {instance_number!r}")
    evidence_all = prepare_evidence(source_datasets, result.study_instance_uid)
    refs = [r for r in key_frame_references(result, evidence_all) if r[2]]
    if not refs:
        raise EncodingError("result.runs: no key frame to reference (nothing for a KOS to flag)")
    referenced = []
    seen = set()
    for _run, ds, _kfs in refs:
        if ds.SOPInstanceUID not in seen:
            seen.add(ds.SOPInstanceUID)
            referenced.append(ds)
    # Patient/study attributes come from evidence[0]: give it the study's most complete header.
    evidence = [_with_header_of(referenced[0], evidence_all[0])] + referenced[1:]

    content = hd.ko.KeyObjectSelection(
        document_title=title,
        referenced_objects=referenced,
        observer_device_context=device_observer_context(result.model),
        description=kos_description(result),
    )
    # Replace the whole-instance references by one frame-level IMAGE item per key frame.
    container = content[0]
    kept = [it for it in container.ContentSequence if it.ValueType not in ("IMAGE", "COMPOSITE")]
    for _run, ds, kfs in refs:
        kept.extend(frame_items(SOURCE, ds, kfs))
    container.ContentSequence = hd.sr.ContentSequence(kept)

    now = datetime.datetime.now()
    model = result.model
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=_ensure_uid(series_uid, "series_uid"),
        series_number=series_number,
        sop_instance_uid=_ensure_uid(sop_instance_uid, "sop_instance_uid"),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        institution_name=institution_name,
        **document_identity(model, now, "AI key frames (not verified)"),
    )
    return _finish(kos)


def _with_header_of(target: Dataset, donor: Dataset) -> Dataset:
    """``target`` with the Patient/Study Type 2 attributes of ``donor`` where its own are empty."""
    from dicom_node.sr import TYPE2_HEADER  # noqa: PLC0415

    out = target.copy() if hasattr(target, "copy") else target
    for kw in TYPE2_HEADER:
        if not str(out.get(kw, "") or "") and str(donor.get(kw, "") or ""):
            out[kw] = donor[kw]
    return out


__all__ = ["build_kos", "TITLE_FOR_REPORT_ATTACHMENT", "TITLE_OF_INTEREST", "KOS_SOP_CLASS_UID"]
