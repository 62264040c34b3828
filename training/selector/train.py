"""Selector training: timm ConvNeXt, AdamW, cross-entropy, strong augmentation, study-level split.

``train(TrainConfig) -> summary dict``; checkpoints ``OUT/last.pt`` (every ``ckpt_every``
steps and at the end) and ``OUT/best.pt`` (best validation score), resumable with
``resume="auto"`` or a path.  Metrics (per-class F1, laterality F1, key-frame accuracy,
confusion matrix) come from ``training.selector.evaluate``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from inference.types import CLASS_NAMES

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str
    out: str
    arch: str = "convnext_atto"
    size: int = 128
    channels: int = 1
    mean: float = 0.5
    std: float = 0.25
    # frame normalisation before mean/std, recorded in the bundle and applied when serving
    # (inference.frames.NORMALIZATIONS); "flatfield" makes real and synthetic frames alike
    normalize: str = "none"
    epochs: int = 10
    steps: Optional[int] = None  # overrides epochs when set
    batch: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_frac: float = 0.05
    augment: str = "trivialaugment"  # see AUGMENTATIONS
    balance: str | bool = "class"  # class | class+view | none (see sampling_weights)
    # Probability that a training frame's background is swapped for another run's (see
    # BackgroundSwap): the side must then be read from the contrast-filled vessels.
    bg_swap: float = 0.0
    # Exponential moving average of the weights (0: off).  The averaged weights are evaluated,
    # checkpointed as "model" and exported: steadier from one evaluation to the next.
    ema: float = 0.0
    label_smoothing: float = 0.0
    drop_path: float = 0.0
    ls_init: Optional[float] = None  # ConvNeXt layer-scale init; None = timm default (1e-6)
    val_frac: float = 0.2
    seed: int = 0
    threads: int = 2
    eval_every: Optional[int] = None  # steps; default: once per epoch (and at the end)
    ckpt_every: int = 200
    min_gap: int = 5
    resume: Optional[str] = None  # path or "auto"
    cache: Optional[str] = None
    progress: bool = True
    max_train_frames: Optional[int] = None

    def spec(self) -> dict:
        return {"input_size": self.size, "channels": self.channels, "mean": self.mean, "std": self.std,
                "normalize": self.normalize}


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


#: Augmentations of ``TrainConfig.augment``; all act on display frames before
#: ``inference.frames.finish_input`` (normalisation), as a real cath lab's frames would differ.
AUGMENTATIONS = ("none", "light", "trivialaugment", "sim2real", "sim2real+trivialaugment")


class Augment:
    """Augmentation of a batch of square display frames (B, S, S) in [0, 1] (numpy, float32).

    - ``trivialaugment``: torchvision's TrivialAugmentWide, as in the CAG-VLM paper.
    - ``light``: small affine + brightness/contrast jitter + a little noise.
    - ``sim2real``: what differs between synthetic runs and real cath labs, drawn per frame:
      zoom (real runs are often filmed with the tree filling the field), small rotation and
      shift, gamma, window (contrast and level), detector blur or edge enhancement, quantum
      noise, lossy JPEG at low to high quality, 8-bit quantisation, and now and then a shutter.
      No flips: a mirrored left coronary is not a right one.
    - ``sim2real+trivialaugment``: TrivialAugmentWide on half of the frames, then ``sim2real``.
    """

    def __init__(self, kind: str, seed: int = 0, geometric: bool = True):
        """``geometric=False``: photometric only (no zoom, rotation, shift or shutters), for
        models whose per-pixel targets must stay aligned with the frame (the lesion model)."""
        self.geometric = bool(geometric)
        if kind not in AUGMENTATIONS and kind != "":
            raise ValueError(f"unknown augmentation {kind!r} ({' | '.join(AUGMENTATIONS)})")
        self.kind = kind or "none"
        self.rng = np.random.default_rng(seed)
        self.ta = None
        if "trivialaugment" in self.kind:
            from torchvision.transforms import v2

            self.ta = v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR)
        elif self.kind == "light":
            from torchvision.transforms import v2

            self.lt = v2.Compose([
                v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1)),
                v2.ColorJitter(brightness=0.25, contrast=0.25),
            ])

    def __call__(self, d: np.ndarray) -> np.ndarray:
        d = np.clip(np.asarray(d, dtype=np.float32), 0, 1)
        if self.kind == "none":
            return d
        if self.kind == "light":
            out = self._torch(d, self.lt)
            return np.clip(out + self.rng.normal(0, 1, out.shape).astype(np.float32)
                           * 0.02 * self.rng.random((len(out), 1, 1)).astype(np.float32), 0, 1)
        if self.kind == "trivialaugment":
            return self._torch(d, self.ta)
        if self.ta is not None:  # sim2real+trivialaugment
            pick = self.rng.random(len(d)) < 0.5
            if pick.any():
                d = d.copy()
                d[pick] = self._torch(d[pick], self.ta)
        return np.stack([self.sim2real(x) for x in d])

    @staticmethod
    def _torch(d: np.ndarray, t) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(d))[:, None]
        return torch.stack([t(xi) for xi in x])[:, 0].clamp(0, 1).numpy()

    def sim2real(self, x: np.ndarray) -> np.ndarray:
        """One display frame (S, S) in [0, 1] -> a plausible frame of another cath lab."""
        from PIL import Image

        from inference.frames import smooth

        rng = self.rng
        s = x.shape[-1]
        if self.geometric and rng.random() < 0.8:  # geometry: zoom in more often than out, rotate, shift
            zoom = float(np.exp(rng.uniform(np.log(0.85), np.log(1.6))))
            ang = np.deg2rad(rng.uniform(-15, 15))
            tx, ty = rng.uniform(-0.1, 0.1, 2) * s
            c, sn = np.cos(ang) / zoom, np.sin(ang) / zoom
            cx = cy = (s - 1) / 2
            # output pixel (u, v) samples input at A @ (u - c) + c + t
            a, b_, e = c, sn, cx - c * cx - sn * cy + tx
            d_, e2, f = -sn, c, cy + sn * cx - c * cy + ty
            x = np.asarray(Image.fromarray(x).transform((s, s), Image.AFFINE, (a, b_, e, d_, e2, f),
                                                         resample=Image.BILINEAR, fillcolor=0.0), np.float32)
        if rng.random() < 0.85:  # gamma and window
            x = np.power(np.clip(x, 0, 1), float(np.exp(rng.uniform(np.log(0.6), np.log(1.7)))))
            mid, top = float(np.median(x)), float(np.percentile(x, 99.5))
            lo = mid * rng.uniform(-0.5, 0.5)
            hi = max(top * rng.uniform(0.8, 1.25), lo + 0.05)
            x = (x - lo) / (hi - lo)
        u = rng.random()
        if u < 0.25:  # detector blur
            x = smooth(x, 1) if s >= 64 else x
        elif u < 0.45:  # edge enhancement
            x = x + rng.uniform(0.3, 1.2) * (x - smooth(x, 1))
        if rng.random() < 0.6:  # quantum noise, more in bright areas
            sig = rng.uniform(0.005, 0.05)
            x = x + rng.normal(0, 1, x.shape).astype(np.float32) * sig * np.sqrt(np.clip(x, 0.02, 1))
        x8 = (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)  # real runs are 8-bit
        if rng.random() < 0.4:  # lossy JPEG
            import io

            buf = io.BytesIO()
            Image.fromarray(x8).save(buf, format="JPEG", quality=int(rng.integers(25, 92)))
            x8 = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
        x = x8.astype(np.float32) / 255
        if self.geometric and rng.random() < 0.15:  # a shutter blade or a round field
            yy, xx = np.mgrid[0:s, 0:s]
            if rng.random() < 0.5:
                r = rng.uniform(0.45, 0.6) * s
                x = np.where((yy - s / 2) ** 2 + (xx - s / 2) ** 2 <= r * r, x, 0)
            else:
                k = int(rng.uniform(0.05, 0.2) * s)
                side = rng.integers(4)
                m = [yy < k, yy >= s - k, xx < k, xx >= s - k][side]
                x = np.where(m, 0, x)
        return x.astype(np.float32)


class BackgroundSwap:
    """Move a frame's contrast onto another patient's background.

    A run's pre-injection frames (``*_other``) show everything but the iodine: chest, spine,
    diaphragm, catheter.  ``frame - own pre-contrast frame + another run's pre-contrast frame``
    (display space, where attenuations add) keeps the opacified vessels and replaces the rest.
    Why: on real runs the saliency of the synthetic-only selector lay on background anatomy
    (spine, diaphragm, texture), which a generator can never make as varied as real chests; with
    the background drawn from another run it carries no side information, so the model has to
    learn the side from the vessels.  Frames of runs without a pre-contrast frame are left alone.
    """

    def __init__(self, fs, p: float, seed: int = 0):
        self.p = float(p)
        self.D = fs.D
        self.rng = np.random.default_rng(seed)
        other = np.array([CLASS_NAMES[i].endswith("_other") for i in range(len(CLASS_NAMES))])[fs.y]
        self.pool = np.where(other)[0]
        self.run = np.asarray(fs.run)
        self.own = {}
        for i in self.pool:
            self.own.setdefault(int(self.run[i]), []).append(int(i))

    def __call__(self, idx: np.ndarray, d: np.ndarray) -> np.ndarray:
        if self.p <= 0 or len(self.pool) < 2:
            return d
        d = d.copy()
        for b, i in enumerate(idx):
            own = self.own.get(int(self.run[i]))
            if not own or self.rng.random() >= self.p:
                continue
            j = own[int(self.rng.integers(len(own)))]
            k = int(self.pool[int(self.rng.integers(len(self.pool)))])
            if self.run[k] == self.run[i]:
                continue
            d[b] = np.clip(d[b] - np.asarray(self.D[j], np.float32) + np.asarray(self.D[k], np.float32), 0, 1)
        return d


def view_group(record: dict) -> str:
    """The projection family of a run: AP / LAO / RAO with CRA / CAU ('' when unknown)."""
    view = str(record.get("view") or "").upper().split()
    if not view:
        return ""
    tilt = [t for t in view[1:] if t in ("CRA", "CAU")]
    return " ".join([view[0]] + tilt[:1])


def sampling_weights(fs, balance: str | bool) -> np.ndarray:
    """Per-frame sampling probabilities (sqrt-inverse frequency: tempers oversampling).

    ``"class"`` (or True) balances the six classes; ``"class+view"`` balances each class within
    each projection family too, so that a side rarely filmed from one angle (the RCA in RAO:
    ~1 run in 10 of a typical study) is not simply called the other side from that angle.
    Runs without a known view count as one family.  ``"none"`` (or False): uniform.
    """
    mode = {True: "class", False: "none"}.get(balance, balance)
    if mode == "none":
        w = np.ones(len(fs.y))
    elif mode in ("class", "class+view"):
        keys = fs.y.astype(np.int64)
        if mode == "class+view":
            groups = sorted({view_group(r) for r in fs.records})
            gid = np.array([groups.index(view_group(r)) for r in fs.records], dtype=np.int64)
            keys = keys * len(groups) + gid[fs.run]
        _, inv, cnt = np.unique(keys, return_inverse=True, return_counts=True)
        w = 1.0 / np.sqrt(cnt[inv].astype(np.float64))
    else:
        raise ValueError(f"balance must be class, class+view or none, got {balance!r}")
    return w / w.sum()


def predict_torch(model, X: np.ndarray, batch: int = 64) -> np.ndarray:
    """Softmax probabilities of a torch model over a (N, C, S, S) array."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(X), batch):
            xb = torch.from_numpy(np.asarray(X[i:i + batch], dtype=np.float32))
            out.append(torch.softmax(model(xb).float(), dim=1).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASS_NAMES)), np.float32)


def _score(m: dict) -> float:
    return m.get("laterality_f1", 0) + m.get("macro_f1", 0) + m.get("key_frame_accuracy", 0)


def load_checkpoint(path: str | Path) -> dict:
    import torch

    return torch.load(str(path), map_location="cpu", weights_only=False)


def model_from_checkpoint(ckpt: dict | str | Path):
    from training.selector.model import create_model

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    cfg = ckpt["config"]
    model = create_model(cfg["arch"], channels=cfg.get("channels", 1))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model


def train(cfg: TrainConfig) -> dict:
    import torch
    import torch.nn.functional as F

    from inference.frames import finish_input
    from training.selector.data import build_frameset, split_frameset
    from training.selector.evaluate import frameset_metrics
    from training.selector.model import count_params, create_model

    t_start = time.monotonic()
    torch.set_num_threads(max(1, cfg.threads))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _seed_all(cfg.seed)

    fs = build_frameset(cfg.data, cfg.spec(), cache_dir=cfg.cache, progress=cfg.progress)
    if len(fs) == 0:
        raise RuntimeError(f"no frames in {cfg.data}: {fs.errors[:3]}")
    tr, va = split_frameset(fs, val_frac=cfg.val_frac, seed=cfg.seed)
    t_data = time.monotonic() - t_start
    log.info("selector data: %d train frames (%d runs), %d val frames (%d runs), %.1fs",
             len(tr), len(tr.records), len(va), len(va.records), t_data)

    model = create_model(cfg.arch, channels=cfg.channels, drop_path_rate=cfg.drop_path, ls_init_value=cfg.ls_init)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(tr) / cfg.batch))
    total = int(cfg.steps) if cfg.steps else steps_per_epoch * max(1, cfg.epochs)
    warm = max(1, int(total * cfg.warmup_frac))

    def lr_at(step: int) -> float:
        if step < warm:
            return cfg.lr * (step + 1) / warm
        p = (step - warm) / max(1, total - warm)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))

    ema_model = None
    if cfg.ema:
        import copy

        ema_model = copy.deepcopy(model)
        for p_ in ema_model.parameters():
            p_.requires_grad_(False)

    step = 0
    best = -1.0
    history: list[dict] = []
    resume = cfg.resume
    if resume == "auto":
        resume = str(out / "last.pt") if (out / "last.pt").is_file() else None
    if resume:
        ck = load_checkpoint(resume)
        model.load_state_dict(ck.get("train_model", ck["model"]))
        if ema_model is not None:
            ema_model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
        best = float(ck.get("best", -1.0))
        history = list(ck.get("history", []))
        if ck.get("rng"):
            torch.set_rng_state(ck["rng"]["torch"])
            np.random.set_state(ck["rng"]["numpy"])
            random.setstate(ck["rng"]["python"])
        log.info("resumed from %s at step %d/%d", resume, step, total)

    counts = np.bincount(tr.y, minlength=len(CLASS_NAMES)).astype(np.float64)
    w = sampling_weights(tr, cfg.balance)
    aug = Augment(cfg.augment, seed=cfg.seed + step)
    spec = cfg.spec()
    swap = BackgroundSwap(tr, cfg.bg_swap, seed=cfg.seed + step + 1)
    eval_every = cfg.eval_every or steps_per_epoch
    rng = np.random.default_rng(cfg.seed + step)  # a resumed run continues with a fresh stream

    def evaluate() -> dict:
        if len(va) == 0:
            return {}
        probs = predict_torch(ema_model if ema_model is not None else model, va.X)
        model.train()
        return frameset_metrics(va, probs, min_gap=cfg.min_gap)

    def save(path: Path, metrics: Optional[dict] = None) -> None:
        ck = {
            "model": (ema_model if ema_model is not None else model).state_dict(),
            **({"train_model": model.state_dict()} if ema_model is not None else {}),
            "optimizer": opt.state_dict(),
            "step": step,
            "total_steps": total,
            "best": best,
            "history": history,
            "config": asdict(cfg),
            "spec": cfg.spec(),
            "classes": list(CLASS_NAMES),
            "metrics": metrics or (history[-1]["metrics"] if history else {}),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "data": {"train_runs": len(tr.records), "val_runs": len(va.records), "train_frames": len(tr),
                     "val_frames": len(va), "class_counts": counts.astype(int).tolist()},
        }
        tmp = path.with_suffix(".tmp")
        torch.save(ck, str(tmp))
        os.replace(tmp, path)

    model.train()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc=f"train {cfg.arch}", unit="step", file=sys.stderr)
    t_train = time.monotonic()
    loss_ema = None
    first_step = step
    while step < total:
        idx = rng.choice(len(tr.y), size=min(cfg.batch, len(tr.y)), replace=True, p=w)
        idx = np.sort(idx)
        if (aug.kind == "none" and not cfg.bg_swap) or tr.D is None:
            xb = torch.from_numpy(np.asarray(tr.X[idx], dtype=np.float32))
        else:  # augment the display frames, then the serving path's normalisation
            d = swap(idx, np.asarray(tr.D[idx], dtype=np.float32))
            xb = torch.from_numpy(finish_input(aug(d), spec))
        yb = torch.from_numpy(tr.y[idx])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema_model is not None:
            d = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema_model.parameters(), model.parameters()):
                    pe.mul_(d).add_(pm.detach(), alpha=1 - d)
                for be, bm in zip(ema_model.buffers(), model.buffers()):
                    be.copy_(bm)
        step += 1
        lv = float(loss.detach())
        loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{lr_at(step - 1):.1e}")
        if step % eval_every == 0 or step == total:
            m = evaluate()
            history.append({"step": step, "loss": round(loss_ema, 4), "metrics": m})
            sc = _score(m)
            if m:
                log.info("step %d loss %.3f val laterality F1 %.3f macro F1 %.3f key-frame acc %.3f", step,
                         loss_ema, m["laterality_f1"], m["macro_f1"], m["key_frame_accuracy"])
            if sc > best:
                best = sc
                save(out / "best.pt", m)
        if step % cfg.ckpt_every == 0 and step != total:
            save(out / "last.pt")
    if bar is not None:
        bar.close()
    t_loop = time.monotonic() - t_train
    final = history[-1]["metrics"] if history else {}
    save(out / "last.pt", final)
    if not (out / "best.pt").exists():
        save(out / "best.pt", final)
    summary = {
        "arch": cfg.arch,
        "params": count_params(model),
        "size": cfg.size,
        "steps": step,
        "batch": cfg.batch,
        "lr": cfg.lr,
        "augment": cfg.augment,
        "seed": cfg.seed,
        "train_runs": len(tr.records),
        "val_runs": len(va.records),
        "train_frames": len(tr),
        "val_frames": len(va),
        "seconds": {"data": round(t_data, 1), "train": round(t_loop, 1),
                    "per_step": round(t_loop / max(1, step - first_step), 3),
                    "total": round(time.monotonic() - t_start, 1)},
        "val_metrics": final,
        "best_checkpoint": str(out / "best.pt"),
        "last_checkpoint": str(out / "last.pt"),
        "data_errors": fs.errors,
    }
    (out / "train-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
