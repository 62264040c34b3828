"""Export a selector checkpoint to ONNX, check parity with torch, optionally quantize to int8,
and write ``BUNDLE/selector.onnx`` + the manifest's selector section.

* Export: ``torch.onnx.export(dynamo=False)``, opset 17, input ``input`` (N, C, S, S) with a
  dynamic batch axis, output ``logits`` (N, 6).  Weights inline (no ``.onnx.data``).
* Parity: ONNX Runtime vs torch eager on the same inputs: max |logit diff| and argmax
  agreement; export fails when they disagree beyond ``tol``.
* int8 (``--int8``): ``static`` QDQ (per-channel weights, calibrated on real frames) suits
  convnext_atto..nano whose MLPs are 1x1 convs; ``dynamic`` (MatMul only) suits tiny/base
  whose MLPs are Linear.  ``auto`` picks by architecture.  The drift against fp32 (max |prob
  diff|, argmax agreement) is measured and written to the manifest.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from inference.types import CLASS_NAMES

log = logging.getLogger(__name__)

OPSET = 17
STATIC_INT8_ARCHS = ("convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano")


def export_onnx(model, path: str | Path, size: int, channels: int = 1) -> Path:
    import torch

    path = Path(path)
    model.eval()
    dummy = torch.zeros(2, channels, size, size)
    torch.onnx.export(
        model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return path


def _session(path: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def ort_logits(path: Path, x: np.ndarray, batch: int = 32, threads: int = 2) -> np.ndarray:
    s = _session(path, threads)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: np.ascontiguousarray(x[i:i + batch], dtype=np.float32)})[0]
                           for i in range(0, len(x), batch)])


def torch_logits(model, x: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch

    model.eval()
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(np.asarray(x[i:i + batch], dtype=np.float32))).numpy()
                               for i in range(0, len(x), batch)])


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def parity(model, onnx_path: Path, x: np.ndarray) -> dict:
    a = torch_logits(model, x)
    b = ort_logits(onnx_path, x)
    return {
        "samples": int(len(x)),
        "max_abs_logit_diff": float(np.abs(a - b).max()),
        "max_abs_prob_diff": float(np.abs(_softmax(a) - _softmax(b)).max()),
        "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
    }


def drift(fp32_path: Path, int8_path: Path, x: np.ndarray, y: Optional[np.ndarray] = None) -> dict:
    a = ort_logits(fp32_path, x)
    b = ort_logits(int8_path, x)
    pa, pb = _softmax(a), _softmax(b)
    d = {
        "samples": int(len(x)),
        "max_abs_prob_diff": round(float(np.abs(pa - pb).max()), 5),
        "mean_abs_prob_diff": round(float(np.abs(pa - pb).mean()), 5),
        "argmax_agreement": round(float((a.argmax(1) == b.argmax(1)).mean()), 4),
    }
    if y is not None and len(y):
        d["accuracy_fp32"] = round(float((a.argmax(1) == y).mean()), 4)
        d["accuracy_int8"] = round(float((b.argmax(1) == y).mean()), 4)
        side = np.array([0 if CLASS_NAMES[i].startswith("LCA") else 1 for i in range(len(CLASS_NAMES))])
        d["laterality_agreement"] = round(float((side[a.argmax(1)] == side[b.argmax(1)]).mean()), 4)
    return d


class _Calib:
    def __init__(self, x: np.ndarray, name: str, batch: int = 8):
        self.it = iter([{name: np.ascontiguousarray(x[i:i + batch], dtype=np.float32)}
                        for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.it, None)


def quantize(fp32_path: Path, out_path: Path, method: str, arch: str, calib: np.ndarray) -> str:
    """int8 model at ``out_path``; returns the method used ("static" | "dynamic")."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    if method == "auto":
        method = "static" if arch.startswith(STATIC_INT8_ARCHS) else "dynamic"
    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing is an optimisation, not a requirement
            log.warning("quant_pre_process failed (%s); quantizing the raw model", exc)
            shutil.copy(fp32_path, pre)
        if method == "static":
            quantize_static(str(pre), str(out_path), _Calib(calib, "input"), quant_format=QuantFormat.QDQ,
                            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        elif method == "dynamic":
            quantize_dynamic(str(pre), str(out_path), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
        else:
            raise ValueError(f"unknown int8 method {method!r} (auto | static | dynamic)")
    return method


def _sample_frames(data: Optional[str], spec: dict, n: int, seed: int = 0,
                   cache: Optional[str] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Real preprocessed frames (validation split) when a dataset is given, else random inputs."""
    rng = np.random.default_rng(seed)
    if data:
        from training.selector.data import build_frameset, split_frameset

        fs = build_frameset(data, spec, cache_dir=cache)
        _, va = split_frameset(fs, seed=seed)
        src = va if len(va) else fs
        sel = rng.choice(len(src), size=min(n, len(src)), replace=False)
        return np.asarray(src.X[np.sort(sel)], dtype=np.float32), src.y[np.sort(sel)]
    s, c = spec["input_size"], spec["channels"]
    x = ((rng.random((n, c, s, s), dtype=np.float32) - spec["mean"]) / spec["std"]).astype(np.float32)
    return x, None


def export_bundle(checkpoint: str | Path, bundle_dir: str | Path, *, int8: bool = False, int8_method: str = "auto",
                  data: Optional[str] = None, cache: Optional[str] = None, parity_samples: int = 64,
                  tol: float = 1e-3, metrics: Optional[dict] = None, version: Optional[str] = None) -> dict:
    """Export ``checkpoint`` into ``bundle_dir`` and update its manifest; returns the selector section."""
    from inference.bundle import Preprocessing, SelectorSpec, sha256_file, update_manifest
    from training.selector.train import load_checkpoint, model_from_checkpoint

    ck = load_checkpoint(checkpoint)
    cfg = ck["config"]
    spec = dict(ck.get("spec") or {"input_size": cfg["size"], "channels": cfg.get("channels", 1),
                                   "mean": cfg.get("mean", 0.5), "std": cfg.get("std", 0.25)})
    model = model_from_checkpoint(ck)
    bundle = Path(bundle_dir)
    bundle.mkdir(parents=True, exist_ok=True)
    x, y = _sample_frames(data, spec, parity_samples, seed=cfg.get("seed", 0), cache=cache)
    with tempfile.TemporaryDirectory(dir=bundle) as td:
        fp32 = Path(td) / "selector.fp32.onnx"
        export_onnx(model, fp32, spec["input_size"], spec["channels"])
        par = parity(model, fp32, x)
        log.info("ONNX parity: %s", par)
        if par["max_abs_logit_diff"] > tol or par["argmax_agreement"] < 1.0:
            raise RuntimeError(f"ONNX export does not match torch: {par}")
        quant = None
        final = fp32
        if int8:
            q = Path(td) / "selector.int8.onnx"
            method = quantize(fp32, q, int8_method, cfg["arch"], x)
            quant = {"method": method, "drift": drift(fp32, q, x, y)}
            log.info("int8 (%s) drift vs fp32: %s", method, quant["drift"])
            final = q
        target = bundle / "selector.onnx"
        shutil.copy(final, target.with_suffix(".onnx.tmp"))
        os.replace(target.with_suffix(".onnx.tmp"), target)
    digest = sha256_file(target)
    m = metrics if metrics is not None else ck.get("metrics") or {}
    section = SelectorSpec(
        file="selector.onnx",
        arch=cfg["arch"],
        preprocessing=Preprocessing(**spec),
        sha256=digest,
        version=version or f"s{ck.get('step', 0)}-{digest[:8]}",
        training={
            "steps": ck.get("step"),
            "batch": cfg.get("batch"),
            "lr": cfg.get("lr"),
            "optimizer": "AdamW",
            "loss": "cross-entropy",
            "augment": cfg.get("augment"),
            "balance": cfg.get("balance", "class"),
            "ema": cfg.get("ema", 0.0),
            "bg_swap": cfg.get("bg_swap", 0.0),
            "seed": cfg.get("seed"),
            "data": ck.get("data", {}),
            "split": "by study",
        },
        metrics=_compact_metrics(m),
    ).model_dump()
    section.update({
        "output": "logits",
        "input_name": "input",
        "opset": OPSET,
        "precision": "int8" if int8 else "fp32",
        "quantization": quant,
        "parity": {k: (round(v, 8) if isinstance(v, float) else v) for k, v in par.items()},
    })
    update_manifest(bundle, selector=section)
    return section


def _compact_metrics(m: dict) -> dict:
    keep = ("laterality_f1", "laterality_accuracy", "key_frame_accuracy", "macro_f1", "accuracy",
            "frame_laterality_f1", "per_class_f1", "confusion_matrix", "runs", "frames")
    return {k: m[k] for k in keep if k in m}


def main_export(args) -> int:
    section = export_bundle(args.checkpoint, args.bundle, int8=args.int8, int8_method=args.int8_method,
                            data=args.data, tol=args.tol)
    print(json.dumps({k: section.get(k) for k in ("file", "arch", "sha256", "version", "precision", "parity",
                                                   "quantization")}, indent=2))
    return 0
