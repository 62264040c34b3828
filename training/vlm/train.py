"""Fine-tuning the VLM on key frames + reports: full training or LoRA (peft).

Checkpoints (``OUT/checkpoints/step-N``: weights or adapter, optimizer, step) allow
``resume``; progress is a tqdm bar; gradient checkpointing and bf16 autocast are used
where a GPU exists.  The same ``inference.vlm.transformers_backend.build_inputs`` formats
prompts for training and serving.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from inference.vlm.base import build_prompt, format_report, to_pil
from inference.vlm.transformers_backend import build_inputs, family_of
from training.vlm.data import FrameCache, StudyExample

log = logging.getLogger(__name__)

#: Decoder linear layers of the language model only (the vision tower has q_proj/v_proj too).
LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class LoraSpec:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = LM_TARGETS

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, bias="none")


@dataclass
class TrainConfig:
    steps: int = 0  # 0: until budget_s
    budget_s: float = 120.0
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: int = 20
    max_images: int = 4
    languages: tuple[str, ...] = ("en", "ja")
    lora: Optional[LoraSpec] = None
    gradient_checkpointing: bool = False  # default on with a GPU
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end
    # CPU threads for torch while training (0: torch's default).  1 is the default because on a
    # small shared machine OpenMP's spinning threads are ~5x slower under contention.
    threads: int = 1
    random_frames: bool = True  # a random key-frame candidate of each run per step (augmentation)
    # Languages after the first are learnt from the first one's reference report (and the images),
    # so that at serving time they are written from the first draft and say the same thing.
    from_first_language: bool = True
    # "findings": every prompt carries the study's ground-truth findings perturbed like a lesion
    # detector's errors (``training.vlm.concepts``), so the model learns to write its report from
    # the lesion model's findings; "none": today's prompts.
    concepts: str = "none"
    concept_noise: Optional[dict] = None  # None: training.vlm.concepts.NOISE
    concept_variants: int = 8  # perturbations drawn per (study, language); one per step at random
    progress: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["languages"] = list(self.languages)
        if d["concepts"] == "none":  # a bundle trained without concepts records none of it
            for k in ("concepts", "concept_noise", "concept_variants"):
                d.pop(k)
        elif d["concept_noise"] is None:
            from training.vlm.concepts import NOISE

            d["concept_noise"] = dict(NOISE)
        return d


def end_of_answer(processor, family: str) -> str:
    return "" if family == "paligemma" else "<end_of_turn>"


class Encoded:
    """One (study, language) training sample: token ids + labels; pixels looked up per step.

    ``variants``: other encodings of the same sample (prompts with differently perturbed
    concepts), one chosen at random per step; the first is the one in the attributes."""

    __slots__ = ("study", "lang", "input_ids", "labels", "token_type_ids", "variants")

    def __init__(self, study, lang, input_ids, labels, token_type_ids, variants=None):
        self.study, self.lang = study, lang
        self.input_ids, self.labels, self.token_type_ids = input_ids, labels, token_type_ids
        self.variants = variants or [(input_ids, labels, token_type_ids)]


def encode_sample(processor, family: str, n_images: int, sides: list[str], lang: str, target: str,
                  source: Optional[str] = None, concepts: Optional[list[dict]] = None):
    """Token ids / labels for a prompt with ``n_images`` images and the answer ``target``
    (``source``: the other language's report the answer is written from; ``concepts``: the
    lesion model's findings the prompt names)."""
    from PIL import Image

    blank = [Image.new("RGB", (8, 8)) for _ in range(n_images)]
    prompt = build_prompt(lang, sides, n_images, source=source, concepts=concepts)
    if family == "paligemma":
        b = build_inputs(processor, family, blank, prompt, target=target)
        ids = b["input_ids"][0].tolist()
        labels = b["labels"][0].tolist()
        tt = b["token_type_ids"][0].tolist() if "token_type_ids" in b else None
        return ids, labels, tt
    b = build_inputs(processor, family, blank, prompt)
    p_ids = b["input_ids"][0].tolist()
    tt = b["token_type_ids"][0].tolist() if "token_type_ids" in b else None
    t_ids = processor.tokenizer(target + end_of_answer(processor, family), add_special_tokens=False)["input_ids"]
    ids = p_ids + t_ids
    labels = [-100] * len(p_ids) + list(t_ids)
    if tt is not None:
        tt = tt + [0] * len(t_ids)
    return ids, labels, tt


class PixelCache:
    def __init__(self, processor, frames: FrameCache):
        self.processor = processor
        self.frames = frames
        self._cache = {}

    def __call__(self, ref):
        t = self._cache.get(ref)
        if t is None:
            ip = self.processor.image_processor
            t = ip(images=[to_pil(self.frames(ref))], return_tensors="pt")["pixel_values"][0]
            self._cache[ref] = t
        return t


def training_concepts(study: StudyExample, cfg: TrainConfig, lang: str, variant: int) -> Optional[list[dict]]:
    """The concepts in one training prompt: ``None`` without ``cfg.concepts``; else the study's
    true findings perturbed (seeded by ``cfg.seed``, the study, the language and ``variant``)."""
    if cfg.concepts == "none":
        return None
    from training.vlm.concepts import check_mode, perturb_findings, study_rng, true_concepts

    check_mode(cfg.concepts)
    rng = study_rng(cfg.seed, f"{study.study_uid}:{lang}:{variant}", "train")
    return perturb_findings(true_concepts(study), rng, cfg.concept_noise)


def encode_dataset(processor, family: str, studies: list[StudyExample], cfg: TrainConfig) -> list[Encoded]:
    out = []
    n_var = max(1, int(cfg.concept_variants)) if cfg.concepts != "none" else 1
    for s in studies:
        refs, sides = s.frames(cfg.max_images)
        first = cfg.languages[0] if cfg.languages else None
        for lang in cfg.languages:
            if lang not in s.report:
                continue
            target = format_report(s.report[lang], lang)
            source = None
            if cfg.from_first_language and lang != first and first in s.report:
                source = format_report(s.report[first], first)
            variants = []
            done: dict = {}
            for v in range(n_var):
                c = training_concepts(s, cfg, lang, v)
                key = None if c is None else tuple(tuple(sorted(f.items())) for f in c)
                if key not in done:  # the same draw twice is encoded once, and kept twice (its rate)
                    done[key] = encode_sample(processor, family, len(refs), sides, lang, target, source=source,
                                              concepts=c)
                variants.append(done[key])
            ids, labels, tt = variants[0]
            out.append(Encoded(s, lang, ids, labels, tt, variants))
    return out


def collate(samples: list[Encoded], pixels: PixelCache, cfg: TrainConfig, rng: random.Random, pad_id: int):
    import torch

    enc = [s.variants[rng.randrange(len(s.variants))] if len(s.variants) > 1 else s.variants[0] for s in samples]
    n = max(len(e[0]) for e in enc)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), -100, dtype=torch.long)
    att = torch.zeros((len(samples), n), dtype=torch.long)
    tt = torch.zeros((len(samples), n), dtype=torch.long)
    pix = []
    for i, (s, (s_ids, s_labels, s_tt)) in enumerate(zip(samples, enc)):
        L = len(s_ids)
        ids[i, :L] = torch.tensor(s_ids)
        labels[i, :L] = torch.tensor(s_labels)
        att[i, :L] = 1
        if s_tt is not None:
            tt[i, :L] = torch.tensor(s_tt)
        refs, _ = s.study.frames(cfg.max_images, rng if cfg.random_frames else None)
        pix.extend(pixels(r) for r in refs)
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels, "token_type_ids": tt}
    if pix:
        batch["pixel_values"] = torch.stack(pix)
    return batch


def _latest_checkpoint(out: Path) -> Optional[Path]:
    ck = out / "checkpoints"
    if not ck.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[1]), p) for p in ck.glob("step-*") if (p / "state.json").is_file())
    return steps[-1][1] if steps else None


def apply_lora(model, spec: LoraSpec):
    from peft import get_peft_model

    return get_peft_model(model, spec.peft_config())


def train_model(model, processor, studies: list[StudyExample], cfg: TrainConfig,
                out_dir: Optional[str | Path] = None, resume: bool = False,
                frame_cache: Optional[FrameCache] = None) -> tuple[object, dict]:
    """Train ``model`` (wrapped with LoRA when ``cfg.lora``) and return (model, stats)."""
    import torch

    family = family_of(model)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if not cuda and cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.lora is not None and not hasattr(model, "peft_config"):
        model = apply_lora(model, cfg.lora)
    if cfg.gradient_checkpointing or cuda:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.steps or 10**9
    start_step = 0
    out = Path(out_dir) if out_dir else None
    if resume and out is not None:
        ck = _latest_checkpoint(out)
        if ck is not None:
            start_step = _load_checkpoint(model, opt, ck)
            log.info("resumed from %s (step %d)", ck, start_step)

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        if cfg.steps:
            frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        else:
            frac = min(1.0, (time.monotonic() - t0) / max(cfg.budget_s, 1e-6))
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    samples = encode_dataset(processor, family, studies, cfg)
    frame_cache = frame_cache or FrameCache(getattr(processor.image_processor, "size", {}).get("height"))
    frame_cache.preload(r for s in studies for runs in s.runs.values() for cands in runs for r in cands)
    if not samples:
        raise ValueError("no training samples (no studies with key frames and reports)")
    pixels = PixelCache(processor, frame_cache)
    pad_id = processor.tokenizer.pad_token_id or 0
    for s in studies:  # pixel values once per frame, before the clock starts
        for runs in s.runs.values():
            for cands in runs:
                for r in cands:
                    pixels(r)
    model.train()
    t0 = time.monotonic()
    losses: list[float] = []
    step = start_step
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps or None, initial=start_step, desc="vlm", unit="step", leave=False)
    order: list[int] = []
    while step < total:
        if not cfg.steps and time.monotonic() - t0 > cfg.budget_s:
            break
        if len(order) < cfg.batch_size:
            more = list(range(len(samples)))
            rng.shuffle(more)
            order.extend(more)
        batch_samples = [samples[order.pop()] for _ in range(min(cfg.batch_size, len(samples)))]
        batch = collate(batch_samples, pixels, cfg, rng, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(next(model.parameters()).dtype)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if out is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(model, opt, out, step)
    if bar is not None:
        bar.close()
    model.eval()
    stats = {
        "steps": step,
        "steps_this_run": step - start_step,
        "train_seconds": round(time.monotonic() - t0, 1),
        "final_loss": round(float(np.mean(losses[-20:])), 4) if losses else None,
        "first_loss": round(losses[0], 4) if losses else None,
        "samples": len(samples),
        "trainable_parameters": sum(p.numel() for p in params),
    }
    if out is not None and cfg.checkpoint_every:
        save_checkpoint(model, opt, out, step)
    return model, stats


def save_checkpoint(model, opt, out: Path, step: int, keep: int = 2) -> Path:
    """Trainable weights (all of them, or the LoRA ones) + optimizer + step, by parameter name."""
    import torch

    ck = out / "checkpoints" / f"step-{step}"
    ck.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(state, ck / "weights.pt")
    torch.save(opt.state_dict(), ck / "optimizer.pt")
    (ck / "state.json").write_text(json.dumps({"step": step}))
    olds = sorted((int(p.name.split("-")[1]), p) for p in (out / "checkpoints").glob("step-*"))
    for _, p in olds[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return ck


def _load_checkpoint(model, opt, ck: Path) -> int:
    import torch

    state = torch.load(ck / "weights.pt", map_location="cpu")
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {ck} does not fit this model (e.g. {missing[:3]})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    try:
        opt.load_state_dict(torch.load(ck / "optimizer.pt", map_location="cpu"))
    except Exception as exc:  # pragma: no cover - optimizer shape change
        log.warning("optimizer state not restored: %s", exc)
    return int(json.loads((ck / "state.json").read_text())["step"])
