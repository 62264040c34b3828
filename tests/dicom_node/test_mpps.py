"""MPPS SCP over real associations: completion by MPPS, the timeout fallback,
DISCONTINUED, refused transitions, forwarding, and the calling-AE allow-list."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import timedelta

from pydicom.uid import generate_uid

from cagtest.dicom import XA_CLASS, make_dataset, pyscu_send, write_dataset
from cagtest.node import CAG_NODE, node_config, write_config
from cagtest.workflow import MPPS, SCU, RecordingNSCP, mpps_create_ds, mpps_set_ds, wait_for


def _recorder():
    calls: list[tuple[str, float]] = []

    def process(node, study_uid):
        calls.append((study_uid, time.monotonic()))
        node.journal.set_study_state(study_uid, "reported", stage="outbox")

    return calls, process


def _files(tmp_path, study, n, series=None):
    series = series or generate_uid()
    out = []
    for i in range(n):
        ds = make_dataset(study, series, seed=i)
        out.append((ds.SOPInstanceUID, write_dataset(ds, tmp_path / f"{study[-6:]}-{i}.dcm")))
    return series, out


def test_mpps_completed_processes_at_last_instance_despite_quiet_600(make_node, tmp_path):
    calls, process = _recorder()
    node = make_node(process_fn=process, processing__enabled=True, completion__quiet_seconds=600)
    study, mpps_uid = generate_uid(), generate_uid()
    series, files = _files(tmp_path, study, 3)
    with SCU(node.port) as scu:
        assert scu.n_create(mpps_create_ds(study), MPPS, mpps_uid)[0] == 0x0000
        assert pyscu_send(node.port, [p for _, p in files[:2]]) == [0, 0]
        done = mpps_set_ds("COMPLETED", {series: [u for u, _ in files]}, XA_CLASS)
        assert scu.n_set(done, MPPS, mpps_uid)[0] == 0x0000
    time.sleep(1.0)  # one listed instance is still missing: not complete
    assert calls == [] and node.journal.get_study(study).state == "receiving"
    assert node.mpps.get(mpps_uid)["completion"] == "waiting"
    t_last = time.monotonic()
    assert pyscu_send(node.port, [files[2][1]]) == [0]
    assert wait_for(lambda: calls, timeout=5), "not processed after the last listed instance"
    assert calls[0][0] == study and calls[0][1] - t_last < 3.0
    assert node.mpps.get(mpps_uid)["completion"] == "triggered"
    # the recorder sees the call when processing starts; the job is 'done' once it returns
    assert wait_for(lambda: [j.state for j in node.journal.jobs(study)] == ["done"], timeout=5), \
        [j.state for j in node.journal.jobs(study)]
    # The quiet-period timer that fires later finds the job: nothing processed twice.
    later = node.journal.get_study(study).last_received + timedelta(seconds=601)
    assert node.journal.complete_study(study, 600, now=later) is False


def test_mpps_completed_after_all_instances_processes_at_once(make_node, tmp_path):
    calls, process = _recorder()
    node = make_node(process_fn=process, processing__enabled=True, completion__quiet_seconds=600)
    study, mpps_uid = generate_uid(), generate_uid()
    series, files = _files(tmp_path, study, 2)
    assert pyscu_send(node.port, [p for _, p in files]) == [0, 0]
    with SCU(node.port) as scu:
        assert scu.n_create(mpps_create_ds(study), MPPS, mpps_uid)[0] == 0
        t0 = time.monotonic()
        assert scu.n_set(mpps_set_ds("COMPLETED", {series: [u for u, _ in files]}, XA_CLASS), MPPS,
                         mpps_uid)[0] == 0
    assert wait_for(lambda: calls, timeout=5)
    assert calls[0][1] - t0 < 3.0
    assert len(node.journal.jobs(study)) == 1


def test_mpps_missing_instance_falls_back_to_quiet_period(make_node, tmp_path):
    calls, process = _recorder()
    node = make_node(process_fn=process, processing__enabled=True, completion__quiet_seconds=3,
                     mpps__instance_timeout_s=1)
    study, mpps_uid = generate_uid(), generate_uid()
    series, files = _files(tmp_path, study, 1)
    never = generate_uid()
    t_sent = time.monotonic()
    assert pyscu_send(node.port, [files[0][1]]) == [0]
    with SCU(node.port) as scu:
        assert scu.n_create(mpps_create_ds(study), MPPS, mpps_uid)[0] == 0
        assert scu.n_set(mpps_set_ds("COMPLETED", {series: [files[0][0], never]}, XA_CLASS), MPPS,
                         mpps_uid)[0] == 0
    assert wait_for(lambda: node.mpps.get(mpps_uid)["completion"] == "timed_out", timeout=5)
    assert "1 of 2" in node.mpps.get(mpps_uid)["note"]
    assert calls == []  # the timeout does not process: the quiet period does
    assert wait_for(lambda: calls, timeout=8)
    assert calls[0][1] - t_sent >= 3.0
    # shown by `cag-node studies`
    cfg_path = write_config(tmp_path, node_config(tmp_path), "cli.yaml")
    out = subprocess.run([CAG_NODE, "studies", "--config", str(cfg_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith(study))
    assert "COMPLETED/timed_out" in line and "never arrived" in line
    js = subprocess.run([CAG_NODE, "studies", "--json", "--config", str(cfg_path)], capture_output=True,
                        text=True, timeout=60)
    row = next(r for r in json.loads(js.stdout) if r["study_uid"] == study)
    assert row["mpps"][0]["completion"] == "timed_out" and row["mpps"][0]["n_listed"] == 2


def _discontinued(node, tmp_path, listed_missing: int) -> tuple[str, str]:
    """One run of a new study sent, then its MPPS created and DISCONTINUED listing it (and
    ``listed_missing`` instances that never come); returns (study, MPPS UID)."""
    study, mpps_uid = generate_uid(), generate_uid()
    series, files = _files(tmp_path, study, 1)
    assert pyscu_send(node.port, [files[0][1]]) == [0]
    with SCU(node.port) as scu:
        assert scu.n_create(mpps_create_ds(study), MPPS, mpps_uid)[0] == 0
        listed = {series: [files[0][0]] + [generate_uid() for _ in range(listed_missing)]}
        assert scu.n_set(mpps_set_ds("DISCONTINUED", listed, XA_CLASS), MPPS, mpps_uid)[0] == 0
    return study, mpps_uid


def test_mpps_discontinued_skip_is_not_processed(make_node, tmp_path):
    calls, process = _recorder()
    node = make_node(process_fn=process, processing__enabled=True, completion__quiet_seconds=1,
                     mpps__on_discontinued="skip")
    study, mpps_uid = _discontinued(node, tmp_path, listed_missing=0)
    st = wait_for(lambda: (s := node.journal.get_study(study)).state == "failed" and s, timeout=6)
    assert st and st.stage == "mpps" and "DISCONTINUED" in st.error
    time.sleep(0.5)
    assert calls == [] and node.journal.jobs(study) == []


def test_mpps_discontinued_process_processes_what_arrived(make_node, tmp_path):
    calls, process = _recorder()
    node = make_node(process_fn=process, processing__enabled=True, completion__quiet_seconds=600,
                     mpps__on_discontinued="process")
    study, mpps_uid = _discontinued(node, tmp_path, listed_missing=1)  # one never came: processed anyway
    assert wait_for(lambda: calls, timeout=5)
    assert node.mpps.get(mpps_uid)["completion"] == "triggered"


def test_mpps_invalid_requests_refused_with_standard_statuses(make_node, tmp_path):
    node = make_node()
    study, uid = generate_uid(), generate_uid()
    with SCU(node.port) as scu:
        # N-SET of an instance that does not exist: 0x0112 No such object instance
        assert scu.n_set(mpps_set_ds("COMPLETED", {}, XA_CLASS), MPPS, generate_uid())[0] == 0x0112
        # N-CREATE must be IN PROGRESS: 0x0106 Invalid attribute value
        bad = mpps_create_ds(study)
        bad.PerformedProcedureStepStatus = "COMPLETED"
        assert scu.n_create(bad, MPPS, generate_uid())[0] == 0x0106
        assert scu.n_create(mpps_create_ds(study), MPPS, uid)[0] == 0
        # the same instance again: 0x0111 Duplicate SOP instance
        assert scu.n_create(mpps_create_ds(study), MPPS, uid)[0] == 0x0111
        # an unknown status value: 0x0106
        weird = mpps_set_ds("DONE", {}, XA_CLASS)
        assert scu.n_set(weird, MPPS, uid)[0] == 0x0106
        assert node.mpps.get(uid)["state"] == "IN PROGRESS"
        assert scu.n_set(mpps_set_ds("COMPLETED", {}, XA_CLASS), MPPS, uid)[0] == 0
        # after COMPLETED: 0x0110 Processing failure (may no longer be updated, F.7.2.2)
        st, _ = scu.n_set(mpps_set_ds("DISCONTINUED", {}, XA_CLASS), MPPS, uid)
        assert st == 0x0110
        assert scu.n_set(mpps_set_ds("IN PROGRESS", {}, XA_CLASS), MPPS, uid)[0] == 0x0110
        assert scu.assoc.is_established  # the node stays up, the association too
    assert node.mpps.get(uid)["state"] == "COMPLETED"


def test_mpps_refused_for_calling_ae_not_allowed(make_node):
    node = make_node()
    scu = SCU(node.port, aet="INTRUDER")
    assert not scu.assoc.is_established and scu.assoc.is_rejected


def test_mpps_forwarded_to_destination(make_node, tmp_path):
    ris = RecordingNSCP("RIS")
    try:
        node = make_node(destinations=[{"name": "ris", "ae_title": "RIS", "host": "127.0.0.1", "port": ris.port}],
                         mpps__forward_to="ris")
        study, uid = generate_uid(), generate_uid()
        with SCU(node.port) as scu:
            assert scu.n_create(mpps_create_ds(study), MPPS, uid)[0] == 0
            assert scu.n_set(mpps_set_ds("COMPLETED", {}, XA_CLASS), MPPS, uid)[0] == 0
        assert wait_for(lambda: len(ris.mpps) == 2, timeout=10)
        assert [(op, u) for op, u, _ in ris.mpps] == [("create", uid), ("set", uid)]
        assert ris.mpps[1][2].PerformedProcedureStepStatus == "COMPLETED"
    finally:
        ris.stop()


def test_mpps_sees_instances_another_node_received(make_node, tmp_path):
    """Several nodes on one journal: the MPPS is held by this node, its last listed instance is
    acknowledged by another node (journalled, this node's instance_stored never called)."""
    from dicom_node.journal import Journal

    calls, process = _recorder()
    node = make_node(process_fn=process, processing__enabled=True, completion__quiet_seconds=600)
    study, mpps_uid = generate_uid(), generate_uid()
    series, files = _files(tmp_path, study, 2)
    with SCU(node.port) as scu:
        assert scu.n_create(mpps_create_ds(study), MPPS, mpps_uid)[0] == 0x0000
        assert pyscu_send(node.port, [files[0][1]]) == [0]
        assert scu.n_set(mpps_set_ds("COMPLETED", {series: [u for u, _ in files]}, XA_CLASS), MPPS,
                         mpps_uid)[0] == 0x0000
    time.sleep(0.5)
    assert calls == [] and node.mpps.get(mpps_uid)["completion"] == "waiting"
    other = Journal(node.config.journal_url, owner="node-b")
    try:
        other.record_instance(study_uid=study, series_uid=series, sop_instance_uid=files[1][0],
                              sop_class_uid=XA_CLASS, modality="XA", transfer_syntax="1.2.840.10008.1.2.1",
                              path=str(files[1][1]), size=files[1][1].stat().st_size, calling_aet="MODALITY",
                              processable=True)
    finally:
        other.close()
    assert wait_for(lambda: calls, timeout=10), "the MPPS never saw the other node's instance"
    assert node.mpps.get(mpps_uid)["completion"] == "triggered"
