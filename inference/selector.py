"""The key-frame and laterality selector, in ONNX Runtime (no torch).

For one run: frames stream through the display pipeline (``inference.frames``); per-frame
mean / variance feed the candidate detector (``inference.candidates``) on the fly; the
candidate frames are preprocessed with the bundle's ``Preprocessing`` and classified in
batches by the 6-class ConvNeXt (``inference.types.CLASS_NAMES``).  Then

* laterality = the side with the larger mean side probability (P(side_better) +
  P(side_bad) + P(side_other)) over the candidate frames, contrast-filled frames weighted
  higher (weight 1 - P(*_other) / 2); ``confidence`` is that mean probability;
* key frames = candidates ranked by P(side_better), best first, at most ``max_key_frames``
  (and, candidates being so, at least ``min_gap`` apart).  The best is always kept; further
  ones only when the model calls them ``side_better``.

Memory is bounded by ``min_gap + 1 + batch_size`` preprocessed frames, whatever the run length.
An unreadable run gives ``RunSelection(error=...)``, never an exception.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from inference.candidates import CandidateTracker
from inference.frames import FrameError, open_run, preprocess
from inference.types import CLASS_NAMES, SIDES, KeyFrame, RunSelection

log = logging.getLogger(__name__)

_SIDE_IDX = {s: [i for i, c in enumerate(CLASS_NAMES) if c.startswith(s + "_")] for s in SIDES}
_OTHER_IDX = [i for i, c in enumerate(CLASS_NAMES) if c.endswith("_other")]


class SelectorError(RuntimeError):
    """The selector model cannot be loaded."""


def resolve_providers(providers: Sequence[str] | None = ("auto",)) -> list[str]:
    """ORT execution providers: ``auto`` = CUDA when available, then CPU; unknown ones dropped."""
    import onnxruntime as ort

    avail = ort.get_available_providers()
    want: list[str] = []
    for p in providers or ["auto"]:
        p = str(p)
        if p.lower() == "auto":
            want += [q for q in ("CUDAExecutionProvider",) if q in avail]
        elif p.lower() in ("cpu", "cuda"):
            q = "CPUExecutionProvider" if p.lower() == "cpu" else "CUDAExecutionProvider"
            if q in avail:
                want.append(q)
            else:
                log.warning("execution provider %s not available (have %s)", q, avail)
        elif p in avail:
            want.append(p)
        else:
            log.warning("execution provider %s not available (have %s)", p, avail)
    want.append("CPUExecutionProvider")
    out: list[str] = []
    for p in want:
        if p not in out:
            out.append(p)
    return out


def ort_session(path: str | os.PathLike, threads: int = 2, providers: Sequence[str] | None = ("auto",)):
    """An ONNX Runtime session for one of the bundle's models: ``threads`` intra-op threads, one
    inter-op thread, full graph optimisation, quiet logging, ``providers`` resolved
    (:func:`resolve_providers`).  Raises what ONNX Runtime raises; callers name the model."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=resolve_providers(providers))


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class Selector:
    """``Selector(bundle, threads=2, batch_size=16, providers=["auto"])``.

    ``bundle`` is an ``inference.bundle.Bundle`` or a bundle directory.
    """

    def __init__(self, bundle: Any, threads: int = 2, batch_size: int = 16,
                 providers: Sequence[str] | None = ("auto",)):
        from inference.bundle import Bundle, BundleError

        if isinstance(bundle, (str, os.PathLike)):
            bundle = Bundle.load(bundle)
        self.bundle = bundle
        spec = bundle.manifest.selector
        if spec is None:
            raise BundleError(f"bundle {bundle.root}: no selector section in the manifest")
        self.spec = spec
        self.preprocessing = spec.preprocessing
        self.batch_size = max(1, int(batch_size))
        self.threads = max(1, int(threads))
        self.providers = resolve_providers(providers)
        path = bundle.selector_path
        try:
            self.session = ort_session(path, self.threads, self.providers)
        except Exception as exc:
            raise SelectorError(f"cannot load selector model {path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_is_probs = str(spec.output).lower().startswith("prob")  # (a declared manifest key)
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(CLASS_NAMES):
            raise SelectorError(f"selector model has {n_out} outputs, expected {len(CLASS_NAMES)}")

    # -- model --------------------------------------------------------------
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N, 6) for preprocessed inputs (N, C, S, S), in batches."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[None]
        out = []
        for i in range(0, len(x), self.batch_size):
            y = self.session.run(None, {self.input_name: np.ascontiguousarray(x[i:i + self.batch_size])})[0]
            out.append(y if self.output_is_probs else softmax(y))
        if not out:
            return np.zeros((0, len(CLASS_NAMES)), np.float32)
        return np.concatenate(out).astype(np.float32)

    def predict_frames(self, frames: Iterable[np.ndarray]) -> np.ndarray:
        """Class probabilities for display frames (H, W) in [0, 1]."""
        return self.predict(np.stack([preprocess(f, self.preprocessing) for f in frames]))

    # -- runs ---------------------------------------------------------------
    def score_run(self, path: str | os.PathLike, min_gap: int = 5, all_frames: bool = False
                  ) -> tuple[Any, list[int], np.ndarray]:
        """(Run, 0-based scored frame indices, probabilities) — candidates only unless ``all_frames``.

        Streams: memory is bounded by ``min_gap + 1 + batch_size`` preprocessed frames.
        Raises FrameError on an unreadable run.
        """
        run = open_run(path)
        tracker = CandidateTracker(min_gap)
        pending: dict[int, np.ndarray] = {}
        batch_idx: list[int] = []
        batch_x: list[np.ndarray] = []
        idx_out: list[int] = []
        prob_out: list[np.ndarray] = []

        def flush():
            if batch_x:
                prob_out.append(self.predict(np.stack(batch_x)))
                idx_out.extend(batch_idx)
                batch_x.clear()
                batch_idx.clear()

        def take(accepted: list[int]):
            for i in accepted:
                batch_idx.append(i)
                batch_x.append(pending[i])
                if len(batch_x) >= self.batch_size:
                    flush()

        for disp, st in run.iter_frames_with_stats():
            pending[st.index] = preprocess(disp, self.preprocessing)
            if all_frames:
                take([st.index])
                pending.pop(st.index, None)
                tracker.push(st.index, st.mean, st.var)
                continue
            take(tracker.push(st.index, st.mean, st.var))
            for k in [k for k in pending if k < tracker.decided_upto]:
                del pending[k]
        fin = tracker.finish()
        if not all_frames:
            take(fin)
        flush()
        pending.clear()
        # (for single-threaded callers such as evaluation with all_frames=True; select_run
        # itself never reads it, so a Selector shared by worker threads stays correct)
        self.last_candidates = list(tracker.accepted)
        probs = np.concatenate(prob_out) if prob_out else np.zeros((0, len(CLASS_NAMES)), np.float32)
        return run, idx_out, probs

    def select_run(self, path: str | os.PathLike, min_gap: int = 5, max_key_frames: int = 2) -> RunSelection:
        """Laterality, confidence, key frames (best first) and candidates of one run."""
        t0 = time.monotonic()
        path = Path(path)
        try:
            run, idx, probs = self.score_run(path, min_gap=min_gap)
        except FrameError as exc:
            return _error_selection(path, str(exc))
        except Exception as exc:  # never let one run take the study down
            log.exception("selector failed on %s", path)
            return _error_selection(path, f"{path.name}: selector failed: {type(exc).__name__}: {exc}")
        sel = RunSelection(
            file=str(path),
            sop_instance_uid=run.sop_instance_uid,
            series_instance_uid=run.series_instance_uid,
            sop_class_uid=run.sop_class_uid,
            n_frames=run.n_frames,
            candidates=[i + 1 for i in idx],
        )
        if len(idx) == 0:
            sel.error = f"{path.name}: no frames"
            return sel
        side, conf = aggregate_laterality(probs)
        sel.laterality = side  # type: ignore[assignment]
        sel.confidence = round(float(conf), 6)
        sel.key_frames = rank_key_frames(idx, probs, side, max_key_frames)
        log.debug("selector %s: %d frames, %d candidates, %s %.3f, key %s (%.2fs)", path.name, run.n_frames,
                  len(idx), side, conf, [k.frame_number for k in sel.key_frames], time.monotonic() - t0)
        return sel

    def select_study(self, paths: Iterable[str | os.PathLike], min_gap: int = 5,
                     max_key_frames: int = 2) -> list[RunSelection]:
        return [self.select_run(p, min_gap=min_gap, max_key_frames=max_key_frames) for p in paths]


def aggregate_laterality(probs: np.ndarray) -> tuple[str, float]:
    """(side, mean P(side)) over frames; contrast frames (low P(*_other)) count more."""
    probs = np.asarray(probs, dtype=np.float64)
    w = 1.0 - 0.5 * probs[:, _OTHER_IDX].sum(axis=1)
    w = w / w.sum()
    p_side = {s: float((probs[:, ix].sum(axis=1) * w).sum()) for s, ix in _SIDE_IDX.items()}
    side = max(SIDES, key=lambda s: p_side[s])
    return side, p_side[side]


def rank_key_frames(idx: Sequence[int], probs: np.ndarray, side: str, max_key_frames: int) -> list[KeyFrame]:
    """Candidates ranked by P(side_better), best first; the first always, others if labelled better."""
    better = CLASS_NAMES.index(f"{side}_better")
    order = sorted(range(len(idx)), key=lambda j: (-float(probs[j, better]), idx[j]))
    out: list[KeyFrame] = []
    for j in order:
        if len(out) >= max(1, int(max_key_frames)):
            break
        label = CLASS_NAMES[int(np.argmax(probs[j]))]
        if out and label != CLASS_NAMES[better]:
            continue
        out.append(KeyFrame(frame_number=int(idx[j]) + 1, label=label, score=round(float(probs[j, better]), 6)))
    return out


def _error_selection(path: Path, message: str) -> RunSelection:
    uid = series = cls = ""
    n = 0
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        uid = str(ds.get("SOPInstanceUID", ""))
        series = str(ds.get("SeriesInstanceUID", ""))
        cls = str(ds.get("SOPClassUID", ""))
        n = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:
        pass
    return RunSelection(file=str(path), sop_instance_uid=uid, series_instance_uid=series, sop_class_uid=cls,
                        n_frames=n, error=message)
