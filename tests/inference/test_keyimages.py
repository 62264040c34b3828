"""The one image-selection policy (inference.keyimages): what the VLM is shown of a study."""

from __future__ import annotations

from inference.keyimages import choose_key_frames, key_images, rank_key_frames, select_images
from inference.types import KeyFrame, RunSelection


def run(name, side, confidence, frames, error=None):
    return RunSelection(file=name, sop_instance_uid=name, laterality=side, confidence=confidence,
                        key_frames=[KeyFrame(frame_number=n, label=f"{side}_better", score=s) for n, s in frames], error=error)


RUNS = [
    run("lca-a", "LCA", 0.70, [(10, 0.99), (20, 0.98)]),   # high key-frame scores, low confidence
    run("lca-b", "LCA", 0.95, [(5, 0.60), (7, 0.50)]),
    run("lca-c", "LCA", 0.80, [(3, 0.90)]),
    run("rca-a", "RCA", 0.90, [(12, 0.40), (14, 0.30)]),
    run("bad", "RCA", 0.99, [(1, 0.99)], error="undecodable"),
]


def test_runs_rank_by_confidence_then_depth():
    ranked = rank_key_frames(RUNS)
    assert [(r.file, n) for r, n in ranked["LCA"]] == [("lca-b", 5), ("lca-c", 3), ("lca-a", 10),
                                                      ("lca-b", 7), ("lca-a", 20)]
    assert [(r.file, n) for r, n in ranked["RCA"]] == [("rca-a", 12), ("rca-a", 14)]  # errors never shown


def test_the_budget_is_shared_between_the_sides():
    chosen = [(side, r.file, n) for side, r, n in choose_key_frames(RUNS, 4)]
    assert chosen == [("LCA", "lca-b", 5), ("LCA", "lca-c", 3), ("RCA", "rca-a", 12), ("RCA", "rca-a", 14)]
    # one side only: it gets the whole budget
    assert len(choose_key_frames(RUNS[:3], 4)) == 4
    assert [(side, r.file) for side, r, _ in choose_key_frames(RUNS, 1)] == [("LCA", "lca-b")]


def test_key_images_decodes_what_the_policy_chose():
    seen = []

    def frames_for(r, n):
        seen.append((r.file, n))
        return f"{r.file}#{n}"

    images = key_images(RUNS, 3, frames_for)
    assert images == {"LCA": ["lca-b#5", "lca-c#3"], "RCA": ["rca-a#12"]}
    assert seen == [("lca-b", 5), ("lca-c", 3), ("rca-a", 12)]
    # select_images over the result keeps it as it is (report_study applies it again)
    assert select_images(images, 3) == (["lca-b#5", "lca-c#3", "rca-a#12"], ["LCA", "LCA", "RCA"])
