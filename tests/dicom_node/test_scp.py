"""The listener against real peers: dcmtk echoscu/storescu and a raw pynetdicom
SCU, with the node running as a ``cag-node serve`` subprocess."""

from __future__ import annotations

import json
import warnings
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest

from dicom_node.journal import Journal
from cagtest.net import require_tools
from cagtest.dicom import CT_CLASS, STORESCU_TS_OPTION, dataset_bytes, make_dataset, pyscu_send, storescu_cmd, write_dataset
from cagtest.net import run_tool
from cagtest.node import CAG_NODE, NodeProcess, node_config, write_config

pytestmark = [pytest.mark.peers, require_tools("storescu", "echoscu")]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    d = tmp_path_factory.mktemp("node")
    cfg = node_config(d, node__allowed_hosts=["127.0.0.0/8", "::1/128"], logging__file="logs/node.log")
    p = NodeProcess(write_config(d, cfg)).start()
    p.tmp = d
    p.journal = Journal(f"sqlite:///{d / 'journal.db'}")
    yield p
    rc = p.terminate()
    p.journal.close()
    assert rc == 0, p.log()


def spool_files(d: Path) -> set[Path]:
    return {p for p in (d / "spool").rglob("*") if p.is_file()}


def test_ready_line_and_echo(node):
    assert node.port > 0 and node.admin_port and "as CAGNODE" in node.ready_line
    r = run_tool(["echoscu", "-aet", "ECHOSCU", "-aec", "CAGNODE", "127.0.0.1", str(node.port)])
    assert r.returncode == 0, r.stderr


def test_storescu_study_is_stored_and_journaled(node, study_dir):
    d, study, uids = study_dir
    files = sorted(d.glob("*.dcm"))
    r = run_tool(storescu_cmd(node.port, files))
    assert r.returncode == 0, r.stderr
    inst = {i.sop_instance_uid: i for i in node.journal.study_instances(study)}
    assert set(inst) == set(uids)
    for f in files:
        src = pydicom.dcmread(f)
        rec = inst[src.SOPInstanceUID]
        assert Path(rec.path) == node.tmp / "spool" / study / src.SeriesInstanceUID / f"{src.SOPInstanceUID}.dcm"
        assert rec.size == Path(rec.path).stat().st_size
        assert rec.processable and rec.modality == "XA" and rec.n_frames == 8 and rec.calling_aet == "STORESCU"
        # storescu re-encodes, but these simple files come out byte-identical
        assert dataset_bytes(Path(rec.path)) == dataset_bytes(f)
        stored = pydicom.dcmread(rec.path)
        assert stored.file_meta.SourceApplicationEntityTitle == "STORESCU"
        assert stored.PixelData == src.PixelData
    st = node.journal.get_study(study)
    assert st.state == "receiving" and st.n_instances == 3
    assert st.patient_hash and "SYN0001" not in st.patient_hash

    out = run_tool([CAG_NODE, "studies", "--config", str(node.config_path), "--json"])
    assert out.returncode == 0, out.stderr
    rows = {r["study_uid"]: r for r in json.loads(out.stdout)}
    assert rows[study]["n_instances"] == 3 and rows[study]["state"] == "receiving"
    table = run_tool([CAG_NODE, "studies", "--config", str(node.config_path)])
    assert study in table.stdout and "receiving" in table.stdout


def _groups_without_duplicate_uids(files: list[Path]) -> list[list[Path]]:
    """Files sharing a SOP Instance UID go into different rounds (a re-send overwrites)."""
    rounds: list[list[Path]] = []
    seen: list[set[str]] = []
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for r, s in zip(rounds, seen):
            if uid not in s:
                r.append(f)
                s.add(uid)
                break
        else:
            rounds.append([f])
            seen.append({uid})
    return rounds


def test_all_real_files_accepted_bytes_identical(node, real_xa_files):
    """Every real XA/RF file, sent raw (the file's data set bytes go on the wire
    unchanged), is acknowledged, journaled and stored byte for byte."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for round_files in _groups_without_duplicate_uids(real_xa_files):
            statuses = pyscu_send(node.port, round_files)
            assert statuses == [0] * len(round_files), list(zip(round_files, statuses))
            for f in round_files:
                meta = pydicom.dcmread(f, stop_before_pixels=True)
                rec = node.journal.get_instance(str(meta.SOPInstanceUID))
                assert rec is not None, f
                assert rec.transfer_syntax == meta.file_meta.TransferSyntaxUID
                assert dataset_bytes(Path(rec.path)) == dataset_bytes(f), f.name
                assert rec.modality == meta.Modality
                # XA (incl. SC with Modality XA) is analysed, RF is stored only
                assert rec.processable == (meta.Modality == "XA"), (f.name, rec.reason)
        uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in real_xa_files}
    assert all(node.journal.get_instance(u) for u in uids)


def test_real_files_with_storescu(node, real_xa_files):
    """The same files through dcmtk storescu, proposing each file's own transfer syntax."""
    by_option = defaultdict(list)
    for f in real_xa_files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if ts in STORESCU_TS_OPTION:  # dcmtk 3.6.7 has no HTJ2K
            by_option[tuple(STORESCU_TS_OPTION[ts])].append(f)
    sent = 0
    for option, files in by_option.items():
        r = run_tool(storescu_cmd(node.port, files, aet="MODALITY", extra=list(option)))
        assert r.returncode == 0, (option, r.stderr[-2000:])
        sent += len(files)
        for f in files:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            rec = node.journal.get_instance(uid)
            assert rec is not None and rec.calling_aet == "MODALITY"
            assert pydicom.dcmread(rec.path, stop_before_pixels=True).SOPInstanceUID == uid
    assert sent >= len(real_xa_files) - 1


def test_unlisted_calling_ae_refused(node, study_dir, tmp_path):
    d, study, _ = study_dir
    r = run_tool(storescu_cmd(node.port, sorted(d.glob("*.dcm")), aet="INTRUDER"))
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stderr + r.stdout
    assert node.journal.get_study(study) is None

    from pynetdicom import AE

    def rejection(calling: str, called: str) -> tuple:
        ae = AE(ae_title=calling)
        ae.add_requested_context("1.2.840.10008.1.1")
        a = ae.associate("127.0.0.1", node.port, ae_title=called)
        assert a.is_rejected
        p = a.acceptor.primitive
        return p.result, p.result_source, p.diagnostic

    assert rejection("INTRUDER", "CAGNODE") == (0x01, 0x01, 0x03)  # calling AE not allowed: reason 3
    assert rejection("PYSCU", "NOTUS") == (0x01, 0x01, 0x07)  # called AE title wrong: reason 7


def _status_class(s):
    return s is not None and 0xC000 <= s <= 0xCFFF


def test_bad_input_refused_node_stays_up(node, tmp_path):
    good = make_dataset()
    src = write_dataset(good, tmp_path / "good.dcm")
    raw = src.read_bytes()
    meta_len = len(raw) - len(dataset_bytes(src))

    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[: meta_len + (len(raw) - meta_len) // 2])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[:meta_len] + bytes(range(256)) * 8)

    statuses = pyscu_send(node.port, [truncated, garbage])
    assert all(_status_class(s) for s in statuses), [hex(s or 0) for s in statuses]
    assert node.journal.get_instance(good.SOPInstanceUID) is None
    assert not list((node.tmp / "spool").rglob(f"{good.SOPInstanceUID}*"))

    rej = node.journal.rejections()
    assert {r["status"] for r in rej[-2:]} <= set(range(0xC000, 0xD000))
    assert any("malformed" in r["reason"] for r in rej[-2:])

    r = run_tool(["echoscu", "-aet", "ECHOSCU", "-aec", "CAGNODE", "127.0.0.1", str(node.port)])
    assert r.returncode == 0


def test_hostile_uid_cannot_escape_spool(node, tmp_path):
    before = spool_files(node.tmp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hostile = make_dataset(sop_uid="../../../../escape")
        hostile.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"  # pynetdicom reads the request UID here
        f = write_dataset(hostile, tmp_path / "hostile.dcm")
        hostile2 = make_dataset(study_uid="../../evil")
        f2 = write_dataset(hostile2, tmp_path / "hostile2.dcm")
        statuses = pyscu_send(node.port, [f, f2])
    assert statuses == [0xC212, 0xC212]
    assert spool_files(node.tmp) == before
    assert not list(node.tmp.parent.rglob("escape*")) and not list(node.tmp.parent.rglob("evil*"))
    assert node.journal.rejections()[-1]["reason"].startswith("StudyInstanceUID")


def test_ct_stored_not_processable(node, tmp_path):
    ct = make_dataset(modality="CT", sop_class=CT_CLASS, frames=1)
    f = write_dataset(ct, tmp_path / "ct.dcm")
    assert pyscu_send(node.port, [f]) == [0]
    rec = node.journal.get_instance(ct.SOPInstanceUID)
    assert rec is not None and rec.processable is False and "CT" in rec.reason
    assert Path(rec.path).is_file()


def test_resend_is_idempotent(node, tmp_path):
    ds = make_dataset()
    f = write_dataset(ds, tmp_path / "x.dcm")
    assert pyscu_send(node.port, [f]) == [0]
    first = node.journal.get_instance(ds.SOPInstanceUID)
    r = run_tool(storescu_cmd(node.port, [f], aet="MODALITY"))
    assert r.returncode == 0
    assert pyscu_send(node.port, [f]) == [0]
    second = node.journal.get_instance(ds.SOPInstanceUID)
    assert second.path == first.path and second.received_at > first.received_at
    assert node.journal.get_study(ds.StudyInstanceUID).n_instances == 1
    assert len(node.journal.study_instances(ds.StudyInstanceUID)) == 1
    assert not list((node.tmp / "spool" / ".tmp").iterdir())
    assert dataset_bytes(Path(second.path)) == dataset_bytes(f)


def test_streamed_reception_uid_mismatch_and_dropped_connection(node, tmp_path):
    """Data sets stream into spool/.tmp as they arrive.  A request naming another instance than its
    data set is stored under the data set's UID with a matching File Meta (bytes as received); a
    connection dropped in the middle of a data set leaves no file behind and the node keeps going."""
    import io
    import socket
    import time

    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    tmpd = node.tmp / "spool" / ".tmp"
    ds = make_dataset()
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.999.1"  # becomes the request's UID
    f = write_dataset(ds, tmp_path / "mismatch.dcm")
    assert pyscu_send(node.port, [f]) == [0]
    rec = node.journal.get_instance(ds.SOPInstanceUID)
    assert rec is not None and node.journal.get_instance("1.2.826.0.1.3680043.10.999.1") is None
    stored = pydicom.dcmread(rec.path)
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.SourceApplicationEntityTitle == "PYSCU"
    assert dataset_bytes(Path(rec.path)) == dataset_bytes(f) and rec.size == Path(rec.path).stat().st_size
    assert not list(tmpd.iterdir())

    big = make_dataset(frames=64, size=512)
    fb = write_dataset(big, tmp_path / "big.dcm")
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(big.SOPClassUID, str(big.file_meta.TransferSyntaxUID))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CAGNODE")
    assert assoc.is_established
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = big.SOPClassUID, big.SOPInstanceUID
    req.DataSet = io.BytesIO(dataset_bytes(fb))
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    sock = assoc.dul.socket.socket
    for i, prim in enumerate(msg.encode_msg(assoc.accepted_contexts[0].context_id, 16384)):
        pdu = P_DATA_TF()
        pdu.from_primitive(prim)
        sock.sendall(pdu.encode())
        if i == 50:  # command + ~800 KB of a 16 MiB data set, then the connection drops
            break
    sock.shutdown(socket.SHUT_RDWR)
    try:
        assoc.abort()
    except Exception:
        pass
    deadline = time.monotonic() + 10
    while list(tmpd.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(tmpd.iterdir()), list(tmpd.iterdir())
    assert node.journal.get_instance(big.SOPInstanceUID) is None
    small = make_dataset()
    assert pyscu_send(node.port, [write_dataset(small, tmp_path / "after.dcm")]) == [0]


def test_metrics_and_health(node):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/healthz", timeout=5) as r:
        h = json.loads(r.read())
    assert h["status"] == "ok" and h["port"] == node.port
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'cag_associations_total{reason="",result="accepted"}' in text
    assert "cag_instances_received_total" in text and "cag_bytes_received_total" in text
    # earlier tests in this module were refused for these reasons
    assert 'cag_associations_total{reason="calling_aet",result="rejected"} 2.0' in text
    assert 'cag_associations_total{reason="called_aet",result="rejected"} 1.0' in text
    assert 'cag_store_failures_total{status="0xC212"} 2.0' in text
    assert 'cag_store_failures_total{status="0xC210"} 2.0' in text


def test_host_allow_list_refuses(node_proc, tmp_path):
    n = node_proc(node_config(tmp_path, node__allowed_hosts=["10.0.0.0/8"]))
    r = run_tool(["echoscu", "-aet", "ECHOSCU", "-aec", "CAGNODE", "127.0.0.1", str(n.port)])
    assert r.returncode != 0
    assert "Association Rejected" in r.stderr + r.stdout
    from pynetdicom import AE
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    a = ae.associate("127.0.0.1", n.port, ae_title="CAGNODE")
    assert a.is_rejected
    p = a.acceptor.primitive
    assert (p.result, p.result_source, p.diagnostic) == (0x01, 0x01, 0x01)


def test_low_disk_refused_with_a700(node_proc, tmp_path):
    n = node_proc(node_config(tmp_path, storage__min_free_mb=10**9))
    ds = make_dataset()
    f = write_dataset(ds, tmp_path / "in" / "x.dcm")
    assert pyscu_send(n.port, [f]) == [0xA700]
    assert not [p for p in (tmp_path / "spool").rglob("*") if p.is_file()]
    j = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    assert j.get_instance(ds.SOPInstanceUID) is None
    assert j.rejections()[-1]["status"] == 0xA700
    j.close()


def test_negotiation_accepts_cath_study_classes_and_syntaxes(node):
    """Beyond pynetdicom's 128-context proposal limit on the requestor side, the
    node supports every storage class with every stored-as-received syntax."""
    from pynetdicom import AE

    classes = ["1.2.840.10008.5.1.4.1.1.12.1", "1.2.840.10008.5.1.4.1.1.12.1.1",  # XA, Enhanced XA
               "1.2.840.10008.5.1.4.1.1.12.2", "1.2.840.10008.5.1.4.1.1.12.2.1",  # XRF, Enhanced XRF
               "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.2",  # SC, MF grayscale byte SC
               "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.67",  # Comprehensive SR, RDSR
               "1.2.840.10008.5.1.4.1.1.88.59", "1.2.840.10008.5.1.4.1.1.2"]  # KO, CT
    syntaxes = ["1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.51",
                "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.93",
                "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.5",
                "1.2.840.10008.1.2.4.102"]
    ae = AE(ae_title="PYSCU")
    for c in classes:
        for t in syntaxes:
            ae.add_requested_context(c, t)
    a = ae.associate("127.0.0.1", node.port, ae_title="CAGNODE")
    try:
        assert a.is_established
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in a.accepted_contexts}
        assert accepted == {(c, t) for c in classes for t in syntaxes}
    finally:
        a.release()


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2"])
def test_deflated_big_endian_implicit_stored_as_received(node, tmp_path, ts):
    ds = make_dataset(frames=2)
    ds.file_meta.TransferSyntaxUID = ts
    f = tmp_path / "x.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ts == "1.2.840.10008.1.2.2":
            ds.save_as(f, implicit_vr=False, little_endian=False, enforce_file_format=True)
        else:
            ds.save_as(f, enforce_file_format=True)
    assert pyscu_send(node.port, [f]) == [0]
    rec = node.journal.get_instance(ds.SOPInstanceUID)
    assert rec.transfer_syntax == ts and rec.n_frames == 2 and rec.processable
    assert dataset_bytes(Path(rec.path)) == dataset_bytes(f)
    back = pydicom.dcmread(rec.path)
    assert back.PixelData == ds.PixelData and back.StudyInstanceUID == ds.StudyInstanceUID


def test_sigterm_lets_inflight_association_finish(node_proc, tmp_path):
    import signal
    import threading
    import time

    files = [write_dataset(make_dataset(frames=16, size=256, seed=i), tmp_path / "in" / f"{i}.dcm")
             for i in range(25)]
    n = node_proc(node_config(tmp_path))
    statuses: list = []
    t = threading.Thread(target=lambda: pyscu_send(n.port, files, statuses=statuses))
    t.start()
    deadline = time.monotonic() + 20
    while not statuses and time.monotonic() < deadline:
        time.sleep(0.002)
    n.proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert n.proc.wait(30) == 0, n.log()
    assert statuses == [0] * len(files), statuses
    j = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    assert j.count_instances() == len(files)
    j.close()
    # stopped: new associations are refused at TCP level
    r = run_tool(["echoscu", "-aet", "ECHOSCU", "-aec", "CAGNODE", "127.0.0.1", str(n.port)])
    assert r.returncode != 0


def test_no_phi_in_logs(node):
    """The synthetic patient (name, ID, birth date) never reaches the log at INFO."""
    for log in (node.log(), (node.tmp / "logs" / "node.log").read_text()):  # stderr and logging.file
        assert "association accepted" in log and "listening on" in log
        for phi in ("SYN0001", "Synthetic", "19500101"):
            assert phi not in log
