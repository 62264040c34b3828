"""Tokenizer round-trip, prompts, parsing into sections, frame presentation."""

import numpy as np
import pytest

from inference.vlm.base import (ReportBackend, build_prompt, format_report, parse_report, report_study,
                               select_images)

EN = "Findings: 90% stenosis in the proximal LAD (segment 6).\nImpression: Single-vessel disease.\nRecommendation: PCI."
JA = "所見: 左冠動脈造影：LAD近位部（#6）に90%狭窄を認める。\n診断: 1枝病変（LAD）。\n推奨: LADに対するPCIを推奨する。"


def test_tokenizer_roundtrip_en_ja(tmp_path):
    from transformers import AutoTokenizer

    from training.vlm.tokenizer import train_tokenizer

    corpus = [EN, JA, "右冠動脈造影：有意狭窄を認めない。", "Medical therapy is recommended."] * 5
    tok = train_tokenizer(corpus, vocab_size=400)
    for text in corpus[:4] + ["未知の文字列 ☃ ünïcödé", "segment 15; 99%"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # Gemma3Processor needs these on the tokenizer, and they survive save/load.
    tok.save_pretrained(tmp_path)
    t2 = AutoTokenizer.from_pretrained(tmp_path)
    for name in ("boi_token", "eoi_token", "image_token"):
        assert getattr(t2, name) == getattr(tok, name)
    assert t2.convert_tokens_to_ids(t2.image_token) != t2.unk_token_id
    assert t2.decode(t2(JA, add_special_tokens=False)["input_ids"]) == JA


def test_prompts_en_ja():
    en = build_prompt("en", ["LCA", "LCA", "RCA"])
    ja = build_prompt("ja", ["LCA", "RCA"])
    assert "LCA x2, RCA x1" in en and "English" in en
    assert "左冠動脈 x1" in ja and "日本語" in ja
    with pytest.raises(ValueError):
        build_prompt("fr")


@pytest.mark.parametrize("lang,text", [("en", EN), ("ja", JA)])
def test_parse_sections(lang, text):
    r = parse_report(text, lang)
    assert r.format_ok
    assert r.findings.startswith(("90%", "左冠動脈"))
    assert r.impression and r.recommendation
    # format_report is the inverse
    assert parse_report(format_report(r.to_dict(), lang), lang).to_dict() == r.to_dict()


def test_parse_variants():
    r = parse_report("**Findings**: a\n**Impression**: b\n**Recommendations**: c", "en")
    assert r.format_ok and (r.findings, r.impression, r.recommendation) == ("a", "b", "c")
    r = parse_report("所見：あ\n印象：い\n治療方針：う", "ja")  # full-width colons, alias headers
    assert r.format_ok and r.recommendation == "う"
    # a Japanese request answered with English headers still parses
    assert parse_report(EN, "ja").format_ok


@pytest.mark.parametrize("text", [
    "The LAD looks narrowed, I think PCI.",           # no headers at all
    "Findings: a\nImpression: b",                     # a section missing
    "Findings: a\nImpression: b\nRecommendation:",    # an empty section
    "Intro.\nFindings: a\nImpression: b\nRecommendation: c",  # text before the first header
    "",
])
def test_parse_format_not_followed(text):
    r = parse_report(text, "en")
    assert r.format_ok is False
    assert r.findings == text.strip()  # nothing is lost


def test_parse_keeps_whole_text_when_unformatted():
    text = "The LAD looks narrowed, I think PCI."
    r = parse_report(text, "en")
    assert (r.findings, r.impression, r.recommendation, r.format_ok) == (text, "", "", False)


def test_select_images_lca_first_shared_budget():
    L = [np.full((4, 4), i, np.float32) for i in range(3)]
    R = [np.full((4, 4), 10 + i, np.float32) for i in range(3)]
    imgs, sides = select_images({"RCA": R, "LCA": L}, 4)
    assert sides == ["LCA", "LCA", "RCA", "RCA"]
    assert [float(i[0, 0]) for i in imgs] == [0, 1, 10, 11]
    imgs, sides = select_images({"LCA": L[:1], "RCA": R}, 4)  # one side short: the other fills up
    assert sides == ["LCA", "RCA", "RCA", "RCA"]
    imgs, sides = select_images({"RCA": R}, 2)
    assert sides == ["RCA", "RCA"]


class _Echo(ReportBackend):
    """A backend recording what it is asked; it answers a well-formed report naming the prompt's
    language and image count (report_study's presentation logic only)."""

    max_images = 3

    def __init__(self):
        from inference.types import ModelInfo

        self.calls = []
        self.prompts = []
        self.model_info = ModelInfo(name="x", version="1", device_uid="2.25.1")

    def generate(self, images, language, sides=None, source=None):
        self.calls.append((len(images), list(sides), language))
        return super().generate(images, language, sides=sides, source=source)

    def generate_text(self, images, prompt):
        self.prompts.append(prompt)
        lang = "ja" if "日本語" in prompt else "en"
        return format_report({"findings": f"{lang}:{len(images)}", "impression": "i", "recommendation": "r"}, lang)


def test_report_study_from_runs():
    from inference.types import KeyFrame, RunSelection

    runs = [RunSelection(file="a", sop_instance_uid="1", laterality="RCA", confidence=0.9,
                         key_frames=[KeyFrame(3, "RCA_better", 0.9), KeyFrame(9, "RCA_better", 0.8)]),
            RunSelection(file="b", sop_instance_uid="2", laterality="LCA", confidence=0.8,
                         key_frames=[KeyFrame(5, "LCA_better", 0.7)]),
            RunSelection(file="c", sop_instance_uid="3", error="undecodable")]
    asked = []

    def frames_for(run, n):
        asked.append((run.file, n))
        return np.zeros((8, 8), np.float32)

    b = _Echo()
    out = report_study(b, runs, frames_for, languages=("en", "ja"))
    assert set(out) == {"en", "ja"}
    assert b.calls[0] == (3, ["LCA", "RCA", "RCA"], "en")
    assert ("c", 1) not in asked
    # independent drafts: each prompt sees only the images
    assert all("英語の報告書" not in p for p in b.prompts)
    assert out["ja"].findings == "ja:3"


def test_second_language_is_written_from_the_first_draft():
    b = _Echo()
    b.from_first_language = True
    imgs = {"LCA": [np.zeros((8, 8), np.float32)]}
    out = report_study(b, imgs, languages=("en", "ja"))
    assert [c[2] for c in b.calls] == ["en", "ja"]
    assert "英語の報告書" in b.prompts[1] and "Findings: en:1" in b.prompts[1]
    assert build_prompt("ja", ["LCA"], source="Findings: x") == b.prompts[1].replace("en:1\nImpression: i\n"
                                                                                     "Recommendation: r", "x")
    assert out["en"].format_ok and out["ja"].format_ok
    # a malformed first draft is not passed on: the second is written from the images alone
    b2 = _Echo()
    b2.from_first_language = True
    b2.generate_text = lambda images, prompt: (b2.prompts.append(prompt), "no sections here")[1]
    report_study(b2, imgs, languages=("en", "ja"))
    assert "英語の報告書" not in b2.prompts[1]
