"""Fixtures for the results area (SR/KOS encoding, outbox, SCU); helpers live in cagtest.results."""

from __future__ import annotations

import shutil

import pytest
from pydicom.uid import generate_uid


from cagtest.pacs import StoreSCP, stopped_after
from cagtest.results import OrthancPeer, make_result, make_xa


@pytest.fixture
def study():
    """(sources, result): two XA runs + one non-XA instance not analysed."""
    study_uid = generate_uid()
    a = make_xa(study_uid, series_number=1)
    b = make_xa(study_uid, series_number=2, n_frames=10)
    sources = [a, b]
    res = make_result(sources, not_analysed=[{"sop_instance_uid": generate_uid(), "reason": "modality SR not processed"}])
    return sources, res

@pytest.fixture
def orthanc_factory(tmp_path):
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc not on PATH")
    yield from stopped_after(lambda name="orthanc", aet="ORTHANC": OrthancPeer(tmp_path / name, aet=aet))

@pytest.fixture
def storescp_factory(tmp_path):
    if shutil.which("storescp") is None:
        pytest.skip("storescp not on PATH")
    yield from stopped_after(lambda name="storescp", **kw: StoreSCP(tmp_path / name, **kw))
