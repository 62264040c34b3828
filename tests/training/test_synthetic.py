"""Synthetic coronary angiography: determinism, labels, anatomy, reports, DICOM validity."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pydicom
import pytest

from inference.types import CLASS_NAMES, LANGUAGES, SECTIONS
from training.synthetic import generate_dataset, generate_study, make_report, render_run, treatment
from training.synthetic.anatomy import sample_anatomy
from training.synthetic.lesions import SEGMENTS, Lesion, segment_location
from training.synthetic.render import sample_run_spec

TINY = dict(size=128, frames=12, runs_per_study=4, progress=False)

XA = "1.2.840.10008.5.1.4.1.1.12.1"


# ----------------------------------------------------------------------------- output format


def test_labels_jsonl_contract(tiny_synth):
    out, recs = tiny_synth
    lines = (out / "labels.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(recs) == 12
    for line, rec in zip(lines, recs):
        assert json.loads(line) == rec
        for key in ("file", "study_uid", "sop_instance_uid", "series_uid", "patient_id", "laterality",
                    "frame_labels", "findings", "report"):
            assert key in rec, key
        assert (out / rec["file"]).is_file()
        assert rec["laterality"] in ("LCA", "RCA")
        assert len(rec["frame_labels"]) == rec["n_frames"] == 12
        assert all(lab in CLASS_NAMES for lab in rec["frame_labels"])
        assert all(lab.startswith(rec["laterality"] + "_") for lab in rec["frame_labels"])
        for f in rec["findings"]:
            assert set(f) >= {"vessel", "segment", "severity", "side"}
            assert f["severity"] in (50, 75, 90, 99, 100)
            assert SEGMENTS[f["segment"]][0] == f["side"]
    # one series and one SOP instance per run, unique
    assert len({r["sop_instance_uid"] for r in recs}) == len(recs)
    assert len({r["series_uid"] for r in recs}) == len(recs)


def test_studies_jsonl_matches_runs(tiny_synth):
    out, recs = tiny_synth
    studies = [json.loads(x) for x in (out / "studies.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(studies) == 3
    for st in studies:
        runs = [r for r in recs if r["study_uid"] == st["study_uid"]]
        assert sorted(r["file"] for r in runs) == sorted(st["files"])
        sides = {r["laterality"] for r in runs}
        assert sides == {"LCA", "RCA"}  # every lesion is visible in some run of its side
        for r in runs:
            assert r["report"] == st["report"]
            assert r["findings"] == st["findings"]
            assert r["treatment"] == st["treatment"] == treatment(st["findings"])
            assert all(f["side"] == r["laterality"] for f in r["run_findings"])
            assert r["patient_id"] == st["patient_id"]


def test_every_run_has_all_three_phases():
    """A good-quality run starts without contrast, fills, and has diagnostic frames."""
    for seed in range(3):
        for side in ("LCA", "RCA"):
            _, labels, meta = render_run(seed, side=side, size=96, n_frames=30, quality="good")
            assert labels[0] == f"{side}_other"
            assert f"{side}_better" in labels
            assert f"{side}_bad" in labels  # wash-in is never instantaneous
            first_better = labels.index(f"{side}_better")
            assert all(lab != f"{side}_better" for lab in labels[:first_better])


# ----------------------------------------------------------------------------- determinism


def test_determinism_byte_identical(tmp_path, tiny_synth):
    out, recs = tiny_synth
    again = tmp_path / "again"
    recs2 = generate_dataset(again, 1, seed=7, **TINY)
    assert recs2 == recs[: len(recs2)]
    for r in recs2:
        assert (again / r["file"]).read_bytes() == (out / r["file"]).read_bytes()
    other = generate_dataset(tmp_path / "other", 1, seed=8, **TINY)
    assert other[0]["study_uid"] != recs[0]["study_uid"]
    assert (tmp_path / "other" / other[0]["file"]).read_bytes() != (out / recs[0]["file"]).read_bytes()


def test_render_run_deterministic_and_shapes():
    a, la, ma = render_run(3, side="RCA", size=64, n_frames=8)
    b, lb, mb = render_run(3, side="RCA", size=64, n_frames=8)
    assert a.shape == (8, 64, 64) and a.dtype == np.uint8
    assert np.array_equal(a, b) and la == lb
    assert ma["side"] == "RCA" and len(ma["fill"]) == 8


# ----------------------------------------------------------------------------- labels vs pixels


def _vessel_pixels(frames, labels, side, thr=15.0):
    """Fraction of thin dark structures in each frame relative to the no-contrast background
    (median of the 'other' frames), high-passed so the moving heart border does not count."""
    from training.synthetic.render import box_blur

    ref = np.median(frames[[i for i, lab in enumerate(labels) if lab == f"{side}_other"]].astype(np.float32), axis=0)
    out = []
    for f in frames:
        d = ref - f.astype(np.float32)
        out.append(float((d - box_blur(d, 3) > thr).mean()))
    return out


@pytest.mark.parametrize("side", ["LCA", "RCA"])
def test_better_frames_have_contrast_other_frames_do_not(side):
    for seed in (0, 1):
        # noise-free so that single pixels can be compared
        spec = sample_run_spec(np.random.default_rng(seed), side, size=128, n_frames=24, quality="good")
        spec.noise = 0.0
        spec.catheter = False  # the catheter tip moves with the heart: not contrast
        spec.device = ""  # nor a guidewire
        frames, labels, _ = render_run(seed, spec=spec)
        dark = _vessel_pixels(frames, labels, side)
        better = [d for d, lab in zip(dark, labels) if lab.endswith("better")]
        other = [d for d, lab in zip(dark, labels) if lab.endswith("other")]
        assert better and other
        assert min(better) > 0.005, better  # opacified vessels cover > 0.5% of the image
        assert max(other) < 0.001, other


def test_laterality_matches_anatomy_in_lao():
    """LAO 40: the RCA (patient's right AV groove, the 'C') lies left of the LCA on screen."""
    xs = {"LCA": [], "RCA": []}
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        anatomy = sample_anatomy(rng)
        for side in ("LCA", "RCA"):
            frames, labels, _ = render_run(seed, side=side, size=128, n_frames=20, anatomy=anatomy, lesions=[],
                                           view=(40.0, 0.0), quality="good")
            ref = np.median(frames[[i for i, lab in enumerate(labels) if lab.endswith("other")]].astype(np.float32), 0)
            best = [i for i, lab in enumerate(labels) if lab.endswith("better")]
            diff = np.clip(ref - frames[best[len(best) // 2]].astype(np.float32), 0, None)
            w = diff * (diff > 20)
            xs[side].append(float((w.sum(0) * np.arange(128)).sum() / w.sum()))
    assert all(r < l for r, l in zip(xs["RCA"], xs["LCA"])), xs


def test_occlusion_leaves_distal_vessel_unfilled():
    rng = np.random.default_rng(11)
    anatomy = sample_anatomy(rng)
    loc = segment_location(anatomy.lca, 6, rng)
    occl = Lesion("LCA", "LAD", 6, 100, loc[0], loc[1], 5.0)
    spec = sample_run_spec(np.random.default_rng(0), "LCA", size=128, n_frames=20, view=(-30.0, -25.0), quality="good")
    spec.noise = 0.0
    f0, l0, m0 = render_run(0, anatomy=anatomy, lesions=[], spec=spec)
    f1, l1, m1 = render_run(0, anatomy=anatomy, lesions=[occl], spec=spec)
    i = l0.index("LCA_better") + 2
    d0 = _vessel_pixels(f0, l0, "LCA", thr=8)[i]
    d1 = _vessel_pixels(f1, l1, "LCA", thr=8)[i]
    assert d1 < 0.8 * d0  # the LAD beyond the occlusion (and its branches) is not opacified


# ----------------------------------------------------------------------------- reports


def _f(vessel, segment, severity):
    return {"vessel": vessel, "segment": segment, "severity": severity, "side": SEGMENTS[segment][0]}


@pytest.mark.parametrize(
    "findings,expected",
    [
        ([], "medical"),
        ([_f("LAD", 7, 50)], "medical"),
        ([_f("LAD", 6, 75)], "PCI"),
        ([_f("LAD", 6, 90), _f("RCA", 2, 100)], "PCI"),
        ([_f("LAD", 6, 75), _f("LCx", 11, 90), _f("RCA", 1, 75)], "CABG"),
        ([_f("LM", 5, 50)], "CABG"),
        ([_f("LM", 5, 75), _f("RCA", 3, 50)], "CABG"),
    ],
)
def test_treatment_rules(findings, expected):
    assert treatment(findings) == expected
    rep = make_report(findings)
    rec = rep["en"]["recommendation"]
    assert {"CABG": "CABG", "PCI": "PCI", "medical": "Medical therapy"}[expected] in rec


def test_report_text_matches_findings():
    fs = [_f("LAD", 6, 75), _f("LCx", 13, 100), _f("RCA", 2, 90)]
    rep = make_report(fs)
    assert rep["en"]["findings"] == (
        "Left coronary angiography: 75% stenosis in the proximal LAD (segment 6); total occlusion of the "
        "distal LCx (segment 13). Right coronary angiography: 90% stenosis in the mid RCA (segment 2)."
    )
    assert rep["ja"]["findings"] == (
        "左冠動脈造影：LAD近位部（#6）に75%狭窄、LCx遠位部（#13）に完全閉塞を認める。"
        "右冠動脈造影：RCA中間部（#2）に90%狭窄を認める。"
    )
    assert rep["en"]["impression"] == "Three-vessel coronary artery disease (LAD, LCx, RCA)."
    assert rep["ja"]["impression"] == "3枝病変（LAD、LCx、RCA）。"
    assert rep["ja"]["recommendation"] == "冠動脈バイパス術（CABG）を推奨する。"
    normal = make_report([])
    assert normal["en"]["findings"] == (
        "Left coronary angiography: no significant stenosis. Right coronary angiography: no significant stenosis."
    )
    assert normal["ja"]["recommendation"] == "薬物療法を推奨する。"


def test_reports_well_formed_in_both_languages():
    jp = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
    for seed in range(25):
        st = generate_study(seed, 0, size=32, frames=4, runs_per_study=2, with_pixels=False)["study"]
        rep = st["report"]
        assert set(rep) == set(LANGUAGES)
        for lang in LANGUAGES:
            assert set(rep[lang]) == set(SECTIONS)
            for sec in SECTIONS:
                text = rep[lang][sec]
                assert text and text == text.strip()
                if lang == "en":
                    assert text.isascii() and text.endswith(".")
                else:
                    assert jp.search(text) and text.endswith("。") and "." not in text.replace("%", "")
        for f in st["findings"]:
            name_en, name_ja = SEGMENTS[f["segment"]][2], SEGMENTS[f["segment"]][3]
            assert f"(segment {f['segment']})" in rep["en"]["findings"] and name_en in rep["en"]["findings"]
            assert f"（#{f['segment']}）" in rep["ja"]["findings"] and name_ja in rep["ja"]["findings"]
            word = "total occlusion" if f["severity"] == 100 else f"{f['severity']}% stenosis"
            assert word in rep["en"]["findings"]
        assert st["treatment"] == treatment(st["findings"])


def test_disease_patterns_cover_all_treatments():
    seen = set()
    for seed in range(40):
        st = generate_study(seed, 1, size=32, frames=4, runs_per_study=2, with_pixels=False)["study"]
        seen.add(st["treatment"])
    assert seen == {"PCI", "CABG", "medical"}


# ----------------------------------------------------------------------------- DICOM


def test_dicom_headers(tiny_synth):
    out, recs = tiny_synth
    for rec in recs[:5]:
        ds = pydicom.dcmread(out / rec["file"])
        assert ds.SOPClassUID == XA and ds.Modality == "XA"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.SOPInstanceUID == rec["sop_instance_uid"]
        assert ds.StudyInstanceUID == rec["study_uid"]
        assert ds.SeriesInstanceUID == rec["series_uid"]
        assert ds.PatientID == rec["patient_id"]
        assert int(ds.NumberOfFrames) == len(rec["frame_labels"])
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
        assert ds.FrameIncrementPointer == 0x00181063
        assert float(ds.FrameTime) == pytest.approx(rec["frame_time_ms"], abs=0.01)
        assert float(ds.PositionerPrimaryAngle) == pytest.approx(rec["primary_angle"], abs=0.051)
        assert float(ds.PositionerSecondaryAngle) == pytest.approx(rec["secondary_angle"], abs=0.051)
        assert float(ds.DistanceSourceToDetector) > float(ds.DistanceSourceToPatient) > 0
        assert ds.pixel_array.shape == (12, 128, 128)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not on PATH")
@pytest.mark.parametrize("compression,bits", [("none", 8), ("jpegls", 8), ("rle", 8), ("none", 10), ("jpegls", 12),
                                              ("jpeg", 8)])
def test_dciodvfy_no_errors(tmp_path, tiny_synth, compression, bits):
    out, recs = tiny_synth
    if compression == "none" and bits == 8:
        files = [out / recs[0]["file"], out / recs[-1]["file"]]
    else:
        r = generate_dataset(tmp_path, 1, seed=3, size=64, frames=5, runs_per_study=2, progress=False,
                             compression=compression, bits=bits)
        files = [tmp_path / r[0]["file"]]
        ds = pydicom.dcmread(files[0])
        assert ds.BitsStored == bits and ds.BitsAllocated == (8 if bits == 8 else 16)
        px = ds.pixel_array
        assert px.shape == (5, 64, 64) and int(px.max()) < 2**bits
        if bits > 8:
            assert int(px.max()) > 255
    for f in files:
        res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        text = res.stdout + res.stderr
        errors = [line for line in text.splitlines() if line.startswith("Error")]
        assert not errors, text


def test_cli_synth(tmp_path):
    from dicom_node.cli import main

    rc = main(["synth", str(tmp_path / "o"), "--studies", "1", "--seed", "5", "--size", "64", "--frames", "6",
               "--runs-per-study", "2", "--no-progress"])
    assert rc == 0
    recs = [json.loads(x) for x in (tmp_path / "o" / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 2 and {r["laterality"] for r in recs} == {"LCA", "RCA"}
    assert (tmp_path / "o" / "studies.jsonl").is_file()


def test_labels_without_pixels_match_rendered_labels():
    a = generate_study(4, 2, size=64, frames=10, runs_per_study=3, with_pixels=True)
    b = generate_study(4, 2, size=64, frames=10, runs_per_study=3, with_pixels=False)
    assert a["study"] == b["study"]
    for ra, rb in zip(a["runs"], b["runs"]):
        assert ra["labels"] == rb["labels"]
        assert ra["meta"]["fill"] == rb["meta"]["fill"]
        assert ra["frames"].shape == (10, 64, 64) and rb["frames"] is None


# ----------------------------------------------------------------------------- domain randomisation

from training.synthetic.anatomy import NO_HARDWARE, ostium_local  # noqa: E402
from training.synthetic.render import CONTRAST, RunSpec, run_labels  # noqa: E402


def _dciodvfy_errors(path):
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    text = res.stdout + res.stderr
    return [line for line in text.splitlines() if line.startswith("Error")], text


def test_narrow_domain_has_no_randomisation():
    rng = np.random.default_rng(2)
    an = sample_anatomy(rng, domain="narrow")
    assert an.params == {"vessel_scale": 1.0, "tortuosity": 0.0, "hardware": NO_HARDWARE}
    spec = sample_run_spec(rng, "LCA", size=64, n_frames=8, domain="narrow")
    d = RunSpec()
    for k in ("better_contrast", "texture_gain", "fine_gain", "lung_markings", "rib_cortex", "soft_tissue", "bowel_gas"):
        assert getattr(spec, k) == getattr(d, k), k
    assert spec.domain == "narrow" and CONTRAST["narrow"]["normal"][0] <= spec.contrast
    with pytest.raises(ValueError):
        sample_run_spec(rng, "LCA", domain="narrow", quality="partial")
    a, la, _ = render_run(5, side="LCA", size=64, n_frames=8, domain="narrow")
    b, lb, _ = render_run(5, side="LCA", size=64, n_frames=8, domain="wide")
    assert not np.array_equal(a, b)


def test_wide_anatomy_stays_connected():
    for seed in range(4):
        an = sample_anatomy(np.random.default_rng(seed))
        assert 0.75 <= an.params["vessel_scale"] <= 1.25 and 0 <= an.params["tortuosity"] <= 3
        ref = sample_anatomy(np.random.default_rng(seed), domain="narrow")
        for side in ("LCA", "RCA"):
            tree, tref = an.tree(side), ref.tree(side)
            assert np.allclose(tree.branches[0].pts[0], ostium_local(an.heart, side))  # the ostium stays put
            for b, br in zip(tree.branches, tref.branches):
                assert b.name == br.name and len(b.pts) == len(br.pts)  # sample indices keep their meaning
                assert np.abs(b.pts - br.pts).max() < 3.5 + 1e-6  # wiggle <= tortuosity (3 mm) + a little
                if b.parent >= 0:
                    assert np.allclose(b.pts[0], tree.branches[b.parent].pts[b.parent_idx], atol=1e-6)


def test_contrast_ranges_and_better_threshold():
    wide = CONTRAST["wide"]
    assert wide["low"][1] < wide["better"] < wide["normal"][0]
    for seed in range(20):
        rng = np.random.default_rng(seed)
        good = sample_run_spec(rng, "RCA", size=64, n_frames=20, quality="good")
        low = sample_run_spec(rng, "RCA", size=64, n_frames=20, quality="low_contrast")
        assert good.better_contrast == low.better_contrast == wide["better"]
        assert wide["normal"][0] <= good.contrast <= wide["normal"][1]
        assert wide["low"][0] <= low.contrast <= wide["low"][1]
        an = sample_anatomy(rng)
        assert not any(lab.endswith("better") for lab in run_labels(an, [], low)[0])  # weak: never "better"


def test_partial_injections_fill_less_and_labels_follow_fill():
    fills = {"good": [], "partial": []}
    for seed in range(8):
        rng = np.random.default_rng(seed)
        an = sample_anatomy(rng)
        for q in fills:
            spec = sample_run_spec(rng, "LCA", size=64, n_frames=30, quality=q)
            assert spec.quality in (q, "motion")  # a random table pan makes any run "motion"
            labels, fill, cmax = run_labels(an, [], spec)
            fills[q].append(max(fill))
            for lab, f in zip(labels, fill):
                assert not (lab == "LCA_better" and f < 0.85)
    assert np.mean(fills["partial"]) < 0.8 < np.mean(fills["good"])
    # in a drawn mix about a tenth of the runs are partial
    n = sum(sample_run_spec(np.random.default_rng([9, i]), "RCA", 64, 20).quality == "partial" for i in range(300))
    assert 12 <= n <= 50


@pytest.mark.parametrize("hw", [dict(sternal_wires=6), dict(clips=8), dict(lead="icd")])
def test_forced_hardware_appears(hw):
    an = sample_anatomy(np.random.default_rng(4))
    assert an.hardware == dict(an.hardware, sternal_wires=0, clips=0, lead="")  # this patient has none
    spec = sample_run_spec(np.random.default_rng(1), "RCA", size=128, n_frames=6, view=(0.0, 0.0), quality="good")
    spec.noise, spec.aim, spec.fov_mm, spec.collimation, spec.blades = 0.0, (0.0, 0.0), 280.0, "none", []
    spec.pan, spec.shake = [(0, 0)] * 6, [0.0] * 6  # no table pan
    f0, l0, m0 = render_run(1, anatomy=an, lesions=[], spec=spec)
    an.hardware.update(hw, seed=3)
    f1, l1, m1 = render_run(1, anatomy=an, lesions=[], spec=spec)
    assert l1 == l0 and m1["anatomy"]["hardware"] == an.hardware
    d = f0.astype(int) - f1.astype(int)  # dense hardware is dark (like iodine)
    assert (d > 30).sum(axis=(1, 2)).min() > 20
    m0, m1 = d[0] > 30, d[-1] > 30  # static through the run (the beating heart behind it aside)
    assert (m0 & m1).sum() > 0.7 * (m0 | m1).sum()
    assert (d < -10).sum() == 0


def test_wide_options_deterministic_across_workers(tmp_path):
    opts = dict(size=64, frames=6, runs_per_study=2, progress=False, compression="mixed")
    a = generate_dataset(tmp_path / "a", 2, seed=3, workers=1, **opts)
    b = generate_dataset(tmp_path / "b", 2, seed=3, workers=2, **opts)
    assert a == b
    assert {r["compression"] for r in a} == {"none", "jpeg"}
    for r in a:
        assert (tmp_path / "a" / r["file"]).read_bytes() == (tmp_path / "b" / r["file"]).read_bytes()
        assert (r["jpeg_quality"] is None) == (r["compression"] == "none")
        assert r["jpeg_quality"] is None or 70 <= r["jpeg_quality"] <= 95
        assert r["domain"] == "wide"
        ts = pydicom.dcmread(tmp_path / "a" / r["file"], stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert ts == ("1.2.840.10008.1.2.4.50" if r["compression"] == "jpeg" else "1.2.840.10008.1.2.1")
    # the compression draw does not touch the pixels: same labels as uncompressed
    c = generate_dataset(tmp_path / "c", 2, seed=3, **dict(opts, compression="none"))
    assert [r["frame_labels"] for r in c] == [r["frame_labels"] for r in a]


def test_jpeg_runs_decode_through_open_run(tmp_path):
    from inference.frames import open_run

    opts = dict(size=96, frames=7, runs_per_study=2, progress=False)
    ref = generate_dataset(tmp_path / "raw", 1, seed=11, **opts)
    recs = generate_dataset(tmp_path / "jpg", 1, seed=11, compression="jpeg", jpeg_quality=85, **opts)
    for r, r0 in zip(recs, ref):
        path = tmp_path / "jpg" / r["file"]
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50" and r["jpeg_quality"] == 85
        assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"
        assert float(ds.LossyImageCompressionRatio) > 1.5
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 8
        frag = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=7))
        assert frag[:2] == b"\xff\xd8" and b"\xff\xc0" in frag  # SOI, baseline SOF0
        run = open_run(path)
        frames = list(run.iter_frames())
        assert run.n_frames == len(frames) == r["n_frames"] == 7
        raw = pydicom.dcmread(tmp_path / "raw" / r0["file"]).pixel_array.astype(float)
        assert np.abs(ds.pixel_array.astype(float) - raw).mean() < 3.0  # lossy, but close
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "x", 1, seed=1, size=32, frames=2, runs_per_study=2, progress=False,
                         compression="jpeg", bits=12)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not on PATH")
@pytest.mark.parametrize("compression", ["jpeg", "mixed"])
def test_dciodvfy_new_options(tmp_path, compression):
    # study 55 of seed 7 has sternal wires and surgical clips
    st = generate_study(7, 55, size=32, frames=4, runs_per_study=2, with_pixels=False)["study"]
    assert st["anatomy"]["hardware"]["sternal_wires"] and st["anatomy"]["hardware"]["clips"]
    recs = generate_dataset(tmp_path, 1, seed=7, start=55, size=96, frames=5, runs_per_study=3, progress=False,
                            compression=compression)
    assert all(r["hardware"] == ["clips", "sternal_wires"] for r in recs)
    if compression == "mixed":
        assert {r["compression"] for r in recs} == {"none", "jpeg"}
    for r in recs:
        errors, text = _dciodvfy_errors(tmp_path / r["file"])
        assert not errors, text


def test_cli_synth_new_options(tmp_path):
    from dicom_node.cli import main

    rc = main(["synth", str(tmp_path / "o"), "--studies", "1", "--seed", "5", "--size", "48", "--frames", "4",
               "--runs-per-study", "2", "--compression", "jpeg", "--jpeg-quality", "80", "--domain", "narrow",
               "--no-progress"])
    assert rc == 0
    recs = [json.loads(x) for x in (tmp_path / "o" / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["compression"], r["jpeg_quality"], r["domain"]) for r in recs] == [("jpeg", 80, "narrow")] * 2
    assert main(["synth", str(tmp_path / "p"), "--studies", "1", "--compression", "jpeg", "--bits", "12",
                 "--no-progress"]) == 2


# ----------------------------------------------------------------------------- view spread


def _views(n, geometry):
    out = []
    for i in range(n):
        st = generate_study(11, i, size=32, frames=4, with_pixels=False, geometry=geometry)
        out.append((st, [(r["run"]["side"], r["run"]["primary"], r["run"]["secondary"]) for r in st["runs"]]))
    return out


def test_broad_views_share_projections_between_sides_and_change_nothing_else():
    typical, broad = _views(40, "typical"), _views(40, "broad")
    # typical: a right coronary is never filmed caudal (its views are straight or cranial)
    assert min(s for _, v in typical for side, _, s in v if side == "RCA") > -15
    # broad: some right coronaries get the left's caudal views, and the angles stay in range
    rca_broad = [(p, s) for _, v in broad for side, p, s in v if side == "RCA"]
    assert any(s < -15 for _, s in rca_broad)
    assert all(-60 <= p <= 70 and -40 <= s <= 45 for _, v in broad for _, p, s in v)
    for (st_t, v_t), (st_b, v_b) in zip(typical, broad):  # same patient, disease, runs, report
        assert [x[0] for x in v_t] == [x[0] for x in v_b]
        assert st_t["study"]["findings"] == st_b["study"]["findings"]
        a_t, a_b = dict(st_t["study"]["anatomy"]), dict(st_b["study"]["anatomy"])
        assert -25 <= a_b.pop("heart_tilt") <= 12 and -10 <= a_b.pop("heart_turn") <= 10
        assert a_t == a_b
        assert st_b["study"]["geometry"] == "broad" and "geometry" not in st_t["study"]
    assert sum(vt != vb for (_, vt), (_, vb) in zip(typical, broad)) >= 35
    with pytest.raises(ValueError):
        generate_study(11, 0, size=32, frames=4, with_pixels=False, geometry="all")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not on PATH")
def test_cli_synth_broad_geometry_dciodvfy_clean(tmp_path):
    from dicom_node.cli import main

    assert main(["synth", str(tmp_path / "o"), "--studies", "1", "--seed", "5", "--size", "64", "--frames", "4",
                 "--runs-per-study", "3", "--domain", "narrow", "--geometry", "broad", "--no-progress"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "o" / "labels.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(recs) == 3
    for r in recs:
        ds = pydicom.dcmread(tmp_path / "o" / r["file"], stop_before_pixels=True)
        assert ds.SeriesDescription == f"{r['laterality']} {r['view']}"
        errors, text = _dciodvfy_errors(tmp_path / "o" / r["file"])
        assert not errors, text


def test_tilted_heart_moves_rigidly_and_steepens_the_rao_right_coronary():
    from training.synthetic.anatomy import tilt_heart
    from training.synthetic.projection import CArm

    def chord_angle(an):  # ostium -> end of the RCA main branch in RAO 30, degrees from horizontal
        c, r, _ = CArm(-30, 0, size=512, fov_mm=156, sid=1194, sod=810).project(an.heart.to_patient(an.rca.branches[0].pts))
        return np.degrees(np.arctan2(r[-1] - r[0], abs(c[-1] - c[0])))

    an = sample_anatomy(np.random.default_rng(3), domain="narrow")
    before = an.heart.to_patient(an.rca.branches[0].pts)
    a0 = chord_angle(an)
    tilt_heart(an.heart, -25.0, 0.0)
    after = an.heart.to_patient(an.rca.branches[0].pts)
    # rigid: distances along the vessel unchanged, the basis still orthonormal
    assert np.allclose(np.linalg.norm(np.diff(before, axis=0), axis=1), np.linalg.norm(np.diff(after, axis=0), axis=1))
    assert np.allclose(an.heart.basis @ an.heart.basis.T, np.eye(3), atol=1e-9)
    assert chord_angle(an) > a0 + 5
    with pytest.raises(ValueError):
        sample_anatomy(np.random.default_rng(3), pose="sideways")
