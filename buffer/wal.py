"""The write-ahead log: every accepted request on disk before (DURABLE) or soon after (BUFFERED) its OK.

The event loop hands records to one writer thread and never waits on the disk itself. The writer
takes everything queued (up to GROUP_BYTES), packs the consecutive requests of one (table, format)
into one ROWS record, writes the group with one ``writev`` and, when a DURABLE writer or a batch
waits in it (or BUFFERED data has waited ``sync_interval``), ``fdatasync``s once for all of them:
*group commit*. Writers that arrive during an fsync share the next one; nothing waits on purpose.

Bookkeeping lives in the writer thread too: which lsns each segment holds and how many are settled
(DONE). Segments are deleted oldest first, once every request in them is settled — a DONE record
for a segment's rows may sit in a later segment, so a later segment never goes before an earlier
one — and the directory is fsynced on every create and delete. Deleting a settled segment is safe
at any moment: a crash just after it leaves nothing that refers to rows still needed.

At start, ``recover`` reads every segment (see ``walformat`` for what damage does), cuts a torn
tail, and returns what is not settled: the batches that were in flight (to be resent with their
recorded token and exactly their requests) and the ranges of requests still to flush.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer import walformat as fmt
from buffer.walformat import Damage, Kind, Range

log = logging.getLogger(__name__)

GROUP_BYTES = 1 << 20  # the most one group commit writes
FAULT_RETRY = 1.0  # after a failed write or sync, seconds until the writer tries again
RECORD_BYTES = 256 * 1024  # the most one ROWS record packs (a single larger request is one record)
# BUFFERED rows do not wake a sleeping writer at once: they wait up to WAKE_DELAY (a quarter of the
# sync interval when that is shorter) or WAKE_BYTES for company, so the writer takes the GIL once per
# handful of small requests, not once per request (each wake-up cost ~70 us of CPU at 1,500 1-row
# requests/s). Their reply never waits for the writer; what a SIGKILL can lose stays inside the sync
# interval. DURABLE rows and control records wake it at once.
WAKE_DELAY = 0.01
WAKE_BYTES = 256 << 10
_IOV_MAX = 1024

Key = tuple[str, str]


class LogFailed(OSError):
    """The log could not be written or synced; the message names the directory and the error."""


# ----- recovery ------------------------------------------------------------------------------------

@dataclass(slots=True)
class Part:
    """One request found in the log."""

    lsn: int
    key: Key
    rows: int
    segment: int
    offset: int
    size: int


@dataclass
class PendingBatch:
    token: str
    parts: list[Part]  # in batch order
    missing: int = 0  # requests the batch named that damage took


@dataclass
class SegmentInfo:
    number: int
    ranges: list[Range] = field(default_factory=list)  # the lsns of the requests it holds
    done: list[Range] = field(default_factory=list)  # of those, the settled ones (merged, sorted)
    requests: int = 0
    settled: int = 0
    size: int = 0

    def add(self, first: int, n: int) -> None:
        """The segment holds these lsns (written again after a failed sync, they count once)."""
        self.requests += n - _covered(self.ranges, first, first + n)
        _merge(self.ranges, first, n)

    def settle(self, first: int, n: int) -> None:
        """Marks the segment's lsns among first … first + n - 1 settled; settling one twice counts once."""
        end = first + n
        if not self.ranges or end <= self.ranges[0][0] or first >= self.ranges[-1][0] + self.ranges[-1][1]:
            return
        for a, k in list(self.ranges):
            lo, hi = max(first, a), min(end, a + k)
            if lo < hi:
                self.settled += (hi - lo) - _covered(self.done, lo, hi)
                _merge(self.done, lo, hi - lo)


def _merge(ranges: list[Range], first: int, n: int) -> None:
    """Adds [first, first + n) to sorted, disjoint ranges, joining what touches."""
    lo, hi = first, first + n
    out: list[Range] = []
    for a, k in ranges:
        if a + k < lo or a > hi:
            out.append((a, k))
        else:
            lo, hi = min(lo, a), max(hi, a + k)
    out.append((lo, hi - lo))
    out.sort()
    ranges[:] = out


def _covered(ranges: list[Range], lo: int, hi: int) -> int:
    return sum(max(0, min(hi, a + k) - max(lo, a)) for a, k in ranges)


@dataclass
class Recovered:
    instance: str
    salt: int
    next_lsn: int
    segments: list[SegmentInfo]
    pending: list[PendingBatch]
    directory: Path = Path()
    settled: list[Range] = field(default_factory=list)  # merged: the lsns known settled
    unsettled_rows: int = 0  # rows still to flush, those of pending batches included
    unsettled_requests: int = 0  # requests still to flush that no pending batch holds
    tables: dict[Key, list[int]] = field(default_factory=dict)  # key → [requests, rows, bytes] still to flush
    oldest_lsn: int | None = None
    damage: Damage = field(default_factory=Damage)
    records: int = 0
    database: str = ""  # the ClickHouse database its rows are for ("": not recorded)
    numbers: list[int] = field(default_factory=list)  # the segments as found (the writer adds to ``segments``)

    def iter_unsettled(self) -> Iterator[tuple[Part, bytes]]:
        """The requests still to flush that no pending batch holds, in the log's order, with their
        payloads: read again from the segments, one at a time, so that nothing per request is kept in
        memory (a worker thread calls this; a segment deleted meanwhile held nothing still to flush)."""
        skip = {p.lsn for b in self.pending for p in b.parts}
        for part, data in _parts(self.directory, self.numbers, self.salt, self.next_lsn):
            if part.lsn not in skip and not _within(self.settled, part.lsn):
                yield part, bytes(data)

    @property
    def unsettled(self) -> list[Part]:
        """iter_unsettled as a list (for inspection and tests: it holds every such request)."""
        return [part for part, _ in self.iter_unsettled()]


def _within(ranges: list[Range], lsn: int) -> bool:
    i = bisect.bisect_right(ranges, (lsn, 1 << 62)) - 1
    return i >= 0 and ranges[i][0] <= lsn < ranges[i][0] + ranges[i][1]


OnRecord = Callable[[int, fmt.Scanned, SegmentInfo | None], None]


class _Seen:
    """The lsns met so far, as merged [lo, hi) ranges. In a log lsns only grow, but for a request
    written again after a failed fsync (a copy, after its first): the common case is one range
    growing at its end, O(1) per record; a record that reaches back is checked lsn by lsn."""

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []

    def fresh(self, first: int, n: int) -> bool:
        """True, and marks them, when none of first … first + n - 1 was met; False to check one by one."""
        r = self.ranges
        if r and first < r[-1][1]:
            return False
        if r and first == r[-1][1]:
            r[-1][1] = first + n
        else:
            r.append([first, first + n])
        return True

    def add(self, lsn: int) -> bool:
        """Marks one lsn; False when it was met already (a copy)."""
        r = self.ranges
        i = bisect.bisect_right(r, [lsn, 1 << 62]) - 1
        if i >= 0 and r[i][0] <= lsn < r[i][1]:
            return False
        if i >= 0 and r[i][1] == lsn:
            r[i][1] += 1
        else:
            i += 1
            r.insert(i, [lsn, lsn + 1])
        if i + 1 < len(r) and r[i][1] == r[i + 1][0]:
            r[i][1] = r[i + 1][1]
            del r[i + 1]
        return True


Records = Iterator[tuple[int, fmt.RowsRecord, memoryview, bool]]


def _records(directory: Path, numbers: list[int], salt: int, damage: Damage, on_record: OnRecord | None = None,
             infos: list[SegmentInfo] | None = None) -> Records:
    """The ROWS records of the segments, in file order: (segment, record, the segment's bytes, whether
    none of its lsns was met before). ``on_record`` sees every record; damage is counted in ``damage``."""
    seen = _Seen()
    for i, number in enumerate(numbers):
        try:
            view = memoryview((directory / fmt.segment_name(number)).read_bytes())
        except FileNotFoundError:
            continue
        local = Damage()
        for record in fmt.scan(view, local, salt):
            if on_record is not None:
                on_record(number, record, infos[i] if infos else None)
            if record.kind is not Kind.ROWS:
                continue
            try:
                rows = fmt.decode_rows(record.body, record.offset + fmt.HEADER.size)
            except (ValueError, IndexError, UnicodeDecodeError, struct.error):
                continue  # on_record counts it
            yield number, rows, view, seen.fresh(rows.first_lsn, len(rows.parts)) or _mark(seen, rows)
        if i == len(numbers) - 1 or not local.torn_bytes:
            damage.torn_bytes += local.torn_bytes
        else:  # a finished segment was synced whole: this is damage
            local.corrupt_bytes += local.torn_bytes
            local.corrupt_records += 1
        damage.corrupt_bytes += local.corrupt_bytes
        damage.corrupt_records += local.corrupt_records


def _mark(seen: _Seen, rows: fmt.RowsRecord) -> bool:
    """A record that reaches back: notes which of its parts are copies; always False."""
    rows.copies = [not seen.add(rows.first_lsn + k) for k in range(len(rows.parts))]
    return False


def _copy(rows: fmt.RowsRecord, k: int) -> bool:
    return rows.copies is not None and rows.copies[k]


def _parts(directory: Path, numbers: list[int], salt: int, end: int) -> Iterator[tuple[Part, memoryview]]:
    """Every request in the segments below lsn ``end``, each once, in file order, with a view of its payload."""
    for number, rows, view, fresh in _records(directory, numbers, salt, Damage()):
        key = (rows.table, rows.fmt)
        for k, (n, offset, size) in enumerate(rows.parts):
            lsn = rows.first_lsn + k
            if lsn < end and (fresh or not _copy(rows, k)):
                yield Part(lsn, key, n, number, offset, size), view[offset:offset + size]


def recover(directory: Path, *, repair: bool = True) -> Recovered:
    """Reads the log; with ``repair``, cuts the last segment's torn tail (a crash mid-write).

    Two passes over the segments. The first reads the control records (batches, what settled) and
    which lsns each segment holds; the second finds the requests of the batches in flight and counts
    what is still to flush. Neither keeps anything per request but for the batches in flight, so a
    log of millions of small requests starts in bounded memory; replay reads the rest once more."""
    meta = fmt.open_meta(directory, create=repair)
    salt = int(meta["salt"])  # type: ignore[call-overload]
    numbers = fmt.segment_numbers(directory)
    damage = Damage()
    batches: list[tuple[str, list[Range]]] = []
    done: list[Range] = []
    segments = [SegmentInfo(n) for n in numbers]
    good_end: dict[int, int] = {}
    records = 0
    max_lsn = 0

    def first_pass(number: int, record: fmt.Scanned, seg: SegmentInfo | None) -> None:
        nonlocal records, max_lsn
        records += 1
        good_end[number] = record.offset + fmt.HEADER.size + len(record.body)
        try:
            if record.kind is Kind.ROWS:
                rows = fmt.decode_rows(record.body, 0)
                assert seg is not None
                seg.add(rows.first_lsn, len(rows.parts))
                max_lsn = max(max_lsn, rows.last_lsn)
            elif record.kind is Kind.BATCH:
                batches.append(fmt.decode_batch(record.body))
            else:
                done.extend(fmt.decode_done(record.body))
        except (ValueError, IndexError, UnicodeDecodeError, struct.error):
            # A checksum that holds over a body this build cannot read: a bug or a foreign
            # writer. Skip the record, count it, never crash on it.
            damage.corrupt_records += 1
            damage.corrupt_bytes += fmt.HEADER.size + len(record.body)

    for _ in _records(directory, numbers, salt, damage, first_pass, segments):
        pass
    for seg in segments:
        with contextlib.suppress(FileNotFoundError):
            seg.size = (directory / fmt.segment_name(seg.number)).stat().st_size
    if segments and damage.torn_bytes and repair:
        last = segments[-1]
        end = good_end.get(last.number, 0)
        with open(directory / fmt.segment_name(last.number), "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())
        last.size = end
    for first, n in done + [r for _, rs in batches for r in rs]:
        max_lsn = max(max_lsn, first + n - 1)
    settled: list[Range] = []
    for first, n in sorted(done):
        if settled and first <= settled[-1][0] + settled[-1][1]:
            lo, k = settled[-1]
            settled[-1] = (lo, max(k, first + n - lo))
        else:
            settled.append((first, n))
    for first, n in settled:
        for seg in segments:
            seg.settle(first, n)
    recovered = Recovered(str(meta["instance"]), salt, max_lsn + 1, segments, [], directory, settled,
                          damage=damage, records=records, database=str(meta.get("database", "")),
                          numbers=list(numbers))
    # Second pass: the requests of the batches in flight, and what is still to flush; record by record
    # where a record is all new and all settled, or all unsettled and named by no batch.
    # A batch logged twice (asked again after a failed fsync) is one batch.
    batches = list({token: ranges for token, ranges in batches}.items())
    wanted = {lsn for _, ranges in batches for first, n in ranges for lsn in range(first, first + n)}
    ordered = sorted(wanted)
    found: dict[int, Part] = {}
    for number, rows, _, fresh in _records(directory, numbers, salt, Damage()):
        first, n = rows.first_lsn, len(rows.parts)
        if fresh:
            i = bisect.bisect_right(settled, (first, 1 << 62)) - 1  # the settled range first may be in
            if i >= 0 and settled[i][0] + settled[i][1] >= first + n:
                continue  # all settled
            j = bisect.bisect_left(ordered, first)
            later = bisect.bisect_left(settled, (first + n, 0))  # settled ranges starting after the record
            overlap = (i >= 0 and settled[i][0] + settled[i][1] > first) or later > i + 1
            if not overlap and not (j < len(ordered) and ordered[j] < first + n):
                _count(recovered, (rows.table, rows.fmt), n, sum(p[0] for p in rows.parts),
                       sum(p[2] for p in rows.parts), first)
                continue
        for k, (rows_n, offset, size) in enumerate(rows.parts):
            lsn = first + k
            if not fresh and _copy(rows, k):
                continue
            if lsn in wanted:
                found[lsn] = Part(lsn, (rows.table, rows.fmt), rows_n, number, offset, size)
            if not _within(settled, lsn):
                _count(recovered, (rows.table, rows.fmt), 1, rows_n, size, lsn)
    for token, ranges in batches:
        lsns = [lsn for first, n in ranges for lsn in range(first, first + n)]
        parts = [found[lsn] for lsn in lsns if lsn in found]
        # A batch settles in one DONE record: if any request of it is settled, all are, and those
        # missing were in segments deleted for being settled. Only damage leaves some missing otherwise.
        if not parts or any(_within(settled, p.lsn) for p in parts):
            continue
        recovered.pending.append(PendingBatch(token, parts, missing=len(lsns) - len(parts)))
    held = sum(len(b.parts) for b in recovered.pending)
    recovered.unsettled_requests = sum(t[0] for t in recovered.tables.values()) - held
    return recovered


def _count(recovered: Recovered, key: Key, requests: int, rows: int, size: int, lsn: int) -> None:
    """Counts requests still to flush (``lsn``: the smallest of them)."""
    recovered.unsettled_rows += rows
    t = recovered.tables.setdefault(key, [0, 0, 0])
    t[0] += requests
    t[1] += rows
    t[2] += size
    if recovered.oldest_lsn is None or lsn < recovered.oldest_lsn:
        recovered.oldest_lsn = lsn


@dataclass
class ReadBack:
    """What ``read_rows`` found: the requests of ROWS records, in file order, and where to go on."""

    parts: list[tuple[int, Key, int, bytes]]  # (lsn, key, rows, payload)
    segment: int
    offset: int
    damage: Damage


def read_rows(directory: Path, salt: int, segment: int, offset: int, synced: tuple[int, int],
              limit: int) -> ReadBack:
    """Reads the requests written from ``offset`` of ``segment`` on, about ``limit`` bytes of them, no
    further than what the writer has synced (``synced``: its segment and offset); a worker thread
    calls this. The next read starts at the returned position; a segment that is gone (every
    request in it settled) or read to its end moves it to the next segment."""
    damage = Damage()
    try:
        fd = os.open(directory / fmt.segment_name(segment), os.O_RDONLY)
    except FileNotFoundError:
        return ReadBack([], segment + 1, 0, damage)
    try:
        end = synced[1] if segment == synced[0] else os.fstat(fd).st_size
        want = min(end - offset, limit)
        data = os.pread(fd, want, offset) if want > 0 else b""
        if len(data) >= fmt.HEADER.size:
            _, length, _, _ = fmt.HEADER.unpack_from(data, 0)
            whole = fmt.HEADER.size + length
            if whole > len(data) and offset + whole <= end:  # one record larger than the limit: all of it
                data = os.pread(fd, whole, offset)
    finally:
        os.close(fd)
    view = memoryview(data)
    parts: list[tuple[int, Key, int, bytes]] = []
    stop = 0
    for record in fmt.scan(view, damage, salt):
        stop = record.offset + fmt.HEADER.size + len(record.body)
        if record.kind is not Kind.ROWS:
            continue
        try:
            rows = fmt.decode_rows(record.body, record.offset + fmt.HEADER.size)
        except (ValueError, IndexError, UnicodeDecodeError, struct.error):
            damage.corrupt_records += 1
            damage.corrupt_bytes += fmt.HEADER.size + len(record.body)
            continue
        key = (rows.table, rows.fmt)
        for i, (n, at, size) in enumerate(rows.parts):
            parts.append((rows.first_lsn + i, key, n, data[at:at + size]))
    damage.torn_bytes = 0  # the limit cuts records short: that is where the next read starts
    finished = segment < synced[0]
    if offset + stop >= end and finished:
        return ReadBack(parts, segment + 1, 0, damage)
    if stop == 0 and data:
        # Nothing whole where the reader stands, in bytes already synced: damage. Go on from the next
        # record that holds, or past what was read (the next segment, once this one is finished).
        resume = fmt.next_record(view, 1, salt)
        damage.corrupt_records += 1
        if resume is not None:
            damage.corrupt_bytes += resume
            return ReadBack(parts, segment, offset + resume, damage)
        damage.corrupt_bytes += len(data)
        if offset + len(data) >= end:
            return ReadBack(parts, segment + 1, 0, damage) if finished else ReadBack(parts, segment, end, damage)
        return ReadBack(parts, segment, offset + len(data), damage)
    return ReadBack(parts, segment, offset + stop, damage)


def read_part(directory: Path, part: Part) -> bytes:
    """A request's payload, read back from its segment (a worker thread calls this)."""
    return read_parts(directory, [part])[0]


def read_parts(directory: Path, parts: list[Part]) -> list[bytes]:
    """The payloads of several requests, one open per segment."""
    out: list[bytes] = []
    fds: dict[int, int] = {}
    try:
        for part in parts:
            fd = fds.get(part.segment)
            if fd is None:
                fd = fds[part.segment] = os.open(directory / fmt.segment_name(part.segment), os.O_RDONLY)
            data = os.pread(fd, part.size, part.offset)
            if len(data) != part.size:
                raise OSError(f"{fmt.segment_name(part.segment)} ends before the request at {part.offset}")
            out.append(data)
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


# ----- the writer ----------------------------------------------------------------------------------

# What the event loop queues for the writer: (kind, key, lsn, rows, payload, waiter).
# ROWS: key, lsn, rows, payload; BATCH: key = token, payload = ranges; DONE: payload = ranges;
# SYNC (kind 0): only a waiter. A waiter is a future resolved after the fsync that covers the item.
Item = tuple[int, Any, int, int, Any, "asyncio.Future[None] | None"]
_SYNC = 0
# Plain ints for the per-request comparisons (an IntEnum's are several times slower).
_ROWS, _BATCH, _DONE = int(Kind.ROWS), int(Kind.BATCH), int(Kind.DONE)


@dataclass
class WalStats:
    bytes_written: int = 0
    fsyncs: int = 0
    # Drained by telemetry on the event loop (deques: appended in one thread, popped in another).
    fsync_seconds: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=100_000))
    groups: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=100_000))
    segments_deleted: int = 0


class Writer:
    """The log's one writing thread, and the segment bookkeeping it alone touches."""

    def __init__(self, directory: Path, recovered: Recovered, *, segment_bytes: int, sync_interval: float,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.sync_interval = sync_interval
        self.loop = loop
        self.stats = WalStats()
        self.salt = recovered.salt
        self.error: LogFailed | None = None
        self.disk_bytes = sum(s.size for s in recovered.segments)
        self._segments = recovered.segments
        self._queue: collections.deque[Item] = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        self._unsynced_since: float | None = None
        # Set while the writer may sleep: it sets it before it looks at the queue one last time, and a
        # put reads it after its append, so a put either sees it set or is seen in the queue.
        self._idle = True
        self._wake_delay = min(WAKE_DELAY, sync_interval / 4)
        self._timer: asyncio.TimerHandle | None = None  # a pending wake for BUFFERED rows (the loop's)
        self._unwoken = 0  # bytes of BUFFERED rows queued since the writer was last woken (the loop's)
        self._fd = -1
        self._size = 0
        # Read by the loop (a tuple is replaced whole): where the last write ended, and how far the
        # log is fsynced — what the spill reader may read back.
        self.position: tuple[int, int] = (0, 0)
        self.synced: tuple[int, int] = (0, 0)
        self.taken_bytes = 0  # payload bytes taken off the queue (written by this thread only)
        self._open_segment((recovered.segments[-1].number + 1) if recovered.segments else 1)
        self._thread = threading.Thread(target=self._run, name="wal-writer", daemon=True)

    # ----- the loop's side (cheap: an append and, when the writer sleeps, a wake-up) ---------

    def put(self, item: Item) -> None:
        self._queue.append(item)
        if not self._idle:  # waking a busy writer would only cost a lock: it looks at the queue anyway
            return
        if (item[0] == _ROWS and item[5] is None and self._wake_delay > 0
                and self._unwoken + len(item[4]) < WAKE_BYTES):
            self._unwoken += len(item[4])
            if self._timer is None:
                self._timer = self.loop.call_later(self._wake_delay, self._kick)
            return
        self._kick()

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._unwoken = 0
        self._wake.set()

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Writes and syncs what is queued, then stops the thread."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():  # a disk that hangs: leave its file to the thread, say so
            log.error("the write-ahead log's writer did not finish within %.0fs; what it had queued may not be on "
                      "disk", timeout, extra={"wal_dir": str(self.directory)})
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ----- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._idle = True
            if self.error is not None and not self._stop:
                # A failed disk: try again a moment later (what failed is queued again), or, with
                # nothing to write, probe it, so the log comes back by itself once there is room.
                self._wake.wait(FAULT_RETRY)
                if not self._queue:
                    self._queue.append((_DONE, None, 0, 0, [], None))  # an empty DONE: harmless on disk
            elif not self._queue:
                if self._stop:
                    self._sync([])
                    return
                timeout = None
                if self._unsynced_since is not None:
                    timeout = max(0.0, self._unsynced_since + self.sync_interval - time.monotonic())
                self._wake.wait(timeout)
            self._idle = False
            self._wake.clear()  # before taking: a put after this wakes the next wait at once
            group = self._take()
            waiters = [item[5] for item in group if item[5] is not None]
            try:
                self._write(group)
                if waiters or self.error is not None or (self._unsynced_since is not None and
                                                         time.monotonic() - self._unsynced_since >= self.sync_interval):
                    self._sync(waiters)
                if self._size >= self.segment_bytes:
                    self._rotate()
            except Exception as exc:  # never a silent death: DURABLE writers would wait forever
                self._failed(exc, group)
                if self._stop and not isinstance(exc, OSError):
                    return

    def _take(self) -> list[Item]:
        group: list[Item] = []
        size = 0
        while self._queue and size < GROUP_BYTES:
            item = self._queue.popleft()
            group.append(item)
            if item[0] == _ROWS:
                size += len(item[4])
        self.taken_bytes += size
        return group

    def _write(self, group: list[Item]) -> None:
        buffers: list[bytes] = []
        written: list[Range] = []
        settles: list[Range] = []
        i = 0
        while i < len(group):
            kind = group[i][0]
            if kind == _ROWS:
                j, parts = self._pack(group, i)
                key, first = group[i][1], group[i][2]
                buffers += fmt.rows_record(first, key[1], key[0], parts, self.salt)
                written.append((first, len(parts)))
                i = j
                continue
            item = group[i]
            if kind == _BATCH:
                buffers += fmt.batch_record(item[1], item[4], self.salt)
            elif kind == _DONE:
                buffers += fmt.done_record(item[4], self.salt)
                settles += item[4]
            i += 1
        if buffers:
            self._writev(buffers)
            if self._unsynced_since is None:
                self._unsynced_since = time.monotonic()
        for first, n in written:  # counted once on disk: a failed write leaves no request behind
            self._segments[-1].add(first, n)
        self.stats.groups.append(len(group))
        if settles:
            self._settle(settles)

    def _pack(self, group: list[Item], i: int) -> tuple[int, list[tuple[int, bytes]]]:
        """Consecutive requests of one key with consecutive lsns, as the parts of one ROWS record."""
        key, lsn = group[i][1], group[i][2]
        parts = [(group[i][3], group[i][4])]
        size = len(group[i][4])
        j = i + 1
        n = len(group)
        while j < n and len(parts) < 65535:
            kind, k, next_lsn, rows, payload, _ = group[j]
            if kind != _ROWS or k != key or next_lsn != lsn + 1 or size + len(payload) > RECORD_BYTES:
                break
            lsn = next_lsn
            parts.append((rows, payload))
            size += len(payload)
            j += 1
        return j, parts

    def _writev(self, buffers: list[bytes]) -> None:
        total = sum(len(b) for b in buffers)
        start = self._size
        try:
            for k in range(0, len(buffers), _IOV_MAX):
                chunk = buffers[k:k + _IOV_MAX]
                want = sum(len(b) for b in chunk)
                done = os.writev(self._fd, chunk)
                while done < want:  # a short write: finish it
                    rest = b"".join(chunk)[done:]
                    done += os.write(self._fd, rest)
        except OSError:
            # Leave no half record behind: the next write starts where the last whole one ended.
            os.ftruncate(self._fd, start)
            os.lseek(self._fd, start, os.SEEK_SET)
            raise
        self._size += total
        self.position = (self._segments[-1].number, self._size)
        self.disk_bytes += total
        self.stats.bytes_written += total

    def _sync(self, waiters: list[asyncio.Future[None]]) -> None:
        if self._unsynced_since is not None:
            t0 = time.perf_counter()
            os.fdatasync(self._fd)
            self.stats.fsync_seconds.append(time.perf_counter() - t0)
            self.stats.fsyncs += 1
            self._unsynced_since = None
        self.synced = self.position
        self.error = None
        if waiters:
            self.loop.call_soon_threadsafe(_resolve, waiters, None)

    def _failed(self, exc: Exception, group: list[Item]) -> None:
        """A write or sync failed: its DURABLE writers and batches hear it at once (the service takes
        those requests back, the flusher asks again); the rest of the group — BUFFERED requests
        already acknowledged, DONE records — is queued again, in order, and written once the disk
        takes it (which also ends the fault)."""
        errno = exc.errno if isinstance(exc, OSError) and exc.errno else 0
        error = LogFailed(errno, f"the write-ahead log in {self.directory} cannot be written: "
                                 f"{os.strerror(errno) if errno else repr(exc)}")
        if self.error is None:
            log.error("%s; writes are refused until it can (retried every %gs)", error.strerror, FAULT_RETRY,
                      extra={"wal_dir": str(self.directory)}, exc_info=None if errno else exc)
        self.error = error
        waiters = [item[5] for item in group if item[5] is not None]
        # What settled may go from disk even though its DONE record could not be written: a settled
        # segment is safe to delete at any time, and on a full disk that is what frees room.
        self._settle([r for item in group if item[0] == _DONE for r in item[4]])
        again = [item for item in group if item[5] is None and item[0] != _SYNC]
        self.taken_bytes -= sum(len(item[4]) for item in again if item[0] == _ROWS)
        self._queue.extendleft(reversed(again))
        if waiters:
            self.loop.call_soon_threadsafe(_resolve, waiters, error)

    def _open_segment(self, number: int) -> None:
        path = self.directory / fmt.segment_name(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            fmt.fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd = fd
        self._size = 0
        self._segments.append(SegmentInfo(number))
        self.position = self.synced = (number, 0)  # the segment before was synced whole (_rotate)

    def _rotate(self) -> None:
        self._sync([])
        old = self._fd
        self._open_segment(self._segments[-1].number + 1)  # should this fail, the old one stays in use
        os.close(old)
        self._delete_settled()

    def _settle(self, ranges: list[Range]) -> None:
        # A handful of segments and of ranges per DONE: a plain scan is cheaper than an index.
        for first, n in ranges:
            for seg in self._segments:
                seg.settle(first, n)
        self._delete_settled()

    def _delete_settled(self) -> None:
        deleted = False
        while len(self._segments) > 1 and self._segments[0].settled >= self._segments[0].requests:
            seg = self._segments.pop(0)
            path = self.directory / fmt.segment_name(seg.number)
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                size = 0  # already gone: a crash between the unlink and the next start
            self.disk_bytes -= size
            self.stats.segments_deleted += 1
            deleted = True
        if deleted:
            fmt.fsync_dir(self.directory)


def _resolve(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for fut in waiters:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
            fut.exception()  # a writer that stopped waiting must not leave "never retrieved" behind


# ----- the loop's face ---------------------------------------------------------------------------

class WriteAheadLog:
    """What the rest of the buffer calls, on the event loop: append, log a batch, settle."""

    def __init__(self, directory: str | Path, *, segment_bytes: int = 16 << 20, sync_interval: float = 0.1,
                 max_bytes: int = 1 << 30, database: str = "") -> None:
        self.directory = Path(directory)
        self.database = database  # the rows' ClickHouse database: a log holding rows for another refuses
        self.segment_bytes = segment_bytes
        self.sync_interval = sync_interval
        self.max_bytes = max_bytes
        self.lock = fmt.DirectoryLock(self.directory)
        self.recovered: Recovered | None = None
        self.instance = ""
        self.run = uuid.uuid4().hex[:8]
        self._writer: Writer | None = None
        self._next_lsn = 1
        self.queued_bytes = 0  # payload bytes handed to the writer (the loop's count; see backlog)

    def open(self) -> Recovered:
        """Locks the directory and reads what is in it; raises LogError for what must stop the start."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            recovered = recover(self.directory)
            self._check_database(recovered)
        except BaseException:
            self.lock.release()
            raise
        self.recovered = recovered
        self.instance = recovered.instance
        self._next_lsn = recovered.next_lsn
        return recovered

    def _check_database(self, recovered: Recovered) -> None:
        """The log's rows name tables, not databases: rows kept for one database must not be replayed into
        another. With nothing unsettled the log is simply for the new one."""
        if not self.database or recovered.database == self.database:
            return
        rows = recovered.unsettled_rows
        if rows and recovered.database:
            raise fmt.LogError(f"the write-ahead log in {self.directory} holds {rows} rows for database "
                               f"{recovered.database!r}, and this buffer writes to {self.database!r}: start it with "
                               f"--database {recovered.database} until they are flushed, or give it another --wal-dir")
        meta = fmt.open_meta(self.directory, create=False)
        meta["database"] = self.database
        fmt.write_meta(self.directory, meta)
        recovered.database = self.database

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.recovered is not None, "open() first"
        self._writer = Writer(self.directory, self.recovered, segment_bytes=self.segment_bytes,
                              sync_interval=self.sync_interval, loop=loop)
        self._writer.start()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.lock.release()

    @property
    def writer(self) -> Writer:
        assert self._writer is not None
        return self._writer

    @property
    def started(self) -> bool:
        return self._writer is not None

    @property
    def error(self) -> LogFailed | None:
        return self._writer.error if self._writer is not None else None

    @property
    def disk_bytes(self) -> int:
        return self._writer.disk_bytes if self._writer is not None else 0

    @property
    def segments(self) -> int:
        return len(self._writer._segments) if self._writer is not None else 0

    def token(self, first_lsn: int, last_lsn: int) -> str:
        """A new batch's deduplication token: this log's instance, this run, its requests."""
        return f"{self.instance}-{self.run}-{first_lsn}-{last_lsn}"

    @property
    def next_lsn(self) -> int:
        return self._next_lsn

    def reserve(self) -> int:
        """The next request's lsn (one that goes unused, a request the buffer then refused, is harmless)."""
        lsn = self._next_lsn
        self._next_lsn = lsn + 1
        return lsn

    def put_rows(self, key: Key, lsn: int, rows: int, payload: bytes, durable: bool) -> asyncio.Future[None] | None:
        """Queues one request; when ``durable``, returns a future set once it is fsynced."""
        fut = asyncio.get_running_loop().create_future() if durable else None
        self.queued_bytes += len(payload)
        self.writer.put((_ROWS, key, lsn, rows, payload, fut))
        return fut

    @property
    def backlog(self) -> int:
        """Payload bytes queued for the writer and not yet taken: memory the disk has yet to free."""
        return self.queued_bytes - self.writer.taken_bytes if self._writer is not None else 0

    def append(self, key: Key, payload: bytes, rows: int, durable: bool) -> tuple[int, asyncio.Future[None] | None]:
        """Queues one request; returns its lsn and, when ``durable``, a future set once it is fsynced."""
        lsn = self.reserve()
        return lsn, self.put_rows(key, lsn, rows, payload, durable)

    def log_batch(self, token: str, lsns: list[int]) -> asyncio.Future[None]:
        """Records a batch's token and requests; the future is set once that is fsynced."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writer.put((_BATCH, token, 0, 0, fmt.to_ranges(lsns), fut))
        return fut

    def settle(self, lsns: list[int], durable: bool = False) -> asyncio.Future[None] | None:
        if not lsns:
            return None
        fut = asyncio.get_running_loop().create_future() if durable else None
        self.writer.put((_DONE, None, 0, 0, fmt.to_ranges(lsns), fut))
        return fut

    def sync(self) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writer.put((_SYNC, None, 0, 0, None, fut))
        return fut


# ----- inspection ----------------------------------------------------------------------------------

def describe(directory: Path) -> dict[str, Any]:
    """What a log holds, read-only (``ingest-buffer wal inspect``)."""
    recovered = recover(directory, repair=False)
    tables = {f"{table} ({format_})": {"requests": n, "rows": rows, "bytes": size}
              for (table, format_), (n, rows, size) in recovered.tables.items()}
    return {
        "directory": str(directory), "instance": recovered.instance, "database": recovered.database or None,
        "format": fmt.FORMAT_VERSION,
        "segments": [{"name": fmt.segment_name(s.number), "bytes": s.size, "requests": s.requests,
                      "settled": s.settled} for s in recovered.segments],
        "records": recovered.records, "bytes": sum(s.size for s in recovered.segments),
        "unsettled": {"rows": recovered.unsettled_rows, "tables": tables, "oldest_lsn": recovered.oldest_lsn,
                      "batches_in_flight": [{"token": b.token, "requests": len(b.parts), "missing": b.missing}
                                            for b in recovered.pending]},
        "damage": {"torn_bytes": recovered.damage.torn_bytes, "corrupt_bytes": recovered.damage.corrupt_bytes,
                   "corrupt_records": recovered.damage.corrupt_records},
        "next_lsn": recovered.next_lsn,
    }


Clock = Callable[[], float]
