"""The whole product on one machine: a study in over DICOM, an SR + KOS out to a real PACS.

Real parts throughout: the node's listener on TCP, dcmtk storescu as the
modality, dcmtk storescp / Orthanc as the PACS, ONNX Runtime, a transformers
VLM trained on synthetic data, SQLite, dciodvfy and dsrdump as validators.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import parse_config

from dicom_node.demo import free_port
from cagtest.pacs import SilentPeer
from dicom_node.sr_templates import CagReport
from cagtest.wait import wait_state

pytestmark = pytest.mark.slow


def node_config(tmp_path: Path, bundle: Path, dest_port: int, dest_aet: str = "PACS", **over) -> object:
    data = {
        "node": {"processes": 1, "port": free_port(), "allowed_calling_aets": ["MODALITY", "ORTHANC", "STORESCU"]},
        "storage": {"path": str(tmp_path / "spool"), "journal": f"sqlite:///{tmp_path / 'journal.db'}",
                    "min_free_mb": 10},
        "completion": {"quiet_seconds": 1},
        "models": {"bundle": str(bundle)},
        "destinations": [{"name": "pacs", "ae_title": dest_aet, "host": "127.0.0.1", "port": dest_port}],
        "outbox": {"retry_base_s": 0.5, "poll_s": 0.3},
        "admin": {"port": 0},
    }
    for section, values in over.items():
        data.setdefault(section, {}).update(values)
    return parse_config(data, base_dir=tmp_path)


def storescu(files, port, calling="MODALITY", called="CAGNODE"):
    return subprocess.run(["storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120)


def sr_items(ds):
    """Flatten an SR content tree into (value type, concept meaning, item) tuples."""
    out = []

    def walk(items):
        for it in items or []:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            out.append((it.ValueType, name, it))
            walk(it.get("ContentSequence"))

    walk(ds.ContentSequence)
    return out


def send_and_wait(tmp_path, bundle, files, storescp, **over) -> str:
    """A node on ``bundle`` receives ``files`` from storescu and sends its results to
    ``storescp``; returns the StudyInstanceUID once the study is sent."""
    from dicom_node.node import Node

    cfg = node_config(tmp_path, bundle, storescp.port, storescp.aet, **over)
    node = Node(cfg)
    node.start()
    try:
        r = storescu(files, cfg.node.port)
        assert r.returncode == 0, r.stderr
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        st = wait_state(node, study_uid)
        assert st.state == "sent", st.error
    finally:
        node.stop()
    return study_uid


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")
def test_study_in_sr_and_kos_out(tmp_path, demo_bundle, held_out_study, storescp):
    study_uid = send_and_wait(tmp_path, demo_bundle, held_out_study, storescp)

    got = [pydicom.dcmread(p) for p in storescp.files()]
    srs = [d for d in got if d.Modality == "SR"]
    kos = [d for d in got if d.Modality == "KO"]
    assert len(srs) == 1 and len(kos) == 1
    sr = srs[0]
    assert sr.StudyInstanceUID == study_uid
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SpecificCharacterSet in ("ISO_IR 192", ["ISO_IR 192"])
    # Every key frame referenced by the SR points at a received run and a real frame number.
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID):
            int(pydicom.dcmread(f, stop_before_pixels=True).NumberOfFrames) for f in held_out_study}
    doc = CagReport.from_dataset(sr)
    key_frames = [k for r in doc.runs for k in r.key_frames]
    assert key_frames, "the SR references no key frame"
    for k in key_frames:
        assert k.sop_instance_uid in sent and 1 <= k.frame_number <= sent[k.sop_instance_uid]
    assert any("synthetic" in t.lower() for t in doc.statements), "demo SR must say a synthetic-data model wrote it"
    ja = doc.narrative("ja")
    assert ja is not None and any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff"
                                  for t in ja.sections.values() for ch in t), "no Japanese text in the SR"

    if shutil.which("dciodvfy"):
        for p in storescp.files():
            out = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True)
            errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
            assert not errors, f"{p.name}: {errors}"
    if shutil.which("dsrdump"):
        for p in storescp.files():
            out = subprocess.run(["dsrdump", str(p)], capture_output=True, text=True, errors="replace")
            assert out.returncode == 0, out.stderr


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")
def test_non_angiography_study_still_gets_an_sr(tmp_path, demo_bundle, storescp):
    """A study with no XA run: stored, not analysed, and an SR says so."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from dicom_node.node import Node

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.PatientName, ds.PatientID = "Test^Other", "X1"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = bytes(64)
    f = tmp_path / "sc.dcm"
    ds.save_as(f, enforce_file_format=True)

    cfg = node_config(tmp_path, demo_bundle, storescp.port, storescp.aet)
    node = Node(cfg)
    node.start()
    try:
        assert storescu([f], cfg.node.port).returncode == 0
        st = wait_state(node, ds.StudyInstanceUID)
        assert st.state == "sent", st.error
    finally:
        node.stop()
    srs = [pydicom.dcmread(p) for p in storescp.files()]
    srs = [d for d in srs if d.Modality == "SR"]
    assert len(srs) == 1
    text = " ".join(it.TextValue for vt, _, it in sr_items(srs[0]) if vt == "TEXT")
    assert "not analysed" in text.lower() or "no coronary" in text.lower()


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")
def test_hung_model_fails_the_study_not_the_node(tmp_path, demo_bundle, held_out_study, storescp):
    from dicom_node.node import Node

    hung = SilentPeer()
    cfg = node_config(tmp_path, demo_bundle, storescp.port, storescp.aet,
                      vlm={"backend": "openai", "url": f"http://127.0.0.1:{hung.port}/v1", "model": "x",
                           "timeout_s": 60, "retries": 0},
                      processing={"vlm_timeout_s": 3})
    node = Node(cfg)
    node.start()
    try:
        assert storescu(held_out_study, cfg.node.port).returncode == 0
        study_uid = str(pydicom.dcmread(held_out_study[0], stop_before_pixels=True).StudyInstanceUID)
        st = wait_state(node, study_uid)
        assert st.state == "failed"
        assert "vlm" in (st.stage or "") + (st.error or "")
        # The node still receives while the model thread hangs.
        r = subprocess.run(["echoscu", "-aet", "MODALITY", "-aec", "CAGNODE", "127.0.0.1", str(cfg.node.port)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    finally:
        node.stop()
        hung.close()


@pytest.mark.skipif(shutil.which("Orthanc") is None or shutil.which("dciodvfy") is None,
                    reason="Orthanc / dicom3tools not installed")
def test_orthanc_forwards_and_receives_the_sr(tmp_path, demo_bundle, held_out_study):
    """Orthanc → node → Orthanc: the PACS loop of a real deployment."""
    from dicom_node.node import Node
    from dicom_node.orthanc import OrthancProcess

    node_port = free_port()
    orthanc = OrthancProcess(tmp_path / "orthanc", node_port=node_port)
    cfg = node_config(tmp_path, demo_bundle, orthanc.dicom_port, orthanc.aet, node={"port": node_port})
    orthanc.start()
    node = Node(cfg)
    node.start()
    try:
        ids = [orthanc.upload(f) for f in held_out_study]
        orthanc.send_to_node(ids)
        study_uid = str(pydicom.dcmread(held_out_study[0], stop_before_pixels=True).StudyInstanceUID)
        st = wait_state(node, study_uid)
        assert st.state == "sent", st.error
        found_sr = orthanc.find(study_uid, "SR")
        found_ko = orthanc.find(study_uid, "KO")
        assert len(found_sr) == 1 and len(found_ko) == 1
        saved = orthanc.download_results(study_uid, tmp_path / "results")
        for p in saved:
            out = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True)
            errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
            assert not errors, f"{p.name}: {errors}"
        # The node's instances are in Orthanc's study: the SR sits beside the runs.
        meta = orthanc.get(f"/instances/{found_sr[0]}/metadata?expand")
        assert meta.get("RemoteAET") == cfg.node.ae_title
    finally:
        node.stop()
        orthanc.stop()


def test_demo_command_end_to_end(tmp_path, demo_bundle):
    """`cag-node demo` with a prepared bundle: exit 0, both languages printed, HTML written."""
    import sys

    exe = Path(sys.executable).with_name("cag-node")
    r = subprocess.run([str(exe), "demo", "--bundle", str(demo_bundle), "--out", str(tmp_path / "out"),
                        "--quick", "--timeout", "300"], capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[en]" in r.stdout and "[ja]" in r.stdout
    assert "SR  ->" in r.stdout
    assert (tmp_path / "out" / "report.html").is_file()


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk not installed")
def test_lesions_reach_the_sr_without_a_vlm(tmp_path, demo_bundle, held_out_study, storescp):
    """vlm.backend none + the bundle's lesion model: the templated draft and every lesion as a
    coded finding located on its key frame.  The quick bundle's lesion model is barely trained,
    so its peak threshold is lowered (and peaks kept far apart) to make it report some."""
    from inference.bundle import Bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle)
    b = Bundle.load(bundle)
    assert b.manifest.lesions is not None, "the demo bundle has a lesion model"
    b.manifest.lesions.peak_threshold = 0.0
    b.manifest.lesions.min_distance = 40
    b.manifest.lesions.vessel_threshold = 0.0
    b.save_manifest()
    send_and_wait(tmp_path, bundle, held_out_study, storescp, vlm={"backend": "none"})
    sr = next(d for d in (pydicom.dcmread(p) for p in storescp.files()) if d.Modality == "SR")
    items = sr_items(sr)
    sites = [it for vt, name, it in items if vt == "CODE" and name == "Finding Site"]
    assert sites, "no lesion finding in the SR"
    scoords = [it for vt, _, it in items if vt == "SCOORD"]
    assert scoords
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in held_out_study}
    for sc in scoords:
        img = sc.ContentSequence[0]
        assert img.ValueType == "IMAGE" and img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in sent
        assert "ReferencedFrameNumber" in img.ReferencedSOPSequence[0]
    texts = " ".join(it.TextValue for vt, _, it in items if vt == "TEXT")
    assert "coronary angiography" in texts.lower() and "Recommend" in texts or "recommended" in texts
    if shutil.which("dciodvfy"):
        p = next(p for p in storescp.files() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR")
        out = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True)
        assert not [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
