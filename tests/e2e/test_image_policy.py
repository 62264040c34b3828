"""The node and ``cag-node report`` show the VLM the same frames of a study (one policy:
inference.keyimages).  The real VLM of the quick bundle runs in both; the test only watches
which images reach it."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pydicom
import pytest
import yaml

import inference.vlm as vlm
from dicom_node.demo import free_port
from cagtest.wait import wait_state

pytestmark = pytest.mark.slow


@pytest.fixture
def watched_vlm(monkeypatch):
    """Every backend ``load_backend`` makes records the images of each study it reports on."""
    calls: list[list[np.ndarray]] = []
    real = vlm.load_backend

    def load_backend(cfg, bundle=None):
        backend = real(cfg, bundle)
        inner = backend.generate_languages

        def generate_languages(images, languages, *a, **kw):
            calls.append([np.array(i) for i in images])
            return inner(images, languages, *a, **kw)

        backend.generate_languages = generate_languages
        return backend

    monkeypatch.setattr(vlm, "load_backend", load_backend)
    return calls


def test_node_and_report_pick_the_same_images(tmp_path, demo_bundle, held_out_study, watched_vlm, capsys):
    from dicom_node.cli import main
    from dicom_node.config import load_config
    from dicom_node.node import Node

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"processes": 1, "port": free_port(), "allowed_calling_aets": ["STORESCU"]},
        "storage": {"path": str(tmp_path / "spool"), "journal": f"sqlite:///{tmp_path / 'journal.db'}",
                    "min_free_mb": 10},
        "completion": {"quiet_seconds": 1},
        "models": {"bundle": str(demo_bundle)},
        "destinations": [],
        "vlm": {"max_images": 3},   # fewer than the study's key frames: the policy must choose
        "admin": {"enabled": False},
    }))
    cfg = load_config(config)
    node = Node(cfg).start()
    try:
        r = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "CAGNODE", "127.0.0.1", str(cfg.node.port),
                            *map(str, held_out_study)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        study_uid = str(pydicom.dcmread(held_out_study[0], stop_before_pixels=True).StudyInstanceUID)
        st = wait_state(node, study_uid, states=("reported", "failed"))
        assert st.state == "reported", st.error
    finally:
        node.stop()
    assert len(watched_vlm) == 1
    node_images = watched_vlm.pop()

    assert main(["report", *map(str, held_out_study), "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(watched_vlm) == 1
    report_images = watched_vlm.pop()

    n_key_frames = sum(len(r["key_frames"]) for r in out["runs"] if not r["error"])
    assert n_key_frames > 3 and len(node_images) == 3
    assert len(report_images) == len(node_images)
    for a, b in zip(node_images, report_images):
        assert np.array_equal(a, b)
