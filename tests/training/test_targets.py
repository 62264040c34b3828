"""Per-pixel targets of the synthetic generator (training/synthetic/targets.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from training.synthetic import generate_dataset, generate_study, render_run
from training.synthetic.anatomy import sample_anatomy
from training.synthetic.lesions import sample_lesions
from training.synthetic.render import sample_run_spec
from training.synthetic.targets import (
    UNNUMBERED,
    frame_targets,
    key_frames,
    load_targets,
    overlay_png,
    run_targets,
)


def _patient(seed, pattern, domain="wide"):
    """The anatomy and lesions generate_study draws for study 0 of ``seed``."""
    rng = np.random.default_rng([seed, 0])
    an = sample_anatomy(rng, domain=domain)
    return an, sample_lesions(an, rng, pattern=pattern)


def _ring_contrast(frame, vessel):
    """(mean grey inside the mask, mean grey of the 3-6 px ring just outside it)."""
    m = vessel > 0
    d = distance_transform_edt(~m)
    ring = (d >= 3) & (d <= 6)
    return float(frame[m].mean()), float(frame[ring].mean())


def test_narrow_frames_unchanged_golden():
    """The geometry refactor (run_geometry, field_mask) keeps the narrow domain byte for
    byte: the hash was computed with the renderer before the targets were added."""
    h = hashlib.sha256()
    st = generate_study(21, 0, size=64, frames=8, runs_per_study=2, pattern="2v", domain="narrow")
    for r in st["runs"]:
        h.update(r["frames"].tobytes())
    fr, _, _ = render_run(9, side="LCA", size=64, n_frames=6, quality="motion", domain="narrow")
    h.update(fr.tobytes())
    assert h.hexdigest() == "68edbf9fd8431e50458996cb747bed7f7cb5e642ef57f28e1c159e768163f223"


def test_targets_do_not_change_frames():
    for domain in ("wide", "narrow"):
        a = generate_study(5, 0, size=96, frames=10, runs_per_study=2, domain=domain, targets=2)
        b = generate_study(5, 0, size=96, frames=10, runs_per_study=2, domain=domain)
        assert a["study"] == b["study"]
        for ra, rb in zip(a["runs"], b["runs"]):
            assert np.array_equal(ra["frames"], rb["frames"]) and ra["labels"] == rb["labels"]
            assert "targets" not in rb and len(ra["targets"]) <= 2
    c = generate_study(5, 0, size=96, frames=10, runs_per_study=2, with_pixels=False, targets=2)
    assert all("targets" not in r for r in c["runs"])


@pytest.fixture(scope="module")
def study3v():
    """A 3-vessel-disease study at 128 px with targets on its key frames (+ its patient)."""
    st = generate_study(11, 0, size=128, frames=24, runs_per_study=4, pattern="3v", targets=2)
    return st, _patient(11, "3v")


def test_targets_agree_with_pixels(study3v):
    st, _ = study3v
    n = 0
    for run in st["runs"]:
        side = run["run"]["side"]
        for t in run["targets"]:
            assert t.vessel.shape == t.segment.shape == (128, 128)
            assert t.vessel.dtype == t.segment.dtype == np.uint8
            if run["labels"][t.frame - 1] != f"{side}_better":
                continue
            inside, ring = _ring_contrast(run["frames"][t.frame - 1], t.vessel)
            assert t.vessel.sum() > 300
            assert inside < ring - 10, (inside, ring)
            n += 1
    assert n >= 3


def test_segments_only_on_vessel_pixels(study3v):
    st, _ = study3v
    for run in st["runs"]:
        for t in run["targets"]:
            assert set(np.unique(t.vessel)) <= {0, 1}
            assert np.array_equal(t.segment > 0, t.vessel > 0)
            assert int(t.segment.max()) <= UNNUMBERED
            segs = set(np.unique(t.segment)) - {0, UNNUMBERED}
            want = set(range(5, 16)) if run["run"]["side"] == "LCA" else set(range(1, 5))
            assert segs and segs <= want


def _check_lesions_on_segments(targets, side, lesions):
    seen = 0
    for t in targets:
        assert [d["segment"] for d in t.lesions] == [l.segment for l in lesions if l.side == side]
        for d in t.lesions:
            assert d["reference_diameter_px"] > 0 and d["length_px"] > 0 and len(d["polyline"]) >= 2
            assert d["minimal_diameter_px"] <= d["reference_diameter_px"]
            if not d["visible"]:
                continue
            c, r = d["x"] - 0.5, d["y"] - 0.5  # SCOORD -> pixel index
            ii, jj = np.nonzero(t.segment == d["segment"])
            dist = np.hypot(jj - c, ii - r).min() if len(ii) else np.inf
            assert dist <= 2.0, (d, dist)
            seen += 1
    return seen


def test_visible_lesions_sit_on_their_segment(study3v):
    st, (an, lesions) = study3v
    seen = sum(_check_lesions_on_segments(run["targets"], run["run"]["side"], lesions) for run in st["runs"])
    assert seen >= 4


def test_occlusion_centre_where_the_filled_vessel_stops():
    an, lesions = _patient(14, "2v", "narrow")  # LAD (segment 7) total occlusion
    occ = [l for l in lesions if l.severity == 100]
    assert occ and occ[0].side == "LCA"
    st = generate_study(14, 0, size=128, frames=24, runs_per_study=2, pattern="2v", domain="narrow", targets=1)
    run = st["runs"][0]
    assert run["run"]["side"] == "LCA" and run["targets"]
    assert _check_lesions_on_segments(run["targets"], "LCA", lesions) >= 1
    t = run["targets"][0]
    d = next(x for x in t.lesions if x["severity"] == 100)
    assert d["minimal_diameter_px"] == 0.0
    # beyond the occlusion the LAD is not in the mask: the distal half of the polyline is
    # further from segment-7 pixels than its proximal half
    ii, jj = np.nonzero(t.segment == 7)
    far = [np.hypot(jj - (x - 0.5), ii - (y - 0.5)).min() for x, y in d["polyline"]]
    assert far[-1] > far[0]


def test_panned_frames_shift_the_targets():
    an, lesions = _patient(3, "1v")
    spec = sample_run_spec(np.random.default_rng(1), "LCA", size=128, n_frames=16, quality="good")
    spec = dataclasses.replace(spec, collimation="none", blades=[], shake=[0.0] * 16, pan=[(0, 0)] * 16)
    panned = dataclasses.replace(spec, pan=[(6, -5)] * 16)
    fr0, lab0, _ = render_run(0, anatomy=an, lesions=lesions, spec=spec)
    fr1, lab1, _ = render_run(0, anatomy=an, lesions=lesions, spec=panned)
    f = key_frames(lab1, [0.0] * 16, "LCA", 1)[0]
    assert lab1[f] == "LCA_better"
    t0 = frame_targets(an, lesions, spec, f)
    t1 = frame_targets(an, lesions, panned, f)
    inside, ring = _ring_contrast(fr1[f], t1.vessel)
    assert inside < ring - 10
    # the panned frame is the unpanned one shifted by (dx, dy) = (6, -5): so are the targets
    assert np.array_equal(t1.vessel[8:-8, 8:-8], np.roll(t0.vessel, (-5, 6), axis=(0, 1))[8:-8, 8:-8])
    for a, b in zip(t0.lesions, t1.lesions):
        assert b["x"] == pytest.approx(a["x"] + 6, abs=0.02) and b["y"] == pytest.approx(a["y"] - 5, abs=0.02)


def test_key_frames():
    lab = ["LCA_other"] * 3 + ["LCA_bad"] * 2 + ["LCA_better"] * 7 + ["LCA_bad", "LCA_other"]
    fill = [0, 0, 0, 0.3, 0.6, 0.86, 0.9, 0.95, 0.97, 0.99, 0.93, 0.88, 0.5, 0.0]
    assert key_frames(lab, fill, "LCA", 0) == []
    assert key_frames(lab, fill, "LCA", 1) == [9]  # the highest fill
    k3 = key_frames(lab, fill, "LCA", 3)
    assert len(k3) == 3 and 9 in k3 and all(lab[i] == "LCA_better" for i in k3)
    assert k3[0] <= 6 and k3[-1] >= 10  # spread over the better frames
    assert key_frames(lab, fill, "LCA", 20) == list(range(5, 12))
    bad = ["RCA_other", "RCA_bad", "RCA_bad", "RCA_other"]
    assert key_frames(bad, [0, 0.4, 0.7, 0], "RCA", 2) == [2]
    assert key_frames(["RCA_other"] * 4, [0, 0.01, 0, 0], "RCA", 2) == []


def test_dataset_writes_and_loads_targets(tmp_path):
    opts = dict(size=96, frames=12, runs_per_study=2, progress=False)
    on = generate_dataset(tmp_path / "on", 1, seed=3, targets=2, **opts)
    off = generate_dataset(tmp_path / "off", 1, seed=3, **opts)
    assert not list((tmp_path / "off").rglob("*.npz"))
    assert all("targets" not in r for r in off)
    for a, b in zip(on, off):
        assert {k: v for k, v in a.items() if k != "targets"} == b
        assert (tmp_path / "on" / a["file"]).read_bytes() == (tmp_path / "off" / b["file"]).read_bytes()
        t = a["targets"]
        assert t["file"] == a["file"].replace(".dcm", "_targets.npz")
        assert 1 <= len(t["frames"]) <= 2 and len(t["lesions"]) == len(t["frames"])
        assert all(1 <= f <= a["n_frames"] and not a["frame_labels"][f - 1].endswith("_other") for f in t["frames"])
        with np.load(tmp_path / "on" / t["file"]) as z:
            assert z["frames"].tolist() == t["frames"]
            assert z["vessel"].shape == z["segment"].shape == (len(t["frames"]), 96, 96)
            assert z["vessel"].dtype == z["segment"].dtype == np.uint8
        loaded = load_targets(tmp_path / "on", a)
        assert [x[0] for x in loaded] == t["frames"]
        for (fn, vessel, segment, les), lj in zip(loaded, t["lesions"]):
            assert les == lj and vessel.shape == (96, 96) and np.array_equal(segment > 0, vessel > 0)
    rec = json.loads((tmp_path / "on" / "labels.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert rec["targets"] == on[0]["targets"]
    assert load_targets(tmp_path / "off", off[0]) == []
    # the same targets as computed in memory
    st = generate_study(3, 0, size=96, frames=12, runs_per_study=2, targets=2)
    mem = st["runs"][0]["targets"]
    assert [m.frame for m in mem] == on[0]["targets"]["frames"]
    assert all(np.array_equal(m.vessel, x[1]) for m, x in zip(mem, load_targets(tmp_path / "on", on[0])))


def test_cli_synth_targets(tmp_path):
    from dicom_node.cli import main

    out = tmp_path / "o"
    rc = main(["synth", str(out), "--studies", "1", "--seed", "5", "--size", "64", "--frames", "10",
               "--runs-per-study", "2", "--targets", "1", "--no-progress"])
    assert rc == 0
    recs = [json.loads(x) for x in (out / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all("targets" in r for r in recs)
    with_file = [r for r in recs if r["targets"]["file"]]
    assert with_file and all((out / r["targets"]["file"]).is_file() for r in with_file)
    assert main(["synth", str(tmp_path / "x"), "--studies", "1", "--size", "64", "--targets", "-1", "--no-progress"]) == 2


def test_overlay_png(tmp_path, study3v):
    from PIL import Image

    st, _ = study3v
    run = next(r for r in st["runs"] if r["targets"])
    t = run["targets"][0]
    for kw in ({}, {"outline": True, "scale": 2}):
        p = tmp_path / f"o{len(kw)}.png"
        overlay_png(run["frames"][t.frame - 1], t.vessel, t.segment, t.lesions, p, **kw)
        im = Image.open(p)
        assert im.mode == "RGB" and im.size == (128 * kw.get("scale", 1),) * 2
        a = np.asarray(im)
        assert (a[..., 0] != a[..., 2]).any()  # tinted


def test_run_targets_matches_frame_targets():
    an, lesions = _patient(2, "2v")
    spec = sample_run_spec(np.random.default_rng(4), "RCA", size=64, n_frames=12)
    many = run_targets(an, lesions, spec, [3, 7])
    one = frame_targets(an, lesions, spec, 7)
    assert [m.frame for m in many] == [4, 8]
    assert np.array_equal(many[1].vessel, one.vessel) and np.array_equal(many[1].segment, one.segment)
    assert many[1].lesions == one.lesions
    assert run_targets(an, lesions, spec, []) == []
