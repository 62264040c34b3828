"""Waiting, free ports and external tools."""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Callable

import pytest

from dicom_node.demo import free_port  # noqa: F401  (the one copy: the demo picks its ports with it too)


def wait_for(pred: Callable[[], object], timeout: float = 10.0, interval: float = 0.1, what: str = "condition"):
    """``pred()``'s first truthy value, polled every ``interval`` s; AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    v = pred()
    if v:
        return v
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def run_tool(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def require_tools(*tools: str):
    """A skip mark naming the missing tools (dcmtk, Orthanc, dicom3tools)."""
    missing = [t for t in tools if not have(t)]
    return pytest.mark.skipif(bool(missing), reason=f"missing tools: {', '.join(missing)}")
