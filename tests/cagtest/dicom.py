"""DICOM test data and senders: the one XA builder, Part 10 files, pynetdicom and dcmtk senders."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

XA_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


def dataset(**attributes) -> Dataset:
    """A data set of keyword=value attributes (sequences as lists of data sets)."""
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def xa_dataset(study_uid: Optional[str] = None, series_uid: Optional[str] = None, sop_uid: Optional[str] = None,
               *, pixels: Optional[np.ndarray] = None, frames: int = 8, rows: int = 64, cols: Optional[int] = None,
               seed: int = 0, patient_name: str = "Test^Synthetic", patient_id: str = "SYN0001",
               birth_date: str = "19500101", accession: str = "", series_number: int = 1,
               **attributes) -> Dataset:
    """THE test XA run: an 8-bit multi-frame X-Ray Angiographic Image, written by the synthetic
    generator's ``build_xa_dataset`` (the same header the training data has), with File Meta
    (Explicit VR Little Endian).  ``pixels`` (F, H, W) uint8, else noise of ``frames`` x ``rows``
    x ``cols``; ``attributes``: keywords set on the data set afterwards (``None`` removes one)."""
    from training.synthetic.dicom_writer import build_xa_dataset

    if pixels is None:
        pixels = np.random.default_rng(seed).integers(0, 255, size=(frames, rows, cols or rows), dtype=np.uint8)
    study = {"study_uid": study_uid or generate_uid(), "patient_name": patient_name, "patient_id": patient_id,
             "birth_date": birth_date, "sex": "O", "age": 60, "date": "20260101", "time": "101010",
             "study_id": "1", "accession": accession}
    run = {"sop_instance_uid": sop_uid or generate_uid(), "series_uid": series_uid or generate_uid(),
           "series_number": series_number, "time": "101010", "side": "LCA", "view": "RAO30",
           "patient_orientation": ["L", "F"], "contrast_ml": 8, "frame_time_ms": 66.7, "kvp": 80, "ma": 500,
           "exposure_ms": 6.0, "fov_mm": 200, "sid": 1000, "sod": 750, "primary": -30, "secondary": 0}
    ds = build_xa_dataset(np.asarray(pixels, dtype=np.uint8), study, run)
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def make_dataset(study_uid: Optional[str] = None, series_uid: Optional[str] = None,
                 sop_uid: Optional[str] = None, *, modality: str = "XA", sop_class: str = XA_CLASS,
                 frames: int = 8, size: int = 64, seed: int = 0) -> Dataset:
    """A small multi-frame 8-bit run (synthetic, no PHI); another ``modality``/``sop_class`` keeps
    the XA header (the node judges by those two), a single frame drops the multi-frame attributes."""
    single = {k: None for k in ("NumberOfFrames", "FrameIncrementPointer", "FrameTime", "CineRate",
                                "RecommendedDisplayFrameRate", "ActualFrameDuration", "StartTrim", "StopTrim",
                                "FrameDelay")} if frames <= 1 and modality != "XA" else {}
    return xa_dataset(study_uid, series_uid, sop_uid, frames=frames, rows=size, seed=seed, Modality=modality,
                      SOPClassUID=sop_class, **single)


def write_dataset(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta group (what goes on the wire)."""
    from pydicom.filereader import _read_file_meta_info

    with open(path, "rb") as f:
        f.seek(132)
        _read_file_meta_info(f)
        return f.read()


# storescu (dcmtk 3.6.7) proposes uncompressed syntaxes unless told which
# compressed one to propose; HTJ2K it does not know at all.
STORESCU_TS_OPTION = {
    "1.2.840.10008.1.2": [], "1.2.840.10008.1.2.1": [], "1.2.840.10008.1.2.2": ["-xb"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
    "1.2.840.10008.1.2.4.50": ["-xy"], "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.70": ["-xs"], "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"], "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"], "1.2.840.10008.1.2.5": ["-xr"],
}


def storescu_cmd(port: int, files: list[Path], *, aet: str = "STORESCU", aec: str = "CAGNODE",
                 extra: Optional[list[str]] = None) -> list[str]:
    return ["storescu", "-aet", aet, "-aec", aec, *(extra or []), "127.0.0.1", str(port), *map(str, files)]


def pyscu_send(port: int, paths: list[Path], *, aet: str = "PYSCU", aec: str = "CAGNODE",
               ssl_context=None, stop_after: Optional[int] = None,
               statuses: Optional[list] = None) -> list[Optional[int]]:
    """Send files with pynetdicom *as they are on disk* (chunked: the data set
    bytes after the File Meta group go on the wire unchanged).  Returns one
    status per file (None: no response, e.g. the association died)."""
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    _config.STORE_SEND_CHUNKED_DATASET = True
    metas = [split_dataset(Path(p))[0] for p in paths]
    ae = AE(ae_title=aet)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    pairs = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas})
    assert len(pairs) <= 128, "split into several associations"
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, ts)
    tls_args = (ssl_context, None) if ssl_context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title=aec, tls_args=tls_args)
    if not assoc.is_established:
        raise ConnectionRefusedError(f"association not established (rejected={assoc.is_rejected})")
    statuses = [] if statuses is None else statuses  # the caller may watch it fill
    try:
        for p in paths:
            if not assoc.is_established:
                break
            st = assoc.send_c_store(Path(p))
            statuses.append(int(st.Status) if "Status" in st else None)
            if stop_after is not None and len(statuses) >= stop_after:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses
