"""The lesion model end to end on a tiny synthetic set: targets -> training -> ONNX bundle ->
ONNX Runtime serving -> evaluation CLI.  A few training steps only: these tests check the
plumbing and the contracts (parity, shapes, coordinates, metrics in range), not accuracy, which
the demo build measures on held-out studies."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")

from inference.bundle import Bundle  # noqa: E402
from inference.frames import model_frame, open_run  # noqa: E402
from inference.lesions import LesionModel  # noqa: E402


@pytest.fixture(scope="module")
def lesion_data(tmp_path_factory):
    from training.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("lesion-data")
    generate_dataset(root, 4, 31, size=128, frames=10, runs_per_study=(2, 3), domain="narrow", targets=2,
                     progress=False, pattern="2v")
    return root


@pytest.fixture(scope="module")
def lesion_bundle(lesion_data, tmp_path_factory):
    from training.lesions import build_lesions

    b = tmp_path_factory.mktemp("lesion-bundle")
    # every 3rd step on whole frames: both batch shapes go through the model
    summary = build_lesions(lesion_data, b, size=128, steps=6, batch=4, crop=64, whole_every=3, threads=2)
    return b, summary


def test_lesion_set_matches_targets(lesion_data):
    from training.lesions.data import load_lesion_set

    ls = load_lesion_set(lesion_data, 128)
    assert len(ls) > 0 and ls.D.shape[1:] == (128, 128) and ls.V.shape == ls.D.shape
    assert set(np.unique(ls.V)) <= {0, 1}
    assert ls.G[ls.V == 0].max() == 0  # segments only on vessel pixels
    assert len(ls.L) and np.all((ls.L[:, 1:3] >= -1) & (ls.L[:, 1:3] <= 128))
    # the cache is reused and equal
    again = load_lesion_set(lesion_data, 128)
    assert np.array_equal(again.V, ls.V) and np.array_equal(again.L, ls.L)
    # the vessel mask is on dark pixels of the frame the node decodes
    dark_in = float(ls.D[ls.V > 0].astype(np.float32).mean())
    assert dark_in < float(ls.D[ls.V == 0].astype(np.float32).mean())


def test_heatmap_and_crops(lesion_data):
    from training.lesions.data import heatmap_targets, load_lesion_set
    from training.lesions.train import LesionTrainConfig, _batch

    ls = load_lesion_set(lesion_data, 128)
    i = int(ls.L[ls.L[:, 5] > 0][0, 0])
    H, Sv = heatmap_targets(ls, np.array([i]), 128, 2.5)
    _, c, r, sev = ls.lesions_of(i)[0][:4]
    assert H[0].max() == pytest.approx(1.0, abs=0.05)
    rr, cc = np.unravel_index(H[0].argmax(), H[0].shape)
    assert abs(rr - r) <= 1.5 and abs(cc - c) <= 1.5 or len(ls.lesions_of(i)) > 1
    assert set(np.unique(Sv[0][Sv[0] >= 0])) <= set(ls.lesions_of(i)[:, 3] / 100.0)
    cfg = LesionTrainConfig(size=128, crop=64)
    x, V, G, Hc, Svc = _batch(ls, np.array([i, i]), cfg, rng=np.random.default_rng(0), crop=64)
    assert tuple(x.shape) == (2, 3, 64, 64) and tuple(V.shape) == (2, 64, 64)
    # the position channels are the whole frame's (a crop covers part of [-1, 1])
    rows = x[0, 1, :, 0].numpy()
    assert np.all(np.diff(rows) > 0) and rows[-1] - rows[0] < 1.2


def test_bundle_parity_and_manifest(lesion_bundle):
    b, summary = lesion_bundle
    assert summary["parity"]["max_abs_diff"] < 1e-2 and summary["parity"]["vessel_mask_agreement"] >= 0.999
    bundle = Bundle.load(b)
    spec = bundle.manifest.lesions
    assert spec is not None and spec.sha256 and spec.preprocessing.input_size == 128
    assert [tuple(h) for h in spec.heads] == [("vessel", 1), ("segment", 17), ("heatmap", 1), ("severity", 1)]
    assert bundle.model_info().lesions.startswith("unet_tiny")
    assert spec.training["config"]["whole_every"] == 3 and spec.training["steps"] == 6


def test_bundle_refuses_a_missing_or_changed_lesion_model(lesion_bundle, tmp_path):
    import shutil

    from inference.bundle import BundleError

    b = tmp_path / "b"
    shutil.copytree(lesion_bundle[0], b)
    onnx = (b / "lesions.onnx").read_bytes()
    (b / "lesions.onnx").write_bytes(onnx[:-1] + bytes([onnx[-1] ^ 1]))
    with pytest.raises(BundleError, match="lesions.onnx does not match"):
        Bundle.load(b)
    (b / "lesions.onnx").unlink()
    with pytest.raises(BundleError, match="lesion model file lesions.onnx missing"):
        Bundle.load(b)


def test_serving_maps_and_findings(lesion_bundle, lesion_data):
    from training.synthetic import load_records

    b, _ = lesion_bundle
    lm = LesionModel(b, threads=2)
    rec = next(r for r in load_records(lesion_data) if r.get("targets") and r["targets"]["frames"])
    n = rec["targets"]["frames"][0]
    frame = open_run(lesion_data / rec["file"]).frame(n)
    fm = lm.maps([frame])[0]
    assert fm.vessel.shape == (128, 128) and 0 <= fm.vessel.min() and fm.vessel.max() <= 1
    assert fm.segment.min() >= 1 and fm.segment.max() <= 16
    # a lower peak threshold can only find more
    lm.spec.peak_threshold = 0.0
    many = lm.find(frame, rec["sop_instance_uid"], n, maps=fm)
    for les in many:
        assert 0 <= les.x <= frame.shape[1] and 0 <= les.y <= frame.shape[0]
        assert les.sop_instance_uid == rec["sop_instance_uid"] and les.frame_number == n
        assert 1 <= les.segment <= 15
    lm.spec.peak_threshold = 1.01
    assert lm.find(frame, rec["sop_instance_uid"], n, maps=fm) == []
    # serving preprocesses exactly as the training cache did
    from training.lesions.data import load_lesion_set

    ls = load_lesion_set(lesion_data, 128)
    served = model_frame(frame, {"input_size": 128}).astype(np.float16)
    assert any(np.array_equal(served, d) for d in ls.D)


def test_evaluate_cli(lesion_bundle, lesion_data, tmp_path):
    b, _ = lesion_bundle
    out = subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "lesions", str(lesion_data),
                          "--bundle", str(b), "--json", "--overlays", str(tmp_path / "ov")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout)
    for k in ("vessel_dice", "lesion_sensitivity", "false_positives_per_frame", "segment_accuracy",
              "severity_within_one_grade", "latency_ms_per_frame"):
        assert k in m
    assert 0 <= m["vessel_dice"] <= 1 and 0 <= m["lesion_sensitivity"] <= 1 and m["frames"] > 0
    assert m["vessel_dice"] <= m["vessel_f1_1px"] <= 1  # tolerance only ever forgives
    assert m["lesions_visible"] > 0
    assert list((tmp_path / "ov").glob("*.png"))
    bad = subprocess.run([sys.executable, "-m", "dicom_node.cli", "evaluate", "lesions", str(tmp_path),
                          "--bundle", str(b), "--json"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0


def test_report_json_lesions_and_templated_draft(lesion_bundle, lesion_data, tmp_path):
    """``cag-node report --json`` with a bundle holding a selector and a lesion model and no VLM
    (``vlm.backend: none``): lesions per run and frame, and the templated draft written from them."""
    import shutil

    from training.selector import build_selector
    from training.synthetic import load_records

    b, _ = lesion_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(b, bundle)
    build_selector(lesion_data, bundle, size=64, steps=3, seed=0)
    bd = Bundle.load(bundle)
    bd.manifest.lesions.peak_threshold = 0.0  # the few-step model: make it report something
    bd.manifest.lesions.min_distance = 30
    bd.manifest.lesions.vessel_threshold = 0.0  # ... on any pixel
    bd.save_manifest()
    cfg = tmp_path / "config.yaml"
    cfg.write_text("vlm:\n  backend: none\n")
    recs = load_records(lesion_data)
    files = [str(lesion_data / r["file"]) for r in recs if r["study_uid"] == recs[0]["study_uid"]]
    out = subprocess.run([sys.executable, "-m", "dicom_node.cli", "report", *files, "--bundle", str(bundle),
                          "--config", str(cfg), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["lesions"], "no lesion reported at threshold 0"
    sops = {r["sop_instance_uid"]: r for r in res["runs"]}
    for les in res["lesions"]:
        run = sops[les["sop_instance_uid"]]
        assert les["frame_number"] in run["key_frames"]
        assert les["side"] == run["laterality"]  # segments are chosen among the run's side's
        assert 1 <= les["segment"] <= 15 and 0 <= les["stenosis_pct"] <= 100
    en = res["report"]["en"]
    assert en["format_ok"] and "coronary angiography" in en["findings"].lower()
    assert res["model"]["lesions"].startswith("unet_tiny")


def test_fade_vessels_lightens_only_the_masked_vessels():
    from training.lesions.train import fade_vessels

    d = np.full((2, 32, 32), 0.6, np.float32)
    V = np.zeros((2, 32, 32), np.uint8)
    d[:, 16, 4:28] = 0.1  # a dark vessel, in the mask
    V[:, 16, 4:28] = 1
    d[:, 4:28, 8] = 0.1  # a dark catheter, not in the mask
    out = fade_vessels(d, V, np.random.default_rng(3), p=1.0, max_fade=0.7)
    assert np.all(out[:, 16, 12:28] >= d[:, 16, 12:28]) and np.any(out[:, 16, 12:28] > 0.15)
    assert np.array_equal(out[:, 4:12, 8], d[:, 4:12, 8])  # the catheter away from the vessel is kept
    assert np.array_equal(fade_vessels(d, V, np.random.default_rng(3), p=0.0), d)
