"""Evaluation metrics on known pairs; the clinical parser on the synthetic report templates."""

import numpy as np
import pytest

from training.vlm.evaluate import (bleu, clinical_scores, export_for_rating, fit_vlscore_c, import_ratings,
                                   normalise_finding, parse_findings, parse_treatment, rouge_l, triangle_area,
                                   vlscore)


def test_bleu_rouge_identical_and_disjoint():
    en = "Left coronary angiography: 90% stenosis in the proximal LAD (segment 6)."
    ja = "左冠動脈造影：LAD近位部（#6）に90%狭窄を認める。"
    assert bleu([en], [en], "en") == 1.0
    assert bleu([ja], [ja], "ja") == 1.0
    assert rouge_l(en, en, "en") == 1.0 and rouge_l(ja, ja, "ja") == 1.0
    assert bleu(["alpha beta gamma delta"], [en], "en") < 0.05
    assert rouge_l("xyz", en, "en") == 0.0
    partial = bleu(["Left coronary angiography: 75% stenosis in the mid LAD (segment 7)."], [en], "en")
    assert 0.2 < partial < 1.0
    # Japanese is scored by characters: one changed digit costs little
    assert rouge_l("左冠動脈造影：LAD近位部（#6）に75%狭窄を認める。", ja, "ja") > 0.9


def _synthetic_reports():
    synth = pytest.importorskip("training.synthetic.reports")
    cases = [
        [],
        [{"side": "LCA", "vessel": "LAD", "segment": 6, "severity": 90}],
        [{"side": "LCA", "vessel": "LM", "segment": 5, "severity": 75},
         {"side": "LCA", "vessel": "LCx", "segment": 13, "severity": 100},
         {"side": "RCA", "vessel": "RCA", "segment": 2, "severity": 99}],
        [{"side": "LCA", "vessel": "LAD", "segment": 9, "severity": 50},
         {"side": "RCA", "vessel": "RCA", "segment": 4, "severity": 100}],
        [{"side": "LCA", "vessel": "LAD", "segment": 7, "severity": 75},
         {"side": "LCA", "vessel": "LCx", "segment": 11, "severity": 90},
         {"side": "RCA", "vessel": "RCA", "segment": 1, "severity": 90}],
    ]
    return [(f, synth.make_report(f), synth.treatment(f)) for f in cases]


def test_clinical_parser_on_synthetic_templates():
    for findings, report, treat in _synthetic_reports():
        truth = sorted(map(str, (normalise_finding(f) for f in findings)))
        for lang in ("en", "ja"):
            got = sorted(map(str, parse_findings(report[lang]["findings"])))
            assert got == truth, (lang, report[lang]["findings"])
            assert parse_treatment(report[lang]["recommendation"]) == treat


def test_clinical_parser_free_text():
    f = parse_findings("Total occlusion of the mid RCA (#2). LAD seg 7: 75 % stenosis. No significant stenosis in LCx.")
    assert {(x["vessel"], x["segment"], x["severity"]) for x in f} == {("RCA", 2, 100), ("LAD", 7, 75)}
    assert parse_findings("右冠動脈（#1）に99%狭窄、LCx遠位部（#13）に完全閉塞を認める。") == [
        {"side": "RCA", "vessel": "RCA", "segment": 1, "severity": 99},
        {"side": "LCA", "vessel": "LCX", "segment": 13, "severity": 100}]
    assert parse_treatment("Heart team: CABG rather than PCI") == "CABG"
    assert parse_treatment("経過観察") == "follow-up"
    assert parse_treatment("nothing") is None


def test_clinical_scores():
    t = [[{"side": "LCA", "vessel": "LAD", "segment": 6, "severity": 90}],
         [{"side": "RCA", "vessel": "RCA", "segment": 2, "severity": 75}]]
    p = [[{"side": "LCA", "vessel": "LAD", "segment": 6, "severity": 75}], []]
    s = clinical_scores(p, t, ["PCI", "medical"], ["PCI", "PCI"])
    assert s["side"]["tp"] == 1 and s["side"]["fn"] == 1 and s["side"]["f1"] == pytest.approx(2 / 3, abs=1e-3)
    assert s["segment"]["f1"] == pytest.approx(2 / 3, abs=1e-3)
    assert s["severity"]["f1"] == 0.0
    assert s["treatment_agreement"] == 0.5
    perfect = clinical_scores(t, t, ["PCI"], ["PCI"])
    assert perfect["severity"]["f1"] == 1.0 and perfect["exact_match"] == 1.0
    # no findings on either side is a perfect (vacuous) match
    assert clinical_scores([[]], [[]])["severity"]["f1"] == 1.0


def test_vlscore_formula():
    img, ref = np.array([0.0, 0.0]), np.array([1.0, 0.0])
    assert vlscore(img, ref, ref, c=1.0) == 1.0  # generated == reference: no area
    gen = np.array([0.0, 2.0])
    assert triangle_area(img, gen, ref) == pytest.approx(1.0)  # 0.5 * |a||b| for orthogonal a, b
    assert vlscore(img, gen, ref, c=4.0) == pytest.approx(0.75)
    assert vlscore(img, gen, ref, c=0.5) == 0.0  # clipped at 0
    rng = np.random.default_rng(0)
    c = fit_vlscore_c(list(rng.normal(size=(10, 8))), list(rng.normal(size=(10, 8))))
    assert c > 0


def test_rating_export_import(tmp_path):
    rows = [{"study_uid": "1", "language": "en", "model": m, "findings": "f", "impression": "i",
             "recommendation": "r"} for m in ("gemma3", "reference")]
    for ext in ("csv", "jsonl"):
        p = export_for_rating(rows, tmp_path / f"sheet.{ext}")
        text = p.read_text(encoding="utf-8-sig")
        assert "overall" in text and "gemma3" not in text  # blinded
        # a clinician fills it in
        if ext == "csv":
            import csv

            with open(p, encoding="utf-8-sig", newline="") as fh:
                rs = list(csv.DictReader(fh))
            for r, score in zip(rs, ("7", "9")):
                r["overall"] = score
                r["language_quality"] = "8"
            with open(p, "w", encoding="utf-8-sig", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rs[0].keys()))
                w.writeheader()
                w.writerows(rs)
        else:
            import json

            rs = [json.loads(l) for l in p.read_text().splitlines()]
            for r, score in zip(rs, (7, 9)):
                r["overall"] = score
                r["language_quality"] = 8
            p.write_text("\n".join(json.dumps(r) for r in rs))
        s = import_ratings(p)
        assert s["errors"] == []
        assert s["by_model"]["*"]["overall"]["mean"] == 8.0
        assert set(s["by_model"]) == {"*", "gemma3", "reference"}
        assert s["by_model"]["*"]["language_quality"]["n"] == 2
