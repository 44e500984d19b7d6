"""Replay: what the write-ahead log holds and ClickHouse may not have comes back into the buffer.

Two kinds of rows come back. At start, those the previous process left (below). While running,
those accepted onto disk only (``Spill``): with the log on, a request that finds the buffer's
memory full is written to the log and not kept in memory, and every request after it follows it
there until the reader has caught up, so rows keep their order. The reader goes through the log
from where the first of them was written, reading only what is fsynced, in chunks, and puts each
back as room frees; nothing is kept in memory per request on disk but for COMMITTED writers and
DURABLE ones still waiting for their fsync. Memory then stays within ``--buffer-max-bytes`` while
the disk holds up to ``--wal-max-bytes``.

A routine between the flusher and the gRPC listener. At start it puts back, first, every batch that
was being inserted when the previous process stopped — each as one batch, with exactly its requests
and its recorded deduplication token, so an insert that committed just before a crash is dropped by
ClickHouse rather than doubled — then the other unsettled requests, as many as the buffer has room
for (up to START_BYTES), and the listener opens. The rest follow in the background as flushes make
room, in the order they were accepted (runs of small requests of a line format joined into one
entry, as the service joins them); new requests queue behind them on disk until they are all back,
so the old rows go first. They wait their turn whatever ``--when-full`` says, and keep coming while
the buffer drains (they were acknowledged long ago): the replay's stop waits for them, up to the
drain deadline, and what is still on disk then stays in the log for the next start. ``done`` is set
once the last run's rows are all back in the buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from buffer.api import FORMATS
from buffer.ledger import Ledger, Outcome, Reason
from buffer.ring import Entry, EntryFailed, Ring, State
from buffer.routines import Routine
from buffer.shape import format_of
from buffer.wal import FAULT_RETRY, LogFailed, Part, Recovered, WriteAheadLog, read_parts, read_rows

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024  # read back at most this much at a time
START_BYTES = 16 * 1024 * 1024  # put back at most this much before the listener opens (the rest follows)
# Formats whose requests may be joined into one entry (their rows can still be split apart).
LINE_FORMATS = frozenset(name for name, lines in FORMATS.values() if lines)
_IN_LOG = Outcome(Reason.KEPT_IN_LOG)
_UNREADABLE = Outcome(Reason.UNREADABLE_IN_LOG)


class Spill:
    """The requests accepted onto disk only, and where the reader is: the service's and the reader's
    shared books, on the event loop."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.requests = 0  # on disk only now (the service spills while this is not 0)
        self.rows = 0
        self.bytes = 0
        self.spilled_rows = 0  # ever (a metric)
        self.first_lsn = 0  # the first request of this run of spilled requests
        self.last_read = 0  # the newest one put back
        self.cursor: tuple[int, int] = (0, 0)  # (segment, offset) the reader goes on from
        # Requests someone still waits on (COMMITTED, DURABLE until the call ends): their entry,
        # without its payload until it is read back.
        self.entries: dict[int, Entry] = {}
        self.withdrawn: set[int] = set()  # refused after all (their fsync failed): never put back
        self.arrived = asyncio.Event()
        self._moved = asyncio.Event()  # set when a request leaves the disk-only books

    async def changed(self) -> None:
        """Returns once a spilled request is back in memory, or withdrawn, or kept for the next start."""
        self._moved.clear()
        await self._moved.wait()

    @property
    def active(self) -> bool:
        return self.requests > 0

    def add(self, lsn: int, rows: int, size: int, position: tuple[int, int], entry: Entry | None) -> None:
        """A request went to disk only; ``position`` is where the writer stood before it was queued."""
        if not self.requests:
            self.first_lsn = lsn
            self.last_read = lsn - 1  # (so that a first request lost to damage shows as a gap)
            self.cursor = position
            self.withdrawn.clear()
        self.requests += 1
        self.rows += rows
        self.bytes += size
        self.spilled_rows += rows
        ledger = self.ring.ledger
        ledger.accepted_rows += rows
        ledger.accepted_bytes += size
        ledger.accepted_requests += 1
        if entry is not None:
            self.entries[lsn] = entry
        self.arrived.set()

    def forget(self, entry: Entry) -> None:
        """Its writer has its answer: nothing is kept for it until it is read back."""
        if self.entries.get(entry.lsn) is entry and entry.waiter is None:
            del self.entries[entry.lsn]

    def withdraw(self, entry: Entry) -> bool:
        """Takes back a request whose fsync failed, wherever it is now; False once it is on its way."""
        if entry.seq:
            return self.ring.withdraw(entry)
        if self.entries.pop(entry.lsn, None) is not entry:
            return False
        self.withdrawn.add(entry.lsn)
        self._gone(entry.rows, entry.size)
        ledger = self.ring.ledger
        ledger.accepted_rows -= entry.rows
        ledger.accepted_bytes -= entry.size
        ledger.accepted_requests -= 1
        entry.state = State.FAILED
        return True

    def _gone(self, rows: int, size: int, requests: int = 1) -> None:
        self.requests = max(0, self.requests - requests)
        self.rows -= rows
        self.bytes -= size
        self._moved.set()

    def entry(self, lsn: int, key: tuple[str, str], rows: int, payload: bytes) -> tuple[Entry | None, bool]:
        """The entry of a request read back, or None when it is not one of this run's spilled ones
        (before it, read back already, or withdrawn); and whether someone still holds that entry
        (a COMMITTED or DURABLE writer: it must stay an entry of its own)."""
        if lsn < self.first_lsn or lsn <= self.last_read:
            return None, False
        if lsn in self.withdrawn:  # counted out when it was withdrawn: only the reader moves on
            self.withdrawn.discard(lsn)
            self.last_read = lsn
            return None, False
        entry = self.entries.pop(lsn, None)
        if entry is None:
            return Entry(key, payload, rows, lsn=lsn), False
        entry.payload = payload
        entry.size = len(payload)
        return entry, True

    def back(self, entry: Entry) -> None:
        self.last_read = entry.lsn
        self._gone(entry.rows, entry.size)
        if not self.requests and self.rows:  # requests damage took (Replay._gap): their rows are lost
            self.ring.ledger.fail(_UNREADABLE, self.rows)
            self.rows = self.bytes = 0

    def keep(self) -> int:
        """At the stop: what is still on disk only stays in the log. Returns its rows."""
        rows = self.rows
        self.ring.ledger.fail(_IN_LOG, rows)
        for entry in self.entries.values():
            if entry.waiter is not None and not entry.waiter.done():
                entry.outcome = _IN_LOG
                entry.waiter.set_exception(EntryFailed(f"{entry.rows} rows {_IN_LOG.describe()}"))
                entry.waiter.exception()
        self.entries.clear()
        self._gone(self.rows, self.bytes, self.requests)
        return rows


class Replay(Routine):
    name = "replay"

    def __init__(self, wal: WriteAheadLog, recovered: Recovered, ring: Ring, spill: Spill | None = None) -> None:
        self.wal = wal
        self.recovered = recovered
        self.ring = ring
        self.spill = spill if spill is not None else Spill(ring)
        self.unreadable_requests = 0
        self._in_hand: Entry | None = None  # read back from the spill, waiting for room
        self.ledger: Ledger = ring.ledger
        self.replayed_rows = 0
        # The requests still to flush that no pending batch holds, read from the log as they are
        # needed (in a worker thread); what is left of them, counted.
        self._stream: Iterator[tuple[Part, bytes]] = recovered.iter_unsettled()
        self._pushed_back: list[tuple[Part, bytes]] = []  # read, not yet put back
        self._left_requests = recovered.unsettled_requests
        self._left_rows = recovered.unsettled_rows - sum(p.rows for b in recovered.pending for p in b.parts)
        self._stopped = asyncio.Event()
        self.done = asyncio.Event()
        self._lifecycle_remaining: Callable[[], float] = lambda: 0.0

    def until(self, remaining: Callable[[], float]) -> None:
        """How long the stop may keep putting rows back: the drain's time remaining."""
        self._lifecycle_remaining = remaining

    def stop_budget(self) -> float | None:
        return self._lifecycle_remaining() + 1.0

    async def start(self) -> None:
        for batch in self.recovered.pending:
            payloads = await asyncio.to_thread(read_parts, self.wal.directory, batch.parts)
            entries = [self._entry(p, data) for p, data in zip(batch.parts, payloads, strict=True)]
            for entry in entries:
                entry.replay_token = batch.token
            entries[0].replay_count = len(entries)
            self.ring.readmit(entries)
            self.replayed_rows += sum(e.rows for e in entries)
            if batch.missing:
                log.error("a batch in flight at the last stop (token %s) lost %d of its requests to damage in the "
                          "log; the rest are sent under that token", batch.token, batch.missing)
        had = self._left_requests
        await self._admit(wait=False)
        if had or self.recovered.pending:
            log.info("replaying %d rows from the write-ahead log (%d batches in flight at the last stop); %d more "
                     "follow as flushes make room", self.replayed_rows, len(self.recovered.pending),
                     self._left_rows, extra={"rows_replayed": self.replayed_rows})

    async def run(self) -> None:
        reading = asyncio.ensure_future(self._read())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait((reading, stopped), return_when=asyncio.FIRST_COMPLETED)
            if reading.done():
                reading.result()  # it never ends by itself: it raised
        finally:
            for task in (reading, stopped):
                task.cancel()
            await asyncio.gather(reading, stopped, return_exceptions=True)
            self._keep_the_rest()
            self.done.set()

    async def _read(self) -> None:
        await self._admit(wait=True)
        self.done.set()
        if self.recovered.unsettled_requests:
            log.info("replay done: %d rows back in the buffer", self.replayed_rows,
                     extra={"rows_replayed": self.replayed_rows})
        await self._read_spilled()

    async def stop(self) -> None:
        """Lets the rows still on disk come back while the flusher drains, up to the deadline."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_back(), self._lifecycle_remaining())
        self._stopped.set()

    def rows_on_disk(self) -> int:
        """Rows accepted that are in the log and not in memory: the last run's and the spilled."""
        return max(0, self._left_rows) + self.spill.rows

    async def all_back(self) -> None:
        """Returns once no accepted row is in the log only."""
        await self.done.wait()
        while self.spill.active:
            await self.spill.changed()

    async def caught_up(self) -> None:
        """Returns once every request accepted so far is back in memory (a Flush barrier waits for it)."""
        await self.done.wait()
        last = self.wal.next_lsn - 1  # every request accepted so far has this lsn or a smaller one
        spill = self.spill
        while spill.active and spill.first_lsn <= last and spill.last_read < last:
            await spill.changed()

    async def _read_spilled(self) -> None:
        """Puts spilled requests back as room frees, reading the log from the first of them on."""
        spill = self.spill
        wal = self.wal
        while True:
            if not spill.active:
                spill.arrived.clear()
                await spill.arrived.wait()
                continue
            segment, offset = spill.cursor
            synced = wal.writer.synced
            if (segment, offset) >= synced:
                try:
                    await wal.sync()  # what is written, synced: the spilled requests queued so far
                except LogFailed:
                    await asyncio.sleep(FAULT_RETRY)
                if spill.active and spill.cursor >= wal.writer.synced:
                    await asyncio.sleep(0.01)  # queued but not yet written: the writer is busy
                continue
            found = await asyncio.to_thread(read_rows, wal.directory, wal.writer.salt, segment, offset, synced,
                                            CHUNK_BYTES)
            self._damage(found.damage.corrupt_records)
            for lsn, key, rows, payload in found.parts:
                entry, tracked = spill.entry(lsn, key, rows, payload)
                if entry is None:
                    continue
                if lsn != spill.last_read + 1 and spill.last_read >= spill.first_lsn:
                    self._gap(spill.last_read + 1, lsn)
                joinable = not tracked and format_of(key[1]) in LINE_FORMATS
                self._in_hand = entry
                while not ((joinable and self.ring.join_from_log(key, payload, rows, lsn, counted=True))
                           or self.ring.admit_from_log(entry, counted=True)):
                    self.ring.released.clear()
                    await self.ring.released.wait()
                self._in_hand = None
                spill.back(entry)
                if not spill.active:
                    break  # every spilled request is back; what follows in the chunk is not one
            if spill.active:
                spill.cursor = (found.segment, found.offset)

    def _damage(self, records: int) -> None:
        if records:
            log.error("%d damaged records in the write-ahead log in %s while reading back rows accepted onto "
                      "disk; those rows cannot be read and are lost", records, self.wal.directory,
                      extra={"wal_corrupt_records": records})

    def _gap(self, first: int, found: int) -> None:
        """Spilled requests are written in order: a gap (withdrawn ones apart) is damage."""
        missing = [lsn for lsn in range(first, found) if lsn not in self.spill.withdrawn]
        self.spill.withdrawn.difference_update(range(first, found))
        if missing:
            self.unreadable_requests += len(missing)
            self.spill._gone(0, 0, len(missing))
            for lsn in missing:
                entry = self.spill.entries.pop(lsn, None)
                if entry is not None and entry.waiter is not None and not entry.waiter.done():
                    entry.outcome = _UNREADABLE
                    entry.waiter.set_exception(EntryFailed(f"{entry.rows} rows {_UNREADABLE.describe()}"))
                    entry.waiter.exception()
            log.error("requests %d to %d, accepted onto disk, could not be read back from %s: lost", missing[0],
                      missing[-1], self.wal.directory, extra={"wal_unreadable_requests": len(missing)})

    def _entry(self, part: Part, payload: bytes) -> Entry:
        return Entry(part.key, payload, part.rows, lsn=part.lsn)

    async def _admit(self, *, wait: bool) -> None:
        """Reads the requests left, in order, and puts them in the ring (a run of small ones of a line
        format joined into one entry, as the service does): without ``wait``, as many as the buffer
        holds at most (flushes may free room meanwhile: the listener must not wait for the whole
        log); with it, waiting for room as long as it takes."""
        budget = min(self.ring.max_bytes, START_BYTES)
        while self._left_requests > 0 and (wait or budget > 0):
            chunk = await asyncio.to_thread(self._chunk)
            if not chunk:  # the log holds fewer than it counted at start: a segment was removed under it
                log.error("%d requests (%d rows) counted in the write-ahead log in %s at start were not found "
                          "when read back: its segments were changed by someone else", self._left_requests,
                          self._left_rows, self.wal.directory)
                self.ledger.accepted_rows += self._left_rows
                self.ledger.fail(_UNREADABLE, self._left_rows)
                self._left_requests = self._left_rows = 0
                break
            for i, (part, data) in enumerate(chunk):
                if not wait and budget <= 0:
                    self._ahead_chunk(chunk[i:])
                    return
                budget -= len(data)
                ring = self.ring
                joinable = format_of(part.key[1]) in LINE_FORMATS
                entry: Entry | None = None
                while not (joinable and ring.join_from_log(part.key, data, part.rows, part.lsn)):
                    entry = entry or self._entry(part, data)
                    if entry.size > ring.max_bytes or entry.rows > ring.max_rows:
                        ring.readmit([entry])  # larger than the buffer now is (a smaller --buffer-max-*): alone
                    if entry.seq or ring.admit_from_log(entry):
                        break
                    if not wait:
                        self._ahead_chunk(chunk[i:])
                        return
                    ring.released.clear()
                    await ring.released.wait()  # a flush settled something: there may be room
                self._left_requests -= 1
                self._left_rows -= part.rows
                self.replayed_rows += part.rows

    def _ahead_chunk(self, rest: list[tuple[Part, bytes]]) -> None:
        self._pushed_back = rest + self._pushed_back

    def _chunk(self) -> list[tuple[Part, bytes]]:
        """The next requests, about CHUNK_BYTES of them (a worker thread reads them)."""
        out, self._pushed_back = self._pushed_back, []
        size = sum(len(d) for _, d in out)
        for part, data in self._stream:
            out.append((part, data))
            size += len(data)
            if size >= CHUNK_BYTES:
                break
        return out

    def _keep_the_rest(self) -> None:
        """Rows never put back stay in the log: in this run's books they were accepted and kept there."""
        rows, requests = max(0, self._left_rows), max(0, self._left_requests)
        self._left_rows = self._left_requests = 0
        self._pushed_back = []
        if rows:
            self.ledger.accepted_rows += rows
            self.ledger.accepted_requests += requests
            self.ledger.fail(_IN_LOG, rows)
        held = self._in_hand
        if held is not None and held.waiter is not None and held.seq == 0:
            self.spill.entries[held.lsn] = held  # its writer hears it stays in the log, with the rest
        self._in_hand = None
        rows += self.spill.keep()
        if rows:
            log.warning("%d rows from the write-ahead log were not put back before the stop; they stay in %s for "
                        "the next start", rows, self.wal.directory, extra={"rows_kept_in_log": rows})
