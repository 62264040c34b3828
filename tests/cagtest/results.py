"""Helpers of the results tests (SR/KOS encoding, outbox, SCU).

Test inputs: small XA multi-frame datasets (``cagtest.dicom.xa_dataset``) and
StudyResult/RunSelection/ReportText/ModelInfo from inference.types.  Peers
(Orthanc, storescp) are started per test on free ports and killed at the end.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from cagtest.dicom import xa_dataset
from dicom_node.orthanc import OrthancProcess
from inference.types import KeyFrame, ModelInfo, ReportText, RunSelection, StudyResult

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
MISSING = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
           "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")
DEVICE_UID = "2.25.123456789012345678901234567890123"


def make_xa(study_uid: str, *, n_frames: int = 8, size: int = 16, series_uid: str | None = None,
            omit: tuple[str, ...] = (), series_number: int = 1, instance_number: int = 1,
            patient_name: str = "Test^Patient", charset: str | None = None) -> Dataset:
    """A small but well-formed XA multi-frame instance (``cagtest.dicom.xa_dataset``) without the
    attributes named in ``omit``."""
    pixels = (np.arange(n_frames * size * size) % 251).astype(np.uint8).reshape(n_frames, size, size)
    attrs = {"InstanceNumber": instance_number, "PatientSex": "M", "StudyID": "S1", "Manufacturer": "TestVendor"}
    if charset:
        attrs["SpecificCharacterSet"] = charset
    attrs.update({kw: None for kw in omit})
    return xa_dataset(study_uid, series_uid, pixels=pixels, patient_name=patient_name, patient_id="PID0001",
                      birth_date="19600101", accession="ACC1", series_number=series_number, **attrs)


def make_result(sources: list[Dataset], *, synthetic_demo: bool = True, not_analysed=None,
                languages=("en", "ja")) -> StudyResult:
    runs = []
    for i, ds in enumerate(sources):
        if ds.Modality != "XA":
            continue
        side = "LCA" if i % 2 == 0 else "RCA"
        runs.append(RunSelection(
            file=f"/spool/{ds.SOPInstanceUID}.dcm",
            sop_instance_uid=ds.SOPInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            n_frames=int(ds.NumberOfFrames),
            laterality=side,
            confidence=0.93,
            key_frames=[KeyFrame(3, f"{side}_better", 0.91), KeyFrame(7, f"{side}_better", 0.84)],
            candidates=[1, 3, 5, 7],
        ))
    report = {}
    if "en" in languages:
        report["en"] = ReportText(
            findings="LAD #7: 90% stenosis. RCA #2: 75% stenosis.",
            impression="Two-vessel coronary artery disease.",
            recommendation="PCI to LAD #7; consider staged PCI to RCA.",
        )
    if "ja" in languages:
        report["ja"] = ReportText(
            findings="LAD #7に90%狭窄。RCA #2に75%狭窄。",
            impression="2枝病変の冠動脈疾患。",
            recommendation="LAD #7へのPCIを推奨。RCAは二期的PCIを検討。",
        )
    return StudyResult(
        study_instance_uid=sources[0].StudyInstanceUID,
        runs=runs,
        report=report,
        model=ModelInfo(name="cag-vlm-demo", version="0.1.0", device_uid=DEVICE_UID,
                        selector="convnext_atto 1", vlm="gemma3 0", synthetic_demo=synthetic_demo),
        not_analysed=list(not_analysed or []),
    )


# --------------------------------------------------------------------------- tools
def run_tool(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          encoding="utf-8", errors="replace")


def dciodvfy_counts(path: Path) -> tuple[int, int, str]:
    """(errors, warnings, output) of dciodvfy."""
    p = run_tool("dciodvfy", str(path))
    out = p.stdout + p.stderr
    errors = sum(1 for line in out.splitlines() if line.startswith("Error"))
    warnings = sum(1 for line in out.splitlines() if line.startswith("Warning"))
    return errors, warnings, out


def validated_dump(path: Path) -> str:
    """dciodvfy reports no error and dsrdump reads ``path`` without one; returns dsrdump's text."""
    errors, _warnings, out = dciodvfy_counts(path)
    assert errors == 0, out
    d = run_tool("dsrdump", str(path))
    assert d.returncode == 0, d.stderr
    assert not [line for line in d.stderr.splitlines() if line.startswith("E:")], d.stderr
    return d.stdout


# --------------------------------------------------------------------------- peers
class OrthancPeer(OrthancProcess):
    """A throw-away Orthanc in tmp (the node's own ``OrthancProcess``), with ``find``
    answering SOP Instance UIDs instead of Orthanc ids."""

    def __init__(self, root: Path, aet: str = "ORTHANC"):
        super().__init__(Path(root), aet=aet, stable_age=1)

    def find(self, study_uid: str, modality: str) -> list[str]:
        """SOP Instance UIDs of the study's instances of this modality."""
        return sorted(self.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
                      for i in super().find(study_uid, modality))


def require_tools(*tools: str):
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"missing tools: {', '.join(missing)}")


def self_signed_cert(dirpath: Path, cn: str = "localhost") -> tuple[Path, Path]:
    """(cert.pem, key.pem) for 127.0.0.1/localhost, made with `cryptography`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    dirpath.mkdir(parents=True, exist_ok=True)
    cp, kp = dirpath / "cert.pem", dirpath / "key.pem"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cp, kp
