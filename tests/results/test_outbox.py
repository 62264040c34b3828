"""Outbox + SCU against real peers: Orthanc, dcmtk storescp, and a scripted pynetdicom SCP."""

from __future__ import annotations

import random
import threading
import time

import pytest
import sqlalchemy as sa
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from dicom_node import scu
from dicom_node.config import parse_config
from dicom_node.db import create_engine, make_sessionmaker
from dicom_node.kos import build_kos
from dicom_node.outbox import FAILED, PENDING, SENDING, SENT, Outbox, OutboxRow, backoff_s, create_table, retry_study_db
from dicom_node.sr import build_sr, save
from cagtest.net import free_port, wait_for
from cagtest.pacs import RecordingSCP
from cagtest.results import make_result, make_xa

pytestmark = pytest.mark.peers


# ------------------------------------------------------------------ helpers
@pytest.fixture
def db(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'journal.db'}")
    create_table(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def results(tmp_path):
    """(study_uid, [(sop_uid, path)]) for an SR and a KOS of a two-run study."""
    su = generate_uid()
    sources = [make_xa(su), make_xa(su, series_number=2)]
    res = make_result(sources)
    sr = build_sr(sources, res)
    kos = build_kos(sources, res)
    out = [(sr.SOPInstanceUID, save(sr, tmp_path / "out" / "sr.dcm")),
           (kos.SOPInstanceUID, save(kos, tmp_path / "out" / "kos.dcm"))]
    return su, out


def cfg(*dests, **outbox):
    ob = {"retry_base_s": 0.2, "retry_max_s": 0.5, "horizon_s": 60, "poll_s": 0.2}
    ob.update(outbox)
    return parse_config({
        "node": {"ae_title": "CAGNODE", "acse_timeout": 3, "dimse_timeout": 5, "network_timeout": 5},
        "destinations": [{"name": n, "ae_title": a, "host": "127.0.0.1", "port": p} for n, a, p in dests],
        "outbox": ob,
    })


def drain(outbox: Outbox, study_uid: str, timeout: float = 20.0, want=(SENT, FAILED)) -> list[OutboxRow]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outbox.process_due()
        rows = outbox.rows_for(study_uid)
        if rows and all(r.state in want for r in rows):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"not drained: {outbox.rows_for(study_uid)}")


# ------------------------------------------------------------------ unit
def test_classify_status():
    assert scu.classify_status(0x0000)[0] == scu.SUCCESS
    assert scu.classify_status(0xB000)[0] == scu.WARNING
    assert scu.classify_status(0xB007)[0] == scu.WARNING
    assert scu.classify_status(0xA700)[0] == scu.RETRY
    assert scu.classify_status(0xA7FF)[0] == scu.RETRY
    assert scu.classify_status(0xC000)[0] == scu.RETRY
    assert scu.classify_status(None)[0] == scu.RETRY
    for permanent in (0xA900, 0xA9FF, 0x0122, 0x0124):
        assert scu.classify_status(permanent)[0] == scu.FAILED


def test_backoff_is_exponential_capped_and_jittered():
    rng = random.Random(1)
    for n in range(1, 12):
        d = backoff_s(n, 1.0, 30.0, rng)
        cap = min(30.0, 2 ** (n - 1))
        assert cap * 0.5 <= d <= cap
    assert len({round(backoff_s(3, 1.0, 30.0, rng), 6) for _ in range(20)}) > 1


def test_no_destinations_is_a_noop(db, results):
    su, objs = results
    ob = Outbox(cfg(), db)
    assert ob.enqueue(su, *objs[0]) == []
    assert ob.rows_for(su) == [] and ob.study_state(su) is None and ob.process_due() == 0


# ------------------------------------------------------------------ real peers
def test_results_land_in_orthanc_and_storescp(db, results, orthanc_factory, storescp_factory):
    su, objs = results
    pacs = orthanc_factory().start()
    scp = storescp_factory()
    sent = []
    ob = Outbox(cfg(("pacs", "ORTHANC", pacs.dicom_port), ("archive", scp.aet, scp.port)), db,
                on_study_sent=sent.append)
    for uid, path in objs:
        assert len(ob.enqueue(su, uid, path)) == 2
        ob.enqueue(su, uid, path)  # idempotent: still one row per destination
    rows = drain(ob, su)
    assert len(rows) == 4 and {r.state for r in rows} == {SENT}
    assert pacs.find(su, "SR") == [objs[0][0]]
    assert pacs.find(su, "KO") == [objs[1][0]]
    assert len(scp.files()) == 2
    assert sent == [su]
    assert ob.process_due() == 0  # nothing left to do


def test_pacs_down_then_back_exactly_once(db, results, orthanc_factory):
    su, objs = results
    pacs = orthanc_factory()  # ports reserved, not started
    sent = []
    ob = Outbox(cfg(("pacs", "ORTHANC", pacs.dicom_port)), db, on_study_sent=sent.append)
    sched = BackgroundScheduler()
    sched.start()
    try:
        ob.start(sched)
        for uid, path in objs:
            ob.enqueue(su, uid, path)
        rows = wait_for(lambda: (rs := ob.rows_for(su)) and all(r.attempts >= 2 for r in rs) and rs)
        assert all(r.state in (PENDING, SENDING) for r in rows)
        # refused TCP connections surface as "connection failed" or, depending on timing
        # inside pynetdicom, as an aborted association: both are retried
        assert all(any(w in (r.last_error or "") for w in ("connection", "rejected", "aborted")) for r in rows
                   if r.state == PENDING), [r.last_error for r in rows]
        pacs.start()
        wait_for(lambda: ob.study_state(su) == SENT, timeout=30)
        time.sleep(0.5)  # a few more passes: nothing is sent twice
    finally:
        ob.stop()
        sched.shutdown(wait=True)
    assert pacs.find(su, "SR") == [objs[0][0]] and pacs.find(su, "KO") == [objs[1][0]]
    rows = ob.rows_for(su)
    assert len(rows) == 2 and all(r.state == SENT for r in rows)
    assert sent == [su]


def test_refusing_peer_is_retried_until_horizon_then_failed_and_retry_study(db, results, storescp_factory):
    su, objs = results
    scp = storescp_factory(refuse=True)
    failed = []
    ob = Outbox(cfg(("refuser", "STORESCP", scp.port), horizon_s=1.0), db,
                on_study_failed=lambda s, e: failed.append((s, e)))
    ob.enqueue(su, *objs[0])
    rows = drain(ob, su, timeout=15)
    r = rows[0]
    assert r.state == FAILED and r.attempts >= 2
    assert "gave up after" in r.last_error
    assert "rejected" in r.last_error or "aborted" in r.last_error  # storescp --refuse: either
    assert failed and failed[0][0] == su
    # retry_study (and the CLI's retry_study_db) re-queue it
    assert ob.retry_study(su) == 1
    r = ob.rows_for(su)[0]
    assert r.state == PENDING and r.attempts == 0
    assert retry_study_db(db, su) == 1
    assert retry_study_db(db, "1.2.3.4") == 0


@pytest.mark.parametrize("statuses, state, attempts, received", [
    ([0xA700], SENT, 2, 2),          # out of resources: retried, then stored
    ([0xC000], SENT, 2, 2),          # cannot understand: retried
    ([0xB000], SENT, 1, 1),          # warning = stored (logged)
    ([0xA900], FAILED, 1, 1),        # data set does not match SOP class: permanent
    ([0x0124], FAILED, 1, 1),        # not authorised: permanent
], ids=["A700-retried", "C000-retried", "B000-warning-stored", "A900-failed", "0124-failed"])
def test_status_handling(db, results, statuses, state, attempts, received, tmp_path):
    su, objs = results
    peer = RecordingSCP(tmp_path / "pacs", ae_title="SCRIPTED", statuses=statuses).start()
    try:
        ob = Outbox(cfg(("scripted", "SCRIPTED", peer.port)), db)
        ob.enqueue(su, *objs[0])
        r = drain(ob, su)[0]
    finally:
        peer.stop()
    assert (r.state, r.attempts, len(peer.answered)) == (state, attempts, received), r.last_error
    if statuses[0] == 0xB000:
        assert "0xB000" in r.last_error
    if state == FAILED:
        assert f"0x{statuses[0]:04X}" in r.last_error


def test_sop_class_not_accepted_fails(db, results):
    su, objs = results
    ae = AE(ae_title="SCRIPTED")
    ae.add_supported_context("1.2.840.10008.1.1")
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        ob = Outbox(cfg(("verify-only", "SCRIPTED", port)), db)
        ob.enqueue(su, *objs[0])
        r = drain(ob, su)[0]
    finally:
        server.shutdown()
    assert r.state == FAILED and "not supported" in r.last_error


def test_restart_resumes_rows_left_sending(db, results, storescp_factory):
    su, objs = results
    scp = storescp_factory()
    config = cfg(("archive", scp.aet, scp.port))
    first = Outbox(config, db)
    for uid, path in objs:
        first.enqueue(su, uid, path)
    # a crash while sending: one row claimed, never answered
    with db() as s, s.begin():
        s.execute(sa.update(OutboxRow).where(OutboxRow.sop_instance_uid == objs[0][0]).values(state=SENDING))
    del first
    sent = []
    second = Outbox(config, db, on_study_sent=sent.append)  # the restarted node
    sched = BackgroundScheduler()
    sched.start()
    try:
        second.start(sched)
        wait_for(lambda: second.study_state(su) == SENT)
    finally:
        second.stop()
        sched.shutdown(wait=True)
    rows = second.rows_for(su)
    assert [r.state for r in rows] == [SENT, SENT] and sent == [su]
    assert len(scp.files()) == 2


def test_stop_is_prompt(db, results):
    ob = Outbox(cfg(("nobody", "NOBODY", free_port())), db)
    sched = BackgroundScheduler()
    sched.start()
    ob.start(sched)
    t = threading.Thread(target=ob.stop)
    t.start()
    t.join(10)
    sched.shutdown(wait=False)
    assert not t.is_alive()


def test_tls_destination(db, results, tmp_path):
    """TLS to a pynetdicom SCP with a self-signed certificate: verified with `ca`, refused without."""
    import ssl

    from cagtest.results import self_signed_cert

    su, objs = results
    cert, key = self_signed_cert(tmp_path / "tls")
    other_cert, _ = self_signed_cert(tmp_path / "other")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(cert), str(key))
    received = []
    ae = AE(ae_title="TLSPEER")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.88.33")
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_ctx,
                             evt_handlers=[(evt.EVT_C_STORE, lambda e: received.append(1) or 0x0000)])
    try:
        def tls_cfg(ca):
            return parse_config({
                "node": {"acse_timeout": 3, "dimse_timeout": 5, "network_timeout": 5},
                "destinations": [{"name": "tls", "ae_title": "TLSPEER", "host": "127.0.0.1", "port": port,
                                  "tls": {"enabled": True, "ca": str(ca)}}],
                "outbox": {"retry_base_s": 0.2, "retry_max_s": 0.5, "horizon_s": 0.5, "poll_s": 0.2},
            })
        wrong = Outbox(tls_cfg(other_cert), db)  # untrusted server certificate: never sent
        wrong.enqueue(su, *objs[0])
        r = drain(wrong, su)[0]
        assert r.state == FAILED and not received
        assert wrong.retry_study(su) == 1
        right = Outbox(tls_cfg(cert), db)
        r = drain(right, su)[0]
        assert r.state == SENT and received == [1]
    finally:
        server.shutdown()
