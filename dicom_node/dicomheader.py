"""A raw DICOM data set header walker: no pydicom decode, no I/O, no network.

The C-STORE handler (and STOW-RS) walks the received bytes once, element headers only with the
values skipped, to check the structure is complete and to pick out the few values the node
needs: the UIDs, Modality, NumberOfFrames and a short hash of PatientID (never PatientID itself).
Implicit/explicit VR, little/big endian and deflated data sets; undefined-length sequences and
items are followed up to a fixed nesting depth; anything truncated or inconsistent is
:class:`MalformedDataset`.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

from pydicom.uid import UID

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_BE = "1.2.840.10008.1.2.2"


# ---------------------------------------------------------------------------
# Raw data set walking (no pydicom decode)
# ---------------------------------------------------------------------------
class MalformedDataset(ValueError):
    pass


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 32

TAG_SOP_CLASS = 0x00080016
TAG_SOP_INSTANCE = 0x00080018
TAG_MODALITY = 0x00080060
TAG_PATIENT_ID = 0x00100020
TAG_STUDY_UID = 0x0020000D
TAG_SERIES_UID = 0x0020000E
TAG_N_FRAMES = 0x00280008
TAG_PIXEL_DATA = 0x7FE00010
TAG_FLOAT_PIXEL_DATA = 0x7FE00008
TAG_DOUBLE_PIXEL_DATA = 0x7FE00009
_WANTED = {TAG_SOP_CLASS, TAG_SOP_INSTANCE, TAG_MODALITY, TAG_PATIENT_ID, TAG_STUDY_UID, TAG_SERIES_UID,
           TAG_N_FRAMES}
_PIXELS = {TAG_PIXEL_DATA, TAG_FLOAT_PIXEL_DATA, TAG_DOUBLE_PIXEL_DATA}


def _walk(buf: memoryview, pos: int, end: int, implicit: bool, e: str, found: Optional[dict], depth: int,
          nested: bool) -> int:
    """Walk one data set's element headers; return the position after it.

    ``nested``: an item of undefined length, which must end with an Item
    Delimitation item.  Values are skipped, except top-level wanted tags.
    """
    if depth > _MAX_DEPTH:
        raise MalformedDataset("sequences nested too deep")
    hdr = struct.Struct(e + "HHI")
    short = struct.Struct(e + "HH2sH")
    while pos < end:
        if end - pos < 8:
            if not nested and not any(buf[pos:end]):  # tolerate trailing zero padding
                return end
            raise MalformedDataset(f"truncated element header at offset {pos}")
        group, elem, length = hdr.unpack_from(buf, pos)
        tag = (group << 16) | elem
        if group == 0xFFFE:
            if nested and elem == 0xE00D:
                return pos + 8
            raise MalformedDataset(f"unexpected delimiter ({group:04X},{elem:04X}) at offset {pos}")
        vr = None
        if implicit:
            pos += 8
        else:
            _, _, vr, length16 = short.unpack_from(buf, pos)
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise MalformedDataset(f"invalid VR at offset {pos}")
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise MalformedDataset(f"truncated element header at offset {pos}")
                (length,) = struct.unpack_from(e + "I", buf, pos + 8)
                pos += 12
            else:
                length = length16
                pos += 8
        if length == _UNDEFINED:
            if vr is not None and vr not in (b"SQ", b"UN", b"OB", b"OW"):
                raise MalformedDataset(f"undefined length with VR {vr!r} at offset {pos}")
            # UN of undefined length holds an implicit-VR LE sequence (PS3.5 6.2.2)
            items_implicit = implicit or vr == b"UN"
            pos = _skip_items(buf, pos, end, items_implicit, "<" if vr == b"UN" else e, depth + 1)
            if found is not None and tag in _PIXELS:
                found[tag] = b""
            continue
        if pos + length > end:
            raise MalformedDataset(f"element ({group:04X},{elem:04X}) runs past the end of the data set "
                                   f"({length} bytes at offset {pos} of {end})")
        if found is not None and (tag in _WANTED or tag in _PIXELS):
            found[tag] = bytes(buf[pos:pos + length]) if tag in _WANTED else b""
        pos += length
    if nested:
        raise MalformedDataset("item without its delimiter")
    return pos


def _skip_items(buf: memoryview, pos: int, end: int, implicit: bool, e: str, depth: int) -> int:
    """Skip the items of an undefined-length sequence or encapsulated pixel data."""
    hdr = struct.Struct(e + "HHI")
    while True:
        if end - pos < 8:
            raise MalformedDataset(f"truncated sequence at offset {pos}")
        group, elem, length = hdr.unpack_from(buf, pos)
        if group != 0xFFFE:
            raise MalformedDataset(f"expected an item at offset {pos}")
        pos += 8
        if elem == 0xE0DD:
            return pos
        if elem != 0xE000:
            raise MalformedDataset(f"unexpected ({group:04X},{elem:04X}) in a sequence")
        if length == _UNDEFINED:
            pos = _walk(buf, pos, end, implicit, e, None, depth + 1, nested=True)
        else:
            if pos + length > end:
                raise MalformedDataset(f"item runs past the end of the data set at offset {pos}")
            pos += length


@dataclass(frozen=True)
class Header:
    """The few header values the listener needs (no PHI kept besides a hash)."""

    sop_class_uid: Optional[str]
    sop_instance_uid: Optional[str]
    study_uid: Optional[str]
    series_uid: Optional[str]
    modality: Optional[str]
    n_frames: Optional[int]
    has_pixels: bool
    patient_hash: Optional[str]


def _text(b: Optional[bytes]) -> Optional[str]:
    if b is None:
        return None
    s = b.rstrip(b"\x00 ").lstrip(b" ").decode("ascii", "replace")
    return s or None


def parse_header(data: memoryview | bytes, transfer_syntax: str) -> Header:
    """Check the raw data set is structurally complete and extract the header values."""
    buf = memoryview(data)
    if transfer_syntax == DEFLATED_LE:
        try:
            buf = memoryview(zlib.decompress(buf, -zlib.MAX_WBITS))
        except zlib.error as exc:
            raise MalformedDataset(f"deflated data set does not inflate: {exc}") from None
    implicit = transfer_syntax == IMPLICIT_LE
    e = ">" if transfer_syntax == EXPLICIT_BE else "<"
    found: dict[int, bytes] = {}
    try:
        _walk(buf, 0, len(buf), implicit, e, found, 0, nested=False)
    except struct.error as exc:  # pragma: no cover - guarded by length checks
        raise MalformedDataset(str(exc)) from None
    n_frames = None
    nf = _text(found.get(TAG_N_FRAMES))
    if nf:
        try:
            n_frames = int(nf)
        except ValueError:
            n_frames = None
    pid = found.get(TAG_PATIENT_ID)
    phash = hashlib.sha256(pid.rstrip(b"\x00 ")).hexdigest()[:16] if pid else None
    modality = _text(found.get(TAG_MODALITY))
    return Header(
        sop_class_uid=_text(found.get(TAG_SOP_CLASS)),
        sop_instance_uid=_text(found.get(TAG_SOP_INSTANCE)),
        study_uid=_text(found.get(TAG_STUDY_UID)),
        series_uid=_text(found.get(TAG_SERIES_UID)),
        modality=modality.upper() if modality else None,
        n_frames=n_frames,
        has_pixels=bool(_PIXELS & found.keys()),
        patient_hash=phash,
    )


def processable(header: Header, sop_class_uid: str, modalities: list[str]) -> tuple[bool, Optional[str]]:
    """Is this instance a run the pipeline analyses?  (False, reason) otherwise."""
    if (header.modality or "") not in modalities:
        return False, f"modality {header.modality or '(none)'} is not processed"
    name = UID(sop_class_uid).name if sop_class_uid else ""
    if "Image Storage" not in name:
        return False, f"SOP class {sop_class_uid} is not an image"
    if not header.has_pixels:
        return False, "no pixel data"
    return True, None
