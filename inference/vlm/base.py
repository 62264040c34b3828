"""The report backend interface, prompt templates (EN/JA) and parsing into sections.

No torch here: this module is imported by the remote (OpenAI-compatible) backend
on nodes that have no torch installed.
"""

from __future__ import annotations

import io
import re
from abc import ABC, abstractmethod
from typing import Iterable, Optional, Sequence

import numpy as np

from inference.keyimages import key_images, select_images  # noqa: F401  (select_images: re-exported)
from inference.types import LANGUAGES, SEGMENTS, SIDES, ModelInfo, ReportText

# Section headers the model is asked for (first one of each list) and those the parser accepts.
HEADERS: dict[str, dict[str, list[str]]] = {
    "en": {
        "findings": ["Findings"],
        "impression": ["Impression", "Diagnosis", "Conclusion"],
        "recommendation": ["Recommendation", "Recommendations", "Treatment", "Plan"],
    },
    "ja": {
        "findings": ["所見"],
        "impression": ["診断", "印象", "結論"],
        "recommendation": ["推奨", "治療方針", "推奨治療"],
    },
}

_SIDE_NAMES = {"en": {"LCA": "LCA", "RCA": "RCA"}, "ja": {"LCA": "左冠動脈", "RCA": "右冠動脈"}}

PROMPTS = {
    "en": (
        "Coronary angiography key frames ({layout}). Write the report in English with three "
        "sections, one per line: Findings: ... Impression: ... Recommendation: ..."
    ),
    "ja": (
        "冠動脈造影のキーフレーム（{layout}）。日本語で報告書を書いてください。"
        "所見: … 診断: … 推奨: … の三項目を一行ずつ。"
    ),
}


# The second language's prompt when it is written from the first language's draft (and the
# images): both drafts then say the same thing (``ReportBackend.from_first_language``).
PROMPTS_FROM = {
    "en": (
        "Coronary angiography key frames ({layout}) and their Japanese report:\n{source}\n"
        "Write the same report in English with three sections, one per line: "
        "Findings: ... Impression: ... Recommendation: ..."
    ),
    "ja": (
        "冠動脈造影のキーフレーム（{layout}）と英語の報告書:\n{source}\n"
        "同じ内容の報告書を日本語で書いてください。所見: … 診断: … 推奨: … の三項目を一行ずつ。"
    ),
}


# The line a prompt gains when the lesion model's findings ("concepts") are given: a model trained
# with them (bundle manifest ``vlm.training.concepts``) writes its report from them and the images.
CONCEPT_LINES = {
    "en": {"head": "Lesion model: ", "sep": "; ", "none": "no stenosis"},
    "ja": {"head": "病変モデル: ", "sep": "、", "none": "狭窄なし"},
}


def normalise_concepts(concepts: Iterable[dict]) -> list[dict]:
    """The lesion model's findings in a fixed form and order: one per AHA segment (the highest
    grade when a segment is listed twice), LCA before RCA, then by segment number; the side and
    vessel follow the segment (``inference.types.SEGMENTS``) when it is an AHA segment."""
    best: dict = {}
    for f in concepts or ():
        if f.get("severity") is None or str(f.get("severity")) == "":
            continue  # nothing to say about it
        seg = f.get("segment")
        try:
            seg = int(seg)
        except (TypeError, ValueError):
            seg = None if seg is None or str(seg) == "" else str(seg)
        if isinstance(seg, int) and seg in SEGMENTS:
            side, vessel = SEGMENTS[seg][0], SEGMENTS[seg][1]
        else:
            vessel = str(f.get("vessel") or "")
            side = str(f.get("side") or ("RCA" if vessel.upper() in ("RCA", "PDA") else "LCA" if vessel else ""))
        d = {"side": side, "vessel": vessel, "segment": seg, "severity": int(round(float(f["severity"])))}
        key = (side, vessel, seg)
        if key not in best or d["severity"] > best[key]["severity"]:
            best[key] = d

    def order(d: dict):
        side = SIDES.index(d["side"]) if d["side"] in SIDES else len(SIDES)
        seg = d["segment"]
        return (side, 0, seg, "", "") if isinstance(seg, int) else (side, 1, 0, str(seg or ""), d["vessel"])

    return sorted(best.values(), key=order)


def concepts_line(concepts: Iterable[dict], language: str) -> str:
    """One compact line naming the lesion model's findings, e.g. ``Lesion model: LAD #6 90%;
    RCA #2 75%`` / ``病変モデル: LAD #6 90%、RCA #2 75%``; an empty list (the lesion model saw no
    stenosis) gives ``Lesion model: no stenosis`` / ``病変モデル: 狭窄なし``."""
    c = CONCEPT_LINES[check_language(language)]
    items = [f"{f['vessel']} #{f['segment']} {f['severity']}%" if f["segment"] is not None
             else f"{f['vessel']} {f['severity']}%" for f in normalise_concepts(concepts)]
    return c["head"] + (c["sep"].join(items) if items else c["none"])


class ReportError(RuntimeError):
    """The backend could not produce a report (server error after retries, bad model, ...)."""


class ReportTimeout(ReportError, TimeoutError):
    """Generation did not finish within the configured timeout."""


def check_language(language: str) -> str:
    if language not in LANGUAGES:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    return language


def build_prompt(language: str, sides: Optional[Sequence[str]] = None, n_images: Optional[int] = None,
                 source: Optional[str] = None, concepts: Optional[Sequence[dict]] = None) -> str:
    """The instruction text for ``language``; ``sides`` names the side of each image, in order.

    ``source``: the other language's draft (formatted with ``format_report``) to write this one
    from; training passes the reference report, serving the draft just generated.
    ``concepts``: the lesion model's findings (``[{"side", "vessel", "segment", "severity"}]``;
    ``[]`` = it saw no stenosis): the prompt ends with one more line, :func:`concepts_line`.
    ``None`` (a model trained without them) leaves the prompt as it always was.
    """
    check_language(language)
    names = _SIDE_NAMES[language]
    if sides:
        counts: dict[str, int] = {}
        for s in sides:
            counts[s] = counts.get(s, 0) + 1
        sep = ", " if language == "en" else "、"
        layout = sep.join(f"{names.get(s, s)} x{n}" for s, n in counts.items())
    else:
        layout = f"{n_images or 0} images" if language == "en" else f"{n_images or 0}枚"
    if source:
        prompt = PROMPTS_FROM[language].format(layout=layout, source=source.strip())
    else:
        prompt = PROMPTS[language].format(layout=layout)
    if concepts is not None:
        prompt += "\n" + concepts_line(concepts, language)
    return prompt


def format_report(sections: dict, language: str) -> str:
    """The target text a model is trained to write (the inverse of ``parse_report``)."""
    h = HEADERS[check_language(language)]
    return "\n".join(f"{h[k][0]}: {str(sections.get(k, '')).strip()}"
                     for k in ("findings", "impression", "recommendation"))


def _header_regex(language: str) -> re.Pattern:
    alts = []
    for key, names in HEADERS[language].items():
        for n in names:
            alts.append((key, n))
    # Longest names first so "Recommendations" wins over "Recommendation".
    alts.sort(key=lambda kn: -len(kn[1]))
    body = "|".join(f"(?P<{key}_{i}>{re.escape(n)})" for i, (key, n) in enumerate(alts))
    return re.compile(rf"(?im)^[ \t*#\-]*(?:{body})[ \t*]*[:：]")


_REGEX = {lang: _header_regex(lang) for lang in HEADERS}


def parse_report(text: str, language: str) -> ReportText:
    """Split ``text`` into findings / impression / recommendation.

    Accepts either language's headers (a model may answer in the wrong one).  When the three
    sections are not all present exactly once, non-empty, and starting the text, the whole text
    is returned in ``findings`` with ``format_ok=False``.
    """
    check_language(language)
    text = (text or "").strip()
    hits: list[tuple[int, int, str]] = []
    for lang in (language,) + tuple(l for l in HEADERS if l != language):
        hits = []
        for m in _REGEX[lang].finditer(text):
            key = next(k for k, v in m.groupdict().items() if v is not None).rsplit("_", 1)[0]
            hits.append((m.start(), m.end(), key))
        if hits:
            break
    keys = [h[2] for h in hits]
    if sorted(keys) != sorted(["findings", "impression", "recommendation"]) or (hits and hits[0][0] != 0):
        return ReportText(findings=text, impression="", recommendation="", format_ok=False)
    out: dict[str, str] = {}
    for i, (start, end, key) in enumerate(hits):
        stop = hits[i + 1][0] if i + 1 < len(hits) else len(text)
        out[key] = text[end:stop].strip()
    if not all(out.values()):  # an empty section: the model did not really follow the format
        return ReportText(findings=text, impression="", recommendation="", format_ok=False)
    return ReportText(findings=out["findings"], impression=out["impression"],
                      recommendation=out["recommendation"], format_ok=True)


def to_uint8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {a.shape}")
    a = np.nan_to_num(a, nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(to_uint8(image), mode="L").convert("RGB")


def to_png(image: np.ndarray) -> bytes:
    """PNG bytes of a frame: pixels only, no metadata (nothing that could carry PHI)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image), mode="L").save(buf, format="PNG")
    return buf.getvalue()


class ReportBackend(ABC):
    """Images + language -> ReportText.  Implementations only need ``generate_text``."""

    max_images: int = 4
    model_info: ModelInfo
    #: Write every language after the first from the first one's draft (``PROMPTS_FROM``), as the
    #: model was trained to (bundle manifest ``vlm.training.from_first_language``).
    from_first_language: bool = False

    @abstractmethod
    def generate_text(self, images: list[np.ndarray], prompt: str) -> str:
        """The model's raw answer to ``prompt`` about ``images`` (deterministic)."""

    def generate(self, images: list[np.ndarray], language: str = "en",
                 sides: Optional[Sequence[str]] = None, source: Optional[str] = None,
                 concepts: Optional[Sequence[dict]] = None) -> ReportText:
        """One language's draft; ``source``: another language's draft to write it from;
        ``concepts``: the lesion model's findings, put into the prompt as given (``None``: none)."""
        check_language(language)
        images = list(images)[: self.max_images]
        if sides is not None:
            sides = list(sides)[: len(images)]
        prompt = build_prompt(language, sides, len(images), source=source, concepts=concepts)
        return parse_report(self.generate_text(images, prompt), language)

    def generate_languages(self, images: list[np.ndarray], languages: Sequence[str],
                           sides: Optional[Sequence[str]] = None,
                           concepts: Optional[Sequence[dict]] = None) -> dict[str, ReportText]:
        """Drafts in ``languages``, in order.  With ``from_first_language`` the later ones are
        written from the first draft when it is well-formed (else from the images alone).
        ``concepts`` go into every language's prompt, as given."""
        out: dict[str, ReportText] = {}
        source: Optional[str] = None
        for i, lang in enumerate(languages):
            if concepts is None:  # (subclasses that override generate without concepts keep working)
                out[lang] = self.generate(images, lang, sides=sides, source=source)
            else:
                out[lang] = self.generate(images, lang, sides=sides, source=source, concepts=concepts)
            if i == 0 and self.from_first_language and out[lang].format_ok:
                source = format_report(out[lang].to_dict(), lang)
        return out

    def close(self) -> None:  # pragma: no cover - optional
        pass


def report_study(backend: ReportBackend, images_by_side, frames_for=None,
                 languages: Iterable[str] = ("en", "ja"),
                 concepts: Optional[Sequence[dict]] = None) -> dict[str, ReportText]:
    """One report per language for one study.

    ``images_by_side``: ``{"LCA": [frame, ...], "RCA": [...]}`` with key frames best first; or
    a list of ``RunSelection`` together with ``frames_for(run, frame_number) -> frame``.
    ``concepts``: the lesion model's findings for the study (``[]``: it saw no stenosis; e.g.
    ``inference.reporting.findings_from_lesions``); passed to the model only when
    ``backend.uses_concepts`` (a model trained without them keeps its usual prompt), so a caller
    may always pass what it has.
    """
    if not isinstance(images_by_side, dict):
        if frames_for is None:
            raise TypeError("report_study(runs, ...) needs frames_for(run, frame_number)")
        images_by_side = key_images(list(images_by_side), backend.max_images, frames_for)
    if isinstance(languages, str):
        languages = (languages,)
    images, sides = select_images(images_by_side, backend.max_images)
    if not images:
        raise ReportError("no key frames to report on")
    if concepts is not None and getattr(backend, "uses_concepts", False):
        return backend.generate_languages(images, list(languages), sides=sides, concepts=list(concepts))
    return backend.generate_languages(images, list(languages), sides=sides)
