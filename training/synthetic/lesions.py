"""Lesions (stenoses, occlusions) on the coronary trees, with AHA segment numbering.

Severity is the diameter stenosis in percent using the Japanese AHA grades
(50, 75, 90, 99, 100); 100 = total occlusion (the vessel beyond is not filled).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .anatomy import STEP_MM, Anatomy, Tree, segment_location

from inference.types import SEGMENTS  # noqa: E402  (segment -> side, vessel, EN, JA)

SEVERITIES = (50, 75, 90, 99, 100)


@dataclass
class Lesion:
    side: str
    vessel: str  # territory: LM | LAD | LCx | RCA
    segment: int
    severity: int  # % diameter stenosis, 100 = occlusion
    branch: int  # index of the branch in the side's tree
    index: int  # centreline sample index of the lesion centre
    length_mm: float

    def finding(self) -> dict:
        return {"vessel": self.vessel, "segment": self.segment, "severity": self.severity, "side": self.side}

    def to_dict(self) -> dict:
        return asdict(self)


# study-level disease patterns (probabilities)
_PATTERNS = (("normal", 0.2), ("mild", 0.1), ("1v", 0.3), ("2v", 0.18), ("3v", 0.12), ("lm", 0.1))
_SEGS = {
    "LAD": ([6, 7, 8, 9, 10], [0.35, 0.35, 0.1, 0.15, 0.05]),
    "LCx": ([11, 12, 13], [0.4, 0.3, 0.3]),
    "RCA": ([1, 2, 3, 4], [0.35, 0.35, 0.2, 0.1]),
}


def sample_lesions(anatomy: Anatomy, rng: np.random.Generator, pattern: str | None = None) -> list[Lesion]:
    if pattern is None:
        names = [p for p, _ in _PATTERNS]
        pattern = str(rng.choice(names, p=[w for _, w in _PATTERNS]))
    vessels = ["LAD", "LCx", "RCA"]
    plan: list[tuple[str, int]] = []  # (vessel, severity)
    if pattern == "mild":
        for v in rng.choice(vessels, size=int(rng.integers(1, 3)), replace=False):
            plan.append((str(v), 50))
    elif pattern in ("1v", "2v", "3v"):
        k = int(pattern[0])
        for v in rng.choice(vessels, size=k, replace=False):
            plan.append((str(v), int(rng.choice([75, 90, 99, 100], p=[0.4, 0.3, 0.15, 0.15]))))
        if rng.random() < 0.3:  # an extra non-significant lesion
            plan.append((str(rng.choice(vessels)), 50))
    elif pattern == "lm":
        plan.append(("LM", int(rng.choice([50, 75, 90], p=[0.35, 0.45, 0.2]))))
        for v in rng.choice(vessels, size=int(rng.integers(0, 3)), replace=False):
            plan.append((str(v), int(rng.choice([50, 75, 90]))))
    lesions: list[Lesion] = []
    used: set[int] = set()
    for vessel, sev in plan:
        side = "RCA" if vessel == "RCA" else "LCA"
        tree = anatomy.tree(side)
        if vessel == "LM":
            segs = [5]
        else:
            segs, p = _SEGS[vessel]
            keys = rng.random(len(segs)) ** (1.0 / np.asarray(p))  # weighted random order
            segs = [segs[i] for i in np.argsort(-keys)]
        for seg in segs:
            seg = int(seg)
            if seg in used:
                continue
            loc = segment_location(tree, seg, rng)
            if loc is None:
                continue
            used.add(seg)
            lesions.append(Lesion(side, SEGMENTS[seg][1], seg, int(sev), loc[0], loc[1], float(rng.uniform(4, 10))))
            break
    lesions.sort(key=lambda l: (0 if l.side == "LCA" else 1, l.segment))
    return lesions


def apply_lesions(tree: Tree, lesions: list[Lesion]) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per branch: radius with stenoses, a 'filled' mask (False beyond occlusions) and an
    extra filling delay in mm of path (slow flow beyond tight stenoses)."""
    radii = [b.radius.copy() for b in tree.branches]
    filled = [np.ones(len(b.radius), bool) for b in tree.branches]
    delay = [np.zeros(len(b.radius)) for b in tree.branches]
    for les in lesions:
        if les.side != tree.side:
            continue
        b = tree.branches[les.branch]
        n = len(b.radius)
        k = np.arange(n)
        half = les.length_mm / STEP_MM / 2
        x = (k - les.index) / max(half, 1)
        bump = np.where(np.abs(x) < 1, np.cos(np.pi * x / 2) ** 2, 0.0)
        # eccentric, slightly irregular narrowing
        sev = les.severity / 100.0
        radii[les.branch] *= 1 - sev * bump
        if les.severity >= 100:
            filled[les.branch][k >= les.index] = False
        elif les.severity >= 90:
            delay[les.branch][k > les.index] += 60.0 if les.severity == 90 else 220.0
    # propagate down the tree (parents always precede their children)
    for j, b in enumerate(tree.branches):
        if b.parent >= 0:
            if not filled[b.parent][b.parent_idx]:
                filled[j][:] = False
            delay[j] += delay[b.parent][b.parent_idx]
    return radii, filled, delay
