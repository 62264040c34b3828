"""Which frames a study's draft report is written from: ONE policy for the node's pipeline,
``cag-node report`` and VLM training.

1. :func:`rank_key_frames` — per side, every run's best key frame first (runs by the selector's
   confidence, then the order given), then every run's second key frame, and so on;
2. :func:`select_images` — at most ``max_images`` of them, the budget shared round-robin between
   the sides present (LCA first), so both sides are shown when both exist.

Training has no selector output: it hands :func:`select_images` one labelled key frame per run
(``training.vlm.data.StudyExample``), so the model sees studies presented as in serving.
:func:`key_images` decodes only the chosen frames (each run opened once).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, TypeVar

from inference.types import SIDES, RunSelection

T = TypeVar("T")


def select_images(images_by_side: dict[str, Sequence[T]], max_images: int) -> tuple[list[T], list[str]]:
    """Choose up to ``max_images`` items (frames or references to them), LCA first then RCA.

    Items of each side are taken best first; the budget is shared round-robin between the sides
    present.  Returns the items and each one's side, in the order the model sees them.
    """
    order = [s for s in SIDES if images_by_side.get(s)] + \
        [s for s in images_by_side if s not in SIDES and images_by_side.get(s)]
    take = {s: 0 for s in order}
    budget = max(1, int(max_images))
    while budget > 0:
        progressed = False
        for s in order:
            if budget > 0 and take[s] < len(images_by_side[s]):
                take[s] += 1
                budget -= 1
                progressed = True
        if not progressed:
            break
    items: list[T] = []
    sides: list[str] = []
    for s in order:
        for item in list(images_by_side[s])[: take[s]]:
            items.append(item)
            sides.append(s)
    return items, sides


def rank_key_frames(runs: Sequence[RunSelection]) -> dict[str, list[tuple[RunSelection, int]]]:
    """``{side: [(run, frame_number), ...]}`` best first: the first key frame of every usable run
    (by descending confidence; ties keep the given order), then the second ones, ..."""
    ranked = sorted((r for r in runs if r.ok), key=lambda r: -r.confidence)
    depth = max((len(r.key_frames) for r in ranked), default=0)
    by_side: dict[str, list[tuple[RunSelection, int]]] = {}
    for d in range(depth):
        for r in ranked:
            if d < len(r.key_frames):
                by_side.setdefault(r.laterality, []).append((r, r.key_frames[d].frame_number))
    return by_side


def choose_key_frames(runs: Sequence[RunSelection], max_images: int) -> list[tuple[str, RunSelection, int]]:
    """The policy: ``[(side, run, frame_number), ...]`` in the order the model sees them."""
    refs, sides = select_images(rank_key_frames(runs), max_images)
    return [(side, run, n) for side, (run, n) in zip(sides, refs)]


def key_images(runs: Sequence[RunSelection], max_images: int,
               frames_for: Optional[Callable[[RunSelection, int], object]] = None) -> dict[str, list]:
    """The chosen frames as ``{side: [frame, ...]}`` (what ``report_study`` takes).  By default
    decoded with :func:`inference.frames.read_frames`, each run opened once."""
    chosen = choose_key_frames(runs, max_images)
    if frames_for is None:
        from inference.frames import read_frames

        wanted: dict[str, list[int]] = {}
        for _side, run, n in chosen:
            wanted.setdefault(run.file, []).append(n)
        decoded = {f: read_frames(f, ns) for f, ns in wanted.items()}

        def frames_for(run, n):
            return decoded[run.file][n]

    images: dict[str, list] = {}
    for side, run, n in chosen:
        images.setdefault(side, []).append(frames_for(run, n))
    return images
