"""VLM training: tokenizer, tiny demo model, data, LoRA / full training, evaluation.

``build_vlm(data_dir, bundle_dir, seed=0, budget_s=150, quick=False) -> metrics`` builds the
demo VLM into ``bundle_dir/vlm`` and writes the manifest's vlm section.
"""

from __future__ import annotations


def build_vlm(*args, **kwargs):
    from training.vlm.build import build_vlm as _b

    return _b(*args, **kwargs)


def evaluate_bundle(*args, **kwargs):
    from training.vlm.evaluate import evaluate_bundle as _e

    return _e(*args, **kwargs)


__all__ = ["build_vlm", "evaluate_bundle"]
