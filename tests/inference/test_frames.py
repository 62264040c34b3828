import tracemalloc

import numpy as np
import pytest

from inference.bundle import Preprocessing
from inference.frames import FrameError, open_run, preprocess, read_frame, resize_square, shutter_mask

REAL = {
    # name: number of frames
    "ballerina-sample2-XA.dcm": 17,  # JPEG baseline, odd-length fragments
    "barre-XA-MONO2-8-12x-catheter.dcm": 12,  # JPEG lossless, invalid UIDs
    "chafey-XA1_JPH-htj2k.dcm": 1,  # HTJ2K
    "dbdicom-rubo0015-uncompressed.dcm": 1,
    "oncodata-FluroWithDisplayShutter.dcm": 1,
    "orthanc-KarstenHilbertRF.dcm": 1,  # Modality LUT Sequence
    "pipedicom-RF1-j2kr.dcm": 1,
    "wg04-XA1_J2KI.dcm": 1,
    "wg04-XA1_J2KR.dcm": 1,
    "wg04-XA1_JLSL.dcm": 1,  # JPEG-LS (pyjpegls)
    "wg04-XA1_JLSN.dcm": 1,
    "wg04-XA1_JPLL.dcm": 1,  # empty offset table, 8 fragments
    "wg04-XA1_RLE.dcm": 1,
    "wg04-XA1_UNC.dcm": 1,
}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_files_decode(real_xa_dir, name):
    p = real_xa_dir / name
    if not p.exists():
        pytest.skip(f"{name} absent")
    run = open_run(p)
    assert run.n_frames == REAL[name]
    n = 0
    for f in run.iter_frames():
        assert f.dtype == np.float32 and f.shape == (run.rows, run.columns)
        assert np.isfinite(f).all() and f.min() >= 0.0 and f.max() <= 1.0
        assert f.std() > 0.01  # an image, not a blank
        n += 1
    assert n == REAL[name]
    x = preprocess(f, Preprocessing(input_size=64))
    assert x.shape == (1, 64, 64) and x.dtype == np.float32


def test_all_transfer_syntaxes_agree(real_xa_dir):
    """The WG04 XA1 re-encodings decode to the same image (lossless ones exactly)."""
    ref = next(open_run(real_xa_dir / "wg04-XA1_UNC.dcm").iter_frames())
    for name in ["wg04-XA1_J2KR.dcm", "wg04-XA1_JLSL.dcm", "wg04-XA1_JPLL.dcm", "wg04-XA1_RLE.dcm",
                 "chafey-XA1_JPH-htj2k.dcm"]:
        f = next(open_run(real_xa_dir / name).iter_frames())
        assert np.abs(f - ref).max() < 1e-6, name
    for name in ["wg04-XA1_J2KI.dcm", "wg04-XA1_JLSN.dcm"]:
        f = next(open_run(real_xa_dir / name).iter_frames())
        assert np.abs(f - ref).mean() < 0.02, name


def test_undecodable_run_is_a_clean_error(real_xa_dir):
    run = open_run(real_xa_dir / "wg04-XA1_JPLY.dcm")  # the header is fine
    with pytest.raises(FrameError, match="cannot decode frame 1"):
        list(run.iter_frames())


def test_not_dicom_and_no_pixels(tmp_path):
    p = tmp_path / "x.dcm"
    p.write_bytes(b"not dicom at all" * 10)
    with pytest.raises(FrameError):
        open_run(p)
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(FrameError, match="no pixel data"):
        open_run(tmp_path / "sr.dcm")


def test_voi_window_applied_real(real_xa_dir):
    """oncodata: WC 640 / WW 588, linear window (PS3.3 C.11.2.1.2.1) inside the shutters."""
    import pydicom

    p = real_xa_dir / "oncodata-FluroWithDisplayShutter.dcm"
    raw = pydicom.dcmread(p).pixel_array.astype(np.float64)
    run = open_run(p)
    f = next(run.iter_frames())
    inside = run._mask > 0
    assert f[~inside].max() == 0.0
    mid = inside
    expect = (raw[mid] - 639.5) / 587 + 0.5
    assert np.abs(f[mid] - expect).max() < 1e-3


def test_window_on_generated_run(toy_run):
    p, _, frames = toy_run(window=(2000, 1000))
    f = next(open_run(p).iter_frames())
    raw = frames[0].astype(np.float64)
    expect = np.clip((raw - 1999.5) / 999 + 0.5, 0, 1)
    assert np.abs(f - expect).max() < 1e-4


def test_minmax_fallback_without_window(toy_run):
    p, _, frames = toy_run()
    for f, raw in zip(open_run(p).iter_frames(), frames):
        assert f.min() == 0.0 and f.max() == 1.0
        r = raw.astype(np.float64)
        assert np.abs(f - (r - r.min()) / (r.max() - r.min())).max() < 1e-5


def test_monochrome1_inverted(toy_run):
    p2, _, _ = toy_run(seed=5, window=(2000, 1500))
    import shutil

    p1 = p2.with_name("m1.dcm")
    shutil.copy(p2, p1)
    import pydicom

    ds = pydicom.dcmread(p1)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(p1)
    for a, b in zip(open_run(p2).iter_frames(), open_run(p1).iter_frames()):
        assert np.allclose(a + b, 1.0, atol=1e-6)


@pytest.mark.parametrize("bits", [8, 10, 12, 16])
def test_bit_depths(tmp_path, bits):
    from training.selector.toy import write_run

    maxv = 2**bits - 1
    frames = np.linspace(0, maxv, 3 * 16 * 16).reshape(3, 16, 16).round()
    p = write_run(tmp_path / f"b{bits}.dcm", frames, bits=bits, window=(maxv / 2 + 0.5, maxv + 1))
    out = list(open_run(p).iter_frames())
    assert len(out) == 3
    assert out[0][0, 0] == 0.0 and out[-1][-1, -1] == pytest.approx(1.0, abs=1e-3)
    assert all(np.all(np.diff(o.ravel()) >= 0) for o in out)  # monotone mapping


def test_shutter_masked_real(real_xa_dir):
    run = open_run(real_xa_dir / "oncodata-FluroWithDisplayShutter.dcm")
    f = next(run.iter_frames())
    m = run._mask
    assert m is not None and 0.2 < m.mean() < 0.95
    assert f[m == 0].max() == 0.0
    assert f[0, 0] == 0.0 and f[-1, -1] == 0.0
    assert f[m > 0].mean() > 0.05


def test_shutter_rectangular_circular_polygonal(toy_run):
    rect = {"ShutterShape": "RECTANGULAR", "ShutterLeftVerticalEdge": 11, "ShutterRightVerticalEdge": 50,
            "ShutterUpperHorizontalEdge": 5, "ShutterLowerHorizontalEdge": 60}
    p, _, _ = toy_run(shutter=rect, window=(2000, 4000))
    f = next(open_run(p).iter_frames())
    assert f[:, :10].max() == 0 and f[:, 50:].max() == 0 and f[:4].max() == 0 and f[60:].max() == 0
    assert f[4:60, 10:50].min() > 0
    circ = {"ShutterShape": ["CIRCULAR"], "CenterOfCircularShutter": [32, 32], "RadiusOfCircularShutter": 10}
    p, _, _ = toy_run(seed=2, shutter=circ, window=(2000, 4000))
    f = next(open_run(p).iter_frames())
    assert f[31, 31] > 0 and f[0, 0] == 0 and f[31, 50] == 0
    poly = {"ShutterShape": "POLYGONAL", "VerticesOfThePolygonalShutter": [1, 1, 1, 64, 64, 1]}  # a triangle
    p, _, _ = toy_run(seed=3, shutter=poly, window=(2000, 4000))
    f = next(open_run(p).iter_frames())
    assert f[2, 2] > 0 and f[60, 60] == 0


def test_shutter_mask_ignores_malformed():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.ShutterShape = "RECTANGULAR"  # edges missing
    assert shutter_mask(ds, 8, 8) is None


def test_streaming_memory_bounded(tmp_path):
    """Peak Python/numpy memory while streaming a long run stays near one frame, not the run."""
    from training.selector.toy import write_run

    n, size = 240, 256
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 4095, (size, size), dtype=np.uint16)
    frames = np.broadcast_to(frame, (n, size, size))
    p = write_run(tmp_path / "long.dcm", frames)
    run_bytes = n * size * size * 2  # 31 MB of pixel data
    run = open_run(p)
    tracemalloc.start()
    k = 0
    for disp, st in run.iter_frames_with_stats():
        k += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert k == n
    assert peak < run_bytes / 8, f"peak {peak / 1e6:.1f} MB for a {run_bytes / 1e6:.0f} MB run"


def test_read_frame_matches_stream(toy_run):
    p, _, _ = toy_run(n=9)
    frames = list(open_run(p).iter_frames())
    assert np.array_equal(read_frame(p, 7), frames[6])
    with pytest.raises(FrameError):
        read_frame(p, 10)


def test_preprocess_shapes_and_normalisation():
    spec = Preprocessing(input_size=32, mean=0.5, std=0.25)
    x = preprocess(np.full((100, 100), 0.5, np.float32), spec)
    assert x.shape == (1, 32, 32) and np.allclose(x, 0.0)
    x = preprocess(np.ones((40, 80), np.float32), spec)  # letterboxed: black bands top and bottom
    assert x.shape == (1, 32, 32)
    assert np.allclose(x[0, 0], -2.0) and np.allclose(x[0, 16], 2.0)
    x3 = preprocess(np.ones((64, 64), np.float32), {"input_size": 16, "channels": 3, "mean": 0.0, "std": 1.0})
    assert x3.shape == (3, 16, 16) and np.allclose(x3, 1.0)
    with pytest.raises(ValueError):
        resize_square(np.zeros((2, 3, 4)), 8)


# -- frame normalisation (Preprocessing.normalize) ------------------------------


def _angio_like(s: int = 96, seed: int = 0) -> np.ndarray:
    """A square frame: textured background in a round field, a dark 'vessel', black outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s]
    f = 0.5 + 0.2 * np.sin(xx / 9.0) + 0.02 * rng.standard_normal((s, s))
    f[(np.abs(yy - xx) < 2) & (yy > s // 5)] = 0.08  # a diagonal vessel
    field = (yy - s / 2) ** 2 + (xx - s / 2) ** 2 <= (0.42 * s) ** 2
    return np.where(field, np.clip(f, 0, 1), 0.0).astype(np.float32), field


def test_flatfield_neutral_outside_field_and_vessels_dark():
    from inference.frames import flatfield

    f, field = _angio_like()
    z = flatfield(f)
    assert z.shape == f.shape and z.dtype == np.float32
    assert np.all(z[~field] == 0.5)  # collimation is no cue
    vessel = (np.abs(np.subtract(*np.mgrid[0:96, 0:96])) < 1) & field
    vessel[:30] = False
    assert np.median(z[vessel]) < 0.3 < 0.5 < np.median(z[field & ~vessel]) + 0.1
    assert 0.0 <= z.min() and z.max() <= 1.0


def test_flatfield_ignores_gain_and_slow_shading():
    """Two cath labs' windows and vignetting: the normalised frames are (nearly) the same."""
    from inference.frames import flatfield

    f, field = _angio_like()
    yy, xx = np.mgrid[0:96, 0:96]
    shaded = f * 0.6 * (1.0 - 0.25 * ((yy - 48) ** 2 + (xx - 48) ** 2) / 48 ** 2)
    a, b = flatfield(f), flatfield(shaded.astype(np.float32))
    inner = field & ((yy - 48) ** 2 + (xx - 48) ** 2 <= 30 ** 2)
    assert np.abs(a - b)[inner].mean() < 0.03
    assert np.abs(a - flatfield(f * 0.5)).max() < 1e-5  # pure gain: identical


def test_preprocess_is_model_frame_then_finish_input_and_batches_agree():
    from inference.frames import finish_input, model_frame

    rng = np.random.default_rng(1)
    frames = [rng.random((120, 90)).astype(np.float32) for _ in range(3)]
    for norm in ("none", "flatfield"):
        spec = Preprocessing(input_size=48, channels=3, normalize=norm)
        one = np.stack([preprocess(f, spec) for f in frames])
        two = np.stack([finish_input(model_frame(f, spec), spec) for f in frames])
        batch = finish_input(np.stack([model_frame(f, spec) for f in frames]), spec)
        assert one.shape == (3, 3, 48, 48)
        assert np.array_equal(one, two) and np.allclose(one, batch, atol=1e-6)
    a = preprocess(frames[0], Preprocessing(input_size=48))
    b = preprocess(frames[0], Preprocessing(input_size=48, normalize="flatfield"))
    assert not np.allclose(a, b)


def test_preprocessing_normalize_is_validated_and_defaults_to_none():
    assert Preprocessing().normalize == "none"  # bundles made before it existed
    assert Preprocessing.model_validate({"input_size": 96}).normalize == "none"
    with pytest.raises(Exception, match="normalize"):
        Preprocessing(normalize="histogram")
    from inference.frames import normalize_frame

    with pytest.raises(ValueError, match="normalize"):
        normalize_frame(np.zeros((8, 8), np.float32), "histogram")


def test_exposed_field_keeps_dark_areas_inside_the_field():
    """A dense dark region enclosed by the field (heart shadow, filled ostium) is exposed; the
    black outside of a round field is not."""
    from inference.frames import exposed_field

    f, field = _angio_like()
    yy, xx = np.mgrid[0:96, 0:96]
    f = f.copy()
    f[(yy - 48) ** 2 + (xx - 48) ** 2 <= 12 ** 2] = 0.0  # black blob well inside the field
    e = exposed_field(f)
    assert e[48, 48] == 1.0 and e[2, 2] == 0.0 and e[2, 93] == 0.0
    assert e[field].mean() > 0.9 and e[~field].max() == 0.0
    full = np.full((64, 64), 0.6, np.float32)  # a frame with no collimation at all
    assert exposed_field(full).mean() > 0.9


def _flood_by_box_blurs(dark, border, step):
    """The exposed field's flood fill as first written (a loop of box blurs): the reference."""
    from inference.frames import box_blur

    outside = dark & border
    for _ in range(dark.shape[-1]):
        grown = (box_blur(outside.astype(np.float32), step) > 1e-3) & dark
        if np.array_equal(grown, outside):
            break
        outside = grown
    return outside


def test_exposed_field_flood_fill_equals_the_box_blur_loop():
    """scipy's geodesic dilation gives exactly the field the box-blur loop gave (so bundles
    trained before the change see the same inputs), on shutters, circles, letterboxes and noise."""
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(3)
    s = 96
    yy, xx = np.mgrid[0:s, 0:s]
    frames = []
    for k in range(6):
        f = rng.uniform(0.2, 0.9, (s, s)).astype(np.float32)
        if k % 3 == 0:
            f[(yy - s / 2) ** 2 + (xx - s / 2) ** 2 > (0.45 * s) ** 2] = 0
        if k % 3 == 1:
            f[:, : s // 6] = 0
            f[: s // 8, :] = 0
        f[rng.random((s, s)) < 0.05] = 0  # black specks inside the field
        f[s // 2 - 3: s // 2 + 3, :] = 0  # a dark band crossing the field
        frames.append(f)
    x = np.stack(frames)
    level = np.percentile(x.reshape(len(x), -1), 95, axis=-1)[:, None, None]
    dark = ~(x > np.maximum(0.004, 0.03 * level))
    border = np.zeros((s, s), bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    step = max(1, s // 24)
    ref = _flood_by_box_blurs(dark, border, step)
    got = binary_dilation(dark & border, structure=np.ones((1, 2 * step + 1, 2 * step + 1), bool),
                          iterations=0, mask=dark)
    assert np.array_equal(ref, got)
