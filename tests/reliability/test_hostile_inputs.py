"""Hostile and broken C-STORE inputs: each gets a status, the node stays up, nothing else is disturbed.

The data sets are built byte by byte and sent exactly as built (pynetdicom's
chunked send: the bytes after the File Meta go on the wire as they are), so
the node sees what a broken or malicious modality would send.  The node-core
tests cover single hostile UIDs; here it is a whole corpus on one running node
(``cag-node serve`` subprocess), then a bounded hypothesis fuzz of the same path.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cagtest.reliability import (NO_VLM, XA, NodeProc, associate_store, chunked_send, db_study, echo, make_xa, node_config,
                     send_files, wait_for, write_raw_part10)

IMPLICIT = "1.2.840.10008.1.2"
BIG = "1.2.840.10008.1.2.2"
CT = "1.2.840.10008.5.1.4.1.1.2"
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


# ---------------------------------------------------------------------------
# Byte-level encoding (explicit VR little endian unless said otherwise)
# ---------------------------------------------------------------------------
def el(group: int, elem: int, vr: str, value: bytes, length: int | None = None, e: str = "<") -> bytes:
    n = len(value) if length is None else length
    if vr in LONG_VRS:
        return struct.pack(e + "HH2sHI", group, elem, vr.encode(), 0, n) + value
    return struct.pack(e + "HH2sH", group, elem, vr.encode(), n & 0xFFFF) + value


def iel(group: int, elem: int, value: bytes, length: int | None = None) -> bytes:
    """Implicit VR LE element."""
    return struct.pack("<HHI", group, elem, len(value) if length is None else length) + value


def pad(s: str | bytes, c: bytes = b" ") -> bytes:
    b = s.encode("latin-1") if isinstance(s, str) else s
    return b + c if len(b) % 2 else b


def ui(s: str | bytes) -> bytes:
    return pad(s, b"\x00")


def header(study: str | bytes, series: str | bytes, sop: str | bytes, *, sop_class: str = XA,
           charset: bytes | None = None, name: bytes = b"Hostile^Test", rows: int = 8, cols: int = 8,
           frames: int = 2, extra: bytes = b"") -> bytes:
    """A structurally valid XA header (elements in ascending order) without pixel data."""
    parts = []
    if charset is not None:
        parts.append(el(0x0008, 0x0005, "CS", pad(charset)))
    parts += [
        el(0x0008, 0x0016, "UI", ui(sop_class)),
        el(0x0008, 0x0018, "UI", ui(sop)),
        el(0x0008, 0x0060, "CS", pad("XA")),
        el(0x0010, 0x0010, "PN", pad(name)),
        el(0x0010, 0x0020, "LO", pad("HOSTILE1")),
        extra,
        el(0x0020, 0x000D, "UI", ui(study)),
        el(0x0020, 0x000E, "UI", ui(series)),
        el(0x0028, 0x0002, "US", struct.pack("<H", 1)),
        el(0x0028, 0x0004, "CS", pad("MONOCHROME2")),
        el(0x0028, 0x0008, "IS", pad(str(frames))),
        el(0x0028, 0x0010, "US", struct.pack("<H", rows)),
        el(0x0028, 0x0011, "US", struct.pack("<H", cols)),
        el(0x0028, 0x0100, "US", struct.pack("<H", 8)),
        el(0x0028, 0x0101, "US", struct.pack("<H", 8)),
        el(0x0028, 0x0102, "US", struct.pack("<H", 7)),
        el(0x0028, 0x0103, "US", struct.pack("<H", 0)),
    ]
    return b"".join(parts)


def pixels(n: int, length: int | None = None) -> bytes:
    return el(0x7FE0, 0x0010, "OB", bytes(n), length)


def valid_body(study=None, series=None, sop=None, **kw) -> bytes:
    rows, cols, frames = kw.pop("rows", 8), kw.pop("cols", 8), kw.pop("frames", 2)
    return header(study or generate_uid(), series or generate_uid(), sop or generate_uid(), rows=rows, cols=cols,
                  frames=frames, **kw) + pixels(rows * cols * frames)


def nested_sq(depth: int) -> bytes:
    """Sequences of undefined length nested ``depth`` deep (properly delimited)."""
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + inner + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        inner = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + item + \
            struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return inner


def corpus() -> list[tuple[str, bytes, dict]]:
    """(name, data set bytes, send options: command sop_uid / transfer syntax / expect)."""
    s, se = generate_uid(), generate_uid()
    ok = valid_body(s, se)
    g = [generate_uid() for _ in range(3)]
    long_uid = "1." + "2" * 198  # 200 characters
    import random

    R = random.Random(8)
    garbage = bytes(R.getrandbits(8) for _ in range(4096))
    cases: list[tuple[str, bytes, dict]] = [
        ("empty data set", b"", {"expect": "failure"}),
        ("garbage 4 KiB", garbage, {"expect": "failure"}),
        ("zeros 4 KiB", bytes(4096), {"expect": "failure"}),
        ("truncated in pixel data", ok[: len(ok) - 40], {"expect": "failure"}),
        ("truncated in an element header", ok[:37], {"expect": "failure"}),
        ("truncated after the header", header(*g), {"expect": "any"}),
        ("pixel length 0xFFFFFFF0, 16 bytes present", header(*[generate_uid() for _ in range(3)])
         + el(0x7FE0, 0x0010, "OB", bytes(16), 0xFFFFFFF0), {"expect": "failure"}),
        ("PatientName length 0xFFFE (short VR) with 4 bytes", el(0x0008, 0x0016, "UI", ui(XA))
         + el(0x0010, 0x0010, "PN", b"ABCD", 0xFFFE), {"expect": "failure"}),
        ("private UN 0xFFFFFFF0", header(*[generate_uid() for _ in range(3)],
                                          extra=el(0x0019, 0x1010, "UN", b"xx", 0xFFFFFFF0)), {"expect": "failure"}),
        ("short-VR length 0xFFFF past the end", header(*[generate_uid() for _ in range(3)],
                                                     extra=el(0x0019, 0x0010, "UL", b"", 0xFFFF)), {"expect": "failure"}),
        ("undefined-length sequence never closed", header(*[generate_uid() for _ in range(3)])
         + struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
         + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF), {"expect": "failure"}),
        ("sequences nested 2000 deep", header(*[generate_uid() for _ in range(3)]) + nested_sq(2000),
         {"expect": "failure"}),
        ("invalid VR code", el(0x0008, 0x0016, "UI", ui(XA)) + b"\x08\x00\x18\x00" + b"\x01\x02\x04\x00abcd",
         {"expect": "failure"}),
        ("SOPInstanceUID with VR SQ", el(0x0008, 0x0016, "UI", ui(XA)) + el(0x0008, 0x0018, "SQ", b"\x00" * 8)
         + el(0x0020, 0x000D, "UI", ui(generate_uid())) + el(0x0020, 0x000E, "UI", ui(generate_uid())),
         {"expect": "any"}),
        ("Rows with VR UI and text", header(*[generate_uid() for _ in range(3)])
         .replace(el(0x0028, 0x0010, "US", struct.pack("<H", 8)), el(0x0028, 0x0010, "UI", ui("1.2.3"))) + pixels(128),
         {"expect": "any"}),
        ("NumberOfFrames not a number", valid_body(frames=2).replace(el(0x0028, 0x0008, "IS", pad("2")),
                                                                      el(0x0028, 0x0008, "IS", pad("two"))),
         {"expect": "any"}),
        ("absurd dimensions 65535x65535x10000, 1 KiB of pixels",
         header(*[generate_uid() for _ in range(3)], rows=65535, cols=65535, frames=10000) + pixels(1024),
         {"expect": "any"}),
        ("NumberOfFrames -5", valid_body().replace(el(0x0028, 0x0008, "IS", pad("2")), el(0x0028, 0x0008, "IS",
                                                                                           pad("-5"))),
         {"expect": "any"}),
        ("elements out of order and duplicated", el(0x0020, 0x000D, "UI", ui(generate_uid()))
         + el(0x0008, 0x0018, "UI", ui(generate_uid())) + el(0x0008, 0x0016, "UI", ui(XA))
         + el(0x0008, 0x0016, "UI", ui(CT)) + el(0x0020, 0x000E, "UI", ui(generate_uid())) + pixels(16),
         {"expect": "any"}),
        ("group length lies", el(0x0008, 0x0000, "UL", struct.pack("<I", 0xFFFFFF00)) + valid_body(),
         {"expect": "any"}),
        ("empty StudyInstanceUID", header(b"", generate_uid(), generate_uid()) + pixels(128), {"expect": "failure"}),
        ("missing every UID", el(0x0008, 0x0060, "CS", pad("XA")) + pixels(16), {"expect": "failure"}),
        # hostile UIDs in the data set (the command carries a harmless one)
        ("StudyInstanceUID ../../../../tmp/pwn", valid_body("../../../../tmp/pwn"), {"expect": "failure"}),
        ("SeriesInstanceUID /etc/cag-pwn", valid_body(None, "/etc/cag-pwn"), {"expect": "failure"}),
        ("SOPInstanceUID ..", valid_body(None, None, ".."), {"expect": "failure"}),
        ("SOPInstanceUID 1.2/../../x", valid_body(None, None, "1.2/../../x"), {"expect": "failure"}),
        ("StudyInstanceUID results (pipeline folder)", valid_body("results"), {"expect": "failure"}),
        ("StudyInstanceUID .tmp (spool temp folder)", valid_body(".tmp"), {"expect": "failure"}),
        ("SOPInstanceUID 200 characters", valid_body(None, None, long_uid), {"expect": "failure"}),
        ("StudyInstanceUID with a NUL inside", valid_body(b"1.2.3\x00/../../x"), {"expect": "failure"}),
        ("SOPInstanceUID with backslash", valid_body(None, None, "1.2\\..\\..\\x"), {"expect": "failure"}),
        ("SOPInstanceUID with newline + fake log line", valid_body(None, None, "1.2\nERROR forged"),
         {"expect": "failure"}),
        ("SOPInstanceUID C:\\windows", valid_body(None, None, "C:\\windows\\x"), {"expect": "failure"}),
        # hostile UIDs in the command (the data set is fine)
        ("command SOP Instance UID ../../x", valid_body(), {"cmd_uid": "../../x", "expect": "any"}),
        ("command SOP Instance UID with NUL", valid_body(), {"cmd_uid": "1.2\x00.3", "expect": "any"}),
        # odd character sets
        ("unknown SpecificCharacterSet", valid_body(charset=b"ISO_IR 999", name=b"\xff\xfe\xfd"), {"expect": "any"}),
        ("UTF-8 declared, invalid bytes", valid_body(charset=b"ISO_IR 192", name=b"\xc3\x28\xa0\xa1"),
         {"expect": "any"}),
        ("ISO 2022 IR 87 with broken escapes", valid_body(charset=b"\\ISO 2022 IR 87",
                                                          name=b"\x1b$B\x30\x21\x1b(\xff"), {"expect": "any"}),
        ("GB18030 with truncated multibyte", valid_body(charset=b"GB18030", name=b"\x81\x30\x81"), {"expect": "any"}),
        # transfer syntax mismatches
        ("explicit bytes sent as implicit", valid_body(), {"ts": IMPLICIT, "expect": "any"}),
        ("explicit LE bytes sent as big endian", valid_body(), {"ts": BIG, "expect": "any"}),
        ("implicit: element length past the end", iel(0x0008, 0x0016, ui(XA)) + iel(0x0008, 0x0018, b"1.2", 0x7FFFFFFF),
         {"ts": IMPLICIT, "expect": "failure"}),
        ("SOP class CT in data set, XA in command", valid_body(sop_class=CT), {"expect": "any"}),
    ]
    return cases


def _send_raw(port: int, body: bytes, tmp: Path, *, cmd_uid: str | None = None, ts: str = ExplicitVRLittleEndian):
    """Send one data set's bytes as they are; returns (status or None, association ok)."""
    f = write_raw_part10(tmp / "raw.dcm", body, sop_uid=cmd_uid or generate_uid(), ts=ts)
    assoc = associate_store(port, timeout=20)
    assert assoc.is_established, "association refused"
    try:
        with chunked_send():
            rsp = assoc.send_c_store(f)
        status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
    finally:
        if assoc.is_established:
            assoc.release()
    return status


@pytest.fixture(scope="module")
def hostile_node(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile")
    n = NodeProc(work / "node", node_config(work / "node", processing={"enabled": False},
                                            completion={"quiet_seconds": 3600}))
    n.start()
    yield n
    n.stop(timeout=20)


def _spool_invariants(node: NodeProc) -> None:
    """Nothing half-written, nothing outside the spool, every spooled file is a readable DICOM file."""
    spool = Path(node.cfg["storage"]["path"])
    tmpd = spool / ".tmp"
    leftovers = list(tmpd.iterdir()) if tmpd.is_dir() else []
    assert not leftovers, f"half-written files left in {tmpd}: {leftovers}"
    for p in spool.rglob("*"):
        if p.is_file():
            rel = p.relative_to(spool)
            assert len(rel.parts) == 3 and all(c[0].isdigit() for c in rel.parts), f"unexpected spool path {rel}"
            pydicom.dcmread(p, stop_before_pixels=True)
    for p in node.workdir.rglob("*"):
        if p.is_file() and spool not in p.parents and p.name not in ("config.yaml", "node.log") \
                and not p.name.startswith("journal.db"):
            raise AssertionError(f"file written outside the spool: {p}")
    for bad in ("/tmp/pwn", "/etc/cag-pwn"):
        assert not Path(bad).exists(), f"{bad} was created"


def test_hostile_corpus_each_gets_a_status(hostile_node, tmp_path):
    node = hostile_node
    problems = []
    results = []
    for name, body, opts in corpus():
        try:
            status = _send_raw(node.port, body, tmp_path, cmd_uid=opts.get("cmd_uid"),
                               ts=opts.get("ts", ExplicitVRLittleEndian))
        except Exception as exc:  # could not even send it: a gap in this corpus, not a node failure
            problems.append(f"{name}: could not send ({exc.__class__.__name__}: {exc})")
            continue
        results.append((name, status))
        if status is None:
            problems.append(f"{name}: no status (association aborted or timed out)")
        elif opts["expect"] == "failure" and status == 0x0000:
            problems.append(f"{name}: acknowledged with success")
        if not node.alive():
            problems.append(f"{name}: the node died\n{node.log_tail()}")
            break
        if not echo(node.port, timeout=10):
            problems.append(f"{name}: C-ECHO failed afterwards")
    # Nothing else disturbed: a valid instance sent afterwards is stored.
    su = generate_uid()
    f = make_xa(tmp_path / "valid.dcm", study_uid=su)
    st = send_files(node.port, [f])
    assert list(st.values()) == [0], f"valid instance after the corpus: {st}"
    _spool_invariants(node)
    spooled = list(Path(node.cfg["storage"]["path"]).rglob(f"{pydicom.dcmread(f).SOPInstanceUID}.dcm"))
    assert len(spooled) == 1
    assert not problems, "\n".join(problems) + "\n\nall statuses:\n" + \
        "\n".join(f"  {n}: {('0x%04X' % s) if s is not None else None}" for n, s in results)


# ---------------------------------------------------------------------------
# Fuzz: mutations of a valid data set, sent as bytes
# ---------------------------------------------------------------------------
_BASE = valid_body("1.2.826.0.1.3680043.10.99.1", "1.2.826.0.1.3680043.10.99.2", "1.2.826.0.1.3680043.10.99.3",
                   rows=8, cols=8, frames=2)

mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, len(_BASE))),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(1, 255)),
                                        min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.integers(0, len(_BASE)), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("length"), st.integers(0, len(_BASE) - 4),
              st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF])),
    st.tuples(st.just("element"), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF),
              st.sampled_from(["UI", "SQ", "OB", "UN", "US", "PN", "XX", "\x00\x00"]), st.binary(max_size=40)),
)


def _apply(m) -> bytes:
    b = bytearray(_BASE)
    kind = m[0]
    if kind == "truncate":
        return bytes(b[: m[1]])
    if kind == "flip":
        for pos, x in m[1]:
            b[pos] ^= x
        return bytes(b)
    if kind == "insert":
        return bytes(b[: m[1]] + m[2] + b[m[1]:])
    if kind == "length":
        b[m[1]: m[1] + 4] = struct.pack("<I", m[2])
        return bytes(b)
    _, g, e, vr, val = m
    vr = vr if len(vr) == 2 else "UN"
    try:
        extra = el(g, e, vr, val)
    except struct.error:
        extra = b""
    return bytes(b) + extra


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(m=mutation)
def test_fuzz_c_store(hostile_node, tmp_path, m):
    node = hostile_node
    status = _send_raw(node.port, _apply(m), tmp_path)
    assert status is not None, f"no status for {m!r}"
    assert node.alive(), node.log_tail()
    assert echo(node.port, timeout=10), f"C-ECHO failed after {m!r}"


def test_after_fuzz_node_still_stores(hostile_node, tmp_path):
    node = hostile_node
    su = generate_uid()
    f = make_xa(tmp_path / "valid2.dcm", study_uid=su)
    st = send_files(node.port, [f])
    assert list(st.values()) == [0], st
    _spool_invariants(node)


# ---------------------------------------------------------------------------
# What reception accepts, processing must survive
# ---------------------------------------------------------------------------
def test_accepted_oddities_are_processed_without_harm(nodes, pacs_factory, rel_bundle, tmp_path):
    """Instances that are structurally valid (so stored with 0x0000) but absurd -- 65535x65535x10000
    declared over 1 KiB of pixels, NumberOfFrames -5 or 'two', Rows encoded as a UI, broken
    character sets -- sit in one study beside a good run.  The study must end `sent` (one bad run
    never fails a study), the node stays up, and its memory stays bounded (a decoder trusting the
    declared dimensions would try to allocate terabytes)."""
    import psutil

    from cagtest.reliability import assert_results_once

    pacs = pacs_factory().start()
    node = nodes(bundle=rel_bundle, destinations=[pacs.destination()], vlm=NO_VLM,
                 outbox={"retry_base_s": 0.3, "retry_max_s": 1, "poll_s": 0.2},
                 processing={"selector_timeout_s": 120, "vlm_timeout_s": 120})
    node.start()
    su = generate_uid()

    def g():
        return generate_uid()

    bodies = [
        header(su, g(), g(), rows=65535, cols=65535, frames=10000) + pixels(1024),
        valid_body(su, rows=16, cols=16, frames=4).replace(el(0x0028, 0x0008, "IS", pad("4")),
                                                           el(0x0028, 0x0008, "IS", pad("-5"))),
        valid_body(su, rows=16, cols=16, frames=4).replace(el(0x0028, 0x0008, "IS", pad("4")),
                                                           el(0x0028, 0x0008, "IS", pad("two"))),
        header(su, g(), g(), rows=16, cols=16, frames=4).replace(
            el(0x0028, 0x0010, "US", struct.pack("<H", 16)), el(0x0028, 0x0010, "UI", ui("1.2.3"))) + pixels(1024),
        valid_body(su, rows=16, cols=16, frames=4, charset=b"ISO_IR 999", name=b"\xff\xfe\xfd"),
        valid_body(su, rows=16, cols=16, frames=4, charset=b"\\ISO 2022 IR 87", name=b"\x1b$B\x30\x21\x1b(\xff"),
        header(su, g(), g(), rows=64, cols=64, frames=3) + pixels(64 * 64 * 3 // 2),  # half the pixels
    ]
    for b in bodies:
        assert _send_raw(node.port, b, tmp_path) == 0
    good = make_xa(tmp_path / "good.dcm", study_uid=su, rows=64, cols=64, frames=12)
    assert list(send_files(node.port, [good]).values()) == [0]

    proc = psutil.Process(node.proc.pid)
    peak = 0
    deadline = time.monotonic() + 300
    state = None
    while time.monotonic() < deadline:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            break
        if peak > 3 * 2**30:
            node.kill9()
            raise AssertionError(f"node RSS {peak / 2**30:.1f} GiB while processing absurd instances")
        state = db_study(node, su)[0]
        if state in ("sent", "failed"):
            break
        time.sleep(0.05)
    assert node.alive(), node.log_tail()
    st = node.study(su)
    assert st["state"] == "sent", f"study {st['state']}: {st.get('error')}"
    assert echo(node.port)
    assert_results_once(pacs, [su])


def test_over_long_uids_are_refused_at_reception(nodes, pacs_factory, rel_bundle, tmp_path):
    """UIDs of 65-128 characters (path-safe, but over the UI VR's 64) are refused with a failure
    status: accepting them would make a study the node can never return a result for."""
    pacs = pacs_factory().start()
    node = nodes(bundle=rel_bundle, destinations=[pacs.destination()], vlm=NO_VLM,
                 outbox={"retry_base_s": 0.3, "retry_max_s": 1, "poll_s": 0.2})
    node.start()
    su = "1.2." + "3" * 76  # 80 characters
    status = _send_raw(node.port, valid_body(su, "1.2." + "4" * 70, "1.2." + "5" * 90, rows=32, cols=32, frames=6),
                       tmp_path)
    assert 0xC000 <= status <= 0xCFFF, f"over-long UIDs acknowledged with 0x{status:04X}"
    assert db_study(node, su) == (None, None), "a refused instance left a study in the journal"
    assert node.alive() and echo(node.port)
