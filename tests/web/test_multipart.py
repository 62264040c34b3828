"""The multipart/related parser STOW-RS relies on."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from dicom_node.web.multipart import MultipartError, encode_multipart, parse_content_type, parse_multipart


def test_content_type_params_quoted_and_case():
    media, p = parse_content_type('Multipart/Related; type="application/dicom"; BOUNDARY="a b;c\\"d"')
    assert media == "multipart/related"
    assert p == {"type": "application/dicom", "boundary": 'a b;c"d'}


def test_unterminated_quote_is_an_error():
    with pytest.raises(MultipartError):
        parse_content_type('multipart/related; boundary="abc')


def test_preamble_epilogue_headers_and_empty_headers():
    body = (b"preamble to ignore\r\n--XyZ\r\nContent-Type: application/dicom\r\nX-A: 1\r\n\r\nfirst\r\n"
            b"--XyZ\r\n\r\nsecond\r\n--XyZ--\r\nepilogue")
    parts = parse_multipart(body, "XyZ")
    assert [bytes(p.body) for p in parts] == [b"first", b"second"]
    assert parts[0].headers == {"content-type": "application/dicom", "x-a": "1"}
    assert parts[0].content_type == "application/dicom" and parts[1].headers == {}


def test_body_containing_crlf_and_boundary_prefix():
    payload = b"\r\n--XyZnot-a-boundary\r\n--Xy\r\n"
    body, b = encode_multipart([(payload, "application/dicom")], boundary="XyZ")
    assert bytes(parse_multipart(body, b)[0].body) == payload


@pytest.mark.parametrize("body,why", [
    (b"--b\r\nContent-Type: application/dicom\r\n\r\ntruncated", "closing boundary"),
    (b"no boundary here", "no multipart boundary"),
    (b"--b\r\nbroken header line\r\n\r\nx\r\n--b--", "malformed header"),
    (b"--bjunk\r\n\r\nx\r\n--b--", "garbage after a boundary"),
])
def test_malformed_bodies(body, why):
    with pytest.raises(MultipartError, match=why):
        parse_multipart(body, "b")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_roundtrip(payloads):
    body, b = encode_multipart([(p, "application/dicom") for p in payloads])
    assert [bytes(p.body) for p in parse_multipart(body, b)] == payloads
