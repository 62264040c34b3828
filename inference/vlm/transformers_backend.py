"""In-process backend: Gemma3 / PaliGemma(2) from a local path (+ optional LoRA adapter).

torch / transformers / peft are imported here only, lazily (the ``vlm`` extra).
CPU runs fp32, CUDA bf16; decoding is greedy (deterministic); a StoppingCriteria
enforces a wall-clock deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

from inference.types import ModelInfo
from inference.vlm.base import ReportBackend, ReportError, ReportTimeout, to_pil

log = logging.getLogger(__name__)


def _model_class(model_type: str):
    import transformers

    if model_type == "gemma3":
        return transformers.Gemma3ForConditionalGeneration
    if model_type == "paligemma":
        return transformers.PaliGemmaForConditionalGeneration
    return transformers.AutoModelForImageTextToText


def load_model(path: str | Path, adapter: Optional[str | Path] = None, device: str = "auto",
               merge: bool = True):
    """Load (model, processor, device) from a local directory; never touches a hub."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ReportError(f"no VLM at {path} (config.json missing)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = _model_class(config.model_type)
    model = cls.from_pretrained(path, dtype=dtype, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    if adapter:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise ReportError(f"no LoRA adapter at {adapter} (adapter_config.json missing)")
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        if merge:
            model = model.merge_and_unload()
    model.to(device)
    model.eval()
    return model, processor, device


def family_of(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def build_inputs(processor, family: str, images: list, prompt: str, target: Optional[str] = None):
    """Model inputs for ``images`` (PIL) + ``prompt``; the chat format per model family.

    Returns the processor's BatchFeature (input_ids, attention_mask, pixel_values, ...).
    Used for both serving and training (``training.vlm.data``) so there is no skew.
    """
    if family == "paligemma":
        text = getattr(processor, "image_token", "<image>") * len(images) + prompt
        if target is not None:
            return processor(text=[text], images=[images], suffix=[target], return_tensors="pt")
        return processor(text=[text], images=[images], return_tensors="pt")
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[images] if images else None, return_tensors="pt",
                     add_special_tokens=False)


class _Deadline:
    """StoppingCriteria: stop when the wall clock passes ``deadline`` (sets ``hit``)."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.hit = False

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if time.monotonic() > self.deadline:
            self.hit = True
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class TransformersBackend(ReportBackend):
    def __init__(self, path: str | Path, adapter: Optional[str | Path] = None, device: str = "auto",
                 max_new_tokens: int = 256, max_images: int = 4, timeout_s: float = 120.0,
                 model_info: Optional[ModelInfo] = None, model=None, processor=None,
                 threads: Optional[int] = None):
        if threads:
            import torch

            torch.set_num_threads(int(threads))  # 1 is ~10x faster than 2 on a busy 2-core host
        if model is None:
            model, processor, device = load_model(path, adapter, device)
        else:
            device = str(next(model.parameters()).device)
        self.model = model
        self.processor = processor
        self.device = device
        self.family = family_of(model)
        self.max_new_tokens = int(max_new_tokens)
        self.max_images = int(max_images)
        self.timeout_s = float(timeout_s)
        self.path = str(path)
        self.model_info = model_info or ModelInfo(
            name=Path(str(path)).name, version="", device_uid="", vlm=f"{self.family} {path}",
            adapter=str(adapter or ""))
        self._lock = threading.Lock()  # one generate at a time per model

    def generate_text(self, images: list[np.ndarray], prompt: str) -> str:
        import torch
        from transformers import StoppingCriteriaList

        pil = [to_pil(im) for im in images]
        inputs = build_inputs(self.processor, self.family, pil, prompt)
        dtype = next(self.model.parameters()).dtype
        inputs = {k: (v.to(self.device, dtype=dtype) if k == "pixel_values" else v.to(self.device))
                  for k, v in inputs.items()}
        deadline = _Deadline(time.monotonic() + self.timeout_s)
        with self._lock, torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                stopping_criteria=StoppingCriteriaList([deadline]),
            )
        if deadline.hit:
            raise ReportTimeout(f"VLM generation exceeded {self.timeout_s:.1f} s")
        new = out[0, inputs["input_ids"].shape[1]:]
        text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        return text.strip()
