"""kill -9 in the middle of an MPPS and a UPS work item: the state survives and both resume."""

from __future__ import annotations

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.config import parse_config
from dicom_node.journal import Journal
from dicom_node.node import Node
from cagtest.dicom import XA_CLASS, make_dataset, pyscu_send, write_dataset
from cagtest.node import NodeProcess, node_config, write_config
from cagtest.workflow import change, outputs, progress, subscribe, work_item, MPPS, SCU, UPS_PULL, UPS_PUSH, UPS_WATCH, RecordingNSCP, mpps_create_ds, \
    mpps_set_ds, wait_for


def test_kill9_mid_mpps_and_mid_work_item_resume(tmp_path):
    watcher = RecordingNSCP("WATCHER")
    cfg = node_config(tmp_path, completion__quiet_seconds=600, mpps__instance_timeout_s=300,
                      ups__subscribers=[{"ae_title": "WATCHER", "host": "127.0.0.1", "port": watcher.port}])
    path = write_config(tmp_path, cfg)
    study, series, mpps_uid = generate_uid(), generate_uid(), generate_uid()
    a, b = (make_dataset(study, series, seed=i) for i in range(2))
    fa, fb = write_dataset(a, tmp_path / "a.dcm"), write_dataset(b, tmp_path / "b.dcm")
    ups_uid, txn = generate_uid(), generate_uid()
    n = NodeProcess(path).start()
    try:
        assert pyscu_send(n.port, [fa]) == [0]
        with SCU(n.port) as scu:
            assert scu.n_create(mpps_create_ds(study), MPPS, mpps_uid)[0] == 0
            done = mpps_set_ds("COMPLETED", {series: [a.SOPInstanceUID, b.SOPInstanceUID]}, XA_CLASS)
            assert scu.n_set(done, MPPS, mpps_uid)[0] == 0
            assert scu.n_create(work_item(study), UPS_PUSH, ups_uid)[0] == 0
            assert scu.n_action(subscribe("WATCHER"), 3, UPS_WATCH, ups_uid)[0] == 0
            assert scu.n_action(change("IN PROGRESS", txn), 1, UPS_PULL, ups_uid)[0] == 0
            assert scu.n_set(progress(txn, 30, "a third"), UPS_PULL, ups_uid)[0] == 0
        assert wait_for(lambda: len(watcher.states(ups_uid)) == 2, timeout=10)
    finally:
        n.kill9()
    j = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    n2 = NodeProcess(path).start()
    try:
        assert j.get_study(study).state == "receiving"
        # MPPS: the watch is rebuilt from the journal; the missing instance completes the study at once
        assert pyscu_send(n2.port, [fb]) == [0]
        st = wait_for(lambda: (s := j.get_study(study)).state == "waiting" and s, timeout=8)
        assert st, n2.log()
        assert len(j.jobs(study, state="queued")) == 1
        # UPS: state, progress, Transaction UID and subscription survived
        with SCU(n2.port) as scu:
            stat, ds = scu.n_get([], UPS_PULL, ups_uid)
            assert stat == 0 and ds.ProcedureStepState == "IN PROGRESS"
            assert int(ds.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress) == 30
            assert scu.n_action(change("COMPLETED", generate_uid()), 1, UPS_PULL, ups_uid)[0] == 0xC301
            assert scu.n_set(outputs(txn, study, generate_uid()), UPS_PULL, ups_uid)[0] == 0
            assert scu.n_action(change("COMPLETED", txn), 1, UPS_PULL, ups_uid)[0] == 0
        assert wait_for(lambda: watcher.states(ups_uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"], timeout=10)
    finally:
        n2.kill9()
        j.close()
        watcher.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_work_item_left_in_progress_is_completed_at_restart(tmp_path):
    """The node stopped after publishing a study's results but before completing its work item
    (the window a kill -9 can hit): the next start completes it, without processing again."""
    calls = []

    def process(node, study_uid):
        calls.append(study_uid)
        node.journal.set_study_state(study_uid, "processing", stage="encode")
        sr = make_dataset(study_uid, generate_uid(), modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.33",
                          frames=1)
        sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        write_dataset(sr, tmp_path / "spool" / "results" / study_uid / f"SR_{sr.SOPInstanceUID}.dcm")
        assert node.journal.publish_results(study_uid)
        raise SystemExit  # dies here: the job is done, the work item still IN PROGRESS

    over = dict(processing__enabled=True, completion__quiet_seconds=0.3, ups__create_for_studies=True)
    cfg = parse_config(node_config(tmp_path, **over), base_dir=tmp_path)
    node = Node(cfg, process_fn=process).start()
    ds = make_dataset()
    try:
        assert pyscu_send(node.port, [write_dataset(ds, tmp_path / "a.dcm")]) == [0]
        assert wait_for(lambda: calls, timeout=10)
        items = wait_for(lambda: [u for u in _items(node) if node.ups.state_of(u)["state"] == "IN PROGRESS"])
        assert len(items) == 1
    finally:
        node.stop(grace_s=1)
    node2 = Node(parse_config(node_config(tmp_path, **over), base_dir=tmp_path), process_fn=process).start()
    try:
        assert node2.ups.state_of(items[0])["state"] == "COMPLETED"
        out = node2.ups.get(items[0]).UnifiedProcedureStepPerformedProcedureSequence[0].OutputInformationSequence
        assert out[0].ReferencedSOPSequence[0].ReferencedSOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
        assert calls == [ds.StudyInstanceUID]  # not processed again
    finally:
        node2.stop(grace_s=1)


def _items(node) -> list[str]:
    import sqlalchemy as sa

    from dicom_node.ups import UPSItem

    with node.journal.sessionmaker() as s:
        return list(s.scalars(sa.select(UPSItem.sop_instance_uid)).all())


