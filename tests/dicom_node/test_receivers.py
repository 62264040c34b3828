"""node.processes: extra receiver processes on one port (SO_REUSEPORT), each with the same durable
path; every instance acknowledged is journalled, and the connections are spread (issue #16)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from pydicom.uid import generate_uid

from cagtest.dicom import make_dataset
from dicom_node import receivers

pytestmark = pytest.mark.skipif(not receivers.reuse_port_supported(), reason="no SO_REUSEPORT here")


def _store(port, datasets, out):
    from pynetdicom import AE

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CAGNODE")
    assert assoc.is_established
    try:
        for ds in datasets:
            st = assoc.send_c_store(ds)
            out.append((str(ds.SOPInstanceUID), int(st.Status)))
    finally:
        assoc.release()


def test_two_receiver_processes_share_the_port_and_the_journal(make_node):
    node = make_node(node__processes=2, completion__quiet_seconds=1, mpps__enabled=False, ups__enabled=False)
    assert node.receivers is not None and node.receivers.alive() == 1
    child = node.receivers.pids()[0]
    study = generate_uid()
    batches = [[make_dataset(study, generate_uid(), seed=10 * a + i, frames=2) for i in range(2)]
               for a in range(16)]
    out: list = []
    threads = [threading.Thread(target=_store, args=(node.port, b, out)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(out) == 32 and all(st == 0 for _, st in out), out
    insts = node.journal.study_instances(study)
    assert {i.sop_instance_uid for i in insts} == {u for u, _ in out}
    for i in insts:
        assert os.path.getsize(i.path) == i.size
    pids = {int(i.received_by.split(":")[1]) for i in insts}
    # 16 connections over two processes: all on one would be a 1-in-32768 chance
    assert pids == {os.getpid(), child}, pids
    # the study is completed once, whichever process received its last instance
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and node.journal.get_study(study).state == "receiving":
        time.sleep(0.2)
    assert node.journal.get_study(study).state == "waiting"
    assert len(node.journal.jobs(study)) == 1


def test_receiver_process_stops_with_the_node(make_node):
    node = make_node(node__processes=3, mpps__enabled=False, ups__enabled=False)
    pids = node.receivers.pids()
    assert len(pids) == 2
    node.stop(grace_s=2)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_second_node_on_the_port_fails_instead_of_sharing_it(make_node, tmp_path):
    first = make_node(node__processes=2, mpps__enabled=False, ups__enabled=False)
    from dicom_node.config import parse_config
    from dicom_node.node import Node
    from cagtest.node import node_config

    other = tmp_path / "other"
    other.mkdir()
    cfg = parse_config(node_config(other, node__processes=2, node__port=first.port, mpps__enabled=False,
                                   ups__enabled=False), base_dir=other)
    with pytest.raises(OSError):
        Node(cfg).start()
    assert first.receivers.alive() == 1
