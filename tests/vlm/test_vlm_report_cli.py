"""``cag-node report FILE... --bundle DIR --json`` end to end (selector + VLM) via subprocess."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cagtest.node import CAG_NODE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study_and_bundle(tmp_path_factory, tiny_bundle):
    synth = pytest.importorskip("training.synthetic")
    sel = pytest.importorskip("training.selector")
    from inference.bundle import Bundle, update_manifest

    data = tmp_path_factory.mktemp("vlm-synth")
    records = synth.generate_dataset(data, 2, 5, size=128, frames=12, runs_per_study=2, progress=False)
    bundle = tmp_path_factory.mktemp("vlm-report-bundle")
    sel.build_selector(data, bundle, size=64, steps=3, seed=0)
    shutil.copytree(Path(tiny_bundle) / "vlm", bundle / "vlm")
    update_manifest(bundle, vlm=Bundle.load(tiny_bundle).manifest.vlm)
    Bundle.load(bundle)  # selector + vlm, hashes verified
    study = records[0]["study_uid"]
    files = [str(data / r["file"]) for r in records if r["study_uid"] == study]
    return files, bundle


def test_report_json(study_and_bundle, tmp_path):
    files, bundle = study_and_bundle
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [CAG_NODE, "report", *files, "--bundle", str(bundle), "--json"]
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-m", "dicom_node.cli", *cmd[1:]]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert [r["file"] for r in res["runs"]] == files
    for r in res["runs"]:
        assert r["laterality"] in ("LCA", "RCA") and r["key_frames"] and r["error"] is None
    assert set(res["report"]) == {"en", "ja"}
    for lang in ("en", "ja"):
        assert set(res["report"][lang]) >= {"findings", "impression", "recommendation", "format_ok"}
        assert res["report"][lang]["findings"]
    assert res["model"]["vlm"].startswith("gemma3") and res["model"]["device_uid"].startswith("2.25.")
    # same input, same report (greedy decoding)
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout)["report"] == res["report"]


def test_report_missing_bundle(tmp_path):
    cmd = [CAG_NODE, "report", str(tmp_path / "x.dcm"), "--bundle", str(tmp_path / "nope")]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "manifest.json" in out.stderr
