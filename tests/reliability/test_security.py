"""Security: who may associate, TLS with client certificates, the admin endpoint's exposure,
and no PHI in what the node logs or shows (``cag-node studies``)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from cagtest.reliability import (CAG, MODALITY_AET, NODE_AET, associate_store, chunked_send, client_tls, echo, make_pki,
                     make_study, make_xa, send_files, sop_uid_of, write_raw_part10)


def _spooled(node) -> list[Path]:
    spool = Path(node.cfg["storage"]["path"])
    return [p for p in spool.rglob("*.dcm") if ".tmp" not in p.parts and "results" not in p.parts]


def test_calling_ae_called_ae_and_host_allow_lists(nodes, tmp_path):
    """Only listed calling AEs from listed hosts, calling our AE title, get an association."""
    node = nodes(node={"allowed_calling_aets": [MODALITY_AET], "allowed_hosts": ["127.0.0.2/32"]})
    node.start(wait=False)
    ok_src = ("127.0.0.2", 0)
    # readiness: from the allowed host
    deadline = time.monotonic() + 60
    while not echo(node.port, bind_address=ok_src, timeout=2):
        assert node.alive() and time.monotonic() < deadline, node.log_tail()
        time.sleep(0.3)
    su, files = make_study(tmp_path / "in", 1)
    cases = {
        "listed AE, listed host": dict(calling=MODALITY_AET, bind_address=ok_src),
        "listed AE, unlisted host 127.0.0.1": dict(calling=MODALITY_AET),
        "unlisted AE, listed host": dict(calling="EVIL", bind_address=ok_src),
        "listed AE in lower case": dict(calling=MODALITY_AET.lower(), bind_address=ok_src),
        "wrong called AE": dict(calling=MODALITY_AET, called="OTHERNODE", bind_address=ok_src),
        "empty-ish calling AE": dict(calling=" ", bind_address=ok_src),
    }
    got = {}
    for name, kw in cases.items():
        kw = dict(kw)
        called = kw.pop("called", NODE_AET)
        try:
            assoc = associate_store(node.port, called=called, timeout=10, **kw)
        except Exception as exc:  # pynetdicom refuses some AE titles locally
            got[name] = f"not sent ({exc.__class__.__name__})"
            continue
        got[name] = "accepted" if assoc.is_established else ("rejected" if assoc.is_rejected else "aborted/failed")
        if assoc.is_established:
            assoc.release()
    assert got["listed AE, listed host"] == "accepted", got
    for name, res in got.items():
        if name != "listed AE, listed host":
            assert res != "accepted", f"{name}: {got}"
    # A store from a refused peer leaves nothing; one from the allowed peer is stored.
    assert send_files(node.port, files) == {}
    assert _spooled(node) == []
    st = send_files(node.port, files, bind_address=ok_src)
    assert list(st.values()) == [0]
    assert len(_spooled(node)) == 1
    assert node.alive()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_node_survives_repeated_hostile_handshakes(nodes, pki, tmp_path):
    """Rounds of refused TLS peers -- no client certificate, a certificate from another CA, plain
    DICOM without TLS, garbage bytes, a ClientHello that then stalls -- each followed by a good
    client storing an instance: every bad peer is refused (nothing stored), the good one always
    gets through, the node stays up.  (The node-core tests cover each refusal once.)"""
    import ssl

    node = nodes(node={"tls": {"enabled": True, "cert": str(pki["server"]), "key": str(pki["server_key"]),
                               "ca": str(pki["ca"])}, "acse_timeout": 5, "network_timeout": 10})
    node.start(wait=False)
    good = client_tls(pki, "client")
    deadline = time.monotonic() + 60
    while not echo(node.port, tls_args=good, timeout=3):
        assert node.alive() and time.monotonic() < deadline, node.log_tail()
        time.sleep(0.3)

    def garbage():
        with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
            s.sendall(bytes(range(256)) * 8)
            try:
                s.recv(100)
            except OSError:
                pass

    stalled = []

    def stalled_hello():
        # start a TLS handshake in a non-blocking socket and never finish it
        raw = socket.create_connection(("127.0.0.1", node.port), timeout=5)
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        obj = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(obj[0], obj[1], server_hostname="localhost")
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        raw.sendall(obj[1].read())
        stalled.append(raw)

    bad = {
        "no client certificate": dict(tls_args=client_tls(pki, None)),
        "client certificate from another CA": dict(tls_args=client_tls(pki, "rogue")),
        "plain DICOM, no TLS": {},
    }
    stored = []
    for rnd in range(3):
        stalled_hello()
        for name, kw in bad.items():
            f = make_xa(tmp_path / f"bad-{rnd}-{len(stored)}-{name[:5]}.dcm", study_uid=generate_uid())
            assert send_files(node.port, [f], timeout=5, **kw) == {}, f"{name}: C-STORE acknowledged"
            assert sop_uid_of(f) not in {p.stem for p in _spooled(node)}, f"{name}: instance stored"
        garbage()
        assert node.alive(), node.log_tail()
        f = make_xa(tmp_path / f"good-{rnd}.dcm", study_uid=generate_uid())
        t0 = time.monotonic()
        assert list(send_files(node.port, [f], tls_args=good).values()) == [0], f"round {rnd}: good client refused"
        assert time.monotonic() - t0 < 15, "the good client was held up by the stalled handshakes"
        stored.append(sop_uid_of(f))
    for s in stalled:
        s.close()
    assert set(stored) <= {p.stem for p in _spooled(node)}
    assert echo(node.port, tls_args=good, timeout=5)


def _non_loopback_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            ip = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


def test_admin_endpoint_loopback_only_unless_allowed(nodes, tmp_path):
    # 1. Off loopback without allow_remote: refused at start-up, exit 2, the key named.
    bad = nodes("bad", admin={"host": "0.0.0.0"})
    bad.write_config()
    r = subprocess.run([CAG, "serve", "--config", str(bad.cfg_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-1000:])
    assert "admin.host" in r.stderr
    # DICOM port not opened either
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", bad.port)) != 0

    # 2. Default: loopback only -- reachable on 127.0.0.1, not on the machine's other address.
    node = nodes("ok").start()
    port = node.cfg["admin"]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
        assert resp.status == 200
        assert json.loads(resp.read())["status"] == "ok"
    ip = _non_loopback_ip()
    if ip:
        with socket.socket() as s:
            s.settimeout(3)
            assert s.connect_ex((ip, port)) != 0, f"admin port reachable on {ip}"

    # 3. Explicitly allowed: binds all interfaces.
    remote = nodes("remote", admin={"host": "0.0.0.0", "allow_remote": True}).start()
    rport = remote.cfg["admin"]["port"]
    with urllib.request.urlopen(f"http://{ip or '127.0.0.1'}:{rport}/healthz", timeout=10) as resp:
        assert resp.status == 200


PHI = {"name": "Quornelius^Zyxwvut", "id": "PHI-77341-XQ", "birth": "19230817", "accession": "ACC99812PHI"}
PHI_NEEDLES = ["Quornelius", "Zyxwvut", "PHI-77341-XQ", "77341", "19230817", "1923-08-17", "ACC99812PHI"]


def test_no_phi_in_logs_or_studies_output(nodes, pacs_factory, rel_bundle, tmp_path):
    """Distinctive patient values go in; they appear in no log line and no `cag-node studies` output."""
    pacs = pacs_factory().start()
    node = nodes(bundle=rel_bundle, destinations=[pacs.destination()], logging={"level": "INFO"})
    node.start()
    kw = dict(patient_name=PHI["name"], patient_id=PHI["id"], birth_date=PHI["birth"], accession=PHI["accession"])
    su, files = make_study(tmp_path / "in", 2, **kw)
    assert set(send_files(node.port, files).values()) == {0}
    # The same patient in refused and malformed instances (refusals are logged with a reason).
    bad_uid = make_xa(tmp_path / "bad.dcm", study_uid="../" + su, **kw)
    send_files(node.port, [bad_uid])
    raw = (tmp_path / "bad.dcm").read_bytes()
    trunc = write_raw_part10(tmp_path / "trunc.dcm", raw[raw.index(b"DICM") + 4 + 200:][:-100])
    assoc = associate_store(node.port)
    with chunked_send():
        assoc.send_c_store(trunc)
    assoc.release()
    node.wait_state(su, ("sent",), timeout=240)
    outputs = {
        "node log": node.log_text(),
        "cag-node studies": node.cli("studies").stdout,
        "cag-node studies --json": node.cli("studies", "--json").stdout,
    }
    with urllib.request.urlopen(f"http://127.0.0.1:{node.cfg['admin']['port']}/metrics", timeout=10) as resp:
        outputs["/metrics"] = resp.read().decode()
    found = [(where, n) for where, text in outputs.items() for n in PHI_NEEDLES if n.lower() in text.lower()]
    # The journal is documented to hold no PHI either (only a hash of PatientID).
    db = Path(node.cfg["storage"]["journal"].replace("sqlite:///", ""))
    blob = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    found += [("journal database", n) for n in PHI_NEEDLES if n.encode() in blob]
    assert not found, f"PHI found: {found}"
