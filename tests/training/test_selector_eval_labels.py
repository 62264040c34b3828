"""``cag-node evaluate selector --labels CSV``: a bundle measured on labelled (real) runs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

CLI = str(Path(sys.executable).parent / "cag-node")


def _cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=600, cwd=cwd)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# -- no model -------------------------------------------------------------------------------

def test_labelled_run_metrics_by_hand():
    from training.selector.evaluate import labelled_run_metrics

    rows = [  # truth, predicted, model's key frames, reader's key frame
        dict(truth="LCA", predicted="LCA", key_frames=[10, 3], key_frame_truth=12),  # hit (|10-12| = 2), not exact
        dict(truth="LCA", predicted="RCA", key_frames=[5], key_frame_truth=5),  # exact
        dict(truth="RCA", predicted="RCA", key_frames=[7], key_frame_truth=None),
        dict(truth="RCA", predicted="RCA", key_frames=[20], key_frame_truth=2),  # miss
        dict(truth="RCA", predicted=None, key_frames=[], key_frame_truth=4),  # unreadable: wrong, miss
    ]
    m = labelled_run_metrics(rows, key_frame_tolerance=2)
    assert m["runs"] == 5 and m["classes"] == ["LCA", "RCA"]
    # the unreadable RCA run counts as predicted LCA
    assert m["confusion"] == [[1, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    # LCA: tp 1, fp 1, fn 1 -> 0.5; RCA: tp 2, fp 1, fn 1 -> 4/6
    assert m["f1"]["LCA"] == pytest.approx(0.5)
    assert m["f1"]["RCA"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2, abs=1e-4)
    assert m["key_frame_runs"] == 4
    assert m["key_frame_agreement"] == pytest.approx(2 / 4)
    assert m["key_frame_exact"] == pytest.approx(1 / 4)
    assert [r["key_frame_hit"] for r in rows] == [True, True, None, False, False]
    assert labelled_run_metrics(rows, key_frame_tolerance=0)["key_frame_agreement"] == pytest.approx(1 / 4)
    # no reader key frames at all: no key-frame fields
    m2 = labelled_run_metrics([dict(truth="LCA", predicted="LCA", key_frames=[1], key_frame_truth=None)])
    assert "key_frame_agreement" not in m2 and m2["accuracy"] == 1.0


def test_read_labels_csv_spellings_and_errors(tmp_path):
    from training.selector.evaluate import LabelsError, read_labels_csv

    sub = tmp_path / "site"
    sub.mkdir()
    p = _write_csv(sub / "labels.csv", ["File", "Laterality", "key_frame", "note"],
                   [["runs/a.dcm", "lca", "3", "x"], ["/abs/b.dcm", "Right", "", ""], ["c.dcm", "LEFT", "12.0", ""]])
    rows = read_labels_csv(p)
    assert [r["laterality"] for r in rows] == ["LCA", "RCA", "LCA"]
    assert [r["key_frame"] for r in rows] == [3, None, 12]
    assert rows[0]["path"] == str(sub.resolve() / "runs" / "a.dcm") and rows[1]["path"] == "/abs/b.dcm"
    assert rows[0]["file"] == "runs/a.dcm"
    for header, row, needle in [
        (["file", "side"], ["a.dcm", "LCA"], "'laterality'"),
        (["path", "laterality"], ["a.dcm", "LCA"], "'file'"),
        (["file", "laterality"], ["a.dcm", "LAD"], "laterality 'LAD'"),
        (["file", "laterality", "key_frame"], ["a.dcm", "RCA", "0"], "key_frame '0'"),
        (["file", "laterality", "key_frame"], ["a.dcm", "RCA", "2.5"], "key_frame '2.5'"),
        (["file", "laterality", "key_frame"], ["a.dcm", "RCA", "x"], "key_frame 'x'"),
    ]:
        with pytest.raises(LabelsError, match=needle):
            read_labels_csv(_write_csv(tmp_path / "bad.csv", header, [row]))
    with pytest.raises(LabelsError, match="no such file"):
        read_labels_csv(tmp_path / "absent.csv")


def test_cli_usage_errors_exit_2(tmp_path):
    bad = _write_csv(tmp_path / "nolat.csv", ["file", "key_frame"], [["a.dcm", "1"]])
    r = _cli("evaluate", "selector", "--labels", bad, "--bundle", tmp_path / "no-bundle", "--json")
    assert r.returncode == 2 and "--labels" in r.stderr and "laterality" in r.stderr, r.stderr
    r = _cli("evaluate", "selector", "--data", tmp_path, "--labels", bad, "--bundle", tmp_path / "no-bundle")
    assert r.returncode == 2 and "--labels" in r.stderr and "--data" in r.stderr, r.stderr
    r = _cli("evaluate", "selector", "--bundle", tmp_path / "no-bundle")
    assert r.returncode == 2 and "--labels" in r.stderr, r.stderr
    badkf = _write_csv(tmp_path / "badkf.csv", ["file", "laterality", "key_frame"], [["a.dcm", "LCA", "-1"]])
    r = _cli("evaluate", "selector", "--labels", badkf, "--bundle", tmp_path / "no-bundle")
    assert r.returncode == 2 and "key_frame" in r.stderr, r.stderr


# -- the real CLI on a bundle -----------------------------------------------------------------

def test_cli_evaluates_labelled_runs(quick_bundle, tmp_path):
    from training.synthetic import generate_dataset

    data = tmp_path / "runs"
    recs = generate_dataset(data, 2, 20260421, size=128, frames=12, progress=False)
    assert len(recs) >= 4
    (tmp_path / "notes.txt").write_text("not a DICOM file\n")
    rows = []
    for i, rec in enumerate(recs):
        side = rec["laterality"]
        lat = {0: side, 1: side.lower()}.get(i, side)
        if i == 2:
            lat = {"LCA": "left", "RCA": "right"}[side]
        better = [j + 1 for j, lab in enumerate(rec["frame_labels"]) if lab == f"{side}_better"]
        kf = better[0] if (better and i % 2 == 0) else ""  # some cells empty
        rows.append([f"runs/{rec['file']}", lat, kf])
    rows.append(["notes.txt", "RCA", "3"])  # unreadable: reported, counted wrong
    labels = _write_csv(tmp_path / "labels.csv", ["file", "laterality", "key_frame"], rows)

    # relative paths resolve against the CSV's folder, not the working directory
    r = _cli("evaluate", "selector", "--labels", labels, "--bundle", quick_bundle, "--json", cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout)
    for key in ("runs", "accuracy", "f1", "macro_f1", "confusion", "classes", "errors", "per_run",
                "key_frame_runs", "key_frame_agreement", "key_frame_exact", "seconds", "bundle", "labels"):
        assert key in m, key
    n = len(rows)
    assert m["runs"] == n and len(m["per_run"]) == n
    assert m["classes"] == ["LCA", "RCA"]
    cm = m["confusion"]
    assert sum(map(sum, cm)) == n
    assert m["accuracy"] == pytest.approx((cm[0][0] + cm[1][1]) / n, abs=1e-4)
    assert set(m["f1"]) == {"LCA", "RCA"}
    assert m["macro_f1"] == pytest.approx((m["f1"]["LCA"] + m["f1"]["RCA"]) / 2, abs=2e-4)
    assert [e["file"] for e in m["errors"]] == ["notes.txt"] and m["errors"][0]["reason"]
    bad = m["per_run"][-1]
    assert bad["file"] == "notes.txt" and bad["predicted"] is None and bad["key_frame_hit"] is False
    assert m["key_frame_runs"] == sum(1 for row in rows if row[2] != "")
    assert 0.0 <= m["key_frame_exact"] <= m["key_frame_agreement"] <= 1.0
    for pr, row in zip(m["per_run"], rows):
        assert {"file", "truth", "predicted", "confidence", "key_frames", "key_frame_truth", "key_frame_hit"} <= set(pr)
        assert pr["truth"] in ("LCA", "RCA") and pr["key_frame_truth"] == (int(row[2]) if row[2] != "" else None)
        if pr["predicted"] is not None:
            assert pr["predicted"] in ("LCA", "RCA") and 0.0 < pr["confidence"] <= 1.0
            assert pr["key_frames"] and all(1 <= k <= 12 for k in pr["key_frames"])
    assert [pr["truth"] for pr in m["per_run"][:3]] == [recs[i]["laterality"] for i in range(3)]

    # the human-readable summary
    r = _cli("evaluate", "selector", "--labels", labels, "--bundle", quick_bundle, "--key-frame-tolerance", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "laterality accuracy" in r.stdout and "macro F1" in r.stdout and "notes.txt" in r.stdout
    assert "+/-0 frames" in r.stdout

    # occlusion saliency of each readable run's top key frame, and a contact sheet
    sal = tmp_path / "saliency"
    r = _cli("evaluate", "selector", "--labels", labels, "--bundle", quick_bundle, "--json", "--saliency", sal)
    assert r.returncode == 0, r.stderr[-3000:]
    rows_s = json.loads(r.stdout)["saliency"]
    assert len(rows_s) == n and "error" in rows_s[-1]
    for row in rows_s[:-1]:
        assert Path(row["png"]).is_file() and row["side"] in ("LCA", "RCA") and row["truth"] in ("LCA", "RCA")
    assert (sal / "sheet.png").is_file()


def test_occlusion_map_finds_the_part_that_decides(quick_bundle):
    """The map has the model's input size, is never negative, and is zero where occluding a patch
    changes nothing (a black frame)."""
    import numpy as np

    from inference.selector import Selector
    from training.selector.saliency import occlusion_map, overlay
    from training.synthetic import render_run

    sel = Selector(quick_bundle)
    frames, labels, _ = render_run(11, side="LCA", size=128, n_frames=16)
    k = max(range(len(labels)), key=lambda i: labels[i].endswith("better"))
    frame = frames[k].astype(np.float32) / 255
    sal, side, p = occlusion_map(sel, frame)
    s = sel.preprocessing.input_size
    assert sal.shape == (s, s) and sal.min() >= 0 and side in ("LCA", "RCA") and 0 < p <= 1
    blank = occlusion_map(sel, np.zeros((128, 128), np.float32), "LCA")[0]
    assert float(blank.max()) == 0.0  # nothing to take away from a black frame
    rgb = overlay(frame, sal, 64)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
