"""Spool writes and the raw data set walker (no network)."""

from __future__ import annotations

import io
import zlib

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_node.dicomheader import DEFLATED_LE, EXPLICIT_LE, MalformedDataset, parse_header
from dicom_node.spool import FileMeta, Spool, SpoolFull, uid_is_path_safe, uid_is_valid
from cagtest.dicom import make_dataset


def encode(ds, implicit=False, little=True) -> bytes:
    buf = DicomBytesIO()
    buf.is_implicit_VR, buf.is_little_endian = implicit, little
    write_dataset(buf, ds)
    return buf.getvalue()


def test_uid_rules():
    assert uid_is_valid("1.2.840.10008.1.2") and not uid_is_valid("1.2.") and not uid_is_valid("1" * 65)
    assert uid_is_path_safe("999.999.01.5")  # real-world invalid but harmless
    for bad in ["../../etc/x", "..", ".", "", "1/2", "1\\2", "results", "1.2\x00", "a.b", "1 2", "1" * 200]:
        assert not uid_is_path_safe(bad), bad


@pytest.mark.parametrize("ts", ["implicit", "explicit", "big", "deflated"])
def test_parse_header_all_uncompressed_syntaxes(ts):
    ds = make_dataset()
    if ts == "implicit":
        raw, uid = encode(ds, implicit=True), ImplicitVRLittleEndian
    elif ts == "big":
        raw, uid = encode(ds, little=False), ExplicitVRBigEndian
    elif ts == "deflated":
        c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw, uid = c.compress(encode(ds)) + c.flush(), DEFLATED_LE
    else:
        raw, uid = encode(ds), EXPLICIT_LE
    h = parse_header(raw, uid)
    assert (h.study_uid, h.series_uid, h.sop_instance_uid) == (ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                                               ds.SOPInstanceUID)
    assert h.modality == "XA" and h.n_frames == 8 and h.has_pixels and len(h.patient_hash) == 16


def test_parse_header_rejects_truncated_and_garbage():
    raw = encode(make_dataset())
    for cut in (len(raw) - 1, len(raw) // 2, 7, 13):
        with pytest.raises(MalformedDataset):
            parse_header(raw[:cut], EXPLICIT_LE)
    with pytest.raises(MalformedDataset):
        parse_header(bytes(range(256)) * 4, EXPLICIT_LE)
    with pytest.raises(MalformedDataset):
        parse_header(b"\x01\x02" * 100, DEFLATED_LE)


def test_parse_header_real_files(real_xa_files):
    for f in real_xa_files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        with open(f, "rb") as fh:
            fh.seek(132)
            pydicom.filereader._read_file_meta_info(fh)
            raw = fh.read()
        h = parse_header(raw, ds.file_meta.TransferSyntaxUID)
        assert h.sop_instance_uid == ds.SOPInstanceUID and h.has_pixels, f.name


def test_store_atomic_and_clean(tmp_path):
    sp = Spool(tmp_path / "s", fsync=True)
    (sp.tmp / "stale.part").write_bytes(b"x")
    assert sp.clean_stale_temp() == 1 and not list(sp.tmp.iterdir())
    meta = FileMeta("1.2.840.10008.5.1.4.1.1.12.1", "1.2.3.4", EXPLICIT_LE, "1.2.3", "X", "MOD")
    raw = encode(make_dataset(sop_uid="1.2.3.4"))
    out = sp.store("1.2", "1.2.3", "1.2.3.4", meta, io.BytesIO(raw))
    assert out.path == tmp_path / "s" / "1.2" / "1.2.3" / "1.2.3.4.dcm" and out.size == out.path.stat().st_size
    ds = pydicom.dcmread(out.path)
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE and ds.SOPInstanceUID == "1.2.3.4"
    assert out.path.read_bytes().endswith(raw)
    with pytest.raises(ValueError):
        sp.store("..", "1", "1", meta, raw)
    full = Spool(tmp_path / "s", min_free_mb=10**12)
    with pytest.raises(SpoolFull):
        full.store("1.2", "1.2.3", "1.2.3.5", meta, raw)
    assert not list(sp.tmp.iterdir())


def test_adopt_renames_or_rewrites_the_head(tmp_path):
    """A data set streamed into .tmp (RxFile): renamed in place when its head is right, else re-headed."""
    sp = Spool(tmp_path / "s", fsync=True)
    raw = encode(make_dataset(sop_uid="1.2.3.4"))
    meta = FileMeta("1.2.840.10008.5.1.4.1.1.12.1", "1.2.3.4", EXPLICIT_LE, "1.2.3", "X", "MOD")
    src = sp.tmp / "rx-a.dcm"
    src.write_bytes(meta.encode() + raw)
    out = sp.adopt("1.2", "1.2.3", "1.2.3.4", meta, src, meta.encode())
    assert not src.exists() and out.path.read_bytes() == meta.encode() + raw
    assert out.size == out.path.stat().st_size
    # the request named another instance than the data set: the head is rewritten, bytes kept
    other = FileMeta("1.2.840.10008.5.1.4.1.1.12.1", "9.9.9.9.9.9.9", EXPLICIT_LE, "1.2.3", "X", "MOD")
    src2 = sp.tmp / "rx-b.dcm"
    src2.write_bytes(other.encode() + raw)
    out = sp.adopt("1.2", "1.2.3", "1.2.3.4", meta, src2, other.encode())
    assert out.path.read_bytes() == meta.encode() + raw and out.size == out.path.stat().st_size
    assert pydicom.dcmread(out.path).file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert src2.exists()  # left to its owner (pynetdicom unlinks it)
    src2.unlink()
    assert not list(sp.tmp.iterdir())
    with pytest.raises(SpoolFull):
        Spool(tmp_path / "s", min_free_mb=10**12).adopt("1.2", "1.2.3", "1.2.3.4", meta, src, meta.encode())


@pytest.mark.parametrize("fsync", [True, False])
def test_results_are_written_through_the_spool_as_storage_fsync_says(tmp_path, monkeypatch, fsync):
    import os

    from pydicom.uid import generate_uid

    ds = make_dataset("1.2.3")
    ds.SOPInstanceUID = generate_uid()
    spool = Spool(tmp_path / "spool", fsync=fsync)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = spool.write_result("1.2.3", "SR", ds)
    assert path == tmp_path / "spool" / "results" / "1.2.3" / f"SR_{ds.SOPInstanceUID}.dcm"
    assert path.parent == spool.results_dir("1.2.3")
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert list(spool.tmp.iterdir()) == []  # written in .tmp, then renamed
    assert (len(synced) > 0) is fsync  # file and directories only when storage.fsync
    with pytest.raises(ValueError):
        spool.write_result("../x", "SR", ds)
