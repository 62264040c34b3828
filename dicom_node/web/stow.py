"""STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]`` with multipart/related application/dicom.

Each part is a DICOM Part 10 file.  Its File Meta group is read for the
transfer syntax; the data set after it goes through ``StorageSCP.store``, the
very function C-STORE uses: header walked, written + fsynced + renamed into
the spool, journaled, completion timer armed, and only then counted as stored.
So a 200 (or the stored part of a 202) means exactly what a C-STORE 0x0000
means: a crash afterwards loses nothing.

Response (application/dicom+json, PS3.18 Table 10.5.3-1): ``ReferencedSOPSequence``
for the stored instances (with their RetrieveURL where the node serves them),
``FailedSOPSequence`` with ``FailureReason`` per refused part, and, as text for
people, the reason in each failed item's ErrorComment (0000,0902).  HTTP status:
200 all stored, 202 some stored, 409 none stored; 400 for a body that is not a
well-formed multipart message, 415 for a wrong media type, 413 when too large.
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from typing import Optional

from dicom_node import scp as scpmod
from dicom_node.web.multipart import MultipartError, Part, parse_content_type, parse_multipart

log = logging.getLogger(__name__)

CALLING = "DICOMWEB"  # stands for the calling AE title in the spool's File Meta and the journal

# PS3.18 / PS3.4 failure reasons used in FailedSOPSequence
FR_PROCESSING = 0x0110
FR_SOP_CLASS_NOT_SUPPORTED = 0x0122
FR_OUT_OF_RESOURCES = 0xA700
FR_STUDY_MISMATCH = 0xA900  # "Data Set does not match": not of the target study
FR_CANNOT_UNDERSTAND = 0xC000
FR_TS_NOT_SUPPORTED = 0xC122


@dataclass
class PartOutcome:
    index: int
    stored: bool
    reason: Optional[str] = None
    failure_reason: Optional[int] = None
    sop_class_uid: Optional[str] = None
    sop_instance_uid: Optional[str] = None
    study_uid: Optional[str] = None
    series_uid: Optional[str] = None


class BadRequest(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_content_type(value: str) -> str:
    """The boundary of a STOW-RS request, or :class:`BadRequest` (415 / 400)."""
    try:
        media, params = parse_content_type(value)
    except MultipartError as exc:
        raise BadRequest(400, f"Content-Type: {exc}") from None
    if media != "multipart/related":
        raise BadRequest(415, f"Content-Type must be multipart/related; type=\"application/dicom\", not {media or '(none)'}")
    t = params.get("type", "").lower()
    if t and t != "application/dicom":
        raise BadRequest(415, f"multipart/related type {t!r} is not supported (only application/dicom; "
                              "the metadata+bulkdata form is not)")
    if not params.get("boundary"):
        raise BadRequest(400, "Content-Type: multipart/related without a boundary")
    return params["boundary"]


def split_part10(data: memoryview) -> tuple[str, Optional[str], Optional[str], memoryview]:
    """(transfer syntax, media SOP class, media SOP instance, data set bytes) of a Part 10 file.

    Reads the File Meta group (always explicit VR little endian) element by
    element, without pydicom, so a hostile part cannot make it allocate.
    """
    if len(data) < 132 + 12 or bytes(data[128:132]) != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no 'DICM' after the 128-byte preamble)")
    pos = 132
    values: dict[int, bytes] = {}
    n = len(data)
    while pos + 8 <= n:
        group, elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = bytes(data[pos + 4:pos + 6])
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if pos + 12 > n:
                raise ValueError("truncated File Meta element")
            (length,) = struct.unpack_from("<I", data, pos + 8)
            pos += 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8
        if length == 0xFFFFFFFF or pos + length > n:
            raise ValueError("File Meta element runs past the end of the part")
        values[(group << 16) | elem] = bytes(data[pos:pos + length])
        pos += length

    def text(tag):
        v = values.get(tag)
        return v.rstrip(b"\x00 ").decode("ascii", "replace") if v else None

    ts = text(0x00020010)
    if not ts:
        raise ValueError("File Meta without a TransferSyntaxUID (0002,0010)")
    return ts, text(0x00020002), text(0x00020003), data[pos:]


def store_part(scp, part: Part, index: int, target_study: Optional[str]) -> PartOutcome:
    """Store one part through the C-STORE path; never raises."""
    out = PartOutcome(index=index, stored=False)
    ctype = part.content_type or "application/dicom"  # a missing part type defaults to the root's type
    if ctype != "application/dicom":
        out.reason, out.failure_reason = f"part {index + 1}: media type {ctype} is not application/dicom", FR_CANNOT_UNDERSTAND
        return out
    try:
        ts, m_class, m_inst, ds = split_part10(part.body)
    except (ValueError, struct.error) as exc:
        out.reason, out.failure_reason = f"part {index + 1}: {exc}", FR_CANNOT_UNDERSTAND
        _journal_refusal(scp, scpmod.ST_MALFORMED, out.reason, None, None)
        return out
    out.sop_class_uid, out.sop_instance_uid = m_class, m_inst
    if ts not in scpmod.TRANSFER_SYNTAXES:
        out.reason, out.failure_reason = f"part {index + 1}: transfer syntax {ts[:64]} is not supported", FR_TS_NOT_SUPPORTED
        _journal_refusal(scp, scpmod.ST_MALFORMED, out.reason, m_class, m_inst)
        return out
    if target_study is not None:
        try:
            hdr = scpmod.parse_header(ds, ts)
        except scpmod.MalformedDataset as exc:
            out.reason, out.failure_reason = f"part {index + 1}: malformed data set: {exc}", FR_CANNOT_UNDERSTAND
            _journal_refusal(scp, scpmod.ST_MALFORMED, out.reason, m_class, m_inst)
            return out
        if hdr.study_uid != target_study:
            out.reason = f"part {index + 1}: StudyInstanceUID is not the study of the request URL"
            out.failure_reason = FR_STUDY_MISMATCH
            _journal_refusal(scp, scpmod.ST_MALFORMED, out.reason, m_class, m_inst)
            return out
    res = scp.store(ds, ts, CALLING, m_class or "", m_inst or "")
    out.sop_class_uid = res.sop_class_uid or m_class
    out.sop_instance_uid = res.sop_instance_uid or m_inst
    if res.status == scpmod.ST_SUCCESS:
        out.stored = True
        out.study_uid, out.series_uid = res.study_uid, res.series_uid
        return out
    out.reason = f"part {index + 1}: {res.reason}"
    out.failure_reason = {scpmod.ST_OUT_OF_RESOURCES: FR_OUT_OF_RESOURCES,
                          scpmod.ST_INTERNAL: FR_PROCESSING}.get(res.status, FR_CANNOT_UNDERSTAND)
    return out


def _journal_refusal(scp, status, reason, sop_class, sop_inst) -> None:
    scp._refuse(status, reason, CALLING, sop_class, sop_inst)


def store_body(scp, body: bytes, content_type: str, target_study: Optional[str]) -> list[PartOutcome]:
    """Parse and store a whole STOW-RS body; :class:`BadRequest` when it is not multipart."""
    boundary = check_content_type(content_type)
    try:
        parts = parse_multipart(body, boundary)
    except MultipartError as exc:
        raise BadRequest(400, f"malformed multipart body: {exc}") from None
    if not parts:
        raise BadRequest(400, "the multipart body has no parts")
    return [store_part(scp, p, i, target_study) for i, p in enumerate(parts)]


def response_dataset(outcomes: list[PartOutcome], base_url: str, retrieve_url_for) -> tuple[int, dict]:
    """(HTTP status, DICOM JSON) of the Store Instances Response."""
    ok = [o for o in outcomes if o.stored]
    bad = [o for o in outcomes if not o.stored]
    ds: dict = {}
    if ok:
        items = []
        for o in ok:
            item = {"00081150": _ui(o.sop_class_uid), "00081155": _ui(o.sop_instance_uid)}
            url = retrieve_url_for(o)
            if url:
                item["00081190"] = {"vr": "UR", "Value": [url]}
            items.append(item)
        ds["00081199"] = {"vr": "SQ", "Value": items}
    if bad:
        ds["00081198"] = {"vr": "SQ", "Value": [
            {"00081150": _ui(o.sop_class_uid), "00081155": _ui(o.sop_instance_uid),
             "00081197": {"vr": "US", "Value": [o.failure_reason or FR_PROCESSING]},
             "00000902": {"vr": "LT", "Value": [(o.reason or "")[:1024]]}}
            for o in bad]}
    status = 200 if not bad else (202 if ok else 409)
    return status, ds


def _ui(v: Optional[str]) -> dict:
    return {"vr": "UI", "Value": [v]} if v else {"vr": "UI"}
