"""build_vlm options that the demo build relies on."""

from __future__ import annotations

import json

import pytest


def test_max_studies_trains_on_a_fixed_subset(tmp_path, standin_dir):
    from training.vlm import build_vlm
    from training.vlm.data import load_examples
    from training.vlm.train import TrainConfig

    cfg = TrainConfig(steps=2, batch_size=2, seed=0, progress=False)
    m = build_vlm(standin_dir, tmp_path / "b", seed=0, train_cfg=cfg, evaluate=False, max_studies=5)
    assert m["n_train"] + m["n_val"] == 5 < len(load_examples(standin_dir))
    training = json.loads((tmp_path / "b" / "manifest.json").read_text(encoding="utf-8"))["vlm"]["training"]
    assert training["max_studies"] == 5
    with pytest.raises(ValueError, match="max_studies"):
        build_vlm(standin_dir, tmp_path / "c", seed=0, train_cfg=cfg, evaluate=False, max_studies=0)
