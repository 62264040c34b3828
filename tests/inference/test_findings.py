"""Structured content of EN/JA drafts and the cross-language check the node writes into the SR."""

from __future__ import annotations

from inference.types import ReportText
from inference.vlm.findings import language_discrepancies, parse_findings, parse_treatment, report_content


def _r(findings, rec, ok=True):
    return ReportText(findings=findings, impression="x", recommendation=rec, format_ok=ok)


def test_same_content_in_both_languages_agrees():
    en = _r("LAD #7: 90% stenosis. RCA #2: total occlusion.", "CABG is recommended.")
    ja = _r("LAD #7に90%狭窄。RCA #2は完全閉塞。", "冠動脈バイパス術（CABG）を推奨。")
    assert report_content(en) == report_content(ja)
    assert parse_findings(en.findings) == [
        {"side": "LCA", "vessel": "LAD", "segment": 7, "severity": 90},
        {"side": "RCA", "vessel": "RCA", "segment": 2, "severity": 100},
    ]
    assert language_discrepancies({"en": en, "ja": ja}) == []


def test_each_kind_of_disagreement_is_named():
    en = _r("LAD #7: 90% stenosis.", "PCI to LAD #7.")
    ja = _r("LAD #7に75%狭窄。LCX #13に90%狭窄。", "薬物療法を継続。")
    out = language_discrepancies({"en": en, "ja": ja})
    assert out == [
        "finding(s) only in the EN draft: LAD #7 90%",
        "finding(s) only in the JA draft: LAD #7 75%, LCX #13 90%",
        "recommended treatment: EN PCI, JA medical",
    ]
    assert parse_treatment(ja.recommendation) == "medical"


def test_malformed_or_single_draft_is_not_compared():
    en = _r("LAD #7: 90% stenosis.", "PCI.")
    assert language_discrepancies({"en": en}) == []
    assert language_discrepancies({"en": en, "ja": _r("何か", "", ok=False)}) == []
    assert language_discrepancies({"ja": en}) == []  # no reference language
    # dicts (the JSON form) work too
    assert language_discrepancies({"en": en.to_dict(), "ja": _r("LAD #7に90%狭窄。", "PCIを推奨。").to_dict()}) == []
