"""A synthetic study in by STOW-RS, processed by the real pipeline (quick demo bundle),
then seen through the pages, QIDO-RS and WADO-RS."""

from __future__ import annotations

import io
import re

import pydicom
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.slow


def test_stow_study_is_stored_journaled_and_processed(processed):
    node, uid = processed["node"], processed["study_uid"]
    r = processed["stow"]
    assert r.status_code == 200, r.text
    assert len(r.json()["00081199"]["Value"]) == len(processed["files"])
    st = node.journal.get_study(uid)
    assert st.n_instances == len(processed["files"])
    assert st.state in ("reported", "sent") and st.timings.get("total", 0) > 0
    assert [j.state for j in node.journal.jobs(study_uid=uid)] == ["done"]
    if processed["pacs"] is not None:
        got = [pydicom.dcmread(p, stop_before_pixels=True) for p in processed["pacs"].files()]
        assert sorted(d.Modality for d in got) == ["KO", "SR"]


def test_study_page_shows_runs_thumbnails_and_both_languages(processed):
    url, uid = processed["url"], processed["study_uid"]
    t = requests.get(f"{url}/studies/{uid}").text
    sides = re.findall(r'data-laterality="(LCA|RCA)"', t)
    assert sides, "no analysed run on the page"
    imgs = re.findall(r'<img class="keyframe" src="([^"]+)"', t)
    assert imgs
    for src in imgs:
        r = requests.get(url + src)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        im = Image.open(io.BytesIO(r.content))
        assert im.width == 320 and im.getextrema() != ((0, 0), (0, 0), (0, 0))
    assert 'id="report-en"' in t and 'id="report-ja"' in t
    ja = t.split('id="report-ja"', 1)[1]
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", ja), "no Japanese text in the JA report"
    assert "UNVERIFIED" in t
    assert 'id="delivery"' in t


def test_thumbnail_is_the_display_pipeline_frame(processed):
    """Without marks the PNG is inference.frames.read_frame, scaled: the frame the model judged."""
    import numpy as np

    from inference.frames import read_frame

    node, url, uid = processed["node"], processed["url"], processed["study_uid"]
    t = requests.get(f"{url}/studies/{uid}").text
    src = re.findall(r'<img class="keyframe" src="([^"]+)"', t)[0]
    sop, frame = re.match(r".*/frames/([^/]+)/(\d+)\.png", src).groups()
    png = Image.open(io.BytesIO(requests.get(url + src + "?marks=0").content)).convert("L")
    ref = read_frame(node.journal.get_instance(sop).path, int(frame))
    ref_img = Image.fromarray((ref * 255 + 0.5).astype("uint8")).resize(png.size, Image.BILINEAR)
    assert np.abs(np.asarray(png, float) - np.asarray(ref_img, float)).mean() < 2.0
    assert requests.get(f"{url}/studies/{uid}/frames/{sop}/9999.png").status_code == 404


def test_lesion_marks_where_the_sr_has_lesions(processed):
    url, uid = processed["url"], processed["study_uid"]
    t = requests.get(f"{url}/studies/{uid}").text
    n_lesions = t.count('<tr class="lesion">')
    from dicom_node.web.results import read_report, result_files
    from pathlib import Path

    rep = read_report([f for f in result_files(Path(processed["node"].config.spool_dir) / "results" / uid)
                       if f.kind == "SR"][0])
    assert n_lesions == len(rep.lesions)
    if not rep.lesions:
        pytest.skip("the quick model found no lesion in this study")
    les = next(l for l in rep.lesions if l.x is not None)
    base = f"{url}/studies/{uid}/frames/{les.sop_instance_uid}/{les.frame_number}.png"
    marked = Image.open(io.BytesIO(requests.get(base).content)).convert("RGB")
    plain = Image.open(io.BytesIO(requests.get(base + "?marks=0").content)).convert("RGB")
    assert marked.tobytes() != plain.tobytes(), "the lesion mark is not drawn"


def test_qido_and_wado_with_dicomweb_client(processed):
    from dicomweb_client.api import DICOMwebClient

    uid = processed["study_uid"]
    c = DICOMwebClient(url=processed["url"] + "/dicomweb")
    studies = c.search_for_studies(search_filters={"StudyInstanceUID": uid})
    assert len(studies) == 1 and "SR" in studies[0]["00080061"]["Value"]
    # the RetrieveURL names this server with its port (dicomweb-client's Host header has none)
    assert studies[0]["00081190"]["Value"][0] == f"{processed['url']}/dicomweb/studies/{uid}"
    assert studies[0]["00201208"]["Value"][0] == len(processed["files"]) + 2
    series = c.search_for_series(uid)
    mods = sorted(s["00080060"]["Value"][0] for s in series)
    assert "SR" in mods and "KO" in mods and "XA" in mods
    sr_series = next(s for s in series if s["00080060"]["Value"][0] == "SR")["0020000E"]["Value"][0]
    inst = c.search_for_instances(uid, sr_series)
    assert len(inst) == 1
    sr_uid = inst[0]["00080018"]["Value"][0]
    sr = c.retrieve_instance(uid, sr_series, sr_uid)
    assert sr.Modality == "SR" and sr.SOPInstanceUID == sr_uid and sr.VerificationFlag == "UNVERIFIED"
    both = c.retrieve_study(uid)
    assert sorted(d.Modality for d in both) == ["KO", "SR"]
    # a received image is not served back, and says why
    xa = next(s for s in series if s["00080060"]["Value"][0] == "XA")["0020000E"]["Value"][0]
    xa_inst = c.search_for_instances(uid, xa)[0]["00080018"]["Value"][0]
    r = requests.get(f"{processed['url']}/dicomweb/studies/{uid}/series/{xa}/instances/{xa_inst}")
    assert r.status_code == 404 and "only the node's results" in r.text
    assert requests.get(f"{processed['url']}/dicomweb/studies?limit=x").status_code == 400


def test_health_page_shows_bundle_hashes_and_device_uid(processed):
    node, url = processed["node"], processed["url"]
    t = requests.get(url + "/health").text
    b = node.bundle
    assert b.device_uid in t and b.manifest.selector.sha256 in t
    js = requests.get(url + "/health.json").json()
    assert js["health"]["status"] == "ok" and js["bundle"]["device_uid"] == b.device_uid


def test_resend_goes_through_the_outbox(processed):
    if processed["pacs"] is None:
        pytest.skip("dcmtk storescp not installed")
    import time

    node, url, uid = processed["node"], processed["url"], processed["study_uid"]
    s = requests.Session()
    s.get(f"{url}/studies/{uid}")
    def sent_at():
        return {r.sop_instance_uid: r.sent_at for r in node.outbox.rows_for(uid)}

    before = sent_at()
    mtimes = {p: p.stat().st_mtime_ns for p in processed["pacs"].files()}
    assert len(before) == 2 and all(before.values())
    r = s.post(f"{url}/studies/{uid}/resend", data={"csrf": s.cookies["cag_csrf"]}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith("done=resent")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(a and a > before[k] for k, a in sent_at().items()):
        time.sleep(0.2)
    assert all(a and a > before[k] for k, a in sent_at().items()), "not delivered again"
    # storescp wrote the SR and KO again (same names: SOP Instance UIDs)
    assert all(p.stat().st_mtime_ns > m for p, m in mtimes.items())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and node.journal.get_study(uid).state != "sent":
        time.sleep(0.2)
    assert node.journal.get_study(uid).state == "sent"
