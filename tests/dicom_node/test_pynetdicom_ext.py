"""The node's pynetdicom extensions: version-checked, installed once, never at import time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pynetdicom

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
