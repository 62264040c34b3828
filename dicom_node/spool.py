"""The spool: received instances on disk, written so that an acknowledged
instance survives a crash or power loss.

Layout: ``<spool>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``; temporary
files live in ``<spool>/.tmp`` (same filesystem, so the final ``rename`` is
atomic) and are removed at start-up.

A file is the 128-byte preamble, ``DICM``, the File Meta group, and then the
data set bytes *exactly as received* on the association (no decode/re-encode:
that is both faster and bit-preserving; for the deflated transfer syntax the
received bytes are already deflated, which is what a Part 10 file holds).

Write order: temp file -> fsync -> rename over the final name (an
idempotent re-send replaces the old file atomically) -> fsync the directory.
Only after that does the caller journal the instance and answer success.
A data set the listener streamed into ``.tmp`` as it arrived (``Spool.adopt``)
follows the same order, without a second copy when its head is already right.

UIDs from the network are untrusted: a UID is only used as a path component if
it is safe for one (``uid_is_path_safe``).  Real-world UIDs that break the
DICOM grammar but are harmless (leading-zero components, ``999.999...``) are
tolerated.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import struct

log = logging.getLogger(__name__)

STRICT_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# What we accept as a path component: starts with a digit (so it can never be
# "." / ".." / a hidden file / the pipeline's "results" folder), then only
# characters that are inert in a file name on every OS.  At most 64 characters
# (the UI VR's limit): a longer UID could never be referenced by our SR/KOS or
# returned to a PACS, so it is refused at reception rather than accepted into a
# study that can never get a result.
_PATH_SAFE = re.compile(r"^[0-9][0-9A-Za-z._-]{0,63}$")
TMP_DIR = ".tmp"
RESULTS_DIR = "results"  # the node's own SR/KOS: <spool>/results/<study>/
PREAMBLE = b"\x00" * 128 + b"DICM"


def uid_is_valid(uid: str) -> bool:
    """The DICOM UI grammar (PS3.5 9.1), without the leading-zero rule."""
    return bool(uid) and len(uid) <= 64 and STRICT_UID.match(uid) is not None


def uid_is_path_safe(uid: Optional[str]) -> bool:
    return bool(uid) and _PATH_SAFE.match(uid) is not None


class SpoolFull(OSError):
    """Free space is below storage.min_free_mb."""


@dataclass(frozen=True)
class FileMeta:
    """The File Meta Information group (PS3.10 7.1) of one received instance.

    Encoded here rather than with pydicom: it is eight elements, and pydicom
    would warn on (harmless) real-world invalid UIDs that we store as received.
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_class_uid: str
    implementation_version: str = ""
    source_aet: str = ""

    def encode(self) -> bytes:
        elems = [
            _el(0x0001, b"OB", b"\x00\x01"),
            _el(0x0002, b"UI", _pad(self.sop_class_uid, b"\x00")),
            _el(0x0003, b"UI", _pad(self.sop_instance_uid, b"\x00")),
            _el(0x0010, b"UI", _pad(self.transfer_syntax, b"\x00")),
            _el(0x0012, b"UI", _pad(self.implementation_class_uid, b"\x00")),
        ]
        if self.implementation_version:
            elems.append(_el(0x0013, b"SH", _pad(self.implementation_version[:16], b" ")))
        if self.source_aet:
            elems.append(_el(0x0016, b"AE", _pad(self.source_aet[:16], b" ")))
        body = b"".join(elems)
        group_length = _el(0x0000, b"UL", struct.pack("<I", len(body)))
        return PREAMBLE + group_length + body


def _pad(value: str, pad: bytes) -> bytes:
    b = value.encode("ascii", "replace")
    return b + pad if len(b) % 2 else b


def _el(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


@dataclass(frozen=True)
class StoredFile:
    path: Path
    size: int


class Spool:
    def __init__(self, root: Path, *, fsync: bool = True, min_free_mb: int = 0):
        self.root = Path(root)
        self.fsync = fsync
        self.min_free_mb = min_free_mb
        self.tmp = self.root / TMP_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)

    # -- housekeeping -------------------------------------------------------
    def clean_stale_temp(self) -> int:
        """Remove temp files left by a crash (never acknowledged, so never journaled)."""
        n = 0
        for p in self.tmp.iterdir():
            try:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                n += 1
            except OSError as exc:  # pragma: no cover - permissions
                log.warning("could not remove stale temp file %s: %s", p, exc)
        if n:
            log.info("removed %d stale temp file(s) from %s", n, self.tmp)
        return n

    def free_mb(self) -> float:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize / (1024 * 1024)

    def has_space(self) -> bool:
        return self.min_free_mb <= 0 or self.free_mb() >= self.min_free_mb

    def path_for(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_instance_uid):
            if not uid_is_path_safe(uid):
                raise ValueError(f"UID not safe as a path component: {uid[:80]!r}")
        return self.root / study_uid / series_uid / f"{sop_instance_uid}.dcm"

    def results_dir(self, study_uid: str) -> Path:
        """Where the node's results (SR, KOS) for a study live: ``<spool>/results/<study>``."""
        if not uid_is_path_safe(study_uid):
            raise ValueError(f"UID not safe as a path component: {study_uid[:80]!r}")
        return self.root / RESULTS_DIR / study_uid

    # -- writing ------------------------------------------------------------
    def write_result(self, study_uid: str, kind: str, ds) -> Path:
        """Write a result data set (``kind`` ``SR`` or ``KO``) as a Part 10 file,
        ``results/<study>/<kind>_<SOPInstanceUID>.dcm``, with the spool's write order (temp file,
        fsync when ``storage.fsync``, rename, directory fsync); returns its path."""
        uid = str(ds.SOPInstanceUID)
        if not uid_is_path_safe(uid) or not kind.isalnum():
            raise ValueError(f"not a safe result name: {kind!r} {uid[:80]!r}")
        final = self.results_dir(study_uid) / f"{kind}_{uid}.dcm"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getbuffer()

        def write(f) -> None:
            _write_all(f, data)

        try:
            self._write_and_place(final, write)
        finally:
            data.release()
        return final

    def store(self, study_uid: str, series_uid: str, sop_instance_uid: str, file_meta: "FileMeta",
              dataset: BinaryIO | bytes | memoryview) -> StoredFile:
        """Write one instance durably; raise ``SpoolFull`` / ``ValueError`` / ``OSError``."""
        final = self.path_for(study_uid, series_uid, sop_instance_uid)
        if not self.has_space():
            raise SpoolFull(f"free space below storage.min_free_mb={self.min_free_mb}")
        head = file_meta.encode()
        if isinstance(dataset, io.BytesIO):
            body = dataset.getbuffer()
        elif isinstance(dataset, (bytes, bytearray, memoryview)):
            body = memoryview(dataset)
        else:
            body = memoryview(dataset.read())
        size = len(head) + len(body)

        def write(f) -> None:
            _write_all(f, memoryview(head))
            _write_all(f, body)

        try:
            self._write_and_place(final, write)
        finally:
            if isinstance(body, memoryview):
                body.release()
        return StoredFile(final, size)

    def adopt(self, study_uid: str, series_uid: str, sop_instance_uid: str, file_meta: "FileMeta",
              src: Path, written_head: bytes) -> StoredFile:
        """Make a file already streamed into ``.tmp`` a spooled instance, durably.

        ``src`` holds ``written_head`` (preamble + a File Meta group) followed by
        the data set bytes as received.  When that head is the one ``file_meta``
        encodes (the usual case) the file is fsynced and renamed into place;
        otherwise the data set bytes are copied (in the kernel) after the right
        head into a new temp file.  ``src`` is never removed here: its owner
        (pynetdicom) unlinks it, which is a no-op once it was renamed.
        Raises like ``store``.
        """
        final = self.path_for(study_uid, series_uid, sop_instance_uid)
        if not self.has_space():
            raise SpoolFull(f"free space below storage.min_free_mb={self.min_free_mb}")
        head = file_meta.encode()
        src = Path(src)
        total = os.stat(src).st_size
        if head == written_head:
            if self.fsync:
                fd = os.open(src, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            self._place(src, final)
            return StoredFile(final, total)
        body = total - len(written_head)

        def write(f) -> None:
            _write_all(f, memoryview(head))
            with open(src, "rb", buffering=0) as s:
                _copy_range(s, f, len(written_head), body)

        self._write_and_place(final, write)
        return StoredFile(final, len(head) + body)

    def _write_and_place(self, final: Path, write) -> None:
        """``write(f)`` into a new temp file, fsync it, then ``_place`` it at ``final``; the
        temp file is removed if anything fails."""
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb", buffering=0) as f:
                write(f)
                if self.fsync:
                    os.fsync(f.fileno())
            self._place(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise

    def _place(self, src: Path, final: Path) -> None:
        """Rename a complete (fsynced) file into place, creating its folders, and make the new
        directory entries durable."""
        new_dirs = self._makedirs(final.parent)
        os.replace(src, final)
        if self.fsync:
            _fsync_dir(final.parent)
            for d in new_dirs:
                _fsync_dir(d.parent)

    def _makedirs(self, d: Path) -> list[Path]:
        """mkdir -p, returning the directories created (outermost first)."""
        created: list[Path] = []
        p = d
        while not p.exists() and p != self.root:
            created.append(p)
            p = p.parent
        created.reverse()
        for c in created:
            try:
                c.mkdir()
            except FileExistsError:
                pass
        return created


def _write_all(f, data: memoryview) -> None:
    view = memoryview(data)
    try:
        while view:
            n = f.write(view)
            view = view[n:]
    finally:
        view.release()


def _copy_range(src, dst, offset: int, count: int) -> None:
    """Copy ``count`` bytes of ``src`` from ``offset`` to ``dst``'s position, without a user-space buffer
    where the kernel can (``copy_file_range``), else 1 MiB at a time."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < count:
                n = os.copy_file_range(src.fileno(), dst.fileno(), count - done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or done:
                raise
    if done < count:
        src.seek(offset + done)
        while done < count:
            chunk = src.read(min(1 << 20, count - done))
            if not chunk:
                raise OSError(errno.EIO, f"source ended {count - done} bytes early")
            _write_all(dst, memoryview(chunk))
            done += len(chunk)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
