"""Train the lesion model on synthetic key frames with dense targets.

Losses, one per head (``training.lesions.model.HEADS``):

* vessel: binary cross-entropy + soft Dice (the lumen is a few % of the frame);
* segment: cross-entropy over the 16 vessel classes (1-15 AHA, 16 other branches) on vessel
  pixels only (the background is the vessel head's business);
* heatmap: the CenterNet focal loss on Gaussian peaks at the visible lesions' centres;
* severity: L1 on the pixels near a lesion centre.

Frames are augmented photometrically (``training.selector.train.Augment`` ``sim2real`` without
its geometric part, so the targets stay aligned), then go through the serving path's
``finish_input`` with the bundle's preprocessing.  Splits are by study.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from inference.frames import finish_input

from .data import LesionSet, heatmap_targets

log = logging.getLogger(__name__)


@dataclass
class LesionTrainConfig:
    arch: str = "unet_tiny"
    size: int = 256
    normalize: str = "flatfield"
    steps: int = 800
    batch: int = 12
    lr: float = 3e-3
    # train on crop x crop windows of the (normalised) frames: a quarter of the cost of a whole
    # 256 px frame, so four times the samples per second; the network is fully convolutional and
    # serves whole frames.  0 = whole frames.
    crop: int = 128
    weight_decay: float = 1e-4
    sigma: float = 3.5  # heatmap Gaussian, model pixels
    segment_weight: float = 1.0
    heatmap_weight: float = 2.0
    coords: bool = True  # frame-position input channels (inference.lesions.add_coords)
    augment: str = "sim2real"
    lesion_frames: float = 0.7  # share of each batch drawn from frames with a visible lesion
    # every k-th step trains on whole frames (as many as cost the same as the crop batch): an AHA
    # segment is named by where a branch lies in the whole tree, which a crop cannot show.
    # 0 = crops only
    whole_every: int = 0
    # probability that a training frame's opacified vessels are faded towards the background
    # (by 0-70 %, through the vessel mask; the catheter, wires and edges stay as they are).
    # Synthetic vessels are darker than real ones, so after the flatfield a real catheter looks
    # like a synthetic artery; fading teaches that faint tubes are vessels too.  0 = off.
    fade: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    threads: Optional[int] = None
    time_budget_s: Optional[float] = None

    def preprocessing(self) -> dict:
        return {"input_size": self.size, "channels": 1, "mean": 0.5, "std": 0.25, "normalize": self.normalize}


def split_by_study(ls: LesionSet, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    studies = np.unique(ls.study)
    rng = np.random.default_rng(seed)
    rng.shuffle(studies)
    n_val = max(1, int(round(len(studies) * val_fraction))) if len(studies) > 1 else 0
    val = set(studies[:n_val].tolist())
    is_val = np.array([s in val for s in ls.study])
    return np.where(~is_val)[0], np.where(is_val)[0]


def focal_heatmap_loss(logit, target, alpha: float = 2.0, beta: float = 4.0):
    """CenterNet's penalty-reduced focal loss, normalised by the number of peaks."""
    import torch

    p = torch.sigmoid(logit).clamp(1e-4, 1 - 1e-4)
    pos = target.ge(0.99).float()
    neg = 1 - pos
    pos_loss = -torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = -torch.log(1 - p) * p ** alpha * (1 - target) ** beta * neg
    n = pos.sum().clamp(min=1.0)
    return (pos_loss.sum() + neg_loss.sum()) / n


def lesion_losses(out, V, G, H, Sv) -> dict:
    import torch
    import torch.nn.functional as F

    from .model import head_slices

    sl = head_slices()
    v = out[:, sl["vessel"]][:, 0]
    bce = F.binary_cross_entropy_with_logits(v, V)
    pv = torch.sigmoid(v)
    dice = 1 - (2 * (pv * V).sum((1, 2)) + 1) / (pv.sum((1, 2)) + V.sum((1, 2)) + 1)
    seg_logits = out[:, sl["segment"]][:, 1:]  # classes 1..16 -> 0..15
    tgt = torch.where(V > 0.5, (G.long() - 1).clamp(min=0), torch.full_like(G.long(), -100))
    tgt = torch.where((G.long() == 0) & (V > 0.5), torch.full_like(tgt, -100), tgt)
    seg = F.cross_entropy(seg_logits, tgt, ignore_index=-100) if (tgt >= 0).any() else seg_logits.sum() * 0
    heat = focal_heatmap_loss(out[:, sl["heatmap"]][:, 0], H)
    sev_pred = out[:, sl["severity"]][:, 0]
    m = Sv >= 0
    sev = (sev_pred[m] - Sv[m]).abs().mean() if m.any() else sev_pred.sum() * 0
    return {"vessel": bce + dice.mean(), "segment": seg, "heatmap": heat, "severity": sev}


def fade_vessels(d: np.ndarray, V: np.ndarray, rng, p: float, max_fade: float = 0.7) -> np.ndarray:
    """Display frames ``d`` (N, S, S; vessels dark) with, for a share ``p`` of them, the pixels
    of the vessel mask ``V`` (dilated one pixel) moved towards a local background (a grey
    closing, which removes thin dark tubes) by a random 0-``max_fade``: fainter contrast filling,
    same anatomy, the targets unchanged."""
    from scipy import ndimage

    out = d.copy()
    for b in range(len(d)):
        if rng.random() >= p:
            continue
        m = ndimage.binary_dilation(V[b] > 0.5, iterations=1)
        if not m.any():
            continue
        bg = ndimage.grey_closing(d[b], size=(9, 9))
        a = float(rng.uniform(0.0, max_fade))
        out[b] = np.where(m, d[b] + a * np.maximum(bg - d[b], 0.0), d[b])
    return out


def _batch(ls: LesionSet, idx: np.ndarray, cfg: LesionTrainConfig, aug=None, rng=None, crop: int = 0):
    """Inputs and targets of frames ``idx``.  The serving path runs on the whole frame (the
    flatfield normalisation sees all of it); with ``crop`` a window is then cut from input and
    targets alike, centred near a visible lesion (jittered) on frames that have one."""
    import torch

    d = ls.D[idx].astype(np.float32)
    if cfg.fade > 0 and rng is not None:
        d = fade_vessels(d, ls.V[idx], rng, cfg.fade)
    if aug is not None:
        d = aug(d)
    x = finish_input(d, cfg.preprocessing(), field=None if ls.F is None else ls.F[idx])
    if cfg.coords:
        from inference.lesions import add_coords

        x = add_coords(x)  # whole-frame positions, before any crop
    H, Sv = heatmap_targets(ls, idx, cfg.size, cfg.sigma)
    V = ls.V[idx].astype(np.float32)
    G = ls.G[idx].astype(np.int64)
    S = cfg.size
    if crop and crop < S:
        xs, Vs, Gs, Hs, Ss = [], [], [], [], []
        for b, i in enumerate(idx):
            les = ls.lesions_of(int(i))
            les = les[les[:, 5] > 0]
            if len(les) and rng.random() < 0.8:
                _, c, r = les[rng.integers(len(les))][:3]
                c0 = int(np.clip(c - crop / 2 + rng.uniform(-crop / 3, crop / 3), 0, S - crop))
                r0 = int(np.clip(r - crop / 2 + rng.uniform(-crop / 3, crop / 3), 0, S - crop))
            else:
                c0, r0 = (int(v) for v in rng.integers(0, S - crop + 1, 2))
            sl = (slice(r0, r0 + crop), slice(c0, c0 + crop))
            xs.append(x[b][:, sl[0], sl[1]])
            Vs.append(V[b][sl])
            Gs.append(G[b][sl])
            Hs.append(H[b][sl])
            Ss.append(Sv[b][sl])
        x, V, G, H, Sv = (np.ascontiguousarray(np.stack(a)) for a in (xs, Vs, Gs, Hs, Ss))
    return (torch.from_numpy(x), torch.from_numpy(V), torch.from_numpy(G), torch.from_numpy(H), torch.from_numpy(Sv))


def train_lesion_model(ls: LesionSet, cfg: LesionTrainConfig, progress: bool = False):
    """Train; returns (model (eval mode, best validation checkpoint), history dict)."""
    import torch

    from training.selector.train import Augment

    from .model import build_model

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tr, va = split_by_study(ls, cfg.val_fraction, cfg.seed)
    if not len(va):
        va = tr[: max(1, len(tr) // 10)]
    has_lesion = np.zeros(len(ls), bool)
    vis = ls.L[ls.L[:, 5] > 0]
    has_lesion[vis[:, 0].astype(np.int64)] = True
    pos, neg = tr[has_lesion[tr]], tr[~has_lesion[tr]]
    # channels_last: oneDNN's convolutions of these narrow layers run ~25 % faster on the CPU
    # (0.37 -> 0.28 s per 12 x 128 px batch on 2 cores); the model goes back to the default
    # layout before it is returned, so export and parity see an ordinary module
    model = build_model(cfg.arch, in_chans=3 if cfg.coords else 1).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(2, cfg.steps), pct_start=0.1)
    aug = Augment(cfg.augment, seed=cfg.seed, geometric=False) if cfg.augment not in ("", "none") else None
    val_idx = va[: min(len(va), 48)]
    val_batches = [_batch(ls, val_idx[i:i + 8], cfg) for i in range(0, len(val_idx), 8)]
    best, best_state, hist = float("inf"), None, {"train": [], "val": []}
    t0 = time.monotonic()
    eval_every = max(25, cfg.steps // 8)
    step = 0
    whole_batch = max(1, int(round(cfg.batch * (cfg.crop / cfg.size) ** 2))) if cfg.crop else cfg.batch
    for step in range(1, cfg.steps + 1):
        model.train()
        whole = bool(cfg.crop) and cfg.whole_every > 0 and step % cfg.whole_every == 0
        nb = whole_batch if whole else cfg.batch
        n_pos = int(round(nb * cfg.lesion_frames)) if len(pos) else 0
        n_pos = min(n_pos, nb) if len(neg) else nb
        idx = np.concatenate([rng.choice(pos, n_pos) if n_pos else np.zeros(0, np.int64),
                              rng.choice(neg, nb - n_pos) if nb - n_pos else np.zeros(0, np.int64)])
        x, V, G, H, Sv = _batch(ls, idx.astype(np.int64), cfg, aug, rng=rng, crop=0 if whole else cfg.crop)
        losses = lesion_losses(model(x.contiguous(memory_format=torch.channels_last)), V, G, H, Sv)
        loss = (losses["vessel"] + cfg.segment_weight * losses["segment"] + cfg.heatmap_weight * losses["heatmap"]
                + 2.0 * losses["severity"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        hist["train"].append(round(float(loss.detach()), 4))
        over = cfg.time_budget_s is not None and time.monotonic() - t0 > cfg.time_budget_s
        if step % eval_every == 0 or step == cfg.steps or over:
            v = validate(model, val_batches)
            hist["val"].append({"step": step, **v})
            if progress:
                log.info("lesions step %d/%d loss %.3f val %s (%.0f s)", step, cfg.steps, float(loss.detach()), v,
                         time.monotonic() - t0)
            if v["total"] < best:
                best = v["total"]
                best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
        if over:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model = model.to(memory_format=torch.contiguous_format)
    model.eval()
    hist.update(steps=step, seconds=round(time.monotonic() - t0, 1), config=asdict(cfg),
                train_frames=int(len(tr)), val_frames=int(len(va)))
    return model, hist


def validate(model, batches) -> dict:
    import torch

    model.eval()
    acc = {"vessel": 0.0, "segment": 0.0, "heatmap": 0.0, "severity": 0.0}
    with torch.inference_mode():
        for x, V, G, H, Sv in batches:
            for k, v in lesion_losses(model(x), V, G, H, Sv).items():
                acc[k] += float(v) / len(batches)
    acc["total"] = acc["vessel"] + 0.5 * acc["segment"] + acc["heatmap"] + 2.0 * acc["severity"]
    return {k: round(v, 4) for k, v in acc.items()}
