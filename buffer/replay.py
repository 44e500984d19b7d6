"""Replay: what the write-ahead log holds and ClickHouse may not have comes back into the buffer.

A routine between the flusher and the gRPC listener. At start it puts back, first, every batch that
was being inserted when the previous process stopped — each as one batch, with exactly its requests
and its recorded deduplication token, so an insert that committed just before a crash is dropped by
ClickHouse rather than doubled — then as many of the other unsettled requests as the buffer has room
for, and the listener opens. The rest follow in the background as flushes make room, in the order
they were accepted; they wait their turn whatever ``--when-full`` says, and keep coming while the
buffer drains (they were acknowledged long ago): the replay's stop waits for them, up to the drain
deadline, and what is still on disk then stays in the log for the next start. ``done`` is set
once everything is back in the buffer; a Flush barrier waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from buffer.ledger import Ledger, Outcome, Reason
from buffer.ring import Entry, Ring
from buffer.routines import Routine
from buffer.wal import Part, Recovered, WriteAheadLog, read_parts

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024  # read back at most this much at a time
_IN_LOG = Outcome(Reason.KEPT_IN_LOG)


class Replay(Routine):
    name = "replay"

    def __init__(self, wal: WriteAheadLog, recovered: Recovered, ring: Ring) -> None:
        self.wal = wal
        self.recovered = recovered
        self.ring = ring
        self.ledger: Ledger = ring.ledger
        self.replayed_rows = 0
        self._left: list[Part] = list(recovered.unsettled)
        self._at = 0
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
        await self._admit(wait=False)
        if self.recovered.unsettled or self.recovered.pending:
            log.info("replaying %d rows from the write-ahead log (%d batches in flight at the last stop); %d more "
                     "follow as flushes make room", self.replayed_rows, len(self.recovered.pending),
                     sum(p.rows for p in self._left[self._at:]), extra={"rows_replayed": self.replayed_rows})

    async def run(self) -> None:
        admitting = asyncio.ensure_future(self._admit(wait=True))
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait((admitting, stopped), return_when=asyncio.FIRST_COMPLETED)
            if admitting.done():
                admitting.result()
                self.done.set()
                if self.recovered.unsettled:
                    log.info("replay done: %d rows back in the buffer", self.replayed_rows,
                             extra={"rows_replayed": self.replayed_rows})
                await stopped
        finally:
            for task in (admitting, stopped):
                task.cancel()
            await asyncio.gather(admitting, stopped, return_exceptions=True)
            self._keep_the_rest()
            self.done.set()

    async def stop(self) -> None:
        """Lets the rows still on disk come back while the flusher drains, up to the deadline."""
        if not self.done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.done.wait(), self._lifecycle_remaining())
        self._stopped.set()

    def _entry(self, part: Part, payload: bytes) -> Entry:
        return Entry(part.key, payload, part.rows, lsn=part.lsn)

    async def _admit(self, *, wait: bool) -> None:
        """Reads the requests left, in order, and puts them in the ring: without ``wait``, only while
        there is room; with it, waiting for room as long as it takes."""
        while self._at < len(self._left):
            chunk = list(self._chunk())
            payloads = await asyncio.to_thread(read_parts, self.wal.directory, chunk)
            for part, data in zip(chunk, payloads, strict=True):
                entry = self._entry(part, data)
                if entry.size > self.ring.max_bytes or entry.rows > self.ring.max_rows:
                    self.ring.readmit([entry])  # larger than the buffer now is (a smaller --buffer-max-*): alone
                while entry.seq == 0 and not self.ring.admit_from_log(entry):
                    if not wait:
                        return
                    self.ring.released.clear()
                    await self.ring.released.wait()  # a flush settled something: there may be room
                self._at += 1
                self.replayed_rows += part.rows

    def _chunk(self) -> Iterator[Part]:
        size = 0
        for part in self._left[self._at:]:
            if size and size + part.size > CHUNK_BYTES:
                return
            size += part.size
            yield part

    def _keep_the_rest(self) -> None:
        """Rows never put back stay in the log: in this run's books they were accepted and kept there."""
        rest = self._left[self._at:]
        self._at = len(self._left)
        rows = sum(p.rows for p in rest)
        if rows:
            self.ledger.accepted_rows += rows
            self.ledger.accepted_requests += len(rest)
            self.ledger.fail(_IN_LOG, rows)
            log.warning("%d rows from the write-ahead log were not put back before the stop; they stay in %s for "
                        "the next start", rows, self.wal.directory, extra={"rows_kept_in_log": rows})
