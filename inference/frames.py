"""Frame extraction: any stored XA/RF run -> display-ready grayscale frames, streamed.

One run (a multi-frame or single-frame image instance) is opened with :func:`open_run`
(header only) and its frames are decoded one at a time with ``pydicom.pixels.iter_pixels``,
so memory does not grow with the length of the run.  Every frame goes through the display
pipeline of PS3.3 C.11 / C.7.6.11:

1. decode (native, JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE:
   pydicom's decoders plus the pylibjpeg / pyjpegls plugins);
2. Modality LUT (``apply_modality_lut``: rescale slope/intercept or a Modality LUT Sequence);
3. VOI LUT or window (``apply_voi_lut``; the output range of the transform is found by
   probing it, so linear / linear-exact / sigmoid windows and LUTs are all normalised to
   [0, 1]); without any VOI the frame's own min..max is used;
4. MONOCHROME1 inversion;
5. display shutters (rectangular, circular, polygonal; the visible area is their
   intersection) set to black.

:func:`preprocess` turns a display frame into the model input: letterbox to square, resize
to ``spec.input_size`` (bilinear with antialiasing, PIL), normalise with ``spec.mean`` /
``spec.std`` and replicate to ``spec.channels``.  Training (``training.selector.data``) and
serving (``inference.selector``) both call exactly this function: no train/serve skew.

No torch here (``inference`` must run without it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

log = logging.getLogger(__name__)


class FrameError(RuntimeError):
    """A run whose frames cannot be read (not DICOM, no pixel data, undecodable)."""


@dataclass
class FrameStats:
    """Per-frame statistics used for candidate sampling (computed on modality values)."""

    index: int  # 0-based
    mean: float
    var: float


@dataclass
class Run:
    """One stored run: its identifying header fields and a streaming frame reader.

    Only the header is kept in memory (``pixel data`` is never loaded as a whole).
    """

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    modality: str
    n_frames: int
    rows: int
    columns: int
    bits_stored: int
    photometric: str
    transfer_syntax: str
    header: Any = field(repr=False)  # pydicom Dataset without PixelData

    # -- display pipeline ---------------------------------------------------
    def _setup(self) -> None:
        if getattr(self, "_ready", False):
            return
        from pydicom.pixels import apply_modality_lut, apply_voi_lut

        ds = self.header
        self._modality_lut = apply_modality_lut
        self._voi_lut = apply_voi_lut
        has_voi = ("VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0) or (
            "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowCenter is not None and ds.WindowWidth is not None
        )
        self._voi_range: Optional[tuple[float, float]] = None
        self._voi_is_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
        if has_voi:
            try:
                # Probe the monotone VOI transform at both ends of any possible input: its output
                # range (window: y_min..y_max; LUT: first..last entry, inverted LUTs included).
                probe = np.array([-(2**40), 2**40], dtype=np.int64)
                lo, hi = (float(v) for v in apply_voi_lut(probe, ds))
                if np.isfinite(lo) and np.isfinite(hi) and abs(hi - lo) > 1e-9:
                    self._voi_range = (lo, hi)
                else:
                    log.warning("%s: degenerate VOI transform; using min-max", self.path)
            except Exception as exc:  # a malformed window must not lose the run
                log.warning("%s: VOI LUT/window unusable (%s); using min-max", self.path, exc)
        self._invert = self.photometric == "MONOCHROME1"
        self._mask = shutter_mask(ds, self.rows, self.columns)
        self._ready = True

    def to_display(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(modality-space frame as float32, display frame in [0, 1] float32) for one decoded frame."""
        self._setup()
        arr = raw
        if arr.ndim == 3:  # colour (rare for XA): luminance
            arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        ds = self.header
        try:
            mod = self._modality_lut(arr, ds)
        except Exception as exc:
            log.debug("%s: modality LUT failed (%s); using stored values", self.path, exc)
            mod = arr
        mod32 = np.asarray(mod, dtype=np.float32)
        disp: np.ndarray
        if self._voi_range is not None:
            lo, hi = self._voi_range
            voi_in = mod
            if self._voi_is_lut and not np.issubdtype(np.asarray(mod).dtype, np.integer):
                voi_in = np.rint(mod).astype(np.int64)  # a LUT is indexed by integers
            try:
                v = self._voi_lut(voi_in, ds)
                disp = ((np.asarray(v, dtype=np.float32) - lo) / (hi - lo)).astype(np.float32, copy=False)
            except Exception as exc:
                log.debug("%s: VOI failed on frame (%s); using min-max", self.path, exc)
                disp = _minmax(mod32)
        else:
            disp = _minmax(mod32)
        np.clip(disp, 0.0, 1.0, out=disp)
        if self._invert:
            disp = 1.0 - disp
        if self._mask is not None:
            disp = disp * self._mask
        return mod32, disp.astype(np.float32, copy=False)

    # -- streaming ----------------------------------------------------------
    def iter_decoded(self, indices: Optional[Iterable[int]] = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (0-based index, decoded stored-value frame) one at a time."""
        from pydicom.pixels import iter_pixels

        idx = None if indices is None else sorted(set(int(i) for i in indices))
        if idx is not None:
            bad = [i for i in idx if not 0 <= i < self.n_frames]
            if bad:
                raise FrameError(f"{self.path}: frame index out of range: {bad[:5]} (n_frames={self.n_frames})")
            if not idx:
                return
        it = iter_pixels(str(self.path), indices=idx)
        k = 0
        while True:
            try:
                arr = next(it)
            except StopIteration:
                return
            except Exception as exc:
                raise FrameError(f"{self.path.name}: cannot decode frame {(idx[k] if idx else k) + 1} "
                                 f"({self.transfer_syntax}): {_short(exc)}") from exc
            yield (idx[k] if idx is not None else k), arr
            k += 1

    def iter_frames(self, indices: Optional[Iterable[int]] = None) -> Iterator[np.ndarray]:
        """Yield display-ready float32 (rows, columns) frames in [0, 1], streaming."""
        for _, raw in self.iter_decoded(indices):
            yield self.to_display(raw)[1]

    def iter_frames_with_stats(self, indices: Optional[Iterable[int]] = None) -> Iterator[tuple[np.ndarray, FrameStats]]:
        """Yield (display frame, FrameStats) with mean/variance of the modality-space frame
        (independent of any per-frame display normalisation)."""
        for i, raw in self.iter_decoded(indices):
            mod, disp = self.to_display(raw)
            if self._mask is not None:
                vals = mod[self._mask > 0]
                if vals.size == 0:
                    vals = mod
            else:
                vals = mod
            m = float(vals.mean(dtype=np.float64))
            v = float(vals.var(dtype=np.float64))
            yield disp, FrameStats(i, m, v)

    def frame(self, frame_number: int) -> np.ndarray:
        """One display frame by 1-based frame number."""
        for f in self.iter_frames([frame_number - 1]):
            return f
        raise FrameError(f"{self.path}: no frame {frame_number}")


def _short(exc: BaseException) -> str:
    s = " ".join(str(exc).split())
    return s[:300] + ("..." if len(s) > 300 else "")


def _minmax(a: np.ndarray) -> np.ndarray:
    lo = float(a.min()) if a.size else 0.0
    hi = float(a.max()) if a.size else 0.0
    if hi - lo < 1e-12:
        return np.zeros(a.shape, np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32, copy=False)


def shutter_mask(ds: Any, rows: int, cols: int) -> Optional[np.ndarray]:
    """A float32 (rows, cols) mask, 1 inside the visible area of the display shutters, else None.

    Coordinates are 1-based (row, column) as in PS3.3 C.7.6.11; several shapes intersect.
    """
    shapes = ds.get("ShutterShape")
    if not shapes:
        return None
    if isinstance(shapes, str):
        shapes = [shapes]
    shapes = [str(s).upper().strip() for s in shapes]
    rr = np.arange(1, rows + 1, dtype=np.float32)[:, None]
    cc = np.arange(1, cols + 1, dtype=np.float32)[None, :]
    mask = np.ones((rows, cols), dtype=bool)
    used = False
    try:
        if "RECTANGULAR" in shapes:
            left = float(ds.ShutterLeftVerticalEdge)
            right = float(ds.ShutterRightVerticalEdge)
            upper = float(ds.ShutterUpperHorizontalEdge)
            lower = float(ds.ShutterLowerHorizontalEdge)
            mask &= (cc >= left) & (cc <= right) & (rr >= upper) & (rr <= lower)
            used = True
        if "CIRCULAR" in shapes:
            cy, cx = (float(v) for v in ds.CenterOfCircularShutter)
            rad = float(ds.RadiusOfCircularShutter)
            mask &= (rr - cy) ** 2 + (cc - cx) ** 2 <= rad * rad
            used = True
        if "POLYGONAL" in shapes:
            v = [float(x) for x in ds.VerticesOfThePolygonalShutter]
            poly = np.array(v, dtype=np.float64).reshape(-1, 2)  # (row, col) pairs
            mask &= _polygon_mask(poly, rows, cols)
            used = True
    except (AttributeError, TypeError, ValueError) as exc:
        log.warning("ignoring malformed display shutter: %s", exc)
        return None
    if not used:
        return None
    if not mask.any():
        log.warning("display shutter hides the whole image; ignoring it")
        return None
    return mask.astype(np.float32)


def _polygon_mask(poly: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Even-odd point-in-polygon test on pixel centres (1-based row, col vertices)."""
    rr = np.arange(1, rows + 1, dtype=np.float64)[:, None]
    cc = np.arange(1, cols + 1, dtype=np.float64)[None, :]
    inside = np.zeros((rows, cols), dtype=bool)
    n = len(poly)
    for i in range(n):
        r1, c1 = poly[i]
        r2, c2 = poly[(i + 1) % n]
        if r1 == r2:
            continue
        cond = (rr >= min(r1, r2)) & (rr < max(r1, r2))
        xcross = c1 + (rr - r1) * (c2 - c1) / (r2 - r1)
        inside ^= cond & (cc < xcross)
    return inside


def open_run(path: str | os.PathLike) -> Run:
    """Read a run's header (no pixel data).  Raises :class:`FrameError` when it has no frames."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    p = Path(path)
    try:
        ds = pydicom.dcmread(str(p), stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise FrameError(f"{p.name}: not a readable DICOM file: {_short(exc)}") from exc
    # stop_before_pixels stops before (7FE0,0010): confirm the element exists by peeking.
    if not _has_pixel_data(p):
        raise FrameError(f"{p.name}: no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise FrameError(f"{p.name}: missing Rows/Columns") from exc
    try:
        n = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n = 1
    fm = getattr(ds, "file_meta", None)
    ts = str(getattr(fm, "TransferSyntaxUID", "")) if fm is not None else ""
    try:
        import pydicom.uid as _uid

        ts_name = _uid.UID(ts).name if ts else "unknown"
    except Exception:
        ts_name = ts
    return Run(
        path=p,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        modality=str(ds.get("Modality", "")),
        n_frames=max(n, 1),
        rows=rows,
        columns=cols,
        bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper(),
        transfer_syntax=ts_name,
        header=ds,
    )


def _has_pixel_data(p: Path) -> bool:
    import pydicom

    try:
        ds = pydicom.dcmread(str(p), specific_tags=[0x7FE00010, 0x7FE00008, 0x7FE00009], defer_size=256)
    except Exception:
        return True  # let the decoder give the precise error
    return any(t in ds for t in (0x7FE00010, 0x7FE00008, 0x7FE00009))


def iter_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """Display frames of the run at ``path`` (see :meth:`Run.iter_frames`)."""
    yield from open_run(path).iter_frames()


def read_frame(path: str | os.PathLike, frame_number: int) -> np.ndarray:
    """One display frame (float32 in [0, 1]) by 1-based frame number; decodes only that frame."""
    return open_run(path).frame(frame_number)


def read_frames(path: str | os.PathLike, frame_numbers: Iterable[int]) -> dict[int, np.ndarray]:
    """Display frames by 1-based frame number, ``{number: frame}``; decodes only those frames,
    opening the run once."""
    wanted = sorted(set(int(n) for n in frame_numbers))
    return dict(zip(wanted, open_run(path).iter_frames([n - 1 for n in wanted])))


# -- model input ----------------------------------------------------------------


def _spec_values(spec: Any) -> tuple[int, int, float, float, str]:
    if isinstance(spec, dict):
        get = spec.get
    else:
        def get(k, d=None, _s=spec):
            return getattr(_s, k, d)
    return (int(get("input_size", 224)), int(get("channels", 1) or 1), float(get("mean", 0.5)),
            float(get("std", 0.25)), str(get("normalize", "none") or "none"))


def resize_square(frame: np.ndarray, size: int) -> np.ndarray:
    """Letterbox a 2-D float frame to a square (black padding, centred) and resize to ``size``."""
    from PIL import Image

    f = np.asarray(frame, dtype=np.float32)
    if f.ndim != 2:
        raise ValueError(f"expected a 2-D frame, got shape {f.shape}")
    h, w = f.shape
    if h != w:
        s = max(h, w)
        sq = np.zeros((s, s), np.float32)
        y0, x0 = (s - h) // 2, (s - w) // 2
        sq[y0:y0 + h, x0:x0 + w] = f
        f = sq
    if f.shape[0] == size:
        return np.ascontiguousarray(f)
    img = Image.fromarray(f, mode="F") if _PIL_NEEDS_MODE else Image.fromarray(f)
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)


try:  # Pillow >= 11 deprecates the mode argument of fromarray
    import PIL

    _PIL_NEEDS_MODE = int(PIL.__version__.split(".")[0]) < 11
except Exception:  # pragma: no cover
    _PIL_NEEDS_MODE = True


#: Frame normalisations a bundle can name (``Preprocessing.normalize``).
NORMALIZATIONS = ("none", "flatfield")


def box_blur(img: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window of the last two axes (edges replicated), by cumulative sums:
    O(pixels) for any r; leading batch axes are allowed."""
    a = np.asarray(img, dtype=np.float32)
    if r < 1:
        return a
    k = 2 * r + 1
    for ax in (-2, -1):
        pad = [(0, 0)] * a.ndim
        pad[ax] = (r + 1, r)
        c = np.cumsum(np.pad(a, pad, mode="edge"), axis=ax)
        hi = [slice(None)] * a.ndim
        lo = [slice(None)] * a.ndim
        hi[ax] = slice(k, None)
        lo[ax] = slice(0, -k)
        a = (c[tuple(hi)] - c[tuple(lo)]) * np.float32(1.0 / k)
    return a


def smooth(img: np.ndarray, r: int) -> np.ndarray:
    """Three box passes of radius ``r``: close to a Gaussian of sigma ~ r (no scipy needed)."""
    for _ in range(3):
        img = box_blur(img, r)
    return img


def exposed_field(x: np.ndarray) -> np.ndarray:
    """1 where the frame was exposed, 0 under shutters, outside the image-intensifier circle
    and in letterbox bands (any leading batch axes).

    Unexposed pixels are black (below 3 % of the frame's 95th percentile) *and* connected to
    the image border, as every shutter, circle and letterbox band is; dark areas enclosed by the
    field (a dense heart shadow, the contrast-filled ostium) stay in it.  Thin dark vessels that
    reach the border are kept by a closing of the bright pixels.  The field is then stepped back
    a little from its edge.
    """
    s = x.shape[-1]
    level = np.percentile(x.reshape(x.shape[:-2] + (-1,)), 95, axis=-1)[..., None, None]
    lit = x > np.maximum(0.004, 0.03 * level)
    dark = ~lit
    border = np.zeros(x.shape[-2:], bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    step = max(1, s // 24)
    # flood fill from the border through black pixels, jumping gaps of up to ``step`` pixels:
    # a geodesic dilation by a (2 step + 1)^2 square inside ``dark``, repeated until it stops
    # growing (scipy does it ~9x faster than the equivalent loop of box blurs it replaces;
    # the result is identical, tests/inference/test_frames.py)
    from scipy.ndimage import binary_dilation

    square = np.ones((1,) * (x.ndim - 2) + (2 * step + 1, 2 * step + 1), bool)
    outside = binary_dilation(dark & border, structure=square, iterations=0, mask=dark)
    r = max(2, s // 16)
    closed = box_blur((box_blur(lit.astype(np.float32), r) > 1e-3).astype(np.float32), r) > 1 - 1e-3
    field = (~outside | closed).astype(np.float32)
    return (box_blur(field, max(1, s // 64)) > 1 - 1e-3).astype(np.float32)


def flatfield(x: np.ndarray, field: Optional[np.ndarray] = None) -> np.ndarray:
    """Detail image of square display frames in [0, 1] (shape (S, S) or (B, S, S)) -> [0, 1].

    Why: real and synthetic runs (and two real cath labs) differ most in what a coronary
    classifier should ignore: overall brightness, gamma, window, vignetting, the large shadows
    of lungs, diaphragm and heart, and the shape of the collimated field.  So the frame is split
    into a smooth background (a blur of about 1/20 of the frame, over the exposed field only)
    and the detail on top of it (vessels, catheter, bone edges, noise); the detail is divided by
    its own RMS inside the field and mapped to 0.5 + z/8 (clipped at 4 RMS).  Outside the
    exposed field (shutters, letterbox, image-intensifier circle) the output is 0.5, i.e. "no
    detail", so collimation is no cue.  Dark vessels stay darker than their surroundings.

    ``field``: the frames' :func:`exposed_field` when the caller has it already (training
    computes it once per cached frame: it is the costly part, and photometric augmentation
    does not move a shutter).
    """
    x = np.asarray(x, dtype=np.float32)
    s = x.shape[-1]
    field = exposed_field(x) if field is None else np.asarray(field, dtype=np.float32)
    n = field.sum(axis=(-2, -1), keepdims=True)
    # a black or nearly black frame: treat all of it as exposed
    field = np.where(n < 0.05 * s * s, np.float32(1), field)
    r = max(2, s // 36)
    w = smooth(field, r)
    bg = smooth(x * field, r) / np.maximum(w, 1e-3)
    d = (x - bg) * field
    rms = np.sqrt((d * d).sum(axis=(-2, -1), keepdims=True, dtype=np.float64)
                  / np.maximum(field.sum(axis=(-2, -1), keepdims=True), 1.0))
    z = np.clip(d / np.maximum(rms, 1e-4), -4.0, 4.0)
    return np.where(field > 0, 0.5 + z * 0.125, 0.5).astype(np.float32)


def normalize_frame(x: np.ndarray, method: str, field: Optional[np.ndarray] = None) -> np.ndarray:
    """Apply a named normalisation (``NORMALIZATIONS``) to square frames in [0, 1]."""
    if method == "none":
        return x
    if method == "flatfield":
        return flatfield(x, field)
    raise ValueError(f"unknown preprocessing normalize {method!r} (one of {', '.join(NORMALIZATIONS)})")


def model_frame(frame: np.ndarray, spec: Any) -> np.ndarray:
    """Step 1 of :func:`preprocess`: letterbox + resize a display frame to the model's square
    size, still a display image in [0, 1] (training augments here, then calls
    :func:`finish_input`)."""
    return resize_square(frame, _spec_values(spec)[0])


def finish_input(x: np.ndarray, spec: Any, field: Optional[np.ndarray] = None) -> np.ndarray:
    """Step 2 of :func:`preprocess`: square display frame(s) (S, S) or (B, S, S) in [0, 1] ->
    model input (C, S, S) or (B, C, S, S): the bundle's ``normalize``, ``(x - mean) / std``,
    channels replicated."""
    _, channels, mean, std, method = _spec_values(spec)
    x = normalize_frame(np.asarray(x, dtype=np.float32), method, field)
    x = ((x - np.float32(mean)) / np.float32(std)).astype(np.float32, copy=False)
    x = np.expand_dims(x, -3)
    if channels > 1:
        x = np.repeat(x, channels, axis=-3)
    return np.ascontiguousarray(x)


def preprocess(frame: np.ndarray, spec: Any) -> np.ndarray:
    """Display frame (H, W) in [0, 1] -> model input (C, S, S) float32, normalised.

    ``spec`` is an ``inference.bundle.Preprocessing`` (or a dict with ``input_size``,
    ``channels``, ``mean``, ``std`` and optionally ``normalize``).  The one function used by
    training and serving: :func:`model_frame` (letterbox + resize), then :func:`finish_input`
    (the frame normalisation the bundle names, see :func:`flatfield`, and ``(x - mean) / std``).
    """
    return finish_input(model_frame(frame, spec), spec)
