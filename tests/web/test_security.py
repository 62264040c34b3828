"""Loopback by default; off loopback only with allow_remote + TLS + a token; CSRF on the
actions; a client allow-list; an access log without UIDs or secrets."""

from __future__ import annotations

import base64
import datetime as dt
import logging

import pytest
import requests
import urllib3

from dicom_node.config import ConfigError, parse_config
from cagtest.web import stow_body, synthetic_run_files, web_config

urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
TOKEN = "s3cret-token-for-tests-0123456789"


@pytest.mark.parametrize("web,why", [
    ({"enabled": True, "host": "0.0.0.0"}, "allow_remote"),
    ({"enabled": True, "host": "0.0.0.0", "allow_remote": True, "auth": {"token_env": "X"}}, "cert and key"),
    ({"enabled": True, "host": "0.0.0.0", "allow_remote": True, "tls": {"cert": "c", "key": "k"}}, "token_file"),
    ({"tls": {"cert": "c"}}, "go together"),
])
def test_config_refuses_remote_without_tls_and_auth(web, why):
    with pytest.raises(ConfigError, match=why):
        parse_config({"web": web})


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cag-node test")])
    now = dt.datetime.now(dt.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
         .sign(key, hashes.SHA256()))
    (d / "cert.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


def test_remote_config_needs_the_token_over_tls(tmp_path, start_node, cert, monkeypatch, caplog):
    monkeypatch.setenv("CAG_TEST_WEB_TOKEN", TOKEN)
    cfg = web_config(tmp_path, web={"enabled": True, "host": "0.0.0.0", "port": 0, "allow_remote": True,
                                    "tls": {"cert": str(cert[0]), "key": str(cert[1])},
                                    "auth": {"token_env": "CAG_TEST_WEB_TOKEN"}})
    caplog.set_level(logging.DEBUG)
    node = start_node(cfg)
    url = f"https://127.0.0.1:{node.web.address[1]}"
    assert node.web.url.startswith("https://")
    with pytest.raises(requests.exceptions.ConnectionError):  # no plain HTTP on the TLS port
        requests.get(f"http://127.0.0.1:{node.web.address[1]}/studies", timeout=5)
    r = requests.get(url + "/studies", verify=False, timeout=10)
    assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"]
    assert requests.get(url + "/studies", verify=False, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(url + "/dicomweb/studies", verify=False, timeout=10).status_code == 401
    study, files = synthetic_run_files(tmp_path / "in", 1)
    body, h = stow_body(files)
    assert requests.post(url + "/dicomweb/studies", data=body, headers=h, verify=False).status_code == 401
    assert node.journal.get_study(study) is None, "an unauthenticated STOW must store nothing"

    ok = requests.post(url + "/dicomweb/studies", data=body, verify=False,
                       headers={**h, "Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and node.journal.get_study(study).n_instances == 1
    basic = base64.b64encode(f"cag:{TOKEN}".encode()).decode()
    r = requests.get(url + f"/studies/{study}", verify=False, headers={"Authorization": f"Basic {basic}"})
    assert r.status_code == 200 and study in r.text
    assert r.headers["strict-transport-security"]
    bad_user = base64.b64encode(f"root:{TOKEN}".encode()).decode()
    assert requests.get(url + "/studies", verify=False,
                        headers={"Authorization": f"Basic {bad_user}"}).status_code == 401
    # the token is never logged, nor are UIDs in the access log
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in text
    access = [r.getMessage() for r in caplog.records if r.name == "dicom_node.web.access"]
    assert access and any("/studies/{study_uid}" in a for a in access)
    assert not any(study in a for a in access)


def test_missing_token_source_stops_start(tmp_path, start_node, monkeypatch):
    monkeypatch.delenv("CAG_TEST_NO_TOKEN", raising=False)
    cfg = web_config(tmp_path, web={"enabled": True, "port": 0, "auth": {"token_env": "CAG_TEST_NO_TOKEN"}})
    with pytest.raises(OSError, match="CAG_TEST_NO_TOKEN"):
        start_node(cfg)


def test_client_allow_list(tmp_path, start_node):
    node = start_node(web_config(tmp_path, web={"enabled": True, "port": 0, "allowed_hosts": ["10.0.0.0/8"]}))
    r = requests.get(node.web.url + "/studies", timeout=10)
    assert r.status_code == 403


def test_actions_need_the_csrf_token(tmp_path, start_node):
    from cagtest.web import pyscu_send

    node = start_node(web_config(tmp_path))
    study, files = synthetic_run_files(tmp_path / "in", 1)
    assert pyscu_send(node.port, files) == [0]
    node.journal.complete_study(study, 0)
    node.journal.set_study_state(study, "failed", stage="pipeline", error="boom")
    s = requests.Session()
    page = s.get(node.web.url + f"/studies/{study}")
    assert page.status_code == 200 and "boom" in page.text
    cookie = s.cookies.get("cag_csrf")
    assert cookie and f'value="{cookie}"' in page.text
    url = node.web.url + f"/studies/{study}/retry"
    # no field, wrong field, no cookie, foreign origin: all refused, nothing changes
    assert s.post(url, data={}, allow_redirects=False).status_code == 403
    assert s.post(url, data={"csrf": "x" * 43}, allow_redirects=False).status_code == 403
    assert requests.post(url, data={"csrf": cookie}, allow_redirects=False).status_code == 403
    assert s.post(url, data={"csrf": cookie}, headers={"Origin": "https://evil.example"},
                  allow_redirects=False).status_code == 403
    assert node.journal.get_study(study).state == "failed"
    r = s.post(url, data={"csrf": cookie}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].endswith(f"/studies/{study}?done=retried")
    assert node.journal.get_study(study).state == "waiting"
    assert [j.state for j in node.journal.jobs(study_uid=study)][-1] == "queued"
    assert "Processing re-queued." in s.get(node.web.url + r.headers["location"]).text


def test_pages_escape_what_they_show(tmp_path, start_node):
    from cagtest.web import pyscu_send

    node = start_node(web_config(tmp_path))
    study, files = synthetic_run_files(tmp_path / "in", 1)
    pyscu_send(node.port, files)
    node.journal.complete_study(study, 0)
    node.journal.set_study_state(study, "failed", stage="vlm", error="<script>alert(1)</script>")
    for path in ("/studies", f"/studies/{study}"):
        t = requests.get(node.web.url + path).text
        assert "<script>alert(1)" not in t and "&lt;script&gt;" in t
    assert requests.get(node.web.url + "/studies?state=bogus").status_code == 400
    assert requests.get(node.web.url + "/studies/1.2.3").status_code == 404
    assert requests.get(node.web.url + "/studies/..%2F..%2Fetc").status_code == 404
