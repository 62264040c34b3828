"""Real-data dataset builder and the patient-level split."""

from __future__ import annotations

import csv
import json

import pytest

from training.datasets import build_records, normalise_label, split_records, write_jsonl


def _hospital_export(tmp_path, out, recs, every=1, label_case=str):
    """Pretend the synthetic runs came from a hospital: a CSV of frame labels and a JSONL
    of reports, keyed by file / SOP Instance UID like a real export would be."""
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "frame", "label"])
        for k, r in enumerate(recs):
            key = r["file"] if k % 2 == 0 else r["sop_instance_uid"]
            for i, lab in enumerate(r["frame_labels"]):
                if i % every == 0:
                    w.writerow([key, i + 1, label_case(lab)])
    studies = {}
    for r in recs:
        studies[r["study_uid"]] = {"study_uid": r["study_uid"], "report": r["report"], "findings": r["findings"]}
    rep_path = write_jsonl(studies.values(), tmp_path / "reports.jsonl")
    return csv_path, rep_path


def test_build_records_reproduces_synthetic_labels(tmp_path, tiny_synth):
    out, recs = tiny_synth
    csv_path, rep_path = _hospital_export(tmp_path, out, recs)
    built = build_records(out, csv_path, rep_path)
    assert len(built) == len(recs)
    by_sop = {r["sop_instance_uid"]: r for r in recs}
    for b in built:
        r = by_sop[b["sop_instance_uid"]]
        for key in ("file", "study_uid", "series_uid", "patient_id", "laterality", "frame_labels", "findings", "report",
                    "treatment"):
            assert b[key] == r[key], key
        assert b["synthetic"] is False and b["labelled_frames"] == b["n_frames"]
        json.dumps(b, ensure_ascii=False)  # JSON-friendly


def test_build_records_partial_labels_and_synonyms(tmp_path, tiny_synth):
    out, recs = tiny_synth
    csv_path, _ = _hospital_export(tmp_path, out, recs[:2], every=3,
                                   label_case=lambda s: s.lower().replace("other", "others"))
    built = build_records(out, csv_path)
    assert len(built) == 2
    for b in built:
        assert b["frame_labels"][0] is not None and b["frame_labels"][1] is None
        assert b["labelled_frames"] == 4
        assert b["report"] is None and b["findings"] == []


def test_build_records_errors(tmp_path, tiny_synth):
    out, recs = tiny_synth
    bad = tmp_path / "bad.csv"
    bad.write_text(f"file,frame,label\n{recs[0]['file']},1,LCA_good\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown frame label"):
        build_records(out, bad)
    bad.write_text(f"file,frame,label\n{recs[0]['file']},99,LCA_other\n", encoding="utf-8")
    with pytest.raises(ValueError, match="out of range"):
        build_records(out, bad)
    assert build_records(out, bad, strict=False) == []
    bad.write_text("file,frame,label\nnope.dcm,1,LCA_other\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no DICOM file"):
        build_records(out, bad)
    bad.write_text("file,label\nx,LCA_other\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing column"):
        build_records(out, bad)


def test_normalise_label():
    assert normalise_label("lca_better") == "LCA_better"
    assert normalise_label("RCA-others") == "RCA_other"
    assert normalise_label(" RCA bad ") == "RCA_bad"
    with pytest.raises(ValueError):
        normalise_label("LAD_better")


def _fake(n_patients=30, studies=2, runs=3, missing_pid=False):
    recs = []
    for p in range(n_patients):
        for s in range(studies):
            for r in range(runs):
                recs.append({
                    "patient_id": "" if missing_pid else f"P{p:03d}",
                    "study_uid": f"1.2.{p}.{s}",
                    "sop_instance_uid": f"1.2.{p}.{s}.{r}",
                    "file": f"p{p}/s{s}/r{r}.dcm",
                })
    return recs


def _ids(part, key):
    return {r[key] for r in part}


@pytest.mark.parametrize("missing_pid", [False, True])
def test_split_records_by_patient(missing_pid):
    recs = _fake(missing_pid=missing_pid)
    train, val, test = split_records(recs, (0.8, 0.1, 0.1), seed=3)
    assert len(train) + len(val) + len(test) == len(recs)
    key = "study_uid" if missing_pid else "patient_id"
    parts = [train, val, test]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not _ids(parts[i], key) & _ids(parts[j], key)
            assert not _ids(parts[i], "sop_instance_uid") & _ids(parts[j], "sop_instance_uid")
    assert 0.7 < len(train) / len(recs) < 0.9
    assert val and test


def test_split_records_deterministic_and_order_independent():
    recs = _fake()
    a = split_records(recs, seed=1)
    b = split_records(list(reversed(recs)), seed=1)
    c = split_records(recs, seed=2)
    key = lambda parts: [sorted(r["sop_instance_uid"] for r in p) for p in parts]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_split_small_and_two_way(tiny_synth):
    _, recs = tiny_synth  # 3 patients
    train, val, test = split_records(recs, seed=0)
    assert all(len(_ids(p, "patient_id")) == 1 for p in (train, val, test))
    tr, te = split_records(recs, (0.5, 0.5), seed=0)
    assert len(tr) + len(te) == len(recs) and tr and te
    with pytest.raises(ValueError):
        split_records(recs, (0.0, 0.0))
    tr2, va2 = split_records(recs, val_frac=0.34, seed=0)
    assert len(tr2) + len(va2) == len(recs) and va2 and not _ids(tr2, "patient_id") & _ids(va2, "patient_id")
