"""Candidate frames (CAG-VLM paper): local extrema of the per-frame mean and variance.

A frame is a candidate when its mean or its variance is a local maximum or minimum within
``min_gap`` frames on either side (windows clipped at the run's ends; ties go to the first
frame), and accepted candidates are at least ``min_gap`` frames apart (greedy, in time order).

:class:`CandidateTracker` does this on the fly while frames stream: frame *i* is decided as
soon as frame *i + min_gap* has been seen, so a caller only ever holds ``min_gap + 1``
undecided frames, whatever the length of the run.  :func:`find_candidates` is the same rule
on whole arrays (tests, offline use).
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Sequence


class CandidateTracker:
    """Streaming candidate detector.

    ``push(index, mean, var)`` (indices consecutive from 0) returns the indices whose decision
    became final with this frame and that were accepted; ``finish()`` decides the rest.
    ``decided_upto`` is the first index not yet decided (everything before it can be freed).
    """

    def __init__(self, min_gap: int = 5):
        if min_gap < 1:
            raise ValueError("min_gap must be >= 1")
        self.g = int(min_gap)
        self._win: deque[tuple[int, float, float]] = deque()  # frames i-g .. newest
        self._next_decide = 0
        self._last_accepted: int | None = None
        self._n = 0
        self.accepted: list[int] = []
        self.kinds: dict[int, list[str]] = {}  # accepted index -> which extrema it is

    @property
    def decided_upto(self) -> int:
        return self._next_decide

    def push(self, index: int, mean: float, var: float) -> list[int]:
        if index != self._n:
            raise ValueError(f"frames must be pushed in order: expected {self._n}, got {index}")
        self._n += 1
        self._win.append((index, float(mean), float(var)))
        out: list[int] = []
        while self._next_decide + self.g <= index:
            out += self._decide(self._next_decide, end=index)
        return out

    def finish(self) -> list[int]:
        out: list[int] = []
        while self._next_decide < self._n:
            out += self._decide(self._next_decide, end=self._n - 1)
        return out

    def _decide(self, i: int, end: int) -> list[int]:
        g = self.g
        # drop frames older than i - g
        while self._win and self._win[0][0] < i - g:
            self._win.popleft()
        self._next_decide = i + 1
        win = [w for w in self._win if i - g <= w[0] <= min(i + g, end)]
        cur = next(w for w in win if w[0] == i)
        kinds = []
        for k, name in ((1, "mean"), (2, "var")):
            before = [w[k] for w in win if w[0] < i]
            after = [w[k] for w in win if w[0] > i]
            v = cur[k]
            if all(v > b for b in before) and all(v >= a for a in after):
                kinds.append(f"{name}_max")
            if all(v < b for b in before) and all(v <= a for a in after):
                kinds.append(f"{name}_min")
        if not kinds:
            return []
        if self._last_accepted is not None and i - self._last_accepted < g:
            return []
        self._last_accepted = i
        self.accepted.append(i)
        self.kinds[i] = kinds
        return [i]


def find_candidates(means: Sequence[float], variances: Sequence[float], min_gap: int = 5) -> list[int]:
    """0-based candidate indices for whole per-frame mean / variance series."""
    if len(means) != len(variances):
        raise ValueError("means and variances must have the same length")
    t = CandidateTracker(min_gap)
    out: list[int] = []
    for i, (m, v) in enumerate(zip(means, variances)):
        out += t.push(i, m, v)
    out += t.finish()
    return out


def candidates_from_frames(frames: Iterable, min_gap: int = 5) -> list[int]:
    """Candidates from an iterable of 2-D arrays (stats on the arrays themselves)."""
    import numpy as np

    t = CandidateTracker(min_gap)
    out: list[int] = []
    for i, f in enumerate(frames):
        a = np.asarray(f, dtype=np.float64)
        out += t.push(i, float(a.mean()), float(a.var()))
    out += t.finish()
    return out
