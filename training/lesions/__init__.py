"""The lesion model: dense vessel / AHA segment / stenosis heads on key frames (a small U-Net),
trained on the synthetic generator's per-pixel targets and served from ``inference.lesions``.

- :func:`build_lesions` (data_dir, bundle_dir, ...) -> train, export ONNX, write the manifest
- :func:`evaluate_lesions` (data_dir, bundle) -> vessel Dice, lesion sensitivity, ...
"""

from .evaluate import evaluate_lesions
from .export import build_lesions

__all__ = ["build_lesions", "evaluate_lesions"]
