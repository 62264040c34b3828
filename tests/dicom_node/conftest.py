"""Fixtures for the node-core tests: small generated XA runs, in-process nodes and real
``cag-node serve`` subprocesses (helpers: cagtest.dicom, cagtest.node).

Every node binds port 0 (the ready line / ``Node.address`` tells the real
port), so parallel test runs never collide.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from cagtest.dicom import make_dataset, write_dataset
from cagtest.node import NodeProcess, node_config, write_config


@pytest.fixture
def study_dir(tmp_path) -> tuple[Path, str, list[str]]:
    """Three XA runs of one study (two series) as files."""
    study = generate_uid()
    s1, s2 = generate_uid(), generate_uid()
    uids = []
    d = tmp_path / "study"
    for i, series in enumerate([s1, s1, s2]):
        ds = make_dataset(study, series, seed=i)
        uids.append(ds.SOPInstanceUID)
        write_dataset(ds, d / f"run{i}.dcm")
    return d, study, uids


@pytest.fixture
def make_node(tmp_path):
    nodes = []

    def _make(process_fn=None, **over):
        from dicom_node.config import parse_config
        from dicom_node.node import Node

        cfg = parse_config(node_config(tmp_path, **over), base_dir=tmp_path)
        n = Node(cfg, process_fn=process_fn).start()
        nodes.append(n)
        return n

    yield _make
    for n in nodes:
        n.stop(grace_s=2)


@pytest.fixture
def node_proc(tmp_path):
    """Factory: ``node_proc(cfg_dict)`` starts a serve subprocess; all are stopped at teardown."""
    procs: list[NodeProcess] = []

    def _start(cfg: dict, name: str = "config.yaml") -> NodeProcess:
        p = NodeProcess(write_config(tmp_path, cfg, name)).start()
        procs.append(p)
        return p

    yield _start
    for p in procs:
        p.kill9()
