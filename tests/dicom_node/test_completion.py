"""Study completion, reopening, the worker pool, and restart safety."""

from __future__ import annotations

import time

import pytest

from dicom_node.journal import Journal
from cagtest.dicom import make_dataset, pyscu_send, write_dataset
from cagtest.net import wait_for
from cagtest.node import NodeProcess, node_config, write_config


def test_quiet_period_completes_study_and_queues_job(make_node, tmp_path):
    node = make_node(completion__quiet_seconds=1)
    study = "1.2.826.0.1.3680043.8.498.1"
    files = [write_dataset(make_dataset(study, seed=i), tmp_path / f"{i}.dcm") for i in range(2)]
    assert pyscu_send(node.port, files) == [0, 0]
    assert node.journal.get_study(study).state == "receiving"
    st = wait_for(lambda: (s := node.journal.get_study(study)).state == "waiting" and s, timeout=6)
    assert st and st.n_instances == 2 and st.completed_at >= st.last_received
    assert [j.state for j in node.journal.jobs(study)] == ["queued"]
    assert node.metrics.studies_completed._value.get() == 1
    # processing disabled: nobody claims it
    time.sleep(1.2)
    assert node.journal.jobs(study)[0].state == "queued"


def test_late_run_reopens_and_is_processed_again(make_node, tmp_path):
    calls = []

    def process(node, study_uid):
        calls.append(study_uid)
        node.journal.set_study_state(study_uid, "reported", stage="outbox")

    node = make_node(process_fn=process, completion__quiet_seconds=1.5, processing__enabled=True)
    study = "1.2.826.0.1.3680043.8.498.2"
    assert pyscu_send(node.port, [write_dataset(make_dataset(study), tmp_path / "a.dcm")]) == [0]
    assert wait_for(lambda: node.journal.get_study(study).state == "reported")
    assert calls == [study]
    assert pyscu_send(node.port, [write_dataset(make_dataset(study, seed=3), tmp_path / "b.dcm")]) == [0]
    assert node.journal.get_study(study).state == "receiving"  # reopened at once
    assert wait_for(lambda: len(calls) == 2 and node.journal.get_study(study).state == "reported")
    jobs = node.journal.jobs(study)
    assert [j.state for j in jobs] == ["done", "done"]
    assert node.journal.get_study(study).n_instances == 2


def test_pipeline_failure_marks_job_and_study_failed(make_node, tmp_path):
    def process(node, study_uid):
        node.journal.set_study_state(study_uid, "processing", stage="selector")
        raise RuntimeError("model exploded")

    node = make_node(process_fn=process, completion__quiet_seconds=0.3, processing__enabled=True)
    ds = make_dataset()
    assert pyscu_send(node.port, [write_dataset(ds, tmp_path / "a.dcm")]) == [0]
    st = wait_for(lambda: (s := node.journal.get_study(ds.StudyInstanceUID)).state == "failed" and s)
    assert st and "model exploded" in st.error and st.stage == "selector"
    [job] = node.journal.jobs(ds.StudyInstanceUID)
    assert job.state == "failed" and "model exploded" in job.error
    text = node.metrics.render().decode()
    assert 'cag_jobs_total{outcome="failed"} 1.0' in text


def test_stage_metrics_api(make_node):
    node = make_node()
    node.metrics.observe_stage("selector", 1.25)
    text = node.metrics.render().decode()
    assert 'cag_stage_seconds_count{stage="selector"} 1.0' in text
    assert 'cag_stage_seconds_sum{stage="selector"} 1.25' in text


def test_restart_resumes_completion_timer(tmp_path):
    cfg = node_config(tmp_path, completion__quiet_seconds=4)
    path = write_config(tmp_path, cfg)
    n = NodeProcess(path).start()
    ds = make_dataset()
    try:
        assert pyscu_send(n.port, [write_dataset(ds, tmp_path / "a.dcm")]) == [0]
    finally:
        assert n.terminate() == 0, n.log()  # stopped before the quiet period ended
    j = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    try:
        assert j.get_study(ds.StudyInstanceUID).state == "receiving"
        n2 = NodeProcess(path).start()
        try:
            st = wait_for(lambda: (s := j.get_study(ds.StudyInstanceUID)).state == "waiting" and s, timeout=15)
            assert st, n2.log()
            assert len(j.jobs(ds.StudyInstanceUID, state="queued")) == 1
        finally:
            assert n2.terminate() == 0
    finally:
        j.close()


@pytest.mark.peers
def test_outbox_delivery_marks_study_sent(make_node, tmp_path):
    """Node + outbox + a real dcmtk storescp as the PACS: reported -> sent."""
    import shutil
    import socket
    import subprocess

    if shutil.which("storescp") is None:
        pytest.skip("storescp missing")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        pacs_port = s.getsockname()[1]
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def process(node, study_uid):
            inst = node.journal.study_instances(study_uid)[0]
            node.journal.set_study_state(study_uid, "reported", stage="outbox")
            node.outbox.enqueue(study_uid, inst.sop_instance_uid, inst.path)

        node = make_node(process_fn=process, completion__quiet_seconds=0.3, processing__enabled=True,
                         destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                        "port": pacs_port}],
                         outbox={"poll_s": 0.2, "retry_base_s": 0.2})
        assert node.outbox is not None
        ds = make_dataset()
        assert pyscu_send(node.port, [write_dataset(ds, tmp_path / "a.dcm")]) == [0]
        st = wait_for(lambda: (s := node.journal.get_study(ds.StudyInstanceUID)).state == "sent" and s, timeout=15)
        assert st, node.journal.get_study(ds.StudyInstanceUID)
        assert len(list(pacs_dir.iterdir())) == 1
    finally:
        pacs.terminate()
        pacs.wait(10)
