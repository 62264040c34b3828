"""A real Orthanc as the PACS: for ``cag-node demo --pacs``, tests and benchmarks.

Runs the Debian ``Orthanc`` binary in the foreground with its own JSON
configuration (storage in a folder of ours, loopback-only use, no plugins) and
talks to it over its REST API (upload, forward to the node, find and download
the results).  Optionally installs the Lua auto-routing rule that forwards
every stable XA series to the node and never forwards what the node sent back.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

ROUTE_LUA = Path(__file__).with_name("orthanc_route.lua")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancError(RuntimeError):
    pass


class OrthancProcess:
    def __init__(self, workdir: Path, dicom_port: Optional[int] = None, http_port: Optional[int] = None,
                 aet: str = "ORTHANC", node_aet: str = "CAGNODE", node_port: int = 11112,
                 auto_route: bool = False, stable_age: int = 2):
        if shutil.which("Orthanc") is None:
            raise OrthancError("Orthanc is not installed (apt-get install orthanc)")
        self.workdir = Path(workdir)
        self.dicom_port = dicom_port or _free_port()
        self.http_port = http_port or _free_port()
        self.aet = aet
        self.node_aet = node_aet
        self.node_port = node_port
        self.auto_route = auto_route
        self.stable_age = stable_age
        self.proc: Optional[subprocess.Popen] = None

    # -- lifecycle ----------------------------------------------------------
    def config(self) -> dict:
        cfg = {
            "Name": "cag-node-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": {"node": {"AET": self.node_aet, "Host": "127.0.0.1", "Port": self.node_port}},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomScuTimeout": 30,
            "MaximumPduLength": 131072,
            "StableAge": self.stable_age,
            "OverwriteInstances": True,
            "HttpTimeout": 60,
        }
        if self.auto_route:
            cfg["LuaScripts"] = [str(self.workdir / "route.lua")]
        return cfg

    def start(self, timeout_s: float = 30) -> "OrthancProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.auto_route:
            (self.workdir / "route.lua").write_text(
                ROUTE_LUA.read_text().replace("__NODE_AET__", self.node_aet), encoding="utf-8")
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(["Orthanc", f"--logfile={self.workdir / 'orthanc-internal.log'}",
                                      str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self.proc.returncode}; see {self.workdir}/orthanc.log")
            try:
                self.get("/system")
                # REST answers before the DICOM port may listen: wait for both
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=0.5):
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise OrthancError("Orthanc did not start in time")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- REST ---------------------------------------------------------------
    def _req(self, method: str, path: str, body: Optional[bytes] = None, ctype: str = "application/json",
             timeout: float = 120):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", ctype)
            req.add_header("Expect", "")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def get(self, path: str):
        return json.loads(self._req("GET", path))

    def post(self, path: str, payload) -> object:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        raw = self._req("POST", path, body, "application/dicom" if isinstance(payload, bytes) else "application/json")
        return json.loads(raw) if raw.strip() else None

    def upload(self, path: Path) -> str:
        return self.post("/instances", Path(path).read_bytes())["ID"]

    def send_to_node(self, resource_ids: list[str]) -> None:
        try:
            self.post("/modalities/node/store", {"Resources": resource_ids, "Synchronous": True})
        except urllib.error.HTTPError as exc:
            raise OrthancError(f"Orthanc could not send to the node: {exc.read().decode(errors='replace')}") from None

    def find(self, study_uid: str, modality: Optional[str] = None) -> list[str]:
        query = {"StudyInstanceUID": study_uid}
        if modality:
            query["Modality"] = modality
        return self.post("/tools/find", {"Level": "Instance", "Query": query})

    def download(self, instance_id: str) -> bytes:
        return self._req("GET", f"/instances/{instance_id}/file")

    def download_results(self, study_uid: str, out_dir: Path) -> list[Path]:
        """Save the study's SR and KO instances as ``SR_<uid>.dcm`` / ``KO_<uid>.dcm``."""
        import io

        import pydicom

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        for modality in ("SR", "KO"):
            for iid in self.find(study_uid, modality):
                raw = self.download(iid)
                ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
                p = out_dir / f"{modality}_{ds.SOPInstanceUID}.dcm"
                p.write_bytes(raw)
                saved.append(p)
        return saved
