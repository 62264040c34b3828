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
