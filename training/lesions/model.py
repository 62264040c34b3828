"""Lesion model: a small fully convolutional network (U-Net) with four dense heads.

Why dense heads at the frame's own resolution: a stenosis is a few pixels of narrowed lumen,
so a global "has a lesion" label is far too weak a signal to learn one on 2 CPU cores, while
per-pixel targets (which the synthetic generator knows exactly) supervise every pixel.  The
heads mirror how quantitative coronary angiography (QCA) reads a lesion:

* ``vessel``   (1 channel, logit): the opacified lumen, from which diameters are measured;
* ``segment``  (17 channels, logits): 0 background, 1-15 AHA segments, 16 other branches;
* ``heatmap``  (1 channel, logit): lesion centres (CenterNet-style Gaussian peaks);
* ``severity`` (1 channel): % diameter stenosis / 100 at lesion centres (regression).

The output is one tensor ``maps`` (N, 20, S, S) in that channel order (``HEADS``), which keeps
the ONNX graph to one input and one output.  Variants are registered by name, timm-style:
``build_model("unet_tiny")``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: (name, channels) of the output tensor, in order.
HEADS: tuple[tuple[str, int], ...] = (("vessel", 1), ("segment", 17), ("heatmap", 1), ("severity", 1))
N_OUT = sum(c for _, c in HEADS)


def head_slices() -> dict[str, slice]:
    out, i = {}, 0
    for name, c in HEADS:
        out[name] = slice(i, i + c)
        i += c
    return out


@dataclass(frozen=True)
class UNetConfig:
    widths: tuple[int, ...] = (16, 32, 64, 96)
    blocks: int = 1  # extra conv blocks per level after the first
    # CoordConv inside the network (position channels of the *input*); the served lesion model
    # gets frame-position channels from inference.lesions.add_coords instead (crops keep them)
    coords: bool = False


VARIANTS: dict[str, UNetConfig] = {
    "unet_tiny": UNetConfig((16, 32, 48, 64, 96), 0),
    "unet_small": UNetConfig((24, 48, 64, 96, 128), 1),
    "unet_base": UNetConfig((32, 64, 128, 256, 320), 1),
}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class LesionUNet(nn.Module):
    """U-Net at half resolution plus a thin full-resolution path.

    A stride-2 stem takes the frame to S/2, where a U-Net of ``len(widths)`` levels (max-pool
    between, bilinear upsampling with skip concatenation) runs; its output is upsampled to S
    and joined with a few full-resolution feature maps of the input (the lumen edges of a
    2-3 px vessel live there) before the 1x1 heads.  About 4x cheaper than a U-Net whose first
    level runs at S, for the same receptive field in frames of the same size."""

    def __init__(self, cfg: UNetConfig, in_chans: int = 1):
        super().__init__()
        w = cfg.widths
        fine = max(8, w[0] // 2)
        self.coords = cfg.coords
        self.fine = nn.Sequential(
            nn.Conv2d(in_chans + (2 if cfg.coords else 0), fine, 3, padding=1, bias=False), nn.BatchNorm2d(fine), nn.ReLU(inplace=True))
        self.stem = nn.Sequential(
            nn.Conv2d(fine, w[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.down = nn.ModuleList()
        c = w[0]
        for wi in w:
            layers = [_block(c, wi)] + [_block(wi, wi) for _ in range(cfg.blocks)]
            self.down.append(nn.Sequential(*layers))
            c = wi
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        for i in range(len(w) - 1, 0, -1):
            self.up.append(_block(w[i] + w[i - 1], w[i - 1]))
        self.refine = nn.Sequential(
            nn.Conv2d(w[0] + fine, w[0], 3, padding=1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(w[0], N_OUT, 1)
        with torch.no_grad():  # start the centre heatmap near zero (focal-loss practice)
            hs = head_slices()["heatmap"]
            self.head.bias[hs].fill_(-4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coords:
            n, _, h, w = x.shape
            yy = torch.linspace(-1.0, 1.0, h, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
            xx = torch.linspace(-1.0, 1.0, w, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
            x = torch.cat([x, yy, xx], 1)
        f = self.fine(x)
        x = self.stem(f)
        skips = []
        for i, blk in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = blk(x)
            skips.append(x)
        for j, blk in enumerate(self.up):
            skip = skips[-2 - j]
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = blk(torch.cat([x, skip], 1))
        x = nn.functional.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.refine(torch.cat([x, f], 1)))


def build_model(name: str = "unet_small", in_chans: int = 1) -> LesionUNet:
    if name not in VARIANTS:
        raise ValueError(f"unknown lesion model {name!r}; choose from {sorted(VARIANTS)}")
    return LesionUNet(VARIANTS[name], in_chans)
