"""UPS provider (IHE AIW-I) over real associations: the full lifecycle with a watcher
receiving N-EVENT-REPORTs, refused transitions, C-FIND, and the node as performer."""

from __future__ import annotations

import time

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cagtest.dicom import dataset, make_dataset, pyscu_send, write_dataset
from cagtest.node import node_config
from cagtest.workflow import change, outputs, progress, subscribe, work_item, SCU, UPS_PULL, UPS_PUSH, UPS_WATCH, RecordingNSCP, wait_for

GLOBAL = "1.2.840.10008.5.1.4.34.5"


@pytest.fixture
def watcher():
    w = RecordingNSCP("WATCHER")
    yield w
    w.stop()


def _watched_node(make_node, watcher, **over):
    return make_node(ups__subscribers=[{"ae_title": "WATCHER", "host": "127.0.0.1", "port": watcher.port}], **over)


def test_ups_full_lifecycle_with_event_reports(make_node, watcher):
    node = _watched_node(make_node, watcher)
    study, uid, txn = generate_uid(), generate_uid(), generate_uid()
    with SCU(node.port, aet="ORTHANC") as ris, SCU(node.port, aet="MODALITY") as performer:
        assert ris.n_create(work_item(study), UPS_PUSH, uid)[0] == 0x0000
        assert ris.n_action(subscribe("WATCHER"), 3, UPS_WATCH, uid)[0] == 0x0000
        assert wait_for(lambda: watcher.states(uid) == ["SCHEDULED"]), watcher.events  # initial state report
        st, found = performer.c_find(_query("SCHEDULED"))
        assert st == 0 and uid in [str(d.SOPInstanceUID) for d in found]
        assert performer.n_action(change("IN PROGRESS", txn), 1, UPS_PULL, uid)[0] == 0x0000
        assert performer.n_set(progress(txn, 50, "half"), UPS_PULL, uid)[0] == 0x0000
        sr_uid = generate_uid()
        assert performer.n_set(outputs(txn, study, sr_uid), UPS_PULL, uid)[0] == 0x0000
        assert performer.n_action(change("COMPLETED", txn), 1, UPS_PULL, uid)[0] == 0x0000
        st, ds = ris.n_get([0x00741000, 0x00741216, 0x00081195], UPS_PUSH, uid)
        assert st == 0 and ds.ProcedureStepState == "COMPLETED"
        assert "TransactionUID" not in ds  # never disclosed
        ref = ds.UnifiedProcedureStepPerformedProcedureSequence[0].OutputInformationSequence[0]
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr_uid
        st, found = ris.c_find(_query("COMPLETED"))
        assert [str(d.SOPInstanceUID) for d in found] == [uid]
    assert wait_for(lambda: watcher.states(uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"], timeout=10), \
        watcher.events
    prog = watcher.of_type(uid, 3)
    assert [int(p.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress) for p in prog] == [50]
    assert set(watcher.calling) == {"CAGNODE"}  # sent by the node on its own associations


def _query(state: str) -> Dataset:
    return dataset(ProcedureStepState=state, SOPInstanceUID="", ProcedureStepLabel="", ScheduledProcedureStepPriority="")


def test_ups_wrong_transaction_and_illegal_transitions_refused(make_node, watcher):
    node = _watched_node(make_node, watcher)
    study, uid, txn = generate_uid(), generate_uid(), generate_uid()
    with SCU(node.port) as scu:
        assert scu.n_action(change("IN PROGRESS", txn), 1, UPS_PULL, generate_uid())[0] == 0xC307  # no such UPS
        bad = work_item(study)
        bad.ProcedureStepState = "IN PROGRESS"
        assert scu.n_create(bad, UPS_PUSH, generate_uid())[0] == 0xC309  # N-CREATE must be SCHEDULED
        assert scu.n_create(work_item(study), UPS_PUSH, uid)[0] == 0
        assert scu.n_create(work_item(study), UPS_PUSH, uid)[0] == 0x0111  # duplicate
        assert scu.n_action(change("COMPLETED", txn), 1, UPS_PULL, uid)[0] == 0xC310  # not yet IN PROGRESS
        assert scu.n_action(change("SCHEDULED", txn), 1, UPS_PULL, uid)[0] == 0xC303
        assert scu.n_action(change("IN PROGRESS", txn), 1, UPS_PULL, uid)[0] == 0
        assert scu.n_action(change("IN PROGRESS", generate_uid()), 1, UPS_PULL, uid)[0] == 0xC302
        wrong = generate_uid()
        assert scu.n_set(progress(wrong, 10), UPS_PULL, uid)[0] == 0xC301  # wrong Transaction UID
        assert scu.n_action(change("COMPLETED", wrong), 1, UPS_PULL, uid)[0] == 0xC301
        assert scu.n_action(change("COMPLETED", txn), 1, UPS_PULL, uid)[0] == 0  # start time set at claim
        assert scu.n_action(change("COMPLETED", txn), 1, UPS_PULL, uid)[0] == 0xB306  # warning: already
        assert scu.n_action(change("CANCELED", txn), 1, UPS_PULL, uid)[0] == 0xC300  # final
        assert scu.n_set(progress(txn, 99), UPS_PULL, uid)[0] == 0xC300
        cancel = Dataset()
        cancel.ReasonForCancellation = "too late"
        assert scu.n_action(cancel, 2, UPS_PUSH, uid)[0] == 0xC311  # cancel a COMPLETED one
        assert scu.n_action(subscribe("NOBODY"), 3, UPS_WATCH, uid)[0] == 0xC308  # unknown receiving AE
        assert scu.n_get([0x00741000], UPS_PULL, generate_uid())[0] == 0xC307
        assert scu.assoc.is_established
    assert node.ups.state_of(uid)["state"] == "COMPLETED"


def test_ups_request_cancel_and_global_subscription(make_node, watcher):
    node = _watched_node(make_node, watcher)
    with SCU(node.port) as scu:
        assert scu.n_action(subscribe("WATCHER"), 3, UPS_WATCH, GLOBAL)[0] == 0
        a, b, txn = generate_uid(), generate_uid(), generate_uid()
        assert scu.n_create(work_item(generate_uid()), UPS_PUSH, a)[0] == 0
        assert scu.n_create(work_item(generate_uid()), UPS_PUSH, b)[0] == 0
        cancel = Dataset()
        cancel.ReasonForCancellation = "ordered twice"
        assert scu.n_action(cancel, 2, UPS_PUSH, a)[0] == 0  # SCHEDULED: canceled at once
        assert scu.n_action(cancel, 2, UPS_PUSH, a)[0] == 0xB304
        assert scu.n_action(change("IN PROGRESS", txn), 1, UPS_PULL, b)[0] == 0
        assert scu.n_action(cancel, 2, UPS_PUSH, b)[0] == 0  # IN PROGRESS: the performer is told
        assert node.ups.state_of(b)["state"] == "IN PROGRESS"
        assert scu.n_action(change("CANCELED", txn), 1, UPS_PULL, b)[0] == 0
        assert scu.n_action(subscribe("WATCHER"), 4, UPS_WATCH, GLOBAL)[0] == 0  # unsubscribe
    assert wait_for(lambda: watcher.states(a) == ["SCHEDULED", "CANCELED"]
                    and watcher.states(b) == ["SCHEDULED", "IN PROGRESS", "CANCELED"], timeout=10), watcher.events
    [req] = watcher.of_type(b, 2)
    assert req.ReasonForCancellation == "ordered twice" and req.RequestingAE == "MODALITY"
    with SCU(node.port) as scu:
        c = generate_uid()
        assert scu.n_create(work_item(generate_uid()), UPS_PUSH, c)[0] == 0
    time.sleep(1.0)
    assert watcher.states(c) == []  # no longer subscribed


def test_node_performs_work_item_and_completes_it_with_results(make_node, watcher, tmp_path):
    """A RIS asks for AI work on a study; the node claims it when it processes the study and
    completes it with the SR as output reference."""
    from pydicom.uid import ExplicitVRLittleEndian

    def process(node, study_uid):
        node.journal.set_study_state(study_uid, "processing", stage="encode")
        sr = make_dataset(study_uid, generate_uid(), modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.33",
                          frames=1)
        p = tmp_path / "spool" / "results" / study_uid / f"SR_{sr.SOPInstanceUID}.dcm"
        sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        write_dataset(sr, p)
        assert node.journal.publish_results(study_uid)
        return {"results": [{"kind": "SR", "sop_instance_uid": sr.SOPInstanceUID, "path": str(p)}]}

    node = _watched_node(make_node, watcher, process_fn=process, processing__enabled=True,
                         completion__quiet_seconds=0.5)
    study, uid = generate_uid(), generate_uid()
    with SCU(node.port, aet="ORTHANC") as ris:
        assert ris.n_create(work_item(study), UPS_PUSH, uid)[0] == 0
        assert ris.n_action(subscribe("WATCHER"), 3, UPS_WATCH, uid)[0] == 0
    assert pyscu_send(node.port, [write_dataset(make_dataset(study), tmp_path / "a.dcm")]) == [0]
    assert wait_for(lambda: node.ups.state_of(uid)["state"] == "COMPLETED", timeout=10), node.ups.state_of(uid)
    assert node.ups.state_of(uid)["owner"] == "node"
    ds = node.ups.get(uid)
    out = ds.UnifiedProcedureStepPerformedProcedureSequence[0].OutputInformationSequence
    [sr_path] = list((tmp_path / "spool" / "results" / study).glob("SR_*.dcm"))
    assert out[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr_path.name[3:-4]
    assert wait_for(lambda: watcher.states(uid) == ["SCHEDULED", "IN PROGRESS", "COMPLETED"], timeout=10)
    assert [int(p.ProcedureStepProgressInformationSequence[0].ProcedureStepProgress)
            for p in watcher.of_type(uid, 3)] == [10, 100]


def test_node_creates_work_item_per_study_and_cancels_on_failure(make_node, tmp_path):
    def process(node, study_uid):
        raise RuntimeError("model exploded")

    node = make_node(process_fn=process, processing__enabled=True, completion__quiet_seconds=0.3,
                     ups__create_for_studies=True)
    ds = make_dataset()
    assert pyscu_send(node.port, [write_dataset(ds, tmp_path / "a.dcm")]) == [0]
    with SCU(node.port) as scu:
        found = wait_for(lambda: scu.c_find(_query("CANCELED"))[1], timeout=10)
        assert len(found) == 1
        st, item = scu.n_get([], UPS_PULL, str(found[0].SOPInstanceUID))
    assert st == 0 and item.InputInformationSequence[0].StudyInstanceUID == ds.StudyInstanceUID
    assert "model exploded" in item.ReasonForCancellation
    import json
    import subprocess

    from cagtest.node import CAG_NODE, write_config

    cfg_path = write_config(tmp_path, node_config(tmp_path), "cli.yaml")
    js = subprocess.run([CAG_NODE, "studies", "--json", "--config", str(cfg_path)], capture_output=True,
                        text=True, timeout=60)
    row = next(r for r in json.loads(js.stdout) if r["study_uid"] == ds.StudyInstanceUID)
    assert row["ups"] == [{"sop_instance_uid": str(found[0].SOPInstanceUID), "state": "CANCELED",
                           "performer": "node", "created_by": "CAGNODE"}]
