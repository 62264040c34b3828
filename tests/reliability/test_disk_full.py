"""Disk nearly full, and really full: 0xA700, nothing half-written, recovery when space returns.

1. ``storage.min_free_mb`` above the free space: every C-STORE is refused with
   0xA700, nothing is spooled or journaled; restarted with a lower threshold
   (a new config), the same instances are accepted.
2. A real ENOSPC (the spool on a small tmpfs, threshold 0 so the write itself
   fails): the instance that does not fit is refused 0xA700, no partial file is
   left, earlier instances are intact; once the filesystem grows, the refused
   instance is accepted without a restart.  Needs root (mount); skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from cagtest.reliability import db_instance_path, echo, make_study, send_files, sop_uid_of


def _spool_files(node) -> list[Path]:
    spool = Path(node.cfg["storage"]["path"])
    return [p for p in spool.rglob("*") if p.is_file()]


def test_min_free_threshold_refuses_then_recovers_after_restart(nodes, tmp_path):
    free_mb = shutil.disk_usage(tmp_path).free // (1024 * 1024)
    node = nodes(storage={"min_free_mb": int(free_mb + 10_000_000)}, processing={"enabled": False})
    node.start()
    su, files = make_study(tmp_path / "in", 3)
    st = send_files(node.port, files)
    assert len(st) == 3 and set(st.values()) == {0xA700}, {k: hex(v) for k, v in st.items()}
    assert _spool_files(node) == [], _spool_files(node)  # nothing half-written
    assert node.studies() == []  # nothing journaled
    assert echo(node.port)

    node.stop()
    node.cfg["storage"]["min_free_mb"] = 1
    node.start()
    st = send_files(node.port, files)
    assert set(st.values()) == {0}, st
    s = node.study(su)
    assert s is not None and s["n_instances"] == 3, s
    for f in files:
        p = db_instance_path(node, sop_uid_of(f))
        assert p and pydicom.dcmread(p).PixelData == pydicom.dcmread(f).PixelData


def _mount_tmpfs(where: Path, size_mb: int) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
                       capture_output=True, text=True)
    return r.returncode == 0


def test_real_enospc_mid_study(nodes, tmp_path):
    spool = tmp_path / "small-spool"
    if not _mount_tmpfs(spool, 6):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        node = nodes(storage={"path": str(spool), "min_free_mb": 0}, processing={"enabled": False})
        node.start()
        # 1 MiB runs: about five fit in 6 MiB (the .tmp file and the final one share the space).
        su, files = make_study(tmp_path / "in", 9, rows=256, cols=256, frames=16)
        st = {}
        for f in files:  # one association per instance, as some modalities do
            st.update(send_files(node.port, [f]))
        statuses = [st.get(sop_uid_of(f)) for f in files]
        assert 0 in statuses and 0xA700 in statuses, [hex(s) if s is not None else None for s in statuses]
        assert all(s in (0, 0xA700) for s in statuses), statuses
        assert node.alive() and echo(node.port)
        tmpd = spool / ".tmp"
        assert not any(tmpd.iterdir()), f"partial files left: {list(tmpd.iterdir())}"
        for f, s in zip(files, statuses):
            p = db_instance_path(node, sop_uid_of(f))
            if s == 0:
                assert p and pydicom.dcmread(p).PixelData == pydicom.dcmread(f).PixelData
            else:
                assert p is None, f"refused instance journaled: {p}"
                assert not list(spool.rglob(sop_uid_of(f) + ".dcm"))
        # Space returns (the filesystem grows): the refused instances are accepted, no restart needed.
        subprocess.run(["mount", "-o", "remount,size=64m", str(spool)], check=True)
        refused = [f for f, s in zip(files, statuses) if s != 0]
        st2 = send_files(node.port, refused)
        assert set(st2.values()) == {0}, st2
        assert node.study(su)["n_instances"] == len(files)
        node.stop()
    finally:
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)
