"""VLM test fixtures: a stand-in dataset and one tiny bundle built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from cagtest.vlm_standin import make_standin


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory) -> Path:
    return make_standin(tmp_path_factory.mktemp("vlm-standin"), n_studies=24, seed=0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, standin_dir) -> Path:
    """A tiny Gemma3 VLM trained briefly (full) on the stand-in data, in a bundle."""
    import torch

    from training.vlm import build_vlm
    from training.vlm.train import TrainConfig

    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("vlm-bundle")
    # Independent languages here (the quick demo bundle covers drafts written from the first
    # language): 100 steps is enough for either language to write text from the images.
    cfg = TrainConfig(steps=100, batch_size=8, lr=3e-3, warmup=5, seed=0, progress=False,
                      from_first_language=False)
    metrics = build_vlm(standin_dir, out, seed=0, train_cfg=cfg, evaluate=False)
    assert metrics["train"]["final_loss"] < metrics["train"]["first_loss"]
    return out


@pytest.fixture(scope="session")
def tiny_backend(tiny_bundle):
    from inference.bundle import Bundle
    from inference.vlm import load_backend

    return load_backend({"backend": "bundle", "device": "cpu", "max_new_tokens": 96, "max_images": 4,
                         "timeout_s": 120}, Bundle.load(tiny_bundle))


@pytest.fixture(scope="session")
def frames_standin(standin_dir):
    """Key frames of the first stand-in study, by side."""
    from training.vlm.data import FrameCache, load_examples

    s = load_examples(standin_dir)[0]
    fc = FrameCache()
    return {side: [fc(r) for r in refs] for side, refs in s.images_by_side().items()}
