"""The node's pynetdicom extensions: version-checked, installed once, never at import time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pynetdicom
import pytest

from dicom_node import pynetdicom_ext


def test_only_the_pinned_pynetdicom_is_patched():
    assert pynetdicom_ext.supported(pynetdicom.__version__)  # the pinned 3.0.x
    assert not pynetdicom_ext.supported("3.1.0") and not pynetdicom_ext.supported("2.0.2")


def test_importing_the_node_patches_nothing_and_install_does_it_once():
    code = textwrap.dedent("""
        from pynetdicom import _config, dimse_messages
        from pynetdicom.transport import AssociationSocket
        before = (AssociationSocket.recv, dimse_messages.NamedTemporaryFile, _config.STORE_RECV_CHUNKED_DATASET)
        import dicom_node.node, dicom_node.scp, dicom_node.web.stow  # noqa: F401
        from dicom_node import pynetdicom_ext
        assert (AssociationSocket.recv, dimse_messages.NamedTemporaryFile,
                _config.STORE_RECV_CHUNKED_DATASET) == before, "patched at import"
        assert not pynetdicom_ext.streaming()
        assert pynetdicom_ext.install() is True and pynetdicom_ext.install() is True
        assert AssociationSocket.recv is pynetdicom_ext._fast_recv
        assert dimse_messages.NamedTemporaryFile is pynetdicom_ext._rx_named_temporary_file
        assert _config.STORE_RECV_CHUNKED_DATASET and pynetdicom_ext.streaming()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_context_copy_equals_deepcopy_and_shares_nothing_mutable():
    """The per-association copy of the supported contexts (pynetdicom's transport deep-copies
    them) gives the same contexts as copy.deepcopy, with their own transfer-syntax lists."""
    import copy

    from pynetdicom import AE
    from pynetdicom.presentation import AllStoragePresentationContexts

    from dicom_node import pynetdicom_ext as px

    ae = AE()
    ae.supported_contexts = AllStoragePresentationContexts[:40]
    ae.add_supported_context("1.2.840.10008.1.1", scp_role=True, scu_role=False)
    ctx = ae.supported_contexts
    fast, slow = px._copy_contexts(ctx), copy.deepcopy(ctx)

    def fields(cs):
        return [(c.context_id, c.abstract_syntax, c.transfer_syntax, c.scu_role, c.scp_role, c.result,
                 c.as_scp, c.as_scu) for c in cs]

    assert fields(fast) == fields(slow) and fields(fast) == fields(ctx)
    assert all(a is not b and a._transfer_syntax is not b._transfer_syntax for a, b in zip(fast, ctx))
    fast[0]._transfer_syntax.append("1.2.3")
    assert "1.2.3" not in ctx[0].transfer_syntax
    assert px._copy_contexts({"x": [1]}) == {"x": [1]}  # anything else: a real deepcopy


def _pdv(ctx: int, control: int, payload: bytes) -> bytes:
    return (len(payload) + 2).to_bytes(4, "big") + bytes([ctx, control]) + payload


def test_pdv_fragments_only_for_continuing_data_set_fragments():
    """The fast path takes a PDU only when every PDV continues the data set on the message's
    context; the last fragment, a command, another context or a malformed item go to pynetdicom."""
    from dicom_node.pynetdicom_ext import _pdv_fragments

    two = _pdv(3, 0, b"abc") + _pdv(3, 0, b"defg")
    v = memoryview(bytearray(two))
    frags = _pdv_fragments(v, len(two), 3)
    assert [bytes(v[a:b]) for a, b in frags] == [b"abc", b"defg"]
    assert _pdv_fragments(memoryview(_pdv(3, 2, b"end")), 9, 3) is None  # last fragment
    assert _pdv_fragments(memoryview(_pdv(3, 1, b"cmd")), 9, 3) is None  # command
    assert _pdv_fragments(memoryview(_pdv(5, 0, b"xyz")), 9, 3) is None  # another context
    bad = bytearray(_pdv(3, 0, b"abc"))
    bad[3] = 200  # item longer than the PDU
    assert _pdv_fragments(memoryview(bad), len(bad), 3) is None
    assert _pdv_fragments(memoryview(b"\x00\x00\x00\x01\x03"), 5, 3) is None  # truncated header
    assert _pdv_fragments(memoryview(b""), 0, 3) is None


@pytest.mark.peers
def test_data_set_pdus_go_straight_to_the_file_byte_identical(make_node, tmp_path):
    """dcmtk storescu with 16 KiB PDUs: the continuing fragments take the fast path (counted),
    and the stored instance is the sent data set, byte for byte, as pynetdicom would store it."""
    import shutil

    import pydicom
    from pydicom.uid import generate_uid

    from cagtest.dicom import dataset_bytes, make_dataset, storescu_cmd, write_dataset
    from cagtest.net import run_tool

    if not shutil.which("storescu"):
        pytest.skip("dcmtk storescu not installed")
    node = make_node()
    study = generate_uid()
    files = [write_dataset(make_dataset(study, generate_uid(), frames=20, size=256, seed=i), tmp_path / f"r{i}.dcm")
             for i in range(3)]
    before = pynetdicom_ext.fast_pdus
    r = run_tool(storescu_cmd(node.port, files, extra=["--max-send-pdu", "16384"]))
    assert r.returncode == 0, r.stderr
    assert pynetdicom_ext.fast_pdus - before >= 3 * (20 * 256 * 256 // 16384 - 2)
    stored = {Path(i.path).name: Path(i.path) for i in node.journal.study_instances(study)}
    assert len(stored) == 3
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(stored[f"{uid}.dcm"]) == dataset_bytes(f)
