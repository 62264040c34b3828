import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from inference.types import CLASS_NAMES, RunSelection

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CLI = str(Path(sys.executable).parent / "cag-node")


@pytest.fixture(scope="module")
def selector(tiny_bundle):
    from inference.selector import Selector

    return Selector(tiny_bundle["bundle"], threads=1, batch_size=4)


def test_no_torch_in_inference():
    code = ("import sys, inference.frames, inference.candidates, inference.selector, inference.bundle; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("side", ["LCA", "RCA"])
def test_select_run(selector, toy_run, side):
    p, labels, _ = toy_run(side=side, n=30, seed=11)
    r = selector.select_run(p, min_gap=5, max_key_frames=2)
    assert r.ok, r.error
    assert r.laterality == side and 0.5 <= r.confidence <= 1.0
    assert r.n_frames == 30 and r.sop_instance_uid
    assert 1 <= len(r.key_frames) <= 2
    nums = [k.frame_number for k in r.key_frames]
    assert all(n in r.candidates for n in nums)
    assert all(b - a >= 5 for a, b in zip(r.candidates, r.candidates[1:]))
    scores = [k.score for k in r.key_frames]
    assert scores == sorted(scores, reverse=True)
    assert all(1 <= n <= 30 for n in r.candidates)
    d = r.to_dict()
    assert d["key_frames"] == nums
    json.dumps(d)


def test_max_key_frames_and_min_gap(selector, toy_run):
    p, _, _ = toy_run(n=40, seed=4)
    r = selector.select_run(p, min_gap=2, max_key_frames=5)
    assert len(r.key_frames) <= 5
    assert all(b - a >= 2 for a, b in zip(r.candidates, r.candidates[1:]))
    r1 = selector.select_run(p, min_gap=10, max_key_frames=1)
    assert len(r1.key_frames) == 1
    assert len(r1.candidates) <= len(r.candidates)
    assert all(b - a >= 10 for a, b in zip(r1.candidates, r1.candidates[1:]))


def test_batching_does_not_change_results(tiny_bundle, toy_run):
    from inference.selector import Selector

    p, _, _ = toy_run(n=20, seed=7)
    a = Selector(tiny_bundle["bundle"], batch_size=1).score_run(p, all_frames=True)[2]
    b = Selector(tiny_bundle["bundle"], batch_size=16).score_run(p, all_frames=True)[2]
    assert a.shape == (20, 6) and np.abs(a - b).max() < 1e-5
    assert np.allclose(a.sum(axis=1), 1.0, atol=1e-5)


def test_errors_are_per_run(selector, real_xa_dir, tmp_path, toy_run):
    good, _, _ = toy_run()
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(b"\0" * 200)
    res = selector.select_study([good, real_xa_dir / "wg04-XA1_JPLY.dcm", bad, tmp_path / "missing.dcm"])
    assert [r.ok for r in res] == [True, False, False, False]
    jply = res[1]
    assert "cannot decode" in jply.error and jply.sop_instance_uid  # header still identifies it
    assert all(isinstance(r, RunSelection) for r in res)


def test_every_real_file_gives_a_selection(selector, real_xa_files):
    for p in real_xa_files:
        r = selector.select_run(p)
        if p.name == "wg04-XA1_JPLY.dcm":
            assert r.error
        else:
            assert r.ok, (p.name, r.error)
            assert r.key_frames and r.candidates


def test_parity_torch_vs_ort(tiny_bundle, selector):
    import torch

    from training.selector.data import build_frameset
    from training.selector.train import model_from_checkpoint

    fs = build_frameset(tiny_bundle["data"], selector.preprocessing)
    x = np.asarray(fs.X[:48], dtype=np.float32)
    model = model_from_checkpoint(tiny_bundle["best"])
    with torch.inference_mode():
        pt = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    ort = selector.predict(x)
    assert np.abs(pt - ort).max() < 1e-4
    assert (pt.argmax(1) == ort.argmax(1)).mean() == 1.0


def test_providers():
    from inference.selector import resolve_providers

    assert resolve_providers(["auto"])[-1] == "CPUExecutionProvider"
    assert resolve_providers(["NoSuchProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]


def test_selector_memory_bounded(selector, tmp_path):
    from training.selector.toy import toy_frames, write_run

    f, _ = toy_frames("RCA", 8, 128, seed=3)
    frames = np.concatenate([f] * 25)  # 200 frames
    p = write_run(tmp_path / "long.dcm", frames)
    tracemalloc.start()
    r = selector.select_run(p)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert r.ok and r.n_frames == 200
    assert peak < frames.nbytes / 4, peak


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_cli_select_json(tiny_bundle, toy_run, real_xa_dir, tmp_path):
    p1, _, _ = toy_run(side="LCA", n=24, seed=21)
    p2, _, _ = toy_run(side="RCA", n=24, seed=22)
    res = _cli("select", p1, p2, real_xa_dir / "wg04-XA1_JPLY.dcm", "--bundle", tiny_bundle["bundle"], "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [o["file"] for o in out] == [str(p1), str(p2), str(real_xa_dir / "wg04-XA1_JPLY.dcm")]
    for o in out:
        assert {"file", "sop_instance_uid", "laterality", "confidence", "key_frames", "candidates"} <= set(o)
    assert [o["laterality"] for o in out] == ["LCA", "RCA", None]
    assert out[0]["key_frames"] and all(isinstance(k, int) and k >= 1 for k in out[0]["key_frames"])
    assert out[2]["error"]
    # the bundle from --config (models.bundle, relative to the config file)
    cfg = tmp_path / "cfg" / "config.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"models:\n  bundle: {os.path.relpath(tiny_bundle['bundle'], cfg.parent)}\nselector:\n  min_gap: 3\n")
    res = _cli("select", p1, "--config", cfg, "--json")
    assert res.returncode == 0, res.stderr
    o = json.loads(res.stdout)[0]
    assert o["laterality"] == "LCA"
    assert all(b - a >= 3 for a, b in zip(o["candidates"], o["candidates"][1:]))
    # ./config.yaml is the default
    res = _cli("select", p1, "--json", cwd=cfg.parent)
    assert res.returncode == 0, res.stderr


def test_cli_select_failures(tiny_bundle, real_xa_dir, tmp_path):
    res = _cli("select", real_xa_dir / "wg04-XA1_JPLY.dcm", "--bundle", tiny_bundle["bundle"], "--json")
    assert res.returncode == 1 and json.loads(res.stdout)[0]["error"]
    res = _cli("select", real_xa_dir / "wg04-XA1_UNC.dcm", "--bundle", tmp_path / "nobundle")
    assert res.returncode == 1 and "no model bundle" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("selector:\n  min_gapp: 3\n")
    res = _cli("select", real_xa_dir / "wg04-XA1_UNC.dcm", "--config", bad)
    assert res.returncode == 2 and "selector.min_gapp" in res.stderr
