"""Helpers of the web tests (and bench/web.py): a web-enabled config, STOW bodies, synthetic runs."""

from __future__ import annotations

import os
from pathlib import Path

from dicom_node.config import parse_config
from dicom_node.web.multipart import encode_multipart
from cagtest.dicom import make_dataset, pyscu_send, write_dataset  # noqa: F401  (the web tests and bench use them)
from cagtest.wait import wait_state  # noqa: F401  (re-exported for the web tests)

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("CAG_WEB_ARTEFACTS", ROOT / "build" / "test-artefacts" / "web"))


def web_config(tmp_path: Path, **sections) -> object:
    data = {
        "node": {"processes": 1, "port": 0, "allowed_calling_aets": ["PYSCU", "STORESCU", "MODALITY"]},
        "storage": {"path": str(tmp_path / "spool"), "journal": f"sqlite:///{tmp_path / 'journal.db'}",
                    "min_free_mb": 1},
        "completion": {"quiet_seconds": 30},
        "processing": {"enabled": False},
        "admin": {"enabled": False},
        "web": {"enabled": True, "port": 0, "refresh_s": 0},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    return parse_config(data, base_dir=tmp_path)




def stow_body(paths_or_payloads) -> tuple[bytes, dict]:
    parts = []
    for p in paths_or_payloads:
        payload = Path(p).read_bytes() if isinstance(p, Path) else p
        parts.append((payload, "application/dicom"))
    body, boundary = encode_multipart(parts)
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def synthetic_run_files(d: Path, n: int = 3, **kw) -> tuple[str, list[Path]]:
    from pydicom.uid import generate_uid

    study = generate_uid()
    series = generate_uid()
    files = [write_dataset(make_dataset(study, series, seed=i, **kw), d / f"run{i}.dcm") for i in range(n)]
    return study, files


