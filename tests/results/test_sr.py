"""Comprehensive SR encoding: structure, incomplete headers, validators (dciodvfy, dsrdump, dsr2html)."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.sr import (
    ARTERIES,
    COMPREHENSIVE_SR_UID,
    LANGUAGES,
    SECTION_CODES,
    TITLE_CATH_REPORT,
    EncodingError,
    build_sr,
    iter_content,
    render_html,
    save,
)
from cagtest.results import DEVICE_UID, MISSING, dciodvfy_counts, make_result, make_xa, require_tools, run_tool, validated_dump



def _items(ds, value_type=None, meaning=None):
    out = []
    for it in iter_content(ds):
        if value_type and it.ValueType != value_type:
            continue
        if meaning and (it.get("ConceptNameCodeSequence") is None
                        or it.ConceptNameCodeSequence[0].CodeMeaning != meaning):
            continue
        out.append(it)
    return out


def test_sr_structure(study, tmp_path):
    sources, result = study
    sr = build_sr(sources, result)
    assert sr.SOPClassUID == COMPREHENSIVE_SR_UID
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.Modality == "SR"
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "PARTIAL"  # one instance not analysed
    assert sr.ConceptNameCodeSequence[0].CodeValue == TITLE_CATH_REPORT.value
    # evidence: every source instance
    ev = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
          for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert ev == {s.SOPInstanceUID for s in sources}
    # IHE AIR contributing equipment with the Device UID
    eq = [e for e in sr.ContributingEquipmentSequence if e.get("DeviceUID") == DEVICE_UID]
    assert eq and eq[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert eq[0].Manufacturer == "cag-node" and eq[0].SoftwareVersions
    # TID 4019 + device observer
    assert _items(sr, "TEXT", "Algorithm Name")[0].TextValue == "cag-vlm-demo"
    assert _items(sr, "TEXT", "Algorithm Version")[0].TextValue == "0.1.0"
    assert _items(sr, "TEXT", "Algorithm Parameters")
    assert _items(sr, "UIDREF", "Device Observer UID")[0].UID == DEVICE_UID
    # languages: one container each, tagged
    langs = [it.ConceptCodeSequence[0].CodeValue for it in _items(sr, "CODE", LANGUAGES["en"] and
                                                                   "Language of Content Item and Descendants")]
    assert {"en", "ja"} <= set(langs)
    texts = [it.TextValue for it in _items(sr, "TEXT")]
    assert any("AI-generated draft, not verified" in t for t in texts)
    assert any("synthetic data" in t for t in texts)
    assert any("狭窄" in t for t in texts)
    for code in SECTION_CODES.values():
        assert len(_items(sr, "TEXT", code.meaning)) == 2
    # laterality codes and key frames at frame level
    sides = {it.ConceptCodeSequence[0].CodeValue for it in _items(sr, "CODE", "Target Region")}
    assert sides == {ARTERIES["LCA"].value, ARTERIES["RCA"].value}
    imgs = _items(sr, "IMAGE")
    assert len(imgs) == 4
    assert sorted(int(i.ReferencedSOPSequence[0].ReferencedFrameNumber) for i in imgs) == [3, 3, 7, 7]
    # the not-analysed instance and its reason
    assert any("modality SR not processed" in t for t in texts)
    # it round-trips through a file
    p = save(sr, tmp_path / "sr.dcm")
    back = pydicom.dcmread(p)
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    assert any("狭窄" in it.TextValue for it in _items(back, "TEXT"))


def test_codes_match_the_standard():
    """Standard codes used by the encoder, checked against pydicom's copy of PS3.16."""
    assert codes.SCT.LeftCoronaryArtery.value == ARTERIES["LCA"].value
    assert codes.SCT.RightCoronaryArtery.value == ARTERIES["RCA"].value
    assert codes.LN.Findings.value == SECTION_CODES["findings"].value
    assert codes.DCM.ProcessingEquipment.value == "109102"
    assert codes.DCM.LanguageOfContentItemAndDescendants.value == "121049"


def test_complete_when_everything_analysed():
    su = generate_uid()
    sources = [make_xa(su)]
    res = make_result(sources, synthetic_demo=False)
    sr = build_sr(sources, res)
    assert sr.CompletionFlag == "COMPLETE"
    assert not any("synthetic data" in it.TextValue for it in _items(sr, "TEXT"))
    assert build_sr(sources, res, complete=False).CompletionFlag == "PARTIAL"
    # an out-of-scope instance flagged "expected" keeps it COMPLETE; an unexpected skip does not
    res.not_analysed = [{"sop_instance_uid": generate_uid(), "reason": "modality SR is not analysed",
                         "expected": True}]
    assert build_sr(sources, res).CompletionFlag == "COMPLETE"
    res.not_analysed.append({"sop_instance_uid": generate_uid(), "reason": "undecodable"})
    assert build_sr(sources, res).CompletionFlag == "PARTIAL"


def test_incomplete_header_is_filled_empty_never_invented():
    su = generate_uid()
    src = make_xa(su, omit=MISSING)
    sr = build_sr([src], make_result([src]))
    for kw in MISSING:
        assert kw in sr, kw
        assert str(sr[kw].value or "") == "", kw
    # the source was not modified
    assert "PatientName" not in src


def test_gaps_filled_from_other_instances_of_the_study():
    su = generate_uid()
    bare = make_xa(su, omit=MISSING)
    full = make_xa(su, series_number=2)
    sr = build_sr([bare, full], make_result([bare, full]))
    assert str(sr.PatientName) == "Test^Patient" and sr.PatientID == "PID0001"


def test_japanese_patient_name_from_iso2022_source(tmp_path):
    su = generate_uid()
    src = make_xa(su, charset=["", "ISO 2022 IR 87"], patient_name="Yamada^Tarou=山田^太郎")
    p = tmp_path / "src.dcm"
    src.save_as(p, enforce_file_format=True)
    src = pydicom.dcmread(p, stop_before_pixels=True)
    sr = build_sr([src], make_result([src]))
    out = save(sr, tmp_path / "sr.dcm")
    assert str(pydicom.dcmread(out).PatientName) == "Yamada^Tarou=山田^太郎"


def test_predecessor_is_referenced():
    su = generate_uid()
    sources = [make_xa(su)]
    first = build_sr(sources, make_result(sources))
    second = build_sr(sources, make_result(sources), predecessor=first, series_uid=first.SeriesInstanceUID,
                      instance_number=2)
    pre = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pre.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert second.InstanceNumber == 2 and second.SeriesInstanceUID == first.SeriesInstanceUID


@pytest.mark.parametrize("mutate, message", [
    (lambda s, r: r.runs[0].__setattr__("sop_instance_uid", generate_uid()), "is not among the source_datasets"),
    (lambda s, r: r.runs[0].key_frames[0].__setattr__("frame_number", 99), "outside 1..8"),
    (lambda s, r: r.model.__setattr__("device_uid", ""), "device_uid"),
    (lambda s, r: delattr(s[0], "SOPInstanceUID"), "SOPInstanceUID"),
    (lambda s, r: s[0].__setattr__("StudyInstanceUID", generate_uid()), "StudyInstanceUID"),
    (lambda s, r: r.report.clear(), "result.report"),
    (lambda s, r: r.runs[0].__setattr__("laterality", "LAD"), "laterality"),
], ids=["unknown-run", "frame-out-of-range", "no-device-uid", "no-sop-uid", "other-study", "no-report",
        "bad-laterality"])
def test_errors_name_the_attribute(mutate, message):
    su = generate_uid()
    sources = [make_xa(su)]
    res = make_result(sources)
    mutate(sources, res)
    with pytest.raises(EncodingError, match=message):
        build_sr(sources, res)


def test_run_with_error_is_listed_as_not_analysed():
    su = generate_uid()
    sources = [make_xa(su), make_xa(su, series_number=2)]
    res = make_result(sources)
    res.runs[1].error = "undecodable pixel data"
    res.runs[1].laterality = None
    sr = build_sr(sources, res)
    assert sr.CompletionFlag == "PARTIAL"
    assert len(_items(sr, "IMAGE")) == 2
    assert any("undecodable pixel data" in it.TextValue for it in _items(sr, "TEXT"))


@require_tools("dciodvfy", "dsrdump", "dsr2html")
@pytest.mark.peers
def test_validators_accept_sr(study, tmp_path):
    sources, result = study
    # one source with a bare header: the real-world case
    sources.append(make_xa(sources[0].StudyInstanceUID, series_number=3, omit=MISSING))
    result = make_result(sources, not_analysed=result.not_analysed)
    first = build_sr(sources, result)
    sr = build_sr(sources, result, predecessor=first)
    p = save(sr, tmp_path / "sr.dcm")
    dump = validated_dump(p)
    assert "Japanese" in dump and "Left Coronary Artery" in dump
    html = render_html(p, tmp_path / "sr.html")
    text = html.read_text(encoding="utf-8")
    assert "狭窄" in text and "AI-generated draft, not verified" in text


@pytest.mark.peers
@require_tools("dciodvfy")
def test_sr_on_real_xa_headers(real_xa_files, tmp_path):
    """Real public XA/RF headers (incomplete in their own ways) still give a valid SR."""
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in real_xa_files]
    su = sources[0].StudyInstanceUID
    for ds in sources:  # one study for the test
        ds.StudyInstanceUID = su
    xa = [ds for ds in sources if ds.get("NumberOfFrames")]
    for ds in xa:
        ds.Modality = "XA"
    res = make_result(xa)
    for run in res.runs:
        n = int(next(d for d in xa if d.SOPInstanceUID == run.sop_instance_uid).NumberOfFrames)
        run.key_frames = [k for k in run.key_frames if k.frame_number <= n] or []
    sr = build_sr(sources, res)
    p = save(sr, tmp_path / "real.dcm")
    _errors, _warnings, out = dciodvfy_counts(p)
    # Errors about the sources' own (invalid, e.g. "999.999.1.19941016...") UIDs, which the SR
    # must reference verbatim, are the only ones allowed.
    src_uids = {str(ds.get(k, "")) for ds in sources for k in ("SOPInstanceUID", "SeriesInstanceUID")}
    own = [line for line in out.splitlines() if line.startswith("Error")
           and not any(u and u in line for u in src_uids)
           and "contains invalid data values" not in line]
    assert own == [], out


def test_broken_header_is_left_out_unless_strict():
    from pydicom.dataset import Dataset

    from dicom_node.sr import prepare_evidence

    su = generate_uid()
    good = make_xa(su)
    broken = Dataset()
    broken.PatientName = "X^Y"  # e.g. a non-DICOM file read with force=True
    other_study = make_xa(generate_uid())
    sr = build_sr([broken, good, other_study], make_result([good]))
    ev = [i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
          for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert ev == [good.SOPInstanceUID]
    with pytest.raises(EncodingError, match=r"source_datasets\[0\]: StudyInstanceUID is absent"):
        prepare_evidence([broken, good], su, strict=True)


def test_language_disagreement_is_written_in_both_languages():
    from inference.vlm.findings import language_discrepancies

    su = generate_uid()
    sources = [make_xa(su)]
    res = make_result(sources, synthetic_demo=False)
    assert language_discrepancies(res.report) == []  # the shared fixture's drafts agree
    sr = build_sr(sources, res)
    assert not any("disagree" in it.TextValue for it in _items(sr, "TEXT"))

    res.report["ja"].recommendation = "冠動脈バイパス術（CABG）を推奨。"
    res.discrepancies = language_discrepancies(res.report)
    assert res.discrepancies == ["recommended treatment: EN PCI, JA CABG"]
    sr = build_sr(sources, res)
    texts = [it.TextValue for it in _items(sr, "TEXT")]
    en = [t for t in texts if t.startswith("The English and Japanese drafts disagree")]
    assert en and "EN PCI, JA CABG" in en[0]
    assert any("英語と日本語の下書きの内容が一致しません" in t for t in texts)
    assert sr.CompletionFlag == "COMPLETE"  # the content is whole; the note tells the reader what to check
    res.discrepancies = [""]
    with pytest.raises(EncodingError, match=r"result\.discrepancies\[0\]"):
        build_sr(sources, res)
