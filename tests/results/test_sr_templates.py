"""The SR sub-trees read back through dicom_node.sr_templates: what was encoded comes back."""

from __future__ import annotations

import io

import pydicom
import pytest
from pydicom.uid import generate_uid

from cagtest.results import make_result, make_xa
from dicom_node.sr import build_sr
from dicom_node.sr_templates import AnalysedRun, CagReport, LesionMeasurement, ReportNarrative
from inference.types import LesionFinding


def _written(ds) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def test_the_sr_reads_back_as_it_was_built():
    su = generate_uid()
    a, b = make_xa(su, series_number=1), make_xa(su, series_number=2)
    res = make_result([a, b], not_analysed=[{"sop_instance_uid": "1.2.3", "reason": "undecodable"}])
    res.lesions = [LesionFinding(a.SOPInstanceUID, 3, 7, 88.4, 5.5, 6.25, confidence=0.87),
                   LesionFinding(b.SOPInstanceUID, 7, 2, 74.0, 12.0, 10.0, confidence=0.91)]
    doc = CagReport.from_dataset(_written(build_sr([a, b], res)))

    assert sorted(n.language for n in doc.narratives) == sorted(res.report)
    for lang, text in res.report.items():
        n = doc.narrative(lang)
        assert n.sections == {"findings": text.findings, "impression": text.impression,
                              "recommendation": text.recommendation}
        assert n.statements and n.by_meaning()["Findings"] == text.findings
    assert [(r.sop_instance_uid, r.laterality, r.confidence) for r in doc.runs] == \
        [(r.sop_instance_uid, r.laterality, round(r.confidence, 2)) for r in res.runs]
    for got, want in zip(doc.runs, res.runs):
        assert [(k.frame_number, k.label, k.score) for k in got.key_frames] == \
            [(k.frame_number, k.label, round(k.score, 2)) for k in want.key_frames]
    assert [m.name for m in doc.lesions] == ["Lesion 1", "Lesion 2"]
    for got, want in zip(doc.lesions, res.lesions):
        assert got.stenosis_pct == pytest.approx(want.stenosis_pct, abs=0.05)
        assert got.confidence == pytest.approx(want.confidence, abs=0.005)
        uid, frame, x, y = got.location
        assert (uid, frame) == (want.sop_instance_uid, want.frame_number)
        assert (x, y) == pytest.approx((want.x, want.y))
        assert got.site and got.finding
    assert any("undecodable" in t for t in doc.not_analysed)
    assert doc.statements  # the document-level draft statement


def test_from_sequence_refuses_another_sub_tree():
    su = generate_uid()
    a = make_xa(su)
    sr = build_sr([a], make_result([a]))
    narrative = next(it for it in sr.ContentSequence if it.ValueType == "CONTAINER"
                     and it.ConceptNameCodeSequence[0].CodeValue == "CAG010")
    assert ReportNarrative.from_sequence([narrative]).language in ("en", "ja")
    with pytest.raises(ValueError, match="AnalysedRun"):
        AnalysedRun.from_sequence([narrative])
    with pytest.raises(ValueError, match="LesionMeasurement"):
        LesionMeasurement.from_sequence([narrative])
