"""The lesion model's findings ("concepts") as the VLM sees them in training and evaluation.

A VLM trained with ``concepts="findings"`` reads one more prompt line listing the lesion
model's findings (``inference.vlm.base.concepts_line``).  In training that line carries the
study's ground-truth findings *perturbed like a real detector's errors* (:func:`perturb_findings`),
so the model learns to follow the concepts but not blindly: the target stays the reference
report.  Evaluation supplies concepts per study through a callable
``concepts_for(example) -> list[dict] | None`` (:func:`concepts_source`): the truth, the same
perturbation with another seed, or (later) what a lesion model saw.

Measured (tiny demo VLM, 160 narrow-domain studies, 200 s on 2 shared cores, 48 held-out studies
of 24 frames, EN): trained without concepts, vessel / severity F1 0.14 / 0.00, treatment
agreement 0.21 (no-image baseline 0.00 / 0.00 / 0.19); trained with concepts and given the true
findings 0.92 / 0.55 / 0.83, the noisy ones 0.92 / 0.44 / 0.79, none 0.00 / 0.00 / 0.19.  The
templated report from the same concepts alone scores 1.00 and 0.98 / 0.83 / 0.92: the tiny model
copies segments and grades imperfectly.  Concepts in the report's own phrasing ("90% stenosis
in the proximal LAD (segment 6)") did no better than this compact line (0.93 / 0.48 / 0.85).
"""

from __future__ import annotations

import random
from typing import Callable, Optional

from inference.types import SEGMENTS
from inference.vlm.base import normalise_concepts

#: The grades a finding can have (the synthetic generator's and the lesion model's, >= 50 %).
GRADES: tuple[int, ...] = (50, 75, 90, 99, 100)
#: Per-lesion and per-study error rates of the simulated detector.
NOISE = {"drop": 0.1, "add": 0.1, "grade": 0.15}
#: A spurious lesion's grade: mostly mild (weights for ``GRADES``).
SPURIOUS_GRADE_WEIGHTS = (0.4, 0.3, 0.15, 0.1, 0.05)
#: Segments a spurious lesion can land in (AHA 1-15).
SEGMENT_CHOICES: tuple[int, ...] = tuple(sorted(SEGMENTS))

CONCEPT_MODES = ("none", "findings")  # training: ``build_vlm(concepts=...)``, ``train vlm --concepts``
EVAL_CONCEPTS = ("none", "truth", "noisy")  # ``evaluate vlm --concepts``


def check_mode(mode: str, allowed=CONCEPT_MODES) -> str:
    mode = str(mode or "none").lower()
    if mode not in allowed:
        raise ValueError(f"concepts must be one of {allowed}, got {mode!r}")
    return mode


def study_rng(seed: int, key: str, salt: str = "") -> random.Random:
    """A generator that depends only on (seed, key, salt): the same study gets the same errors
    whatever the order or the number of studies."""
    return random.Random(f"{salt}:{int(seed)}:{key}")


def _step_grade(severity: int, rng: random.Random) -> int:
    g = min(GRADES, key=lambda x: abs(x - int(severity)))
    i = GRADES.index(g)
    moves = [j for j in (i - 1, i + 1) if 0 <= j < len(GRADES)]
    return GRADES[rng.choice(moves)]


def perturb_findings(findings: list[dict], rng: random.Random, noise: Optional[dict] = None,
                     segments: tuple[int, ...] = SEGMENT_CHOICES) -> list[dict]:
    """``findings`` with a detector's errors: each lesion is dropped with ``noise["drop"]``, else
    its grade moves one step (in ``GRADES``) with ``noise["grade"]``; with ``noise["add"]`` one
    spurious lesion is added in a segment of ``segments`` not already listed (a mostly mild
    grade).  The result is normalised (``normalise_concepts``: one per segment, fixed order)."""
    p = {**NOISE, **(noise or {})}
    out = []
    for f in normalise_concepts(findings):
        if rng.random() < p["drop"]:
            continue
        f = dict(f)
        if rng.random() < p["grade"]:
            f["severity"] = _step_grade(f["severity"], rng)
        out.append(f)
    if rng.random() < p["add"]:
        used = {f["segment"] for f in normalise_concepts(findings)} | {f["segment"] for f in out}
        free = [s for s in segments if s not in used and s in SEGMENTS]
        if free:
            seg = rng.choice(free)
            sev = rng.choices(GRADES, weights=SPURIOUS_GRADE_WEIGHTS)[0]
            out.append({"side": SEGMENTS[seg][0], "vessel": SEGMENTS[seg][1], "segment": seg, "severity": sev})
    return normalise_concepts(out)


def true_concepts(example) -> list[dict]:
    """The study's ground-truth findings, as evaluation defines them: the recorded ``findings``,
    else those parsed from its (first language's) reference report (``[]``: no stenosis)."""
    if example.findings:
        return normalise_concepts(example.findings)
    from inference.vlm.findings import parse_findings

    for lang in ("en", "ja"):
        if lang in example.report:
            return normalise_concepts(parse_findings(example.report[lang].get("findings", "")))
    return []


def concepts_source(mode: str, seed: int = 1, noise: Optional[dict] = None
                    ) -> Optional[Callable[[object], Optional[list[dict]]]]:
    """``concepts_for(example)`` for ``evaluate vlm --concepts``: ``none`` -> ``None`` (no concepts
    line), ``truth`` -> the study's findings, ``noisy`` -> the training perturbation drawn with
    ``seed`` under another salt than training's, so the errors differ from any seen in training.

    A lesion model plugs in the same way: any callable taking a ``StudyExample`` and returning
    its findings (``[{"side", "vessel", "segment", "severity"}]``, ``[]`` for no stenosis) or
    ``None`` (no concepts for that study)."""
    mode = check_mode(mode, EVAL_CONCEPTS)
    if mode == "none":
        return None
    if mode == "truth":
        return true_concepts

    def noisy(example) -> list[dict]:
        return perturb_findings(true_concepts(example), study_rng(seed, example.study_uid, "eval"), noise)

    return noisy
