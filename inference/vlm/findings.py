"""Structured content of a report text: findings (side, vessel, AHA segment, severity) and the
treatment it recommends, parsed from English or Japanese.

Used twice: by the node, to check that the English and Japanese drafts of one study say the
same thing (:func:`language_discrepancies`; a disagreement is written into the SR), and by
``training.vlm.evaluate`` to score drafts against the structured ground truth.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import numpy as np


VESSEL_ALIASES: dict[str, list[str]] = {
    "LM": ["left main", "LMCA", "LMT", "LM", "左主幹部", "左主幹"],
    "LAD": ["left anterior descending", "LAD", "左前下行枝", "前下行枝"],
    "LCX": ["left circumflex", "circumflex", "LCx", "LCX", "Cx", "左回旋枝", "回旋枝"],
    "RCA": ["right coronary artery", "right coronary", "RCA", "右冠動脈"],
    "D1": ["first diagonal", "diagonal", "D1", "対角枝"],
    "OM": ["obtuse marginal", "OM", "鈍角枝"],
    "PDA": ["posterior descending", "PDA", "4PD", "後下行枝"],
}
RCA_VESSELS = {"RCA", "PDA"}
# AHA segment -> vessel (1-4 RCA, 5 LM, 6-10 LAD incl. diagonals, 11-15 LCX incl. OM/PL/PD)
AHA = {**{i: "RCA" for i in range(1, 5)}, 5: "LM", **{i: "LAD" for i in range(6, 11)},
       **{i: "LCX" for i in range(11, 16)}}

_ALIAS = sorted(((a, v) for v, al in VESSEL_ALIASES.items() for a in al), key=lambda x: -len(x[0]))
_VESSEL_RE = re.compile("|".join(
    (rf"(?<![A-Za-z]){re.escape(a)}(?![A-Za-z])" if a.isascii() else re.escape(a)) for a, _ in _ALIAS),
    re.IGNORECASE)
_SEG_RE = re.compile(r"(?:#|＃|\bseg(?:ment)?\.?\s*)(\d{1,2})(?!\d)", re.IGNORECASE)
_SEV_RE = re.compile(r"(\d{1,3})\s*[%％]")
_OCCL_RE = re.compile(r"total(?:ly)?\s+occlu|occlusion|occluded|CTO|完全閉塞|閉塞", re.IGNORECASE)
_NEG_RE = re.compile(r"\bno (?:significant )?(?:stenosis|disease|lesion)|有意狭窄な|狭窄なし|病変なし|正常",
                     re.IGNORECASE)
_SPLIT_RE = re.compile(r"(?<=[.;。；\n])|(?<=、)(?=[^、]*#)")


def normalise_vessel(v) -> Optional[str]:
    if v is None:
        return None
    s = str(v).strip()
    for alias, name in _ALIAS:
        if s.lower() == alias.lower():
            return name
    m = _VESSEL_RE.search(s)
    if m:
        return _vessel_of(m.group(0))
    return s.upper() or None


def _vessel_of(token: str) -> str:
    t = token.lower()
    for alias, name in _ALIAS:
        if alias.lower() == t:
            return name
    return token.upper()


def normalise_segment(seg) -> Optional[object]:
    if seg is None or seg == "":
        return None
    if isinstance(seg, (int, np.integer)):
        return int(seg)
    m = re.search(r"\d+", str(seg))
    return int(m.group(0)) if m else str(seg).strip().lower()


def side_of(vessel: Optional[str], segment=None) -> Optional[str]:
    if isinstance(segment, int) and segment in AHA:
        return "RCA" if AHA[segment] == "RCA" else "LCA"
    if vessel is None:
        return None
    return "RCA" if vessel in RCA_VESSELS else "LCA"


def normalise_finding(f: dict) -> dict:
    seg = normalise_segment(f.get("segment"))
    # The AHA segment number fixes the territory (diagonals count as LAD, OM as LCX).
    vessel = AHA.get(seg) if isinstance(seg, int) and seg in AHA else normalise_vessel(f.get("vessel"))
    sev = f.get("severity")
    sev = int(round(float(sev))) if sev is not None and str(sev) != "" else None
    side = f.get("side") or side_of(vessel, seg)
    return {"side": side, "vessel": vessel, "segment": seg, "severity": sev}


def parse_findings(text: str) -> list[dict]:
    """Findings (side, vessel, segment, severity) mentioned in a report text (EN or JA)."""
    out: list[dict] = []
    for clause in _SPLIT_RE.split(text or ""):
        clause = clause.strip()
        if not clause:
            continue
        vessels = [_vessel_of(m.group(0)) for m in _VESSEL_RE.finditer(clause)]
        segs = [int(m.group(1)) for m in _SEG_RE.finditer(clause)]
        sevs = [int(m.group(1)) for m in _SEV_RE.finditer(clause)]
        if _OCCL_RE.search(clause):
            sevs.append(100)
        if not sevs or (_NEG_RE.search(clause) and not segs):
            continue
        sev = max(s for s in sevs if s <= 100) if any(s <= 100 for s in sevs) else None
        if sev is None:
            continue
        seg = segs[0] if segs else None
        vessel = AHA.get(seg) if seg in AHA else (vessels[-1] if vessels else None)
        if vessel is None and seg is None:
            continue
        f = {"side": side_of(vessel, seg), "vessel": vessel, "segment": seg, "severity": sev}
        if f not in out:
            out.append(f)
    return out


TREATMENTS = ("CABG", "PCI", "medical", "follow-up")
_TREAT_RE = [
    ("CABG", re.compile(r"CABG|bypass|バイパス", re.IGNORECASE)),
    ("PCI", re.compile(r"PCI|stent|angioplasty|ステント|経皮的冠動脈", re.IGNORECASE)),
    ("medical", re.compile(r"medical|medication|optimal medical|drug therapy|薬物療法|内科的", re.IGNORECASE)),
    ("follow-up", re.compile(r"follow[- ]?up|observation|経過観察", re.IGNORECASE)),
]


def parse_treatment(text: str) -> Optional[str]:
    """The treatment a recommendation text proposes: the first mentioned of CABG / PCI /
    medical / follow-up (``None`` when none is named)."""
    best = None
    for name, rx in _TREAT_RE:
        m = rx.search(text or "")
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), name)
    return best[1] if best else None


def _describe(f: dict) -> str:
    where = f["vessel"] or f["side"] or "?"
    if f["segment"] is not None:
        where += f" #{f['segment']}"
    return f"{where} {f['severity']}%" if f["severity"] is not None else where


def report_content(report) -> tuple[list[dict], Optional[str]]:
    """(findings, treatment) of one language's draft (a ``ReportText`` or its dict)."""
    get = report.get if isinstance(report, Mapping) else (lambda k, d="": getattr(report, k, d))
    findings = parse_findings(get("findings", "") or "")
    treatment = parse_treatment(get("recommendation", "") or get("findings", "") or "")
    return findings, treatment


def language_discrepancies(reports: Mapping[str, object], reference: str = "en") -> list[str]:
    """What the drafts of one study disagree on, each language against ``reference``.

    The two languages are generated separately, so a small model can write "RCA #2 90%, PCI"
    in English and a different lesion or treatment in Japanese.  A clinician reading one
    language must not be misled silently: the node writes these lines into the SR.
    Compared: the set of findings (vessel, AHA segment, severity) and the recommended
    treatment.  Drafts that did not follow the report format are left out (they are flagged
    on their own).  Returns ``[]`` when they agree or when fewer than two drafts remain.
    """
    def _ok(r) -> bool:
        return bool(r.get("format_ok", True) if isinstance(r, Mapping) else getattr(r, "format_ok", True))

    reports = {k: v for k, v in reports.items() if _ok(v)}
    if reference not in reports:
        return []
    ref_f, ref_t = report_content(reports[reference])
    ref_set = {(f["vessel"], f["segment"], f["severity"]): f for f in ref_f}
    out: list[str] = []
    for lang in sorted(l for l in reports if l != reference):
        f, t = report_content(reports[lang])
        other = {(x["vessel"], x["segment"], x["severity"]): x for x in f}
        only_ref = [_describe(ref_set[k]) for k in ref_set if k not in other]
        only_other = [_describe(other[k]) for k in other if k not in ref_set]
        if only_ref:
            out.append(f"finding(s) only in the {reference.upper()} draft: {', '.join(only_ref)}")
        if only_other:
            out.append(f"finding(s) only in the {lang.upper()} draft: {', '.join(only_other)}")
        if t != ref_t:
            out.append(f"recommended treatment: {reference.upper()} {ref_t or 'none named'}, "
                       f"{lang.upper()} {t or 'none named'}")
    return out
