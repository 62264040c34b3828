"""Synthetic coronary angiography for training, tests and the demo.

- :func:`generate_dataset` (out_dir, n_studies, seed, **opts) -> records of labels.jsonl
- :func:`generate_study` (seed, index, ...) -> one study in memory (frames, labels, report)
- :func:`render_run` (seed, side, size, n_frames, ...) -> (frames uint8, labels, meta): fast,
  no DICOM I/O
- :func:`make_report`, :func:`treatment`: findings -> bilingual report / recommendation
"""

from .dataset import generate_dataset, generate_study, load_records
from .render import RunSpec, render_run, sample_run_spec
from .reports import make_report, treatment

__all__ = [
    "generate_dataset",
    "generate_study",
    "load_records",
    "render_run",
    "RunSpec",
    "sample_run_spec",
    "make_report",
    "treatment",
]
