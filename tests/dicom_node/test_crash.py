"""kill -9 in the middle of an association: nothing acknowledged is lost."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom

from dicom_node.journal import Journal
from cagtest.dicom import dataset_bytes, make_dataset, pyscu_send, write_dataset
from cagtest.node import NodeProcess, node_config, write_config


def test_kill9_mid_transfer_loses_no_acknowledged_instance(tmp_path):
    study = "1.2.826.0.1.3680043.8.498.77"
    files = [write_dataset(make_dataset(study, frames=16, size=256, seed=i), tmp_path / "in" / f"{i}.dcm")
             for i in range(40)]  # 1 MB each
    path = write_config(tmp_path, node_config(tmp_path, completion__quiet_seconds=1))
    n = NodeProcess(path).start()
    statuses: list = []

    def send():
        try:
            pyscu_send(n.port, files, statuses=statuses)
        except Exception:
            pass  # the association dies with the node

    t = threading.Thread(target=send)
    t.start()
    deadline = time.monotonic() + 20
    while len(statuses) < 5 and time.monotonic() < deadline:
        time.sleep(0.002)
    n.kill9()
    t.join(20)
    acked = [f for f, s in zip(files, statuses) if s == 0]
    assert 5 <= len(acked) < len(files), f"kill landed outside the transfer ({len(statuses)} sent)"

    n2 = NodeProcess(path).start()  # restart: cleans temp files, re-arms the timer
    j = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    try:
        assert not list((tmp_path / "spool" / ".tmp").iterdir())
        for f in acked:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            rec = j.get_instance(uid)
            assert rec is not None, f"acknowledged {uid} lost"
            assert dataset_bytes(Path(rec.path)) == dataset_bytes(f)
        deadline = time.monotonic() + 8
        while j.get_study(study).state != "waiting" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert j.get_study(study).state == "waiting"
        assert j.get_study(study).n_instances >= len(acked)
    finally:
        j.close()
        assert n2.terminate() == 0
