"""Write a synthetic run as an X-Ray Angiographic Image Storage multi-frame instance."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

#: transfer syntaxes of write_xa (jpeg: JPEG baseline 8-bit, lossy)
COMPRESSIONS = ("none", "rle", "jpegls", "jpeg")

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
# UID root for synthetic objects: 2.25 (UUID-derived) + digits from a hash of the seed path
_IMPL_VERSION = "CAGNODE_SYNTH1"


def det_uid(*parts) -> str:
    """Deterministic UID (2.25.<int>) from any parts (seed, study index, ...)."""
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()[:16]
    return "2.25." + str(int.from_bytes(h, "big"))


def build_xa_dataset(frames: np.ndarray, study: dict, run: dict) -> Dataset:
    """``frames`` uint8 (F, H, W).  ``study``: patient/study attributes; ``run``: series/run
    attributes (uids, angles, timing, technique).  Returns a complete dataset (uncompressed)."""
    n_frames, rows, cols = frames.shape
    ds = Dataset()
    # SOP common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = XA_SOP_CLASS
    ds.SOPInstanceUID = run["sop_instance_uid"]
    ds.InstanceCreationDate = study["date"]
    ds.InstanceCreationTime = run["time"]
    # patient
    ds.PatientName = study["patient_name"]
    ds.PatientID = study["patient_id"]
    ds.PatientBirthDate = study["birth_date"]
    ds.PatientSex = study["sex"]
    ds.PatientAge = f"{int(study['age']):03d}Y"
    ds.PatientWeight = str(study.get("weight", 70))
    ds.PatientSize = str(study.get("height", 1.7))
    # general study
    ds.StudyInstanceUID = study["study_uid"]
    ds.StudyDate = study["date"]
    ds.StudyTime = study["time"]
    ds.ReferringPhysicianName = ""
    ds.StudyID = study["study_id"]
    ds.AccessionNumber = study["accession"]
    ds.StudyDescription = "Coronary angiography (synthetic)"
    # general series (one series per run)
    ds.Modality = "XA"
    ds.SeriesInstanceUID = run["series_uid"]
    ds.SeriesNumber = run["series_number"]
    ds.SeriesDate = study["date"]
    ds.SeriesTime = run["time"]
    ds.SeriesDescription = f"{run['side']} {run['view']}"
    ds.BodyPartExamined = "HEART"
    ds.PatientPosition = ""
    ds.ProtocolName = "Coronary angiography"
    # general equipment
    ds.Manufacturer = "cag-node synthetic"
    ds.InstitutionName = "Synthetic Cath Lab"
    ds.StationName = "SYNTH-CATH1"
    ds.ManufacturerModelName = "cag-node synth"
    ds.SoftwareVersions = "1.0"
    ds.DeviceSerialNumber = "0001"
    # general image
    ds.InstanceNumber = 1
    ds.PatientOrientation = run["patient_orientation"]
    ds.ContentDate = study["date"]
    ds.ContentTime = run["time"]
    ds.AcquisitionDateTime = study["date"] + run["time"]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    bits = 8 if frames.dtype == np.uint8 else int(run.get("bits", 10))
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    # contrast/bolus
    ds.ContrastBolusAgent = "Iopamidol 370"
    ds.ContrastBolusRoute = "INTRA-ARTERIAL"
    ds.ContrastBolusVolume = run["contrast_ml"]
    ds.ContrastBolusIngredient = "IODINE"
    ds.ContrastBolusIngredientConcentration = 370
    # cine + multi-frame
    ds.NumberOfFrames = n_frames
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x0018, 0x1063)  # FrameTime
    ds.FrameTime = run["frame_time_ms"]
    ds.CineRate = int(round(1000.0 / float(run["frame_time_ms"])))
    ds.RecommendedDisplayFrameRate = ds.CineRate
    ds.ActualFrameDuration = int(round(float(run["frame_time_ms"])))
    ds.StartTrim = 1
    ds.StopTrim = n_frames
    ds.FrameDelay = 0.0
    # X-ray image
    ds.PixelIntensityRelationship = "LOG" if run.get("intensity", "log") == "log" else "LIN"
    if ds.PixelIntensityRelationship == "LOG":  # Modality LUT (identity) required for LOG
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
    ds.WindowCenter = 2 ** (bits - 1)
    ds.WindowWidth = 2**bits
    # X-ray acquisition
    ds.KVP = run["kvp"]
    ds.RadiationSetting = "GR"
    ds.XRayTubeCurrent = int(run["ma"])
    ds.ExposureTime = int(round(run["exposure_ms"]))
    ds.AveragePulseWidth = run["exposure_ms"]
    ds.RadiationMode = "PULSED"
    ds.FieldOfViewShape = "ROUND" if run.get("collimation") == "circle" else "RECTANGLE"
    ds.IntensifierSize = round(float(run["fov_mm"]), 1)
    ds.ImagerPixelSpacing = [round(float(run["fov_mm"]) / rows, 4), round(float(run["fov_mm"]) / cols, 4)]
    ds.FocalSpots = 0.7
    ds.Grid = "IN"
    sid, sod = round(float(run["sid"]), 1), round(float(run["sod"]), 1)
    ds.DistanceSourceToDetector = sid
    ds.DistanceSourceToPatient = sod
    ds.EstimatedRadiographicMagnificationFactor = round(sid / sod, 4)
    ds.TypeOfFilters = "CU"
    # XA positioner
    ds.PositionerMotion = "STATIC"
    ds.PositionerPrimaryAngle = round(float(run["primary"]), 1)
    ds.PositionerSecondaryAngle = round(float(run["secondary"]), 1)
    # X-ray table (optional)
    ds.TableMotion = "DYNAMIC" if run.get("pan") else "STATIC"
    if run.get("pan"):
        ds.TableVerticalIncrement = [0.0] * n_frames
        ds.TableLongitudinalIncrement = [float(p[1]) for p in run["pan"]]
        ds.TableLateralIncrement = [float(p[0]) for p in run["pan"]]
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8 if bits == 8 else "<u2").tobytes()
    return ds


def jpeg_baseline_frames(frames: np.ndarray, quality: int = 90) -> list[bytes]:
    """Each uint8 frame as a JPEG baseline (ISO 10918-1 process 1, 8-bit, one grey
    component) code stream, encoded by Pillow/libjpeg (deterministic), without the JFIF
    APP0 segment (not part of a DICOM JPEG stream)."""
    from io import BytesIO

    from PIL import Image

    out = []
    for fr in frames:
        buf = BytesIO()
        Image.fromarray(np.ascontiguousarray(fr, dtype=np.uint8)).save(buf, format="JPEG", quality=int(quality),
                                                                   optimize=False, progressive=False)
        b = buf.getvalue()
        if b[2:4] == b"\xff\xe0":  # drop APP0 (JFIF): SOI + the rest after the segment
            n = int.from_bytes(b[4:6], "big")
            b = b[:2] + b[4 + n :]
        out.append(b)
    return out


def _compress_jpeg(ds: Dataset, frames: np.ndarray, quality: int) -> None:
    from pydicom.encaps import encapsulate

    if frames.dtype != np.uint8:
        raise ValueError("compression='jpeg' (JPEG baseline) needs 8-bit frames")
    streams = jpeg_baseline_frames(frames, quality)
    ratio = frames.nbytes / max(1, sum(len(x) for x in streams))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate(streams, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{ratio:.2f}"
    ds.LossyImageCompressionMethod = "ISO_10918_1"


def write_xa(path: Path, frames: np.ndarray, study: dict, run: dict, compression: str = "none",
             jpeg_quality: int = 90) -> Path:
    """Write one run; ``compression``: none (Explicit VR Little Endian), rle, jpegls
    (lossless) or jpeg (JPEG baseline, lossy, ``jpeg_quality`` 1-100, 8-bit only)."""
    ds = build_xa_dataset(frames, study, run)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPL_VERSION
    ds.file_meta = meta
    if compression == "rle":
        ds.compress(RLELossless, encoding_plugin="pylibjpeg")
    elif compression == "jpegls":
        ds.compress(JPEGLSLossless)
    elif compression == "jpeg":
        _compress_jpeg(ds, frames, jpeg_quality)
    elif compression != "none":
        raise ValueError(f"unknown compression {compression!r} ({'|'.join(COMPRESSIONS)})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
