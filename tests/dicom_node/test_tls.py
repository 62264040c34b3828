"""DICOM TLS with certificates generated here: server-only and mutual TLS,
against dcmtk echoscu/storescu and pynetdicom."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dicom_node.journal import Journal
from cagtest.net import require_tools
from cagtest.dicom import dataset_bytes, make_dataset, pyscu_send, storescu_cmd, write_dataset
from cagtest.net import run_tool
from cagtest.node import node_config

pytestmark = [pytest.mark.peers, require_tools("storescu", "echoscu")]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer, pub, signer, *, ca=False, server=False):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if server:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(signer, hashes.SHA256())


def _write(d: Path, name: str, key, cert) -> tuple[Path, Path]:
    k, c = d / f"{name}.key", d / f"{name}.pem"
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption()))
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return k, c


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("cag-test-ca"), _name("cag-test-ca"), ca_key.public_key(), ca_key, ca=True)
    _, ca_pem = _write(d, "ca", ca_key, ca)
    out = {"ca": ca_pem}
    for name, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(_name("localhost" if server else "MODALITY"), ca.subject, key.public_key(), ca_key,
                     server=server)
        out[name] = _write(d, name, key, cert)
    # a client certificate from a CA the node does not trust
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _cert(_name("rogue"), _name("rogue-ca"), rogue_key.public_key(), rogue_ca_key)
    out["rogue"] = _write(d, "rogue", rogue_key, rogue)
    return out


def _client_ctx(pki, cert=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert[1]), str(cert[0]))
    return ctx


def test_tls_server_auth(node_proc, tmp_path, pki):
    skey, scert = pki["server"]
    n = node_proc(node_config(tmp_path, node__tls={"enabled": True, "cert": str(scert), "key": str(skey)}))
    assert "with TLS" in n.ready_line
    ckey, ccert = pki["client"]
    tls = ["+tls", str(ckey), str(ccert), "+cf", str(pki["ca"])]
    r = run_tool(["echoscu", *tls, "-aet", "ECHOSCU", "-aec", "CAGNODE", "127.0.0.1", str(n.port)])
    assert r.returncode == 0, r.stderr
    ds = make_dataset()
    f = write_dataset(ds, tmp_path / "in" / "x.dcm")
    r = run_tool(storescu_cmd(n.port, [f], extra=tls))
    assert r.returncode == 0, r.stderr
    assert pyscu_send(n.port, [f], ssl_context=_client_ctx(pki)) == [0]
    # a data set of many 16 KiB PDUs over TLS (the node writes continuing fragments straight to
    # the file: dicom_node.pynetdicom_ext) arrives byte for byte
    big = make_dataset(frames=20, size=256, seed=3)
    fb = write_dataset(big, tmp_path / "in" / "big.dcm")
    r = run_tool(storescu_cmd(n.port, [fb], extra=[*tls, "--max-send-pdu", "16384"]))
    assert r.returncode == 0, r.stderr
    # plain TCP to a TLS port does not associate
    r = run_tool(["echoscu", "-aet", "ECHOSCU", "-aec", "CAGNODE", "-to", "5", "-ta", "5",
                  "127.0.0.1", str(n.port)], timeout=30)
    assert r.returncode != 0
    j = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    assert j.get_instance(ds.SOPInstanceUID).calling_aet in ("STORESCU", "PYSCU")
    assert dataset_bytes(Path(j.get_instance(big.SOPInstanceUID).path)) == dataset_bytes(fb)
    j.close()


def test_tls_client_certificate_required(node_proc, tmp_path, pki):
    skey, scert = pki["server"]
    n = node_proc(node_config(tmp_path, node__tls={"enabled": True, "cert": str(scert), "key": str(skey),
                                                    "ca": str(pki["ca"])}))
    ckey, ccert = pki["client"]
    r = run_tool(["echoscu", "+tls", str(ckey), str(ccert), "+cf", str(pki["ca"]), "-aet", "ECHOSCU",
                  "-aec", "CAGNODE", "127.0.0.1", str(n.port)])
    assert r.returncode == 0, r.stderr
    # no client certificate: the handshake fails
    r = run_tool(["echoscu", "+tla", "+cf", str(pki["ca"]), "-aet", "ECHOSCU", "-aec", "CAGNODE",
                  "-to", "5", "127.0.0.1", str(n.port)], timeout=30)
    assert r.returncode != 0
    ds = make_dataset()
    f = write_dataset(ds, tmp_path / "in" / "x.dcm")
    with pytest.raises(OSError):
        pyscu_send(n.port, [f], ssl_context=_client_ctx(pki))
    with pytest.raises(OSError):
        pyscu_send(n.port, [f], ssl_context=_client_ctx(pki, pki["rogue"]))
    assert pyscu_send(n.port, [f], ssl_context=_client_ctx(pki, pki["client"])) == [0]
    # the node is still serving after the failed handshakes
    r = run_tool(["echoscu", "+tls", str(ckey), str(ccert), "+cf", str(pki["ca"]), "-aet", "ECHOSCU",
                  "-aec", "CAGNODE", "127.0.0.1", str(n.port)])
    assert r.returncode == 0, r.stderr


def test_silent_tcp_client_does_not_block_tls_listener(node_proc, tmp_path, pki):
    """A peer that connects and never starts TLS must not stall other associations."""
    import socket

    skey, scert = pki["server"]
    n = node_proc(node_config(tmp_path, node__tls={"enabled": True, "cert": str(scert), "key": str(skey)}))
    silent = socket.create_connection(("127.0.0.1", n.port))
    try:
        ckey, ccert = pki["client"]
        r = run_tool(["echoscu", "+tls", str(ckey), str(ccert), "+cf", str(pki["ca"]), "-aet", "ECHOSCU",
                      "-aec", "CAGNODE", "-to", "10", "127.0.0.1", str(n.port)], timeout=30)
        assert r.returncode == 0, r.stderr
    finally:
        silent.close()
