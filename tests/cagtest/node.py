"""The node as the tests run it: configs, and a real ``cag-node serve`` subprocess."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parents[2]
CAG_NODE = str(ROOT / ".venv" / "bin" / "cag-node")
if not Path(CAG_NODE).exists():  # e.g. another venv layout
    CAG_NODE = str(Path(sys.executable).parent / "cag-node")
READY = re.compile(r"cag-node listening on (\S+):(\d+) as (\S+).*\(admin (?:(\S+):(\d+)|disabled)\)")


def node_config(tmp_path: Path, **over) -> dict:
    """A loopback test config: port 0, admin port 0, processing off, no destinations."""
    cfg = {
        "node": {"processes": 1, "ae_title": "CAGNODE", "host": "127.0.0.1", "port": 0,
                 "allowed_calling_aets": ["MODALITY", "ORTHANC", "STORESCU", "ECHOSCU", "PYSCU"]},
        "storage": {"path": str(tmp_path / "spool"), "journal": f"sqlite:///{tmp_path / 'journal.db'}",
                    "min_free_mb": 1},
        "completion": {"quiet_seconds": 30},
        "processing": {"enabled": False},
        "admin": {"host": "127.0.0.1", "port": 0},
        "destinations": [],
    }
    for dotted, value in over.items():
        keys = dotted.split("__")
        d = cfg
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return p


@dataclass
class NodeProcess:
    """A real ``cag-node serve`` subprocess."""

    config_path: Path
    proc: Optional[subprocess.Popen] = None
    host: str = "127.0.0.1"
    port: int = 0
    admin_port: Optional[int] = None
    ready_line: str = ""
    log_path: Optional[Path] = None
    stdout_lines: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> "NodeProcess":
        self.log_path = self.config_path.with_suffix(f".{int(time.time() * 1000)}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([CAG_NODE, "serve", "--config", str(self.config_path), "--grace", "10"],
                                     stdout=subprocess.PIPE, stderr=self._log, cwd=self.config_path.parent)
        deadline = time.monotonic() + timeout
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in buf:
                    line = buf.split(b"\n", 1)[0].decode()
                    m = READY.search(line)
                    if m:
                        self.ready_line = line
                        self.host, self.port = m.group(1), int(m.group(2))
                        self.admin_port = int(m.group(5)) if m.group(5) else None
                        return self
            if self.proc.poll() is not None:
                break
        self.kill9()
        raise RuntimeError(f"node did not become ready: {buf!r}\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
