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


def test_mpps_and_ups_are_served_by_every_receiver_process(make_node, tmp_path):
    """MPPS N-CREATE, the instances and N-SET COMPLETED each on their own association, so they
    land on either process: every study is completed by its MPPS (the quiet period is 600 s),
    and UPS work items created on one process are found from the other."""
    from cagtest.dicom import XA_CLASS, pyscu_send, write_dataset
    from cagtest.workflow import MPPS, SCU, UPS_PULL, UPS_PUSH, mpps_create_ds, mpps_set_ds, wait_for, work_item
    from cagtest.dicom import dataset

    processed: list[str] = []

    def process(node, study_uid):
        processed.append(study_uid)
        node.journal.set_study_state(study_uid, "reported", stage="outbox")

    node = make_node(process_fn=process, node__processes=2, processing__enabled=True,
                     completion__quiet_seconds=600)
    assert node.receivers is not None and node.receivers.alive() == 1
    studies = []
    for k in range(8):
        study, series, mpps_uid = generate_uid(), generate_uid(), generate_uid()
        files = []
        for i in range(2):
            ds = make_dataset(study, series, seed=10 * k + i, frames=2)
            files.append((str(ds.SOPInstanceUID), write_dataset(ds, tmp_path / f"s{k}-{i}.dcm")))
        with SCU(node.port) as scu:
            assert scu.n_create(mpps_create_ds(study), MPPS, mpps_uid)[0] == 0x0000
        for _, path in files:  # one association per instance
            assert pyscu_send(node.port, [path]) == [0]
        with SCU(node.port) as scu:
            assert scu.n_set(mpps_set_ds("COMPLETED", {series: [u for u, _ in files]}, XA_CLASS), MPPS,
                             mpps_uid)[0] == 0x0000
        studies.append(study)
    assert wait_for(lambda: len(set(processed)) == 8, timeout=20), (processed, node.journal.list_studies())
    assert sorted(processed) == sorted(studies)  # each once
    pids = {int(i.received_by.split(":")[1]) for st in studies for i in node.journal.study_instances(st)}
    assert pids == {os.getpid(), node.receivers.pids()[0]}

    items = [generate_uid() for _ in range(6)]
    for uid in items:
        with SCU(node.port, aet="ORTHANC") as ris:
            assert ris.n_create(work_item(generate_uid()), UPS_PUSH, uid)[0] == 0x0000
    query = dataset(ProcedureStepState="SCHEDULED", SOPInstanceUID="", ProcedureStepLabel="",
                    ScheduledProcedureStepPriority="")
    for _ in range(4):  # from whichever process each association reaches
        with SCU(node.port) as performer:
            st, found = performer.c_find(query, UPS_PULL)
        assert st == 0 and set(items) <= {str(d.SOPInstanceUID) for d in found}
