"""Key Object Selection: frame-level references to the key frames, validators."""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid

from dicom_node.kos import KOS_SOP_CLASS_UID, TITLE_OF_INTEREST, build_kos
from dicom_node.sr import EncodingError, CodedConcept, iter_content, save
from cagtest.results import MISSING, make_result, make_xa, require_tools, validated_dump


def test_kos_references_frames(study):
    sources, result = study
    kos = build_kos(sources, result)
    assert kos.SOPClassUID == KOS_SOP_CLASS_UID and kos.Modality == "KO"
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113020"
    imgs = [it for it in iter_content(kos) if it.ValueType == "IMAGE"]
    refs = sorted((i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                   int(i.ReferencedSOPSequence[0].ReferencedFrameNumber)) for i in imgs)
    expected = sorted((r.sop_instance_uid, k.frame_number) for r in result.runs for k in r.key_frames)
    assert refs == expected
    # evidence = exactly the referenced instances
    ev = {i.ReferencedSOPInstanceUID for s in kos.CurrentRequestedProcedureEvidenceSequence
          for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert ev == {r.sop_instance_uid for r in result.runs}
    desc = [it.TextValue for it in iter_content(kos) if it.ValueType == "TEXT"]
    assert any("not verified" in d for d in desc)


def test_kos_title_and_errors(study):
    sources, result = study
    assert build_kos(sources, result, title=TITLE_OF_INTEREST).ConceptNameCodeSequence[0].CodeValue == "113000"
    with pytest.raises(EncodingError, match="title"):
        build_kos(sources, result, title=CodedConcept("121070", "DCM", "Findings"))
    for r in result.runs:
        r.key_frames = []
    with pytest.raises(EncodingError, match="no key frame"):
        build_kos(sources, result)


@require_tools("dciodvfy", "dsrdump")
@pytest.mark.peers
def test_validators_accept_kos(tmp_path):
    su = generate_uid()
    sources = [make_xa(su, omit=MISSING), make_xa(su, series_number=2)]
    kos = build_kos(sources, make_result(sources))
    assert str(kos.PatientName) == "Test^Patient"  # taken from the complete header of the study
    p = save(kos, tmp_path / "kos.dcm")
    assert "For Report Attachment" in validated_dump(p)
