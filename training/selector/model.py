"""The selector network: a timm ConvNeXt with a 6-way head on 1-channel input.

``convnext_base`` is the paper's model (GPU training); ``convnext_atto`` / ``convnext_femto``
/ ``convnext_pico`` / ``convnext_nano`` / ``convnext_tiny`` train on CPUs.  Any timm
architecture name works (``timm.create_model(arch, pretrained=False, num_classes=6,
in_chans=channels)``); no weights are ever downloaded.
"""

from __future__ import annotations

from inference.types import CLASS_NAMES

CPU_ARCHS = ("convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny")
PAPER_ARCH = "convnext_base"


def create_model(arch: str = "convnext_atto", channels: int = 1, drop_path_rate: float = 0.0,
                 ls_init_value: float | None = None):
    """``ls_init_value``: ConvNeXt layer-scale init (timm default 1e-6); 1.0 trains much faster
    in short from-scratch CPU runs (same parameters, so checkpoints load either way)."""
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r} (e.g. {', '.join(CPU_ARCHS + (PAPER_ARCH,))})")
    kw = {}
    if ls_init_value is not None and arch.startswith("convnext"):
        kw["ls_init_value"] = float(ls_init_value)
    if drop_path_rate:
        kw["drop_path_rate"] = drop_path_rate
    return timm.create_model(arch, pretrained=False, num_classes=len(CLASS_NAMES), in_chans=channels, **kw)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
