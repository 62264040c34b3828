"""STOW-RS over a real loopback HTTP server: the same durable path as C-STORE,
clear per-instance failures, and a node that stays up on bad input."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import requests

from cagtest.web import pyscu_send, stow_body, synthetic_run_files, web_config


def _post(node, body, headers, path="/dicomweb/studies"):
    return requests.post(node.web.url + path, data=body, headers=headers, timeout=30)


def test_stow_with_dicomweb_client_stores_and_journals(tmp_path, start_node):
    from dicomweb_client.api import DICOMwebClient

    node = start_node(web_config(tmp_path))
    study, files = synthetic_run_files(tmp_path / "in", 3)
    client = DICOMwebClient(url=node.web.url + "/dicomweb")
    resp = client.store_instances([pydicom.dcmread(f) for f in files])
    refs = resp.ReferencedSOPSequence
    assert len(refs) == 3 and "FailedSOPSequence" not in resp
    st = node.journal.get_study(study)
    assert st.state == "receiving" and st.n_instances == 3
    for inst in node.journal.study_instances(study):
        assert Path(inst.path).is_file() and inst.calling_aet == "DICOMWEB" and inst.processable
        back = pydicom.dcmread(inst.path)
        assert back.file_meta.SourceApplicationEntityTitle == "DICOMWEB"
        orig = pydicom.dcmread(next(f for f in files if pydicom.dcmread(f).SOPInstanceUID == inst.sop_instance_uid))
        assert back.PixelData == orig.PixelData


def test_stow_and_cstore_land_in_the_same_study(tmp_path, start_node):
    node = start_node(web_config(tmp_path))
    study, files = synthetic_run_files(tmp_path / "in", 2)
    assert pyscu_send(node.port, [files[0]]) == [0]
    body, h = stow_body([files[1]])
    r = _post(node, body, h, f"/dicomweb/studies/{study}")
    assert r.status_code == 200, r.text
    assert node.journal.get_study(study).n_instances == 2
    assert r.json()["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{study}")


def test_non_dicom_part_is_409_with_reason_and_mixed_is_202(tmp_path, start_node):
    node = start_node(web_config(tmp_path))
    study, files = synthetic_run_files(tmp_path / "in", 1)
    body, h = stow_body([b"this is not DICOM"])
    r = _post(node, body, h)
    assert r.status_code == 409
    failed = r.json()["00081198"]["Value"]
    assert len(failed) == 1 and failed[0]["00081197"]["Value"] == [0xC000]
    assert "not a DICOM Part 10 file" in failed[0]["00000902"]["Value"][0]
    assert "not a DICOM Part 10 file" in r.headers["warning"]
    assert any("not a DICOM Part 10" in x["reason"] for x in node.journal.rejections())

    # a truncated DICOM part (header walk fails) next to a good one: 202, the good one stored
    raw = files[0].read_bytes()
    study2, files2 = synthetic_run_files(tmp_path / "in2", 1)
    body, h = stow_body([files2[0], raw[: len(raw) // 2]])
    r = _post(node, body, h)
    assert r.status_code == 202, r.text
    js = r.json()
    assert len(js["00081199"]["Value"]) == 1 and len(js["00081198"]["Value"]) == 1
    assert "malformed data set" in js["00081198"]["Value"][0]["00000902"]["Value"][0]
    assert node.journal.get_study(study2).n_instances == 1
    assert node.journal.get_study(study) is None  # the truncated one was never journaled


def test_wrong_study_in_url_is_refused(tmp_path, start_node):
    node = start_node(web_config(tmp_path))
    study, files = synthetic_run_files(tmp_path / "in", 1)
    body, h = stow_body(files)
    r = _post(node, body, h, "/dicomweb/studies/1.2.3.4")
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert node.journal.get_study(study) is None


@pytest.mark.parametrize("ctype,body,status,why", [
    ("application/dicom", b"x", 415, "multipart/related"),
    ('multipart/related; type="application/dicom+xml"; boundary=b', b"--b--", 415, "not supported"),
    ('multipart/related; type="application/dicom"', b"x", 400, "without a boundary"),
    ('multipart/related; type="application/dicom"; boundary=b', b"--b\r\n\r\nnever closed", 400, "closing boundary"),
    ('multipart/related; type="application/dicom"; boundary=b', b"garbage", 400, "no multipart boundary"),
    ('multipart/related; type="application/dicom"; boundary=b', b"--b--\r\n", 400, "no parts"),
])
def test_bad_requests_get_4xx_with_a_reason_and_the_node_stays_up(tmp_path, start_node, ctype, body, status, why):
    node = start_node(web_config(tmp_path))
    r = _post(node, body, {"Content-Type": ctype})
    assert r.status_code == status and why in r.text
    # still serving both faces
    study, files = synthetic_run_files(tmp_path / "in", 1)
    b2, h2 = stow_body(files)
    assert _post(node, b2, h2).status_code == 200
    assert pyscu_send(node.port, files) == [0]


def test_body_over_the_limit_is_413(tmp_path, start_node):
    node = start_node(web_config(tmp_path, web={"enabled": True, "port": 0, "max_upload_mb": 1}))
    study, files = synthetic_run_files(tmp_path / "in", 1, frames=4, size=600)  # ~1.4 MB
    body, h = stow_body(files)
    r = _post(node, body, h)
    assert r.status_code == 413 and "max_upload_mb" in r.text
    assert node.journal.get_study(study) is None


def test_web_off_by_default_keeps_the_node_as_before(tmp_path, start_node):
    cfg = web_config(tmp_path, web={"enabled": False})
    node = start_node(cfg)
    assert node.web is None
    assert not __import__("dicom_node.config", fromlist=["x"]).parse_config({}).web.enabled


def test_serve_prints_the_web_url_and_stops_cleanly(tmp_path):
    """``cag-node serve`` with web on: the ready line names the web URL, STOW works, SIGTERM exits 0."""
    import re

    import yaml

    from cagtest.node import NodeProcess

    cfg = {"node": {"processes": 1, "port": 0, "allowed_calling_aets": ["PYSCU"]},
           "storage": {"path": str(tmp_path / "spool"), "journal": f"sqlite:///{tmp_path / 'j.db'}", "min_free_mb": 1},
           "processing": {"enabled": False}, "admin": {"enabled": False}, "web": {"enabled": True, "port": 0}}
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    proc = NodeProcess(p).start()
    try:
        m = re.search(r"; web (http://127\.0\.0\.1:\d+)$", proc.ready_line)
        assert m, proc.ready_line
        study, files = synthetic_run_files(tmp_path / "in", 1)
        body, h = stow_body(files)
        assert requests.post(m.group(1) + "/dicomweb/studies", data=body, headers=h, timeout=30).status_code == 200
        assert proc.terminate() == 0
    finally:
        proc.kill9()
