"""The study lifecycle: states as enums stored as the same strings, every transition a
conditional journal method, one UTC convention, and no import circle in the package."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from cagtest.imports import cycles, import_graph
from dicom_node import outbox as outbox_mod
from dicom_node.config import parse_config
from dicom_node.journal import Journal
from dicom_node.outbox import Outbox
from dicom_node.tables import JobState, OutboxState, StudyState, utcnow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def journal(tmp_path):
    j = Journal(f"sqlite:///{tmp_path / 'j.db'}")
    yield j
    j.close()


def rec(j, study="1.2.3", sop="1.2.3.1.1", **kw):
    return j.record_instance(study_uid=study, series_uid=study + ".1", sop_instance_uid=sop,
                             sop_class_uid="1.2.840.10008.5.1.4.1.1.12.1", modality="XA",
                             transfer_syntax="1.2.840.10008.1.2.1", path=f"/x/{sop}.dcm", size=10, **kw)


def processed(j, study="1.2.3") -> int:
    """A study taken through completion and processing to ``reported``; returns its job id."""
    rec(j, study=study, received_at=utcnow() - timedelta(seconds=60))
    assert j.complete_study(study, 1.0) is True
    job = j.claim_job()
    assert j.advance_stage(study, "frames") and j.publish_results(study)
    return job.id


def raw(tmp_path, sql):
    con = sqlite3.connect(tmp_path / "j.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_states_are_stored_as_the_same_plain_strings(journal, tmp_path):
    processed(journal)
    assert journal.mark_sent("1.2.3")
    assert raw(tmp_path, "SELECT state, typeof(state) FROM studies") == [("sent", "text")]
    assert raw(tmp_path, "SELECT state FROM jobs") == [("done",)]
    st = journal.get_study("1.2.3")
    assert st.state is StudyState.SENT and st.state == "sent" and st.as_dict()["state"] == "sent"
    assert [s.value for s in StudyState] == ["receiving", "waiting", "processing", "reported", "sent", "failed"]


def test_a_journal_written_before_the_enums_still_reads(journal, tmp_path):
    rec(journal)
    con = sqlite3.connect(tmp_path / "j.db")
    con.execute("UPDATE studies SET state='failed', stage='vlm', error='boom', "
                "updated_at='2026-01-02 03:04:05.000006'")
    con.commit()
    con.close()
    st = journal.get_study("1.2.3")
    assert st.state is StudyState.FAILED and st.stage == "vlm"
    assert st.updated_at.tzinfo is not None and st.updated_at.isoformat() == "2026-01-02T03:04:05.000006+00:00"


def test_transitions_happen_only_from_their_states(journal):
    rec(journal)
    assert not journal.mark_sent("1.2.3")                      # receiving: not reported
    assert not journal.mark_delivery_failed("1.2.3", "x")
    assert journal.get_study("1.2.3").state is StudyState.RECEIVING
    job_id = processed(journal)
    assert journal.get_job(job_id).state is JobState.DONE
    assert journal.mark_delivery_failed("1.2.3", "PACS said 0xA700")
    st = journal.get_study("1.2.3")
    assert (st.state, st.stage, st.error) == (StudyState.FAILED, "outbox", "PACS said 0xA700")
    assert not journal.mark_sent("1.2.3")                      # failed: only a retry resumes it
    assert not journal.fail_receiving("1.2.3", "mpps", "discontinued")
    with pytest.raises(ValueError, match="unknown study state"):
        journal.set_study_state("1.2.3", "bogus")


def test_a_late_instance_keeps_a_failing_job_from_failing_the_study(journal):
    rec(journal, received_at=utcnow() - timedelta(seconds=60))
    journal.complete_study("1.2.3", 1.0)
    job = journal.claim_job()
    assert journal.advance_stage("1.2.3", "selector")
    rec(journal, sop="1.2.3.1.2")                              # reopened while processing
    assert not journal.abandon_job(job.id, "1.2.3", "boom")
    assert journal.get_study("1.2.3").state is StudyState.RECEIVING
    assert journal.get_job(job.id).state is JobState.FAILED   # the job fails all the same
    journal.complete_study("1.2.3", 0.0)
    job2 = journal.claim_job()
    assert journal.advance_stage("1.2.3", "vlm")
    assert journal.abandon_job(job2.id, "1.2.3", "out of memory")
    st = journal.get_study("1.2.3")
    assert (st.state, st.stage, st.error) == (StudyState.FAILED, "vlm", "out of memory")


def test_resume_delivery_is_one_commit_and_changes_nothing_without_rows(journal):
    processed(journal)
    journal.mark_delivery_failed("1.2.3", "refused")
    assert journal.resume_delivery("1.2.3", lambda s: 0) == 0   # nothing to send: rolled back
    assert journal.get_study("1.2.3").state is StudyState.FAILED
    with pytest.raises(RuntimeError):
        journal.resume_delivery("1.2.3", lambda s: (_ for _ in ()).throw(RuntimeError("db")))
    assert journal.get_study("1.2.3").state is StudyState.FAILED
    assert journal.resume_delivery("1.2.3", lambda s: 2, stage="pipeline") is None  # wrong stage
    assert journal.resume_delivery("1.2.3", lambda s: 2) == 2
    st = journal.get_study("1.2.3")
    assert (st.state, st.stage, st.error) == (StudyState.REPORTED, "outbox", None)
    assert journal.resume_delivery("9.9", lambda s: 1) is None


def test_outbox_times_are_aware_utc_and_stored_as_before(journal, tmp_path):
    cfg = parse_config({"destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}]},
                       base_dir=tmp_path)
    box = Outbox(cfg, journal.sessionmaker)
    before = utcnow()
    box.enqueue("1.2.3", "1.2.3.9", tmp_path / "SR.dcm")
    [row] = box.rows_for("1.2.3")
    assert row.state is OutboxState.PENDING
    for t in (row.created_at, row.queued_at, row.next_attempt_at):
        assert t.tzinfo is not None and before - timedelta(seconds=5) <= t <= utcnow()
    [(stored,)] = raw(tmp_path, "SELECT next_attempt_at FROM outbox")
    assert "+" not in stored and len(stored) == len("2026-01-02 03:04:05.000006")  # naive UTC, as before
    assert outbox_mod.utcnow is utcnow  # one clock for the journal and the outbox


def test_no_import_circle_inside_dicom_node():
    graph = import_graph(ROOT, "dicom_node")
    assert "dicom_node.tables" in graph and graph["dicom_node.tables"] == set()
    assert cycles(graph) == []


def test_the_node_moves_studies_only_through_journal_transitions():
    """``set_study_state`` (unconditional) is for tests and repair: no module of the node calls it."""
    callers = [p.relative_to(ROOT) for p in (ROOT / "dicom_node").rglob("*.py")
               if "set_study_state(" in p.read_text() and p.name != "journal.py"]
    assert callers == []
