"""Fixtures for the web face: a real node (listener + web server on loopback,
port 0) in this process, a real HTTP client, and one processed study shared by
the tests that need results (built once per session: STOW-RS in, the real
pipeline on the quick demo bundle, SR + KOS out to dcmtk storescp when present).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests

from cagtest.pacs import StoreSCP
from cagtest.web import ARTEFACTS, stow_body, wait_state, web_config


@pytest.fixture
def start_node():
    """Factory: ``start_node(cfg)`` starts a Node in this process; all are stopped at teardown."""
    from dicom_node.node import Node

    nodes = []

    def _start(cfg, **kw):
        n = Node(cfg, **kw).start()
        nodes.append(n)
        return n

    yield _start
    for n in nodes:
        n.stop(grace_s=1)


@pytest.fixture(scope="session")
def processed(tmp_path_factory, quick_bundle):
    """A node with the real pipeline, and one synthetic study sent to it by STOW-RS and processed."""
    from training.demo import make_demo_study

    from dicom_node.node import Node

    tmp = tmp_path_factory.mktemp("web-processed")
    pacs = None
    dests = []
    if shutil.which("storescp"):
        pacs = StoreSCP(tmp / "pacs", aet="PACS", bit_preserving=True)
        dests = [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.port}]
    files = make_demo_study(tmp / "study", seed=77, quick=True)
    # The quick bundle's lesion model is barely trained: lower its peak threshold (as the
    # e2e lesion test does) so that the study page has lesion marks to show.
    from inference.bundle import Bundle

    bundle = tmp / "bundle"
    shutil.copytree(quick_bundle, bundle)
    b = Bundle.load(bundle)
    if b.manifest.lesions is not None:
        b.manifest.lesions.peak_threshold = 0.0
        b.manifest.lesions.min_distance = 40
        b.manifest.lesions.vessel_threshold = 0.0
        b.save_manifest()
    cfg = web_config(tmp, completion={"quiet_seconds": 0.5}, processing={"enabled": True},
                     models={"bundle": str(bundle)}, destinations=dests,
                     outbox={"retry_base_s": 0.5, "poll_s": 0.3})
    node = Node(cfg).start()
    body, headers = stow_body(files)
    t0 = time.monotonic()
    r = requests.post(node.web.url + "/dicomweb/studies", data=body, headers=headers, timeout=60)
    import pydicom

    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    try:
        st = wait_state(node, study_uid, ("sent",) if dests else ("reported",))
        yield {"node": node, "url": node.web.url, "study_uid": study_uid, "files": files, "stow": r,
               "state": st, "pacs": pacs, "seconds": time.monotonic() - t0}
    finally:
        node.stop(grace_s=1)
        if pacs is not None:
            pacs.stop()


@pytest.fixture(scope="session")
def artefacts() -> Path:
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    return ARTEFACTS
