"""The lesion model's findings ("concepts") in the VLM's prompt: format, perturbation, plumbing
through report_study / evaluation, and the manifest flag of a model trained with them."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from inference.types import SEGMENTS
from inference.vlm.base import ReportBackend, build_prompt, concepts_line, format_report

FINDINGS = [{"side": "RCA", "vessel": "RCA", "segment": 2, "severity": 75},
            {"side": "LCA", "vessel": "LAD", "segment": 6, "severity": 90},
            {"side": "LCA", "vessel": "LCX", "segment": 11, "severity": 100}]


def test_prompt_with_concepts_both_languages():
    # None: the prompt every existing bundle was trained on, byte for byte
    assert build_prompt("en", ["LCA", "RCA"]) == build_prompt("en", ["LCA", "RCA"], concepts=None) == (
        "Coronary angiography key frames (LCA x1, RCA x1). Write the report in English with three "
        "sections, one per line: Findings: ... Impression: ... Recommendation: ...")
    assert build_prompt("ja", ["LCA"], source="x") == build_prompt("ja", ["LCA"], source="x", concepts=None) == (
        "冠動脈造影のキーフレーム（左冠動脈 x1）と英語の報告書:\nx\n"
        "同じ内容の報告書を日本語で書いてください。所見: … 診断: … 推奨: … の三項目を一行ずつ。")
    en = build_prompt("en", ["LCA", "RCA"], concepts=FINDINGS)
    ja = build_prompt("ja", ["LCA", "RCA"], concepts=FINDINGS)
    # one more line, LCA before RCA then by segment; the vessel follows the AHA segment
    assert en == build_prompt("en", ["LCA", "RCA"]) + "\nLesion model: LAD #6 90%; LCx #11 100%; RCA #2 75%"
    assert ja == build_prompt("ja", ["LCA", "RCA"]) + "\n病変モデル: LAD #6 90%、LCx #11 100%、RCA #2 75%"
    assert build_prompt("en", ["LCA", "RCA"], concepts=list(reversed(FINDINGS))) == en  # fixed order
    # an empty list: the lesion model saw no stenosis
    assert build_prompt("en", ["LCA"], concepts=[]).endswith("\nLesion model: no stenosis")
    assert build_prompt("ja", ["LCA"], concepts=[]).endswith("\n病変モデル: 狭窄なし")
    # after the source draft too
    assert build_prompt("ja", ["LCA"], source="x", concepts=[]).endswith("一行ずつ。\n病変モデル: 狭窄なし")
    # one finding per segment (the highest grade)
    twice = FINDINGS + [{"side": "LCA", "vessel": "LAD", "segment": 6, "severity": 75}]
    assert concepts_line(twice, "en") == "Lesion model: LAD #6 90%; LCx #11 100%; RCA #2 75%"


def test_perturbation_is_seeded_and_stays_valid():
    from training.vlm.concepts import GRADES, NOISE, perturb_findings, study_rng

    def draws(seed):
        return [perturb_findings(FINDINGS, study_rng(seed, f"study-{i}", "train")) for i in range(600)]

    a, b, c = draws(0), draws(0), draws(1)
    assert a == b and a != c
    n_true = dropped = moved = added = 0
    truth = {f["segment"]: f["severity"] for f in FINDINGS}
    for out in a:
        segs = [f["segment"] for f in out]
        assert len(segs) == len(set(segs))  # one finding per segment
        for f in out:
            assert f["segment"] in SEGMENTS and f["severity"] in GRADES
            assert (f["side"], f["vessel"]) == SEGMENTS[f["segment"]][:2]
            if f["segment"] in truth:
                g = truth[f["segment"]]
                if f["severity"] != g:
                    moved += 1
                    assert abs(GRADES.index(f["severity"]) - GRADES.index(g)) == 1  # one step
            else:
                added += 1
        dropped += sum(s not in segs for s in truth)
        n_true += len(truth)
    assert abs(dropped / n_true - NOISE["drop"]) < 0.04
    assert abs(moved / (n_true - dropped) - NOISE["grade"]) < 0.05
    assert abs(added / len(a) - NOISE["add"]) < 0.05
    # no noise: the findings themselves (normalised); a normal study can gain a spurious lesion only
    rng = random.Random(0)
    assert perturb_findings(FINDINGS, rng, {"drop": 0, "add": 0, "grade": 0}) == \
        perturb_findings(list(reversed(FINDINGS)), rng, {"drop": 0, "add": 0, "grade": 0})
    assert perturb_findings([], rng, {"drop": 0, "add": 0, "grade": 0}) == []
    assert len(perturb_findings([], rng, {"add": 1.0})) == 1


class _Recorder(ReportBackend):
    """Records every prompt; answers with a fixed well-formed report."""

    max_images = 4

    def __init__(self):
        self.prompts: list[str] = []

    def generate_text(self, images, prompt):
        self.prompts.append(prompt)
        lang = "ja" if "日本語" in prompt else "en"
        sec = {"en": {"findings": "LAD #6: 90% stenosis.", "impression": "Single-vessel disease.",
                      "recommendation": "PCI is recommended."},
               "ja": {"findings": "LAD #6: 90%狭窄。", "impression": "一枝病変。", "recommendation": "PCIを推奨する。"}}
        return format_report(sec[lang], lang)


def test_concepts_reach_the_prompt_through_report_study():
    from inference.vlm import report_study

    frames = {"LCA": [np.full((16, 16), 0.5, np.float32)], "RCA": [np.zeros((16, 16), np.float32)]}
    b = _Recorder()
    b.uses_concepts = True
    b.from_first_language = True
    rep = report_study(b, frames, languages=("en", "ja"), concepts=FINDINGS)
    assert set(rep) == {"en", "ja"} and rep["ja"].format_ok
    en, ja = b.prompts
    assert en.endswith("\nLesion model: LAD #6 90%; LCx #11 100%; RCA #2 75%")
    assert ja.endswith("\n病変モデル: LAD #6 90%、LCx #11 100%、RCA #2 75%") and "Findings:" in ja  # + EN draft
    b.prompts.clear()
    report_study(b, frames, languages=("en",), concepts=[])
    assert b.prompts[-1].endswith("\nLesion model: no stenosis")
    b.prompts.clear()
    report_study(b, frames, languages=("en",))  # no concepts: today's prompt
    assert b.prompts == [build_prompt("en", ["LCA", "RCA"], 2)]
    # a model trained without concepts never gets them
    plain = _Recorder()
    report_study(plain, frames, languages=("en", "ja"), concepts=FINDINGS)
    assert not any("Lesion model" in p or "病変モデル" in p for p in plain.prompts)


def test_evaluate_backend_concepts_for(standin_dir):
    from training.vlm.concepts import concepts_source, perturb_findings, study_rng, true_concepts
    from training.vlm.data import FrameCache, load_examples
    from training.vlm.evaluate import evaluate_backend, most_common_reports

    studies = load_examples(standin_dir)[:6]
    seen = []
    truth = concepts_source("truth")

    def concepts_for(example):
        seen.append(example.study_uid)
        return truth(example)

    b = _Recorder()
    res = evaluate_backend(b, studies, most_common_reports(studies), ("en",), frame_cache=FrameCache(),
                           concepts_for=concepts_for)
    assert seen == [s.study_uid for s in studies] and res["n_with_concepts"] == 6
    assert all("\nLesion model: " in p for p in b.prompts)
    assert [o["concepts"] for o in res["outputs"]] == [true_concepts(s) for s in studies]
    # the templated report from the true findings scores perfectly; the no-image baseline stays
    assert res["en"]["concepts_clinical"]["severity"]["f1"] == 1.0
    assert "baseline_clinical" in res["en"]
    # noisy: seeded, and not the training draws of the same seed
    noisy = concepts_source("noisy", seed=0)
    s = studies[0]
    assert noisy(s) == noisy(s) == perturb_findings(true_concepts(s), study_rng(0, s.study_uid, "eval"))
    assert concepts_source("none") is None
    with pytest.raises(ValueError):
        concepts_source("lesions")


def test_build_with_concepts_records_it_and_load_sets_uses_concepts(tmp_path, standin_dir, tiny_bundle):
    from inference.bundle import Bundle
    from inference.vlm import load_backend
    from training.vlm import build_vlm
    from training.vlm.data import load_examples
    from training.vlm.evaluate import evaluate_bundle
    from training.vlm.train import TrainConfig, encode_dataset

    cfg = TrainConfig(steps=2, batch_size=2, seed=0, progress=False)
    build_vlm(standin_dir, tmp_path / "b", seed=0, train_cfg=cfg, evaluate=False, concepts="findings")
    training = json.loads((tmp_path / "b" / "manifest.json").read_text(encoding="utf-8"))["vlm"]["training"]
    assert training["concepts"] == "findings" and training["concept_noise"] == {"drop": 0.1, "add": 0.1, "grade": 0.15}
    vlm = {"backend": "bundle", "device": "cpu", "max_new_tokens": 8}
    backend = load_backend(vlm, Bundle.load(tmp_path / "b"))
    assert backend.uses_concepts
    assert not load_backend(vlm, Bundle.load(tiny_bundle)).uses_concepts  # trained without
    assert "concepts" not in json.loads((tiny_bundle / "manifest.json").read_text())["vlm"]["training"]
    assert not load_backend({**vlm, "concepts": "none"}, Bundle.load(tmp_path / "b")).uses_concepts

    # the training prompts carry (perturbed) concepts in the prompt part only, never in the target
    studies = load_examples(standin_dir)[:4]
    fam = backend.family
    with_c = encode_dataset(backend.processor, fam, studies, TrainConfig(concepts="findings", seed=0))
    without = encode_dataset(backend.processor, fam, studies, TrainConfig(seed=0))
    tok = backend.processor.tokenizer
    for e in with_c:
        assert len(e.variants) == 8
        for ids, labels, _ in e.variants:
            prompt = tok.decode([i for i, l in zip(ids, labels) if l == -100])
            target = tok.decode([i for i, l in zip(ids, labels) if l != -100])
            assert ("\nLesion model: " if e.lang == "en" else "\n病変モデル: ") in prompt
            assert "Lesion model" not in target and "病変モデル" not in target
    assert all(len(e.variants) == 1 and "Lesion model" not in tok.decode(e.input_ids) for e in without)

    # evaluate vlm --concepts: what each model is given
    res = evaluate_bundle(standin_dir, tmp_path / "b", split="all", languages=("en",), limit=1, vlscore=False,
                          max_new_tokens=8, concepts="truth")
    assert res["concepts"] == "truth" and res["n_with_concepts"] == 1
    res = evaluate_bundle(standin_dir, tiny_bundle, split="all", languages=("en",), limit=1, vlscore=False,
                          max_new_tokens=8, concepts="truth")
    assert res["concepts"].startswith("none") and "n_with_concepts" not in res
