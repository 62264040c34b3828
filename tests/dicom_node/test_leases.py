"""Several nodes on one journal: job and outbox claims are leases; a dead node's work is taken
over once its lease expires, a live node's never (issue #16).  On SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from dicom_node.config import parse_config
from dicom_node.journal import Journal
from dicom_node.outbox import PENDING, SENDING, Outbox, OutboxRow
from dicom_node.tables import utcnow


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'j.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def nodes(url):
    """Two nodes' journals on one database (lease 0.6 s) and a way to open more."""
    opened = []

    def open_(owner, lease_s=0.6):
        j = Journal(url, owner=owner, lease_s=lease_s)
        opened.append(j)
        return j

    yield open_
    for j in opened:
        j.close()


def queued_study(j, study):
    j.record_instance(study_uid=study, series_uid=study + ".1", sop_instance_uid=study + ".1.1",
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.12.1", modality="XA",
                      transfer_syntax="1.2.840.10008.1.2.1", path=f"/x/{study}.dcm", size=10,
                      calling_aet="MODALITY", processable=True)
    assert j.complete_study(study, 0) is True


def test_a_live_nodes_job_is_never_taken_and_a_dead_ones_is(nodes):
    a, b = nodes("node-a"), nodes("node-b")
    queued_study(a, "1.2.3")
    job = a.claim_job()
    assert job.claimed_by == a.token and job.claimed_by.startswith("node-a:")
    assert a.advance_stage("1.2.3", "select")
    assert b.claim_job() is None
    # A keeps renewing: past several lease lengths B still cannot take it
    for _ in range(4):
        time.sleep(0.3)
        assert a.renew_leases() == 1
        assert b.claim_job() is None
    # ... and B's start-up recovery leaves another node's running job alone
    assert b.requeue_running_jobs() == 0 and a.holds_job(job.id)
    # A stalls (stops renewing): once the lease has passed, B takes the job over
    time.sleep(0.8)
    took = b.claim_job()
    assert took is not None and took.id == job.id and took.claimed_by == b.token and took.attempts == 2
    assert not a.holds_job(job.id) and b.holds_job(job.id)
    # A wakes up: it is fenced, whatever it concludes is not written
    assert a.advance_stage("1.2.3", "report", first=False) is False
    assert a.publish_results("1.2.3") is False
    assert a.fail_processing("1.2.3", "report", "late") is False
    assert a.finish_job(job.id) is False and a.fail_job(job.id, "late") is False
    assert a.abandon_job(job.id, "1.2.3", "late") is False
    assert a.get_study("1.2.3").state == "processing"
    # B processes and publishes
    assert b.advance_stage("1.2.3", "select")
    assert b.publish_results("1.2.3") is True
    assert b.get_study("1.2.3").state == "reported"
    assert [j.state for j in b.jobs("1.2.3")] == ["done"]


def test_restart_of_the_same_node_requeues_only_its_own_jobs(nodes):
    a, b = nodes("node-a", lease_s=60), nodes("node-b", lease_s=60)
    queued_study(a, "1.2.3")
    queued_study(a, "1.2.4")
    ja, jb = a.claim_job(), b.claim_job()
    assert {ja.study_uid, jb.study_uid} == {"1.2.3", "1.2.4"}
    a.advance_stage(ja.study_uid, "select")
    a2 = nodes("node-a", lease_s=60)  # node-a restarted after a crash: a new process, same id
    assert a2.token != a.token
    assert a2.requeue_running_jobs() == 1
    assert a2.get_job(ja.id).state == "queued" and a2.get_study(ja.study_uid).state == "waiting"
    assert b.holds_job(jb.id)


def test_concurrent_claims_take_each_job_once(nodes):
    js = [nodes(f"node-{i}", lease_s=60) for i in range(3)]
    for k in range(12):
        queued_study(js[0], f"1.2.{k}")
    got: list[tuple[int, str]] = []
    lock = threading.Lock()

    def worker(j):
        while (job := j.claim_job()) is not None:
            with lock:
                got.append((job.id, j.token))

    threads = [threading.Thread(target=worker, args=(j,)) for j in js for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [i for i, _ in got]
    assert len(ids) == 12 and len(set(ids)) == 12
    assert all(j.claimed_by == tok for (i, tok) in got for j in [js[0].get_job(i)])


def outbox(url_, node_id, lease_s=0.6):
    cfg = parse_config({"node": {"ae_title": "CAGNODE", "id": node_id},
                        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}]})
    from dicom_node import db

    engine = db.create_engine(url_)
    db.create_all(engine)
    return Outbox(cfg, db.make_sessionmaker(engine), claim_timeout_s=lease_s), engine


def test_outbox_recovery_leaves_a_live_nodes_sends_alone(url, tmp_path):
    a, ea = outbox(url, "node-a")
    b, eb = outbox(url, "node-b")
    a2, ea2 = outbox(url, "node-a")  # node-a after a restart
    try:
        with a.session_factory() as s, s.begin():
            a.enqueue_in(s, "1.2.3", [("1.2.3.9", tmp_path / "sr.dcm")])
        claimed = a._claim()["pacs"]
        assert len(claimed) == 1
        row = a.rows_for("1.2.3")[0]
        assert row.state == SENDING and row.claimed_by.startswith("node-a:") and row.lease_until is not None
        assert b.recover() == 0 and b._claim() == {}  # node-b's start-up and passes: not its row
        time.sleep(0.35)
        assert a.renew() == 1
        time.sleep(0.35)
        assert b._claim() == {}  # renewed: still node-a's
        assert a2.recover() == 1  # node-a restarted: its own dead process's send is pending again
        assert a.rows_for("1.2.3")[0].state == PENDING
        assert a._claim()["pacs"]
        time.sleep(0.8)  # node-a stalls past its lease: node-b takes the send over
        took = b._claim()["pacs"]
        assert len(took) == 1
        row = b.rows_for("1.2.3")[0]
        assert row.claimed_by.startswith("node-b:") and row.attempts == 3
        # node-a's late outcome is not written over node-b's claim
        a._finish(claimed[0], "sent", 0, None)
        assert b.rows_for("1.2.3")[0].state == SENDING and b.rows_for("1.2.3")[0].claimed_by == row.claimed_by
    finally:
        for e in (ea, eb, ea2):
            e.dispose()


def test_old_journal_gains_the_lease_columns(tmp_path):
    """A journal made before leases opens: the nullable columns are added."""
    path = tmp_path / "old.db"
    eng = sa.create_engine(f"sqlite:///{path}")
    with eng.begin() as c:
        c.exec_driver_sql("CREATE TABLE jobs (id INTEGER PRIMARY KEY, study_uid VARCHAR(64) NOT NULL, "
                          "kind VARCHAR(16) NOT NULL, state VARCHAR(16) NOT NULL, attempts INTEGER NOT NULL, "
                          "created_at DATETIME NOT NULL, started_at DATETIME, finished_at DATETIME, error TEXT, "
                          "claimed_by VARCHAR(255))")
    eng.dispose()
    j = Journal(f"sqlite:///{path}")
    try:
        cols = {c["name"] for c in sa.inspect(j.engine).get_columns("jobs")}
        assert "lease_until" in cols
        queued_study(j, "1.2.3")
        assert j.claim_job().lease_until is not None
    finally:
        j.close()
