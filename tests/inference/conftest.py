"""Fixtures for the frame / candidate / selector tests.

``tiny_bundle`` trains a tiny convnext_atto (32 px) for a few steps on toy runs and exports it
(once per session; ``training.selector.toy`` memoises it per process, so the training tests
reuse the same one).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from training.selector.toy import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("selector-tiny"), size=32, steps=20)


@pytest.fixture()
def toy_run(tmp_path):
    """Factory: write a toy multi-frame XA run and return its path and labels."""
    from training.selector.toy import toy_frames, write_run

    def make(side="LCA", n=12, size=64, seed=1, **kw):
        frames, labels = toy_frames(side, n, size, seed=seed)
        p = write_run(tmp_path / f"{side}-{seed}-{n}.dcm", frames, **kw)
        return p, labels, frames

    return make
