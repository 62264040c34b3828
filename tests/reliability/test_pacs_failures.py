"""The destination PACS down, refusing, slow: results land once it recovers, nothing lost or duplicated.

The destination is a pynetdicom SCP run by the test (``RecordingSCP``), so its
behaviour is scripted: not listening, answering failure statuses, sleeping in
its C-STORE handler past the node's DIMSE timeout, or accepting TCP and never
answering the association request (ACSE timeout).
"""

from __future__ import annotations

import time

import pytest

from cagtest.pacs import SilentPeer
from cagtest.reliability import NO_VLM, assert_results_once, db_outbox, db_study, make_study, send_files, wait_for

FAST_OUTBOX = {"retry_base_s": 0.3, "retry_max_s": 1.0, "poll_s": 0.2}


def _send_study(node, tmp_path, n=2, seed=0):
    su, files = make_study(tmp_path / f"in{seed}", n, seed=seed)
    st = send_files(node.port, files)
    assert set(st.values()) == {0} and len(st) == n, st
    return su


def _attempts(node, su):
    return sum(r[3] for r in db_outbox(node, su))


def test_pacs_down_then_up_across_a_restart(nodes, pacs_factory, rel_bundle, tmp_path):
    pacs = pacs_factory()  # port reserved, nothing listening yet
    node = nodes(bundle=rel_bundle, destinations=[pacs.destination()], vlm=NO_VLM, outbox=FAST_OUTBOX)
    node.start()
    su = _send_study(node, tmp_path)
    wait_for(lambda: db_study(node, su)[0] == "reported" and _attempts(node, su) >= 2, 240, 0.2,
             "results retried against a PACS that is down")
    # The node restarts while the results are still pending; the PACS comes back later.
    node.stop()
    node.start()
    time.sleep(1.0)
    assert db_study(node, su)[0] == "reported"
    pacs.start()
    node.wait_state(su, ("sent",), timeout=60)
    assert_results_once(pacs, [su])
    assert all(n == 1 for n in pacs.stored.values()), dict(pacs.stored)


def test_pacs_refusing_then_accepting(nodes, pacs_factory, rel_bundle, tmp_path):
    """0xA700 (out of resources) and 0xC001 (cannot understand) are retried until 0x0000."""
    pacs = pacs_factory(statuses=[0xA700, 0xA700, 0xC001, 0xA700]).start()
    node = nodes(bundle=rel_bundle, destinations=[pacs.destination()], vlm=NO_VLM, outbox=FAST_OUTBOX)
    node.start()
    su = _send_study(node, tmp_path)
    node.wait_state(su, ("sent",), timeout=240)
    assert sum(pacs.requests.values()) >= 5, dict(pacs.requests)
    assert_results_once(pacs, [su])
    assert all(n == 1 for n in pacs.stored.values()), dict(pacs.stored)
    rows = db_outbox(node, su)
    assert rows and all(r[2] == "sent" for r in rows), rows


def test_pacs_slow_association_then_slow_dimse(nodes, pacs_factory, rel_bundle, tmp_path):
    """First the PACS never answers the association request (ACSE timeout), then it answers C-STORE
    only after the node's DIMSE timeout: the node retries; the result lands; one SR per study."""
    pacs = pacs_factory(delays=[6.0])
    mute = SilentPeer(pacs.port)
    node = nodes(bundle=rel_bundle, destinations=[pacs.destination()], vlm=NO_VLM, outbox=FAST_OUTBOX,
                 node={"acse_timeout": 2, "dimse_timeout": 3, "network_timeout": 10})
    node.start()
    try:
        su = _send_study(node, tmp_path)
        wait_for(lambda: db_study(node, su)[0] == "reported" and _attempts(node, su) >= 2, 240, 0.2,
                 "results retried against a mute PACS")
        assert db_study(node, su)[0] == "reported"
    finally:
        mute.close()
    pacs.start()
    node.wait_state(su, ("sent",), timeout=90)
    assert max(pacs.requests.values()) >= 2 or sum(pacs.requests.values()) >= 3, dict(pacs.requests)
    assert node.alive()
    assert_results_once(pacs, [su])


def test_pacs_permanent_refusal_fails_the_study_and_retry_resends(nodes, pacs_factory, rel_bundle, tmp_path):
    """0xA900 (data set does not match SOP class) is permanent: the study must end `failed` with the
    reason (not stay `reported` forever); `cag-node retry` after the PACS is fixed sends it."""
    pacs = pacs_factory(statuses=[0xA900] * 4).start()
    node = nodes(bundle=rel_bundle, destinations=[pacs.destination()], vlm=NO_VLM, outbox=FAST_OUTBOX)
    node.start()
    su = _send_study(node, tmp_path)
    wait_for(lambda: db_outbox(node, su) and all(r[2] in ("failed", "sent") for r in db_outbox(node, su))
             and any(r[2] == "failed" for r in db_outbox(node, su)), 240, 0.2, "a permanently failed outbox row")
    time.sleep(2.0)
    st = node.study(su)
    assert st["state"] == "failed", f"outbox rows failed permanently but the study is {st['state']!r}: {st}"
    assert st.get("error"), st
    pacs.statuses = []
    r = node.cli("retry", su)
    assert r.returncode == 0, r.stdout + r.stderr
    node.wait_state(su, ("sent",), timeout=120)
    assert_results_once(pacs, [su])
