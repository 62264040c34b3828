"""Structured findings -> templated report (English and Japanese) and treatment.

One set of templates serves three users: the synthetic generator's reference reports (which
the VLM learns to write), the node's templated draft when no VLM runs (``vlm.backend: none``,
written from the lesion model's findings), and the evaluation's parsing of drafts.  The
templates are deliberately regular so a small VLM can learn them from images.

Rules (guideline-like):
- left main >= 50% or three-vessel disease (LAD, LCx, RCA each >= 70%) -> CABG
- one or two vessels with >= 70% -> PCI (to those vessels)
- otherwise -> medical therapy
"""

from __future__ import annotations

from inference.types import SEGMENTS, LesionFinding, ReportText

TERRITORIES = ("LAD", "LCx", "RCA")
_NUM_EN = {1: "Single", 2: "Two", 3: "Three"}


def _sorted(findings: list[dict]) -> list[dict]:
    return sorted(findings, key=lambda f: (0 if f["side"] == "LCA" else 1, int(f["segment"])))


def diseased_vessels(findings: list[dict]) -> list[str]:
    """Territories (LAD, LCx, RCA order) with a >= 70% stenosis."""
    hit = {f["vessel"] for f in findings if f["vessel"] in TERRITORIES and f["severity"] >= 70}
    return [v for v in TERRITORIES if v in hit]


def left_main_disease(findings: list[dict]) -> bool:
    return any(f["vessel"] == "LM" and f["severity"] >= 50 for f in findings)


def treatment(findings: list[dict]) -> str:
    """'CABG' | 'PCI' | 'medical'."""
    vs = diseased_vessels(findings)
    if left_main_disease(findings) or len(vs) >= 3:
        return "CABG"
    if vs:
        return "PCI"
    return "medical"


def _lesion_en(f: dict) -> str:
    name = SEGMENTS[int(f["segment"])][2]
    if f["severity"] >= 100:
        return f"total occlusion of the {name} (segment {f['segment']})"
    return f"{f['severity']}% stenosis in the {name} (segment {f['segment']})"


def _lesion_ja(f: dict) -> str:
    name = SEGMENTS[int(f["segment"])][3]
    if f["severity"] >= 100:
        return f"{name}（#{f['segment']}）に完全閉塞"
    return f"{name}（#{f['segment']}）に{f['severity']}%狭窄"


def _join_en(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def findings_text(findings: list[dict], sides=("LCA", "RCA")) -> tuple[str, str]:
    en, ja = [], []
    for side, en_t, ja_t in (("LCA", "Left coronary angiography", "左冠動脈造影"), ("RCA", "Right coronary angiography", "右冠動脈造影")):
        if side not in sides:
            continue
        fs = [f for f in _sorted(findings) if f["side"] == side]
        if fs:
            en.append(f"{en_t}: " + "; ".join(_lesion_en(f) for f in fs) + ".")
            ja.append(f"{ja_t}：" + "、".join(_lesion_ja(f) for f in fs) + "を認める。")
        else:
            en.append(f"{en_t}: no significant stenosis.")
            ja.append(f"{ja_t}：有意狭窄を認めない。")
    return " ".join(en), "".join(ja)


def impression_text(findings: list[dict]) -> tuple[str, str]:
    vs = diseased_vessels(findings)
    lm = left_main_disease(findings)
    n = len(vs)
    ves_en = ", ".join(vs)
    ves_ja = "、".join(vs)
    if lm:
        if n:
            return (
                f"Left main coronary artery disease with {_NUM_EN[n].lower()}-vessel disease ({ves_en}).",
                f"左主幹部病変および{n}枝病変（{ves_ja}）。",
            )
        return "Left main coronary artery disease.", "左主幹部病変。"
    if n:
        return f"{_NUM_EN[n]}-vessel coronary artery disease ({ves_en}).", f"{n}枝病変（{ves_ja}）。"
    if findings:
        return "Non-significant coronary artery disease.", "有意狭窄を伴わない冠動脈硬化。"
    return "No significant coronary artery stenosis.", "有意な冠動脈狭窄を認めない。"


def recommendation_text(findings: list[dict]) -> tuple[str, str]:
    t = treatment(findings)
    if t == "CABG":
        return "Coronary artery bypass grafting (CABG) is recommended.", "冠動脈バイパス術（CABG）を推奨する。"
    if t == "PCI":
        vs = diseased_vessels(findings)
        return f"PCI to the {_join_en(vs)} is recommended.", "および".join(vs) + "に対するPCIを推奨する。"
    return "Medical therapy is recommended.", "薬物療法を推奨する。"


def make_report(findings: list[dict], sides=("LCA", "RCA")) -> dict:
    """{"en": {findings, impression, recommendation}, "ja": {...}}"""
    f_en, f_ja = findings_text(findings, sides)
    i_en, i_ja = impression_text(findings)
    r_en, r_ja = recommendation_text(findings)
    return {
        "en": {"findings": f_en, "impression": i_en, "recommendation": r_en},
        "ja": {"findings": f_ja, "impression": i_ja, "recommendation": r_ja},
    }


def findings_from_lesions(lesions: "list[LesionFinding]", min_confidence: float = 0.0,
                          min_grade: int = 50) -> list[dict]:
    """Study-level findings from what the lesion model saw: one finding per AHA segment (a
    segment seen on several key frames or runs is one lesion), graded by the most confident
    detection's measured stenosis; detections below ``min_confidence`` or ``min_grade`` are
    left out (a report lists stenoses of 50 % and more)."""
    best: dict[int, LesionFinding] = {}
    for les in lesions:
        if les.confidence < min_confidence or les.grade < min_grade:
            continue
        cur = best.get(les.segment)
        if cur is None or les.confidence > cur.confidence:
            best[les.segment] = les
    return _sorted([l.finding() for l in best.values()])


def templated_report(findings: list[dict], sides=("LCA", "RCA"), languages=("en", "ja")) -> "dict[str, ReportText]":
    """The templated draft (one :class:`ReportText` per language) for ``findings``; ``sides``:
    the sides that were imaged (a side without runs is not described)."""
    rep = make_report(findings, sides)
    return {lang: ReportText(**rep[lang]) for lang in languages if lang in rep}
