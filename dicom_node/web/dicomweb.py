"""QIDO-RS and WADO-RS (PS3.18 10.6, 10.4) over what the node holds.

QIDO answers from the journal (studies, series, instances received) plus the
node's own results (SR, KOS).  The journal keeps no patient data by design,
so the attributes returned are the UIDs, modality, SOP class and counts — no
names, IDs or dates; a PACS remains the place to search for patients.

WADO-RS retrieves the SR and KOS the node produced (the reason radiology IT
asked for DICOMweb here): per study, per series or per instance, as
multipart/related; type="application/dicom".  Received images are not served
back (the modality and the PACS already hold them); asking for one says so.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Optional

from dicom_node.web.results import ResultFile, result_files

DICOM_JSON = "application/dicom+json"


def _ui(v) -> dict:
    return {"vr": "UI", "Value": [str(v)]}


def _cs(v) -> dict:
    return {"vr": "CS", "Value": [str(v)]} if v else {"vr": "CS"}


def _is(n: int) -> dict:
    return {"vr": "IS", "Value": [int(n)]}


def _url(base: str, *parts: str) -> dict:
    return {"vr": "UR", "Value": [base + "/dicomweb/studies/" + "/".join(parts)]}


class Holdings:
    """A study's series and instances: the received ones (journal) and the node's results."""

    def __init__(self, journal, results_root: Path, study_uid: str):
        self.study_uid = study_uid
        self.series: "OrderedDict[str, dict]" = OrderedDict()
        for inst in journal.study_instances(study_uid):
            s = self.series.setdefault(inst.series_uid, {"modality": inst.modality, "instances": [], "result": False})
            s["instances"].append({"sop_class_uid": inst.sop_class_uid, "sop_instance_uid": inst.sop_instance_uid,
                                   "n_frames": inst.n_frames, "result": None})
        self.results: list[ResultFile] = result_files(results_root / study_uid)
        for r in self.results:
            s = self.series.setdefault(r.series_uid, {"modality": r.kind, "instances": [], "result": True})
            s["instances"].append({"sop_class_uid": r.sop_class_uid, "sop_instance_uid": r.sop_instance_uid,
                                   "n_frames": None, "result": r})

    def n_instances(self) -> int:
        return sum(len(s["instances"]) for s in self.series.values())


def study_json(study, holdings: Holdings, base: str) -> dict:
    mods = sorted({s["modality"] for s in holdings.series.values() if s["modality"]})
    return {
        "0020000D": _ui(study.study_uid),
        "00080061": {"vr": "CS", "Value": mods} if mods else {"vr": "CS"},
        "00201206": _is(len(holdings.series)),
        "00201208": _is(holdings.n_instances()),
        "00081190": _url(base, study.study_uid),
    }


def series_json(study_uid: str, series_uid: str, s: dict, base: str) -> dict:
    d = {"0020000D": _ui(study_uid), "0020000E": _ui(series_uid), "00080060": _cs(s["modality"]),
         "00201209": _is(len(s["instances"]))}
    if s["result"]:
        d["00081190"] = _url(base, study_uid, "series", series_uid)
    return d


def instance_json(study_uid: str, series_uid: str, i: dict, base: str) -> dict:
    d = {"0020000D": _ui(study_uid), "0020000E": _ui(series_uid), "00080016": _ui(i["sop_class_uid"]),
         "00080018": _ui(i["sop_instance_uid"])}
    if i["n_frames"]:
        d["00280008"] = _is(i["n_frames"])
    if i["result"] is not None:
        d["00081190"] = _url(base, study_uid, "series", series_uid, "instances", i["sop_instance_uid"])
    return d


def match(params, key_tag: str, keyword: str, value: Optional[str]) -> bool:
    """QIDO single-value / UID-list matching on one attribute (absent parameter: match)."""
    want = params.get(keyword) or params.get(key_tag)
    if not want:
        return True
    wanted = {w.strip() for w in want.replace("\\", ",").split(",") if w.strip()}
    return (value or "") in wanted


def paged(items: list, params) -> list:
    try:
        offset = max(0, int(params.get("offset", 0)))
        limit = int(params.get("limit", 0))
    except ValueError:
        raise ValueError("limit and offset must be integers") from None
    items = items[offset:]
    return items[:limit] if limit > 0 else items


def multipart_files(paths: list[Path]) -> tuple[bytes, str]:
    """The files as one multipart/related body; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for p in paths:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += Path(p).read_bytes()
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f'multipart/related; type="application/dicom"; boundary={boundary}'
