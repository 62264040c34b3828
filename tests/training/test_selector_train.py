"""Selector training, export, evaluation (tiny models on toy / synthetic runs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

from inference.types import CLASS_NAMES  # noqa: E402

CLI = str(Path(sys.executable).parent / "cag-node")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from training.selector.toy import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("selector-tiny"), size=32, steps=20)


def _cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def test_frame_and_run_metrics():
    from training.selector.evaluate import frame_metrics, run_level

    y = np.array([0, 0, 1, 3, 3, 5])
    probs = np.eye(6)[[0, 1, 1, 3, 0, 5]]
    m = frame_metrics(y, probs)
    assert m["confusion_matrix"][0] == [1, 1, 0, 0, 0, 0]
    assert m["confusion_matrix"][3] == [1, 0, 0, 1, 0, 0]
    assert m["per_class_f1"]["LCA_better"] == pytest.approx(0.5)
    assert m["per_class_f1"]["RCA_other"] == 1.0
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["frame_laterality_accuracy"] == pytest.approx(5 / 6, abs=1e-3)
    r = run_level(["LCA", "RCA", "RCA", "LCA"], ["LCA", "RCA", "LCA", None], [True, True, False, False])
    assert r["laterality_accuracy"] == 0.5 and r["key_frame_accuracy"] == 0.5
    assert r["laterality_confusion"] == [[1, 1], [1, 1]]


def test_training_resumes_from_checkpoint(tiny, tmp_path):
    from training.selector.train import TrainConfig, load_checkpoint, train

    base = dict(data=tiny["data"], out=str(tmp_path / "run"), size=32, batch=8, lr=1e-3, augment="trivialaugment",
                eval_every=2, ckpt_every=2, progress=False)
    s1 = train(TrainConfig(steps=2, **base))
    assert s1["steps"] == 2
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["step"] == 2 and ck["config"]["arch"] == "convnext_atto" and "optimizer" in ck
    s2 = train(TrainConfig(steps=4, resume="auto", **base))
    assert s2["steps"] == 4
    ck2 = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck2["step"] == 4
    assert [h["step"] for h in ck2["history"]] == [2, 4]  # history carried over
    assert not any(np.array_equal(ck["model"][k].numpy(), ck2["model"][k].numpy())
                   for k in ck["model"] if k.endswith("weight") and ck["model"][k].dtype.is_floating_point)
    m = ck2["metrics"]
    assert {"laterality_f1", "key_frame_accuracy", "per_class_f1", "confusion_matrix"} <= set(m)


def test_export_int8_reports_drift(tiny, tmp_path):
    from inference.bundle import Bundle
    from inference.selector import Selector
    from training.selector.export import export_bundle

    b = tmp_path / "b8"
    sec = export_bundle(tiny["best"], b, int8=True, data=tiny["data"])
    assert sec["precision"] == "int8" and sec["quantization"]["method"] == "static"
    d = sec["quantization"]["drift"]
    assert 0 <= d["max_abs_prob_diff"] <= 1 and 0 <= d["argmax_agreement"] <= 1
    assert "accuracy_int8" in d
    bundle = Bundle.load(b)  # sha256 verified
    assert bundle.manifest.selector.precision == "int8"
    p = Selector(bundle).predict(np.zeros((3, 1, 32, 32), np.float32))
    assert p.shape == (3, 6)
    sec = export_bundle(tiny["best"], tmp_path / "bd", int8=True, int8_method="dynamic")
    assert sec["quantization"]["method"] == "dynamic"


def test_cli_train_export_evaluate(tiny, tmp_path):
    out = tmp_path / "cli"
    r = _cli("train", "selector", "--data", tiny["data"], "--out", out, "--size", "32", "--steps", "2",
             "--batch", "8", "--no-progress", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    summ = json.loads(r.stdout)
    assert summ["steps"] == 2 and (out / "best.pt").is_file()
    b = tmp_path / "bundle"
    r = _cli("export", "selector", "--checkpoint", out / "best.pt", "--bundle", b)
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads((b / "manifest.json").read_text())
    from inference.bundle import sha256_file

    assert man["selector"]["sha256"] == sha256_file(b / "selector.onnx")
    assert man["selector"]["preprocessing"]["input_size"] == 32
    assert man["selector"]["parity"]["max_abs_logit_diff"] < 1e-3
    r = _cli("evaluate", "selector", "--data", tiny["data"], "--bundle", tiny["bundle"], "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout)
    assert {"laterality_f1", "key_frame_accuracy", "per_class_f1", "confusion_matrix", "macro_f1"} <= set(m)
    assert m["runs"] == 16 and len(m["confusion_matrix"]) == 6
    assert m["laterality_f1"] >= 0.9  # toy runs are easy
    from training.selector.evaluate import format_metrics

    assert "laterality F1" in format_metrics(m)


def test_frames_cache_matches_serving_preprocessing(tiny):
    """Training data come from inference.frames.preprocess: identical (to float16) to serving input."""
    from inference.bundle import Bundle
    from inference.frames import open_run, preprocess
    from training.selector.data import build_frameset, load_records

    spec = Bundle.load(tiny["bundle"]).manifest.selector.preprocessing
    fs = build_frameset(tiny["data"], spec)
    rec = load_records(tiny["data"])[0]
    frames = list(open_run(Path(tiny["data"]) / rec["file"]).iter_frames())
    x = np.stack([preprocess(f, spec) for f in frames])
    sel = fs.run == 0
    assert np.abs(np.asarray(fs.X[sel], np.float32) - x).max() < 5e-3
    assert [CLASS_NAMES[i] for i in fs.y[sel]] == rec["frame_labels"]


@pytest.mark.parametrize("normalize", ["none", "flatfield"])
def test_training_batches_are_the_serving_input(tiny, tmp_path, normalize):
    """What training feeds the model without augmentation (cached display frames D, finished
    by inference.frames.finish_input) is what the node computes for the same frame."""
    from inference.frames import finish_input, open_run, preprocess
    from training.selector.data import build_frameset, load_records

    spec = {"input_size": 48, "channels": 1, "mean": 0.5, "std": 0.25, "normalize": normalize}
    fs = build_frameset(tiny["data"], spec, cache_dir=tmp_path)
    rec = load_records(tiny["data"])[0]
    served = np.stack([preprocess(f, spec) for f in open_run(Path(tiny["data"]) / rec["file"]).iter_frames()])
    sel = np.where(fs.run == 0)[0]
    trained = finish_input(np.asarray(fs.D[sel], np.float32), spec)
    assert trained.shape == served.shape
    assert np.abs(trained - served).max() < 0.05  # float16 cache of the display frames
    assert np.abs(np.asarray(fs.X[sel], np.float32) - served).max() < 5e-3
    again = build_frameset(tiny["data"], spec, cache_dir=tmp_path)  # from the cache
    assert np.array_equal(np.asarray(again.D), np.asarray(fs.D))


def test_augmentations_keep_frames_valid_and_are_seeded():
    from training.selector.train import AUGMENTATIONS, Augment

    rng = np.random.default_rng(0)
    d = rng.random((6, 48, 48)).astype(np.float32)
    assert np.array_equal(Augment("none")(d), d)
    for kind in AUGMENTATIONS:
        out = Augment(kind, seed=3)(d)
        assert out.shape == d.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        if kind != "none":
            assert not np.allclose(out, d)
    a, b = Augment("sim2real", seed=5)(d), Augment("sim2real", seed=5)(d)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="augmentation"):
        Augment("mixup")


def test_build_selector_on_synthetic(tmp_path):
    synthetic = pytest.importorskip("training.synthetic")
    from inference.bundle import Bundle
    from training.selector import build_selector

    data = tmp_path / "syn"
    synthetic.generate_dataset(data, 3, 5, size=64, frames=12, progress=False)
    m = build_selector(data, tmp_path / "bundle", size=32, steps=3, seed=0)
    assert {"laterality_f1", "key_frame_accuracy", "sha256", "steps", "seconds"} <= set(m)
    b = Bundle.load(tmp_path / "bundle")
    assert b.manifest.selector.arch == "convnext_atto" and b.manifest.selector.sha256 == m["sha256"]


def test_sampling_balances_classes_and_views():
    from types import SimpleNamespace

    from training.selector.train import sampling_weights, view_group

    assert [view_group({"view": v}) for v in ("RAO 30", "LAO 40 CRA 20", "AP CAU 33", "")] == \
        ["RAO", "LAO CRA", "AP CAU", ""]
    # class 0 (LCA_better): 3 frames in RAO; class 3 (RCA_better): 1 frame in RAO, 3 in LAO
    recs = [{"view": "RAO 30"}, {"view": "RAO 28"}, {"view": "LAO 40"}]
    fs = SimpleNamespace(y=np.array([0, 0, 0, 3, 3, 3, 3]), run=np.array([0, 0, 0, 1, 2, 2, 2]), records=recs)
    w = sampling_weights(fs, "class")
    assert np.isclose(w.sum(), 1) and np.isclose(w[0] / w[3], np.sqrt(4 / 3))  # sqrt-inverse frequency
    wv = sampling_weights(fs, "class+view")
    # RCA in RAO (one frame) gets more of the RAO draws once views are balanced
    assert wv[3] / wv[:3].sum() > w[3] / w[:3].sum()
    assert np.isclose(wv.sum(), 1) and np.isclose(wv[3] / wv[4], np.sqrt(3))
    assert np.allclose(sampling_weights(fs, "none"), 1 / 7)
    with pytest.raises(ValueError, match="balance"):
        sampling_weights(fs, "views")


def test_ema_weights_are_checkpointed_and_resumed(tiny, tmp_path):
    from training.selector.train import TrainConfig, load_checkpoint, model_from_checkpoint, train

    base = dict(data=tiny["data"], out=str(tmp_path / "run"), size=32, batch=8, lr=1e-3, augment="none",
                eval_every=2, ckpt_every=2, progress=False, ema=0.9)
    train(TrainConfig(steps=3, **base))
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    # "model" holds the averaged weights (what is exported), "train_model" the raw ones
    assert set(ck["model"]) == set(ck["train_model"])
    k = next(k for k in ck["model"] if k.endswith("weight") and ck["model"][k].ndim == 4)
    assert not np.array_equal(ck["model"][k].numpy(), ck["train_model"][k].numpy())
    model_from_checkpoint(ck)  # the exported weights load into a plain model
    train(TrainConfig(steps=5, resume="auto", **base))
    ck2 = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck2["step"] == 5 and not np.array_equal(ck2["train_model"][k].numpy(), ck["train_model"][k].numpy())


def test_background_swap_moves_contrast_onto_another_run(tiny, tmp_path):
    """frame - own pre-contrast frame + another run's pre-contrast frame: the vessels stay, the
    background is the other run's; p=0 changes nothing."""
    from training.selector.data import build_frameset
    from training.selector.train import BackgroundSwap

    spec = {"input_size": 32, "channels": 1, "mean": 0.5, "std": 0.25, "normalize": "none"}
    fs = build_frameset(tiny["data"], spec, cache_dir=tmp_path)
    other = np.array([CLASS_NAMES[i].endswith("_other") for i in fs.y])
    idx = np.where(~other)[0][:6]
    d = np.asarray(fs.D[idx], np.float32)
    assert np.array_equal(BackgroundSwap(fs, 0.0)(idx, d), d)
    sw = BackgroundSwap(fs, 1.0, seed=1)
    out = sw(idx, d)
    assert out.shape == d.shape and 0 <= out.min() and out.max() <= 1
    changed = [b for b in range(len(idx)) if not np.allclose(out[b], d[b])]
    assert changed  # every run of the toy set has pre-contrast frames
    for b in changed:
        own = sw.own[int(fs.run[idx[b]])]
        assert not any(np.allclose(out[b], np.asarray(fs.D[j], np.float32)) for j in own)
