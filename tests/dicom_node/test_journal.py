"""The journal on a real SQLite file: idempotency, reopening, completion, the job queue."""

from __future__ import annotations

import os
import threading
from datetime import timedelta

import pytest

from dicom_node.journal import Journal, utcnow


@pytest.fixture(params=["sqlite", "postgresql"])
def journal(request, tmp_path):
    """The same tests on SQLite and on PostgreSQL (a throw-away server: tests/conftest.py)."""
    if request.param == "sqlite":
        j = Journal(f"sqlite:///{tmp_path / 'j.db'}")
    else:
        j = Journal(request.getfixturevalue("postgres_url"))
    yield j
    j.close()


def rec(j, study="1.2.3", series="1.2.3.1", sop="1.2.3.1.1", **kw):
    args = dict(study_uid=study, series_uid=series, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.12.1",
                modality="XA", transfer_syntax="1.2.840.10008.1.2.1", path=f"/x/{sop}.dcm", size=10,
                calling_aet="MODALITY", processable=True)
    args.update(kw)
    return j.record_instance(**args)


def test_record_is_idempotent_per_sop_instance(journal):
    r1 = rec(journal)
    r2 = rec(journal, size=20)
    assert r1.new_instance and r1.new_study and not r2.new_instance and not r2.new_study
    st = journal.get_study("1.2.3")
    assert st.n_instances == 1 and st.state == "receiving"
    [i] = journal.study_instances("1.2.3")
    assert i.size == 20 and i.series_instance_uid == "1.2.3.1" and i.series_uid == "1.2.3.1"
    rec(journal, sop="1.2.3.1.2")
    assert journal.get_study("1.2.3").n_instances == 2


def test_completion_reopen_and_jobs(journal):
    t0 = utcnow()
    rec(journal, received_at=t0)
    # not quiet yet: tells when to look again
    again = journal.complete_study("1.2.3", 5, now=t0 + timedelta(seconds=1))
    assert again == t0 + timedelta(seconds=5)
    assert journal.complete_study("1.2.3", 5, now=t0 + timedelta(seconds=6)) is True
    st = journal.get_study("1.2.3")
    assert st.state == "waiting" and st.completed_at is not None
    assert [j.state for j in journal.jobs("1.2.3")] == ["queued"]
    assert journal.complete_study("1.2.3", 5, now=t0 + timedelta(seconds=7)) is False  # nothing to do

    r = rec(journal, sop="1.2.3.1.9")  # a late run reopens the study
    assert r.reopened and journal.get_study("1.2.3").state == "receiving"
    # the job queued for the incomplete study is superseded, not run on half a study
    assert [j.state for j in journal.jobs("1.2.3")] == ["cancelled"]
    assert journal.claim_job() is None
    assert journal.complete_study("1.2.3", 0) is True
    assert [j.state for j in journal.jobs("1.2.3")] == ["cancelled", "queued"]


def test_a_reopened_and_recompleted_study_stops_the_running_job(journal):
    """Reopened by a late run and complete again (a new job queued) while the first job still
    runs: the first job's next stage is refused, so it cannot publish results of half the study
    (and then make the new job's stages fail on a 'reported' study)."""
    t0 = utcnow()
    rec(journal, received_at=t0)
    assert journal.complete_study("1.2.3", 0, now=t0 + timedelta(seconds=1)) is True
    job = journal.claim_job()
    assert journal.advance_stage("1.2.3", "frames", first=True)
    assert journal.advance_stage("1.2.3", "selector", first=False)
    rec(journal, sop="1.2.3.1.9")  # late run: receiving
    assert not journal.advance_stage("1.2.3", "vlm", first=False)
    assert journal.complete_study("1.2.3", 0) is True  # complete again: waiting, a new job
    assert journal.get_study("1.2.3").state == "waiting"
    assert not journal.advance_stage("1.2.3", "vlm", first=False)  # the old job stays stopped
    assert not journal.publish_results("1.2.3")
    new = journal.claim_job()
    assert new is not None and new.id != job.id
    assert journal.advance_stage("1.2.3", "frames", first=True)  # the new job runs


def test_claim_is_exclusive_across_threads(journal):
    for i in range(20):
        journal.enqueue_job(f"1.2.{i}")
    got, lock = [], threading.Lock()

    def worker():
        while (job := journal.claim_job()) is not None:
            with lock:
                got.append(job.id)

    ts = [threading.Thread(target=worker) for _ in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert sorted(got) == sorted(set(got)) and len(got) == 20


def test_job_lifecycle_and_requeue(journal):
    rec(journal)
    journal.complete_study("1.2.3", 0)
    job = journal.claim_job()
    assert job.state == "running" and job.attempts == 1
    journal.set_study_state("1.2.3", "processing", stage="selector")
    assert journal.claim_job() is None
    # the process dies: at the next start the job is queued again
    assert journal.requeue_running_jobs() == 1
    assert journal.get_study("1.2.3").state == "waiting"
    job = journal.claim_job()
    assert job.attempts == 2
    journal.fail_job(job.id, "boom")
    assert journal.get_job(job.id).state == "failed" and journal.get_job(job.id).error == "boom"
    journal.set_study_state("1.2.3", "failed", stage="vlm", error="boom")
    retry = journal.retry_study("1.2.3")
    assert retry.state == "queued" and journal.get_study("1.2.3").state == "waiting"
    assert journal.get_study("1.2.3").error is None
    with pytest.raises(ValueError):
        journal.set_study_state("1.2.3", "bogus")


def test_timings_merge(journal):
    rec(journal)
    journal.set_study_timings("1.2.3", {"selector": 1.5})
    journal.set_study_timings("1.2.3", {"vlm": 2})
    assert journal.get_study("1.2.3").timings == {"selector": 1.5, "vlm": 2.0}
    assert journal.get_study("1.2.3").as_dict()["timings"]["vlm"] == 2.0


def test_concurrent_first_instances_of_a_new_study(journal):
    """Two associations delivering the first instances of one new study at the
    same moment both insert the study row: neither may fail (seen in the bench)."""
    barrier = threading.Barrier(8)
    errors = []

    def one(i):
        barrier.wait()
        try:
            rec(journal, study="1.9.9", series=f"1.9.9.{i % 2}", sop=f"1.9.9.0.{i}")
        except Exception as exc:  # pragma: no cover - the failure being tested
            errors.append(exc)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert errors == []
    st = journal.get_study("1.9.9")
    assert st.n_instances == 8 and len(journal.study_instances("1.9.9")) == 8


def test_requeue_only_this_hosts_jobs(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = Journal(url, owner="host-a"), Journal(url, owner="host-b")
    try:
        for uid in ("1.1", "1.2"):
            a.enqueue_job(uid)
        ja, jb = a.claim_job(), b.claim_job()
        assert {ja.study_uid, jb.study_uid} == {"1.1", "1.2"}
        assert b.requeue_running_jobs() == 1  # host b restarts: only its own job
        assert a.get_job(ja.id).state == "running" and a.get_job(jb.id).state == "queued"
    finally:
        a.close()
        b.close()
