"""The write-ahead log's files: segment names, record framing, the meta file and the lock.

A log is a directory::

    wal.meta                   {"format": 1, "instance": "…"}, written once, atomically
    wal.lock                   held (flock) by the one process using the log
    seg-0000000000000001.wal   segments, appended in order, deleted oldest first

Every record is framed on its own, so one that cannot be trusted costs only itself::

    magic "IBW1" | u32 body length | u32 CRC32C of (length, kind, body) | u8 kind | body

The CRC covers the length, so a torn or flipped length is caught like a torn body; the magic lets a
reader find the next record after damage. The CRC starts from the log's own random salt (in
``wal.meta``), so bytes a client sent that happen to hold a whole frame never pass for a record when
a reader looks for the next one after damage. Kinds:

* ROWS — requests for one (table, format): ``u64 first lsn | u16 parts | u8 format | u8 table
  length | table | (u32 rows, u32 bytes) per part | the parts' payloads``. Format 255 means rows
  with a column list or settings of their own (``buffer.shape``): ``u16 length | shape`` follows
  the table. Every accepted request
  has a log sequence number (lsn), increasing for the life of the log; the writer packs the
  consecutive requests of one key into one record.
* BATCH — a batch about to be inserted: ``u16 token length | token | u32 ranges | (u64 first lsn,
  u32 count) per range``; replay resends exactly these requests under exactly this token.
* DONE — requests settled (committed, dead-lettered, dropped): ``u32 ranges | (u64, u32) per range``.

A record that does not end in its file is a torn write: the tail after the last whole record is cut
off at start (and counted). A record whose CRC fails inside a file is skipped, counted as corrupt,
and reading resumes at the next magic that starts a record that checks.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import re
import secrets
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import crc32c

FORMAT_VERSION = 1
MAGIC = b"IBW1"
HEADER = struct.Struct("<4sIIB")  # magic, body length, crc, kind
LENGTH_KIND = struct.Struct("<IB")
ROWS_HEAD = struct.Struct("<QHBB")  # first lsn, parts, format code, table length
PART = struct.Struct("<II")  # rows, bytes
RANGE = struct.Struct("<QI")  # first lsn, count
COUNT = struct.Struct("<I")
TOKEN_LENGTH = struct.Struct("<H")
MAX_BODY = 1 << 30  # no record is larger: a length beyond this is damage, not data
META_NAME = "wal.meta"
LOCK_NAME = "wal.lock"
_SEGMENT = re.compile(r"seg-(\d{16})\.wal")

# ClickHouse format names, by their code in ROWS records (append only: the code is on disk).
FORMAT_CODES = ("JSONEachRow", "JSONCompactEachRow", "CSV", "TabSeparated", "RowBinary", "Native")
FORMAT_CODE = {name: code for code, name in enumerate(FORMAT_CODES)}
SHAPED = 255  # the format code of rows whose shape is more than a format (u16 length | shape follows)


class Kind(enum.IntEnum):
    ROWS = 1
    BATCH = 2
    DONE = 3


class LogError(Exception):
    """The directory cannot be used as a log; the message says why and what to do (exit 2)."""


Range = tuple[int, int]  # (first lsn, count)


def segment_name(number: int) -> str:
    return f"seg-{number:016d}.wal"


def segment_numbers(directory: Path) -> list[int]:
    out = []
    for p in directory.iterdir():
        m = _SEGMENT.fullmatch(p.name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


# ----- encoding ----------------------------------------------------------------------------------

def frame(kind: Kind, parts: list[bytes], salt: int) -> list[bytes]:
    """The record as buffers to write in order (payloads are not copied)."""
    length = sum(len(p) for p in parts)
    crc = crc32c.crc32c(LENGTH_KIND.pack(length, kind), salt)
    for p in parts:
        crc = crc32c.crc32c(p, crc)
    return [HEADER.pack(MAGIC, length, crc, kind), *parts]


def rows_record(first_lsn: int, fmt: str, table: str, parts: list[tuple[int, bytes]], salt: int) -> list[bytes]:
    name = table.encode()
    code = FORMAT_CODE.get(fmt, SHAPED)
    head = ROWS_HEAD.pack(first_lsn, len(parts), code, len(name)) + name
    if code == SHAPED:
        shape = fmt.encode()
        head += TOKEN_LENGTH.pack(len(shape)) + shape
    flat = [n for rows, payload in parts for n in (rows, len(payload))]
    sizes = struct.pack(f"<{len(flat)}I", *flat)
    payloads = [payload for _, payload in parts]
    if len(payloads) > 1 and sum(len(p) for p in payloads) < 64 * 1024:
        payloads = [b"".join(payloads)]  # small requests: one buffer to checksum and write, not hundreds
    return frame(Kind.ROWS, [head, sizes, *payloads], salt)


def ranges_body(ranges: list[Range]) -> bytes:
    return COUNT.pack(len(ranges)) + b"".join(RANGE.pack(first, n) for first, n in ranges)


def batch_record(token: str, ranges: list[Range], salt: int) -> list[bytes]:
    raw = token.encode()
    return frame(Kind.BATCH, [TOKEN_LENGTH.pack(len(raw)) + raw, ranges_body(ranges)], salt)


def done_record(ranges: list[Range], salt: int) -> list[bytes]:
    return frame(Kind.DONE, [ranges_body(ranges)], salt)


def to_ranges(lsns: list[int]) -> list[Range]:
    """Runs of consecutive lsns, as (first, count), in the order given: a batch comes back in its order."""
    out: list[Range] = []
    for lsn in lsns:
        if out and out[-1][0] + out[-1][1] == lsn:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((lsn, 1))
    return out


# ----- decoding ----------------------------------------------------------------------------------

@dataclass(slots=True)
class RowsRecord:
    first_lsn: int
    fmt: str
    table: str
    parts: tuple[tuple[int, int, int], ...]  # (rows, file offset of the payload, bytes) per part
    copies: list[bool] | None = None  # reading a log: which parts were met before (written again)

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + len(self.parts) - 1


def _ranges(body: memoryview, at: int) -> list[Range]:
    (n,) = COUNT.unpack_from(body, at)
    at += COUNT.size
    return [RANGE.unpack_from(body, at + i * RANGE.size) for i in range(n)]


def decode_rows(body: memoryview, body_offset: int) -> RowsRecord:
    first, n, code, table_len = ROWS_HEAD.unpack_from(body, 0)
    at = ROWS_HEAD.size
    table = bytes(body[at:at + table_len]).decode()
    at += table_len
    if code == SHAPED:
        (n_shape,) = TOKEN_LENGTH.unpack_from(body, at)
        fmt = bytes(body[at + TOKEN_LENGTH.size:at + TOKEN_LENGTH.size + n_shape]).decode()
        at += TOKEN_LENGTH.size + n_shape
    else:
        fmt = FORMAT_CODES[code]
    sizes = list(PART.iter_unpack(body[at:at + n * PART.size]))
    if len(sizes) != n:
        raise ValueError("ROWS record shorter than its parts' sizes")
    at += n * PART.size
    parts = []
    for rows, size in sizes:
        parts.append((rows, body_offset + at, size))
        at += size
    if at != len(body):
        raise ValueError("ROWS record parts do not add up to its length")
    return RowsRecord(first, fmt, table, tuple(parts))


def decode_batch(body: memoryview) -> tuple[str, list[Range]]:
    (n,) = TOKEN_LENGTH.unpack_from(body, 0)
    token = bytes(body[TOKEN_LENGTH.size:TOKEN_LENGTH.size + n]).decode()
    return token, _ranges(body, TOKEN_LENGTH.size + n)


def decode_done(body: memoryview) -> list[Range]:
    return _ranges(body, 0)


@dataclass
class Damage:
    """What reading a segment could not trust."""

    torn_bytes: int = 0  # an unfinished record at the end of the segment (a crash mid-write)
    corrupt_bytes: int = 0  # bytes skipped inside the segment (checksum failed, bad framing)
    corrupt_records: int = 0  # places where damage began


@dataclass
class Scanned:
    """One record as read: its kind, its body (a view of the file) and where it starts."""

    kind: Kind
    offset: int
    body: memoryview = field(repr=False)


def scan(data: memoryview, damage: Damage, salt: int) -> Iterator[Scanned]:
    """The records of one segment's bytes, in order; damage is skipped and counted.

    The good end of the data is ``damage``'s business too: after the loop, bytes that did not make a
    whole record at the very end are ``torn_bytes``.
    """
    end = len(data)
    at = 0
    while at < end:
        record = _record_at(data, at, salt)
        if record is not None:
            kind, length = record
            yield Scanned(kind, at, data[at + HEADER.size:at + HEADER.size + length])
            at += HEADER.size + length
            continue
        resume = next_record(data, at + 1, salt)
        if resume is None:
            damage.torn_bytes += end - at  # nothing whole after it: a write the crash cut short
            return
        damage.corrupt_records += 1
        damage.corrupt_bytes += resume - at
        at = resume


def _record_at(data: memoryview, at: int, salt: int) -> tuple[Kind, int] | None:
    if len(data) - at < HEADER.size:
        return None
    magic, length, crc, kind = HEADER.unpack_from(data, at)
    if magic != MAGIC or length > MAX_BODY or at + HEADER.size + length > len(data):
        return None
    start = at + HEADER.size
    check = crc32c.crc32c(data[start:start + length], crc32c.crc32c(LENGTH_KIND.pack(length, kind), salt))
    if check != crc or kind not in Kind._value2member_map_:
        return None
    return Kind(kind), length


def next_record(data: memoryview, start: int, salt: int) -> int | None:
    """The offset of the next magic at which a whole, valid record begins."""
    raw = data.obj if isinstance(data.obj, bytes) and len(data.obj) == len(data) else bytes(data)
    at = start
    while True:
        at = raw.find(MAGIC, at)
        if at < 0:
            return None
        if _record_at(data, at, salt) is not None:
            return at
        at += 1


# ----- the directory: meta and lock ----------------------------------------------------------------

def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_meta(directory: Path, *, create: bool) -> dict[str, object]:
    """The log's meta; creates it (atomically) in an empty or new directory when ``create``."""
    meta_path = directory / META_NAME
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            version = int(meta["format"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LogError(f"{meta_path} is not a write-ahead log's meta file ({exc}): point --wal-dir at a "
                           "directory of its own") from None
        if version > FORMAT_VERSION:
            raise LogError(f"the write-ahead log in {directory} has format {version}, newer than this build "
                           f"reads ({FORMAT_VERSION}): run the newer ingest-buffer on it, or give this one "
                           "another --wal-dir")
        if version < 1:
            raise LogError(f"{meta_path} has an unknown format {version}: point --wal-dir elsewhere")
        if not isinstance(meta.get("instance"), str) or not meta["instance"] or not isinstance(meta.get("salt"), int):
            raise LogError(f"{meta_path} is damaged (its instance or salt is missing): the log cannot be read as it "
                           "is; move the directory aside (ingest-buffer wal inspect shows what it held) and start "
                           "with an empty --wal-dir")
        return dict(meta)
    others = [p.name for p in directory.iterdir() if p.name != LOCK_NAME] if directory.exists() else []
    if others:
        raise LogError(f"{directory} is not a write-ahead log (no {META_NAME}) and is not empty "
                       f"({', '.join(sorted(others)[:5])}): give --wal-dir a directory of its own")
    if not create:
        raise LogError(f"{directory} holds no write-ahead log (no {META_NAME})")
    directory.mkdir(parents=True, exist_ok=True)
    fresh: dict[str, object] = {"format": FORMAT_VERSION, "instance": uuid.uuid4().hex[:12],
                                "salt": secrets.randbits(32)}
    write_meta(directory, fresh)
    return fresh


def write_meta(directory: Path, meta: dict[str, object]) -> None:
    """Replaces the meta file atomically (a temp file, fsynced, renamed, the directory fsynced)."""
    tmp = directory / (META_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / META_NAME)
    fsync_dir(directory)


class DirectoryLock:
    """An exclusive flock on ``wal.lock``: one process per log (released when the process dies)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LogError(f"another process is using the write-ahead log in {self.path.parent} (it holds "
                           f"{self.path}): stop it, or give this one its own --wal-dir") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
