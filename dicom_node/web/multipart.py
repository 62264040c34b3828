"""A small, strict ``multipart/related`` parser (RFC 2046 / RFC 2387) for STOW-RS.

Why our own: the maintained Python multipart packages parse
``multipart/form-data`` for HTML forms; STOW-RS bodies are ``multipart/related``
with ``type="application/dicom"`` and no Content-Disposition.  The whole body
is already in memory (bounded by ``web.max_upload_mb``), so a parser over one
``bytes`` object is enough: parts are ``memoryview`` slices, never copied.

Errors raise :class:`MultipartError` with a message fit for a 400 response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class MultipartError(ValueError):
    """The body or its Content-Type is not a well-formed multipart/related message."""


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``'multipart/related; type="application/dicom"; boundary=x'`` -> (media type, params).

    Parameter names are lower-cased; quoted values are unquoted (backslash escapes honoured).
    """
    value = value or ""
    i = value.find(";")
    media = (value if i < 0 else value[:i]).strip().lower()
    params: dict[str, str] = {}
    rest = "" if i < 0 else value[i + 1:]
    pos = 0
    n = len(rest)
    while pos < n:
        while pos < n and rest[pos] in " \t;":
            pos += 1
        if pos >= n:
            break
        eq = rest.find("=", pos)
        if eq < 0:
            raise MultipartError(f"Content-Type parameter without a value: {rest[pos:][:40]!r}")
        name = rest[pos:eq].strip().lower()
        pos = eq + 1
        if pos < n and rest[pos] == '"':
            pos += 1
            buf = []
            while pos < n and rest[pos] != '"':
                if rest[pos] == "\\" and pos + 1 < n:
                    pos += 1
                buf.append(rest[pos])
                pos += 1
            if pos >= n:
                raise MultipartError("unterminated quoted Content-Type parameter")
            pos += 1
            val = "".join(buf)
        else:
            end = rest.find(";", pos)
            end = n if end < 0 else end
            val = rest[pos:end].strip()
            pos = end
        if not name:
            raise MultipartError("empty Content-Type parameter name")
        params[name] = val
    return media, params


@dataclass
class Part:
    headers: dict[str, str]  # lower-cased names
    body: memoryview

    @property
    def content_type(self) -> str:
        return parse_content_type(self.headers.get("content-type", ""))[0]


def _parse_headers(block: bytes, index: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):  # obsolete folding: continuation of the previous header
            if not headers:
                raise MultipartError(f"part {index + 1}: header continuation without a header")
            last = next(reversed(headers))
            headers[last] += " " + line.strip().decode("latin-1")
            continue
        name, sep, val = line.partition(b":")
        if not sep or not name.strip():
            raise MultipartError(f"part {index + 1}: malformed header line {line[:60]!r}")
        headers[name.strip().decode("latin-1").lower()] = val.strip().decode("latin-1")
    return headers


def parse_multipart(body: bytes | bytearray | memoryview, boundary: str, max_parts: int = 100_000) -> list[Part]:
    """Split a multipart body into its parts.

    The preamble (before the first delimiter) and epilogue (after the close
    delimiter) are ignored, as RFC 2046 says.  A body without its close
    delimiter is refused: a truncated upload must not be half-stored silently.
    """
    if not boundary or len(boundary) > 70:
        raise MultipartError("the multipart boundary must be 1-70 characters")
    raw = body if isinstance(body, bytes) else bytes(body)
    data = memoryview(raw)
    b = boundary.encode("latin-1")
    dash = b"--" + b
    # The first delimiter may start the body (no CRLF before it).
    if raw.startswith(dash):
        pos = len(dash)
    else:
        i = raw.find(b"\r\n" + dash)
        if i < 0:
            raise MultipartError("no multipart boundary found in the body")
        pos = i + 2 + len(dash)
    delim = b"\r\n" + dash
    parts: list[Part] = []
    while True:
        if raw[pos:pos + 2] == b"--":  # close delimiter
            return parts
        # transport padding after a delimiter, then CRLF
        while raw[pos:pos + 1] in (b" ", b"\t"):
            pos += 1
        if raw[pos:pos + 2] != b"\r\n":
            if pos >= len(raw):
                raise MultipartError("the body ends without the closing boundary (truncated upload?)")
            raise MultipartError(f"garbage after a boundary at offset {pos}")
        pos += 2
        end = _find_delimiter(raw, delim, pos)
        hdr_end = raw.find(b"\r\n\r\n", pos, end)
        if raw[pos:pos + 2] == b"\r\n":  # no headers at all
            headers, start = {}, pos + 2
        elif hdr_end < 0:
            raise MultipartError(f"part {len(parts) + 1}: headers not terminated by an empty line")
        else:
            headers, start = _parse_headers(raw[pos:hdr_end], len(parts)), hdr_end + 4
        parts.append(Part(headers, data[start:end]))
        if len(parts) > max_parts:
            raise MultipartError(f"more than {max_parts} parts")
        pos = end + len(delim)


def _find_delimiter(raw: bytes, delim: bytes, pos: int) -> int:
    """The next ``CRLF--boundary`` that really is a delimiter: followed by ``--`` (close) or
    by optional transport padding and CRLF.  (A sender must choose a boundary that is not in
    the payload, but a look-alike such as ``--boundaryX`` is data, not a delimiter.)"""
    while True:
        end = raw.find(delim, pos)
        if end < 0:
            raise MultipartError("the body ends without the closing boundary (truncated upload?)")
        after = end + len(delim)
        if raw[after:after + 2] == b"--":
            return end
        q = after
        while raw[q:q + 1] in (b" ", b"\t"):
            q += 1
        if raw[q:q + 2] == b"\r\n":
            return end
        pos = end + 1


def encode_multipart(parts: list[tuple[bytes, str]], boundary: Optional[str] = None) -> tuple[bytes, str]:
    """Build a multipart/related body from ``(payload, content type)`` pairs; returns (body, boundary)."""
    import uuid

    boundary = boundary or uuid.uuid4().hex
    out = bytearray()
    for payload, ctype in parts:
        out += b"--" + boundary.encode() + b"\r\nContent-Type: " + ctype.encode() + b"\r\n\r\n"
        out += payload + b"\r\n"
    out += b"--" + boundary.encode() + b"--\r\n"
    return bytes(out), boundary
