"""Configuration errors and the studies/retry commands, through the real CLI."""

from __future__ import annotations

import json

import pytest

from dicom_node.journal import Journal
from cagtest.net import run_tool
from cagtest.node import CAG_NODE, node_config, write_config


@pytest.mark.parametrize("cmd, bad, key", [
    ("serve", {"node": {"ae_titel": "X"}}, "node.ae_titel: unknown key"),
    ("serve", {"node": {"port": "eleven"}}, "node.port"),
    ("studies", {"storage": {"min_free_mb": "lots"}}, "storage.min_free_mb"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path, cmd, bad, key):
    import yaml

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    r = run_tool([CAG_NODE, cmd, "--config", str(p)], timeout=30)
    assert r.returncode == 2, (cmd, r.stdout, r.stderr)
    assert key in r.stderr


def test_missing_config_file_exits_2(tmp_path):
    r = run_tool([CAG_NODE, "serve", "--config", str(tmp_path / "nope.yaml")])
    assert r.returncode == 2 and "not found" in r.stderr


def test_studies_and_retry(tmp_path):
    cfg_path = write_config(tmp_path, node_config(tmp_path))
    r = run_tool([CAG_NODE, "studies", "--config", str(cfg_path), "--json"])
    assert r.returncode == 0 and json.loads(r.stdout) == []
    j = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    j.record_instance(study_uid="1.2.3", series_uid="1.2.3.1", sop_instance_uid="1.2.3.1.1",
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.12.1", modality="XA",
                      transfer_syntax="1.2.840.10008.1.2.1", path="/x", size=1, processable=True)
    r = run_tool([CAG_NODE, "retry", "1.2.3", "--config", str(cfg_path)])
    assert r.returncode == 1 and "still receiving" in r.stderr
    j.complete_study("1.2.3", 0)
    job = j.claim_job()
    j.fail_job(job.id, "boom")
    j.set_study_state("1.2.3", "failed", stage="vlm", error="boom: out of memory")
    r = run_tool([CAG_NODE, "studies", "--config", str(cfg_path)])
    assert r.returncode == 0 and "failed" in r.stdout and "boom: out of memory" in r.stdout
    r = run_tool([CAG_NODE, "retry", "1.2.3", "--config", str(cfg_path)])
    assert r.returncode == 0, r.stderr
    assert j.get_study("1.2.3").state == "waiting" and len(j.jobs("1.2.3", state="queued")) == 1
    r = run_tool([CAG_NODE, "retry", "9.9.9", "--config", str(cfg_path)])
    assert r.returncode == 1 and "unknown study" in r.stderr
    rows = json.loads(run_tool([CAG_NODE, "studies", "--config", str(cfg_path), "--json"]).stdout)
    assert rows[0]["study_uid"] == "1.2.3" and rows[0]["state"] == "waiting" and rows[0]["n_instances"] == 1
    j.close()


def test_port_in_use_exits_1(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = write_config(tmp_path, node_config(tmp_path, node__port=s.getsockname()[1]))
        r = run_tool([CAG_NODE, "serve", "--config", str(cfg)], timeout=60)
    assert r.returncode == 1 and "cannot start" in r.stderr and "in use" in r.stderr
