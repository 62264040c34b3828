"""Lesion findings in the Comprehensive SR: codes, values, frame-level SCOORD references, validation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pydicom
import pytest
from pydicom.sr._cid_dict import cid_concepts
from pydicom.sr._concepts_dict import concepts
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.kos import build_kos
from dicom_node.sr import (
    CERTAINTY,
    DIAMETER_STENOSIS,
    FINDING,
    FINDING_SITE,
    OCCLUSION,
    PRIVATE_SCHEME,
    SEGMENT_SITES,
    STENOSIS,
    EncodingError,
    build_sr,
    iter_content,
    render_html,
    save,
)
from inference.types import SEGMENTS, LesionFinding
from cagtest.results import MISSING, make_result, make_xa, require_tools, validated_dump


# --------------------------------------------------------------------------- helpers
def _study(n_frames_b: int = 10):
    """Two XA runs (16 x 16, 8 and ``n_frames_b`` frames; key frames 3 and 7) and three lesions:
    LAD #7 on a key frame, an occluded OM (#12, private code) on frame 5 (not a key frame) with a
    centreline, RCA #2 on the second run at the bottom-right corner of the image."""
    su = generate_uid()
    a = make_xa(su, series_number=1)
    b = make_xa(su, series_number=2, n_frames=n_frames_b)
    res = make_result([a, b])
    res.lesions = [
        LesionFinding(a.SOPInstanceUID, 3, 7, 88.4, 5.5, 6.25, confidence=0.87,
                      reference_diameter_px=6.0, minimal_diameter_px=0.7),
        LesionFinding(a.SOPInstanceUID, 5, 12, 100.0, 10.0, 12.0, confidence=0.6,
                      polyline=[(9.0, 11.0), (10.0, 12.0), (11.5, 13.0)]),
        LesionFinding(b.SOPInstanceUID, 7, 2, 74.0, 16.0, 16.0, confidence=0.91),
    ]
    return [a, b], res


def _code(seq) -> tuple[str, str, str]:
    c = seq[0]
    return c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning


def _name(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning


def _groups(ds):
    return [it for it in iter_content(ds)
            if it.ValueType == "CONTAINER" and _name(it) == "Measurement Group"]


def _child(item, meaning, value_type=None):
    out = [c for c in item.get("ContentSequence", [])
           if _name(c) == meaning and (value_type is None or c.ValueType == value_type)]
    assert len(out) == 1, (meaning, len(out))
    return out[0]


def _num(item) -> tuple[float, tuple[str, str, str]]:
    mv = item.MeasuredValueSequence[0]
    return float(mv.NumericValue), _code(mv.MeasurementUnitsCodeSequence)


def _scoords(group):
    num = _child(group, DIAMETER_STENOSIS.meaning, "NUM")
    return {_name(s): s for s in num.ContentSequence if s.ValueType == "SCOORD"}


def _image_ref(scoord):
    (img,) = [c for c in scoord.ContentSequence if c.ValueType == "IMAGE"]
    assert img.RelationshipType == "SELECTED FROM"
    ref = img.ReferencedSOPSequence[0]
    return ref.ReferencedSOPInstanceUID, int(ref.ReferencedFrameNumber)


# --------------------------------------------------------------------------- content
def test_lesions_are_coded_findings_on_their_frames(tmp_path):
    sources, res = _study()
    sr = build_sr(sources, res)
    back = pydicom.dcmread(save(sr, tmp_path / "sr.dcm"))

    (section,) = [it for it in back.ContentSequence
                  if it.ValueType == "CONTAINER" and _code(it.ConceptNameCodeSequence) == ("121070", "DCM", "Findings")]
    assert section.RelationshipType == "CONTAINS"
    algo = {_name(c): c.TextValue for c in section.ContentSequence if c.RelationshipType == "HAS CONCEPT MOD"}
    assert algo["Algorithm Name"] == "cag-vlm-demo" and algo["Algorithm Version"] == "0.1.0"
    groups = _groups(back)
    assert len(groups) == 3 and all(g in section.ContentSequence for g in groups)

    for i, (group, les) in enumerate(zip(groups, res.lesions)):
        assert _child(group, "Tracking Identifier").TextValue == f"Lesion {i + 1}"
        assert _child(group, "Tracking Identifier").RelationshipType == "HAS OBS CONTEXT"
        assert _child(group, "Tracking Unique Identifier").UID
        finding = _child(group, FINDING.meaning, "CODE")
        expected_finding = OCCLUSION if les.stenosis_pct == 100 else STENOSIS
        assert _code(finding.ConceptCodeSequence)[:2] == (expected_finding.value, "SCT")
        site = _child(group, FINDING_SITE.meaning, "CODE")
        assert _code(site.ConceptNameCodeSequence) == ("363698007", "SCT", "Finding Site")
        assert site.RelationshipType == "HAS CONCEPT MOD"
        want = SEGMENT_SITES[les.segment]
        assert _code(site.ConceptCodeSequence) == (want.value, want.scheme_designator, want.meaning)

        num = _child(group, DIAMETER_STENOSIS.meaning, "NUM")
        assert _code(num.ConceptNameCodeSequence)[:2] == ("408715008", "SCT")
        value, unit = _num(num)
        assert value == pytest.approx(les.stenosis_pct, abs=0.05)
        assert unit[:2] == ("%", "UCUM")
        conf = _child(group, CERTAINTY.meaning, "NUM")
        assert _code(conf.ConceptNameCodeSequence)[:2] == ("111012", "DCM")
        cvalue, cunit = _num(conf)
        assert cvalue == pytest.approx(les.confidence, abs=5e-4) and cunit[:2] == ("1", "UCUM")

        sc = _scoords(group)
        center = sc["Center"]
        assert center.RelationshipType == "INFERRED FROM" and center.GraphicType == "POINT"
        assert [float(v) for v in center.GraphicData] == pytest.approx([les.x, les.y])
        assert _image_ref(center) == (les.sop_instance_uid, les.frame_number)
        comment = _child(group, "Comment").TextValue
        assert f"AHA segment {les.segment} ({SEGMENTS[les.segment][2]}" in comment
        assert f"frame {les.frame_number} of run {les.sop_instance_uid}" in comment

    # the occlusion's centreline, on the same frame
    sc = _scoords(groups[1])
    line = sc["Centerline"]
    assert line.GraphicType == "POLYLINE"
    assert np.asarray(line.GraphicData, dtype=float).reshape(-1, 2).tolist() == [[9, 11], [10, 12], [11.5, 13]]
    assert _image_ref(line) == (res.lesions[1].sop_instance_uid, 5)
    assert "total occlusion" in _child(groups[1], "Comment").TextValue
    assert "graded 90% stenosis" in _child(groups[0], "Comment").TextValue
    assert "reference diameter 6 px" in _child(groups[0], "Comment").TextValue.lower()
    # the private code of AHA 12 is declared
    declared = {i.CodingSchemeDesignator for i in back.CodingSchemeIdentificationSequence}
    assert PRIVATE_SCHEME in declared


def test_codes_come_from_the_standard():
    """Finding sites from CID 3014 (12: private, 14: CID 3015/3604), findings from CID 3810,
    checked against pydicom's copy of PS3.16."""
    def cid_codes(cid):
        return {code: meaning for scheme, kws in cid_concepts[cid].items() for kw in kws
                for code, (meaning, _c) in concepts[scheme][kw].items()}

    cid3014, cid3604, cid3015, cid3810 = (cid_codes(c) for c in (3014, 3604, 3015, 3810))
    assert set(SEGMENT_SITES) == set(SEGMENTS) == set(range(1, 16))
    for seg, code in SEGMENT_SITES.items():
        if seg == 12:
            assert code.scheme_designator == PRIVATE_SCHEME
            continue
        assert code.scheme_designator == "SCT"
        assert code.value in cid3604 and code.value in cid3015, seg
        table = cid3014 if seg != 14 else cid3015
        assert table.get(code.value) == code.meaning, seg
        if seg != 14:
            assert code.value in cid3014
    assert "57823005" not in cid3014  # why 14 comes from CID 3015/3604
    assert len({c.value for c in SEGMENT_SITES.values()}) == 15
    assert cid3810[STENOSIS.value] == STENOSIS.meaning and cid3810[OCCLUSION.value] == OCCLUSION.meaning
    assert codes.SCT.FindingSite.value == FINDING_SITE.value
    assert codes.SCT.LumenDiameterStenosis.value == DIAMETER_STENOSIS.value
    assert codes.DCM.CertaintyOfFinding.value == CERTAINTY.value
    assert codes.DCM.Finding.value == FINDING.value
    assert codes.DCM.Center.value == "111010" and codes.DCM.Centerline.value == "130490"


def test_without_lesions_the_content_is_unchanged():
    """Lesions only add the Findings container: everything else is what an SR without them has."""
    sources, res = _study()
    uid, series = generate_uid(), generate_uid()
    with_lesions = build_sr(sources, res, sop_instance_uid=uid, series_uid=series)
    bare = copy.deepcopy(res)
    bare.lesions = []
    without = build_sr(sources, bare, sop_instance_uid=uid, series_uid=series)
    assert not _groups(without)
    kept = [it for it in with_lesions.ContentSequence
            if not (it.ValueType == "CONTAINER" and _name(it) == "Findings")]
    assert len(kept) == len(with_lesions.ContentSequence) - 1
    assert [it.to_json_dict() for it in kept] == [it.to_json_dict() for it in without.ContentSequence]
    assert with_lesions.CompletionFlag == without.CompletionFlag
    params = lambda ds: [it.TextValue for it in iter_content(ds)  # noqa: E731
                         if it.ValueType == "TEXT" and _name(it) == "Algorithm Parameters"]
    assert params(without) == params(with_lesions)[:len(params(without))]


def test_lesion_off_the_key_frames_keeps_sr_and_kos_key_frames_in_step():
    """A lesion on a frame that is not a key frame is located on its own frame in the SR; the
    key frames (SR "Key Images" and the KOS) stay the selector's, the same in both objects."""
    sources, res = _study()
    sr = build_sr(sources, res)
    kos = build_kos(sources, res)

    def key_images(ds, container=None):
        items = iter_content(ds) if container is None else iter_content(container)
        return sorted((i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                       int(i.ReferencedSOPSequence[0].ReferencedFrameNumber))
                      for i in items if i.ValueType == "IMAGE")

    (key_section,) = [it for it in sr.ContentSequence if it.ValueType == "CONTAINER" and _name(it) == "Key Images"]
    expected = sorted((r.sop_instance_uid, k.frame_number) for r in res.runs for k in r.key_frames)
    assert key_images(sr, key_section) == expected == key_images(kos)
    off = res.lesions[1]
    assert off.frame_number not in [k.frame_number for k in res.runs[0].key_frames]
    assert (off.sop_instance_uid, 5) not in key_images(kos)
    assert _image_ref(_scoords(_groups(sr)[1])["Center"]) == (off.sop_instance_uid, 5)
    assert "not one of the run's key frames: 3, 7" in _child(_groups(sr)[1], "Comment").TextValue
    assert "not one of" not in _child(_groups(sr)[0], "Comment").TextValue
    ev = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
          for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert off.sop_instance_uid in ev


def test_segment_on_the_other_side_is_noted_not_refused():
    sources, res = _study()
    res.lesions = [LesionFinding(res.runs[1].sop_instance_uid, 3, 6, 50.0, 4.0, 4.0, confidence=0.4)]  # LAD on RCA run
    sr = build_sr(sources, res)
    assert "segment is on the LCA but the run was classified RCA" in _child(_groups(sr)[0], "Comment").TextValue


def test_frame_limit_falls_back_to_the_runs_frame_count():
    sources, res = _study()
    del sources[0].NumberOfFrames  # header without it: the selector's n_frames (8) bounds the frame
    res.lesions = [LesionFinding(sources[0].SOPInstanceUID, 8, 7, 60.0, 1.0, 1.0)]
    assert len(_groups(build_sr(sources, res))) == 1
    res.lesions[0].frame_number = 9
    with pytest.raises(EncodingError, match=r"result\.lesions\[0\]\.frame_number: frame 9 outside 1\.\.8"):
        build_sr(sources, res)


# --------------------------------------------------------------------------- validation
def _set(i, attr, value):
    return lambda s, r: setattr(r.lesions[i], attr, value)


@pytest.mark.parametrize("mutate, message", [
    (_set(2, "sop_instance_uid", "1.2.3.4"),
     r"result\.lesions\[2\]\.sop_instance_uid: 1\.2\.3\.4 is not among the analysed runs"),
    (lambda s, r: (setattr(r.runs[1], "error", "undecodable"), setattr(r.runs[1], "laterality", None)),
     r"result\.lesions\[2\]\.sop_instance_uid: .* is not among the analysed runs"),
    (_set(2, "frame_number", 11), r"result\.lesions\[2\]\.frame_number: frame 11 outside 1\.\.10"),
    (_set(0, "frame_number", 0), r"result\.lesions\[0\]\.frame_number: frame 0 outside"),
    (_set(0, "frame_number", 2.0), r"result\.lesions\[0\]\.frame_number: expected an integer"),
    (_set(0, "x", 16.5), r"result\.lesions\[0\]\.x \(Columns 16\): 16\.5 outside 0\.\.16"),
    (_set(0, "y", -0.1), r"result\.lesions\[0\]\.y \(Rows 16\): -0\.1 outside 0\.\.16"),
    (_set(0, "x", math.nan), r"result\.lesions\[0\]\.x .*not a finite number"),
    (_set(1, "polyline", [(1.0, 1.0), (1.0, 17.0)]), r"result\.lesions\[1\]\.polyline\[1\] y \(Rows 16\): 17 outside"),
    (_set(1, "polyline", [(1.0, 1.0)]), r"result\.lesions\[1\]\.polyline: a polyline needs at least 2 points"),
    (_set(1, "polyline", [(1.0, 1.0), (2.0,)]), r"result\.lesions\[1\]\.polyline\[1\]: expected an \(x, y\) pair"),
    (_set(0, "segment", 16), r"result\.lesions\[0\]\.segment: 16 is not an AHA segment"),
    (_set(0, "stenosis_pct", 101.0), r"result\.lesions\[0\]\.stenosis_pct: 101 outside 0\.\.100"),
    (_set(0, "confidence", 1.5), r"result\.lesions\[0\]\.confidence: 1\.5 outside 0\.\.1"),
    (_set(0, "minimal_diameter_px", -1.0), r"result\.lesions\[0\]\.minimal_diameter_px: -1 outside >= 0"),
    (lambda s, r: r.lesions.append({"segment": 7}), r"result\.lesions\[3\]: expected LesionFinding, got dict"),
    (lambda s, r: setattr(r, "lesions", "LAD 90%"), r"result\.lesions: expected a list of LesionFinding"),
], ids=["unknown-run", "run-not-analysed", "frame-beyond-NumberOfFrames", "frame-zero", "frame-not-int",
        "x-beyond-Columns", "y-negative", "x-nan", "polyline-outside", "polyline-one-point", "polyline-bad-pair",
        "bad-segment", "stenosis-over-100", "confidence-over-1", "negative-diameter", "not-a-lesion",
        "not-a-list"])
def test_bad_lesions_name_the_attribute(mutate, message):
    sources, res = _study()
    mutate(sources, res)
    with pytest.raises(EncodingError, match=message):
        build_sr(sources, res)


def test_corner_coordinates_are_inside():
    """SCOORD image-relative: (0, 0) and (Columns, Rows) are the image's outer corners."""
    sources, res = _study()
    res.lesions[0].x, res.lesions[0].y = 0.0, 0.0
    res.lesions[2].x, res.lesions[2].y = 16, 16  # ints too
    assert len(_groups(build_sr(sources, res))) == 3


# --------------------------------------------------------------------------- validators
@require_tools("dciodvfy", "dsrdump", "dsr2html")
@pytest.mark.peers
def test_validators_accept_sr_with_lesions(tmp_path):
    sources, res = _study()
    sources.append(make_xa(sources[0].StudyInstanceUID, series_number=3, omit=MISSING))
    lesions = res.lesions
    res = make_result(sources)
    res.lesions = lesions
    p = save(build_sr(sources, res), tmp_path / "sr.dcm")
    dump = validated_dump(p)
    assert "Measurement Group" in dump and "(POINT,5.5/6.25)" in dump
    text = render_html(p, tmp_path / "sr.html").read_text(encoding="utf-8")
    for les in lesions:
        assert SEGMENT_SITES[les.segment].meaning in text
        assert "Finding Site" in text
    for shown in ("88.4 %", "100.0 %", "74.0 %", "88.4% diameter stenosis", "74% diameter stenosis"):
        assert shown in text, shown
