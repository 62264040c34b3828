"""Fixtures for the synthetic-data and dataset tests: one tiny synthetic dataset per session."""

from __future__ import annotations

import pytest

TINY = dict(size=128, frames=12, runs_per_study=4, progress=False)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """3 studies, 4 runs each, 128x128x12, seed 7: (out_dir, records)."""
    from training.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    recs = generate_dataset(out, 3, seed=7, **TINY)
    return out, recs
