"""What the benchmarks share: ports, processes, work folders and their JSON output."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/<name>.py`: the repository's packages
    sys.path.insert(0, str(ROOT))

from dicom_node.demo import free_port  # noqa: E402,F401  (the one copy)


def wait_port(port: int, timeout: float = 60, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} not listening after {timeout} s")


def stop_process(proc: Optional[subprocess.Popen], timeout: float = 30) -> None:
    """SIGTERM (a node shuts down gracefully), then SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def clear_dir(d: Path) -> None:
    for p in Path(d).iterdir():
        p.unlink()


@contextmanager
def work_dir(given: Optional[Path], prefix: str) -> Iterator[Path]:
    """``given`` (created), else a temporary folder removed afterwards."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def emit(out: dict, json_path: Optional[Path]) -> int:
    """Print the result as JSON (and write it to ``json_path``); the exit status 0."""
    if json_path:
        json_path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0
