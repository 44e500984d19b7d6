"""The background flusher: takes batches out of the ring and inserts them into ClickHouse.

Three concerns, three modules, wired here: *when* a key is flushed and which insert may start
(``schedule``), *one insert* with its retries and held tables (``inserter``), and *poison rows*
(``isolate``). The flusher runs the loop, one task per batch, traces each batch and settles its
entries in the ring. A batch is at most ``--flush-max-rows`` rows and ``--flush-max-bytes`` bytes
(a single request larger than either goes alone).

Each batch gets a deterministic deduplication token, ``<instance>-<first seq>-<last seq>``, that
every retry of it reuses. The flusher reads the drain from the lifecycle: it flushes young rows
every 100 ms once draining, closes the ring and flushes everything once the buffer refuses new
rows, and stops retrying at the deadline; whatever is left then is counted and logged.

Nothing fails silently: a flush task that raises fails its batch's entries with ``internal_error``
(COMMITTED writers hear at once), is logged with its traceback, and makes the buffer unready and its
exit code non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from buffer.deadletter import DeadLetterStore
from buffer.errors import InsertFailure
from buffer.inserter import Attempted, FlushStats, Held, Inserter
from buffer.isolate import Settlement, isolate, settle
from buffer.ledger import Fate, Outcome, Reason
from buffer.lifecycle import Lifecycle, Phase
from buffer.ring import Entry, Key, Ring, State
from buffer.routines import Routine
from buffer.schedule import FlushPolicy, Queued, Scheduler
from buffer.shape import format_of
from buffer.sink import Sink
from buffer.wal import WriteAheadLog

log = logging.getLogger(__name__)

# At exit, how long inserts already sent may take to finish before their rows count as in doubt (with
# the log, they stay there for the next start). Short: a sidecar's SIGTERM can come late in the pod's
# grace period, and the process does not wait for the insert's thread after this (cli._serve).
IN_FLIGHT_GRACE = 0.5
# How long a batch waits for a failing log to record it before it is sent without that.
BATCH_LOG_PATIENCE = 5.0
_NOT_FLUSHED = Outcome(Reason.NOT_FLUSHED_BEFORE_EXIT)
_IN_LOG = Outcome(Reason.KEPT_IN_LOG)

__all__ = ["BatchResult", "FlushPolicy", "Flusher"]


def shortfall(batch: list[Entry], unwritten: int) -> list[Settlement]:
    """A committed batch of which ClickHouse wrote ``unwritten`` rows fewer than it held: which rows
    is not known, so the shortfall is counted against its last rows (their COMMITTED writers hear of it)."""
    out: list[Settlement] = []
    for entry in reversed(batch):
        k = min(unwritten, entry.rows)
        unwritten -= k
        failed = {Outcome(Reason.NOT_WRITTEN): k} if k else {}
        out.append((entry, entry.rows - k, failed, "ClickHouse reported fewer rows written than the insert held"))
    return out[::-1]


@dataclass(frozen=True)
class BatchResult:
    key: Key
    rows: int
    bytes: int
    attempts: int
    seconds: float
    committed: bool
    failure: InsertFailure | None


class Flusher(Routine):
    name = "flusher"

    def __init__(self, ring: Ring, sink: Sink, policy: FlushPolicy, lifecycle: Lifecycle | None = None, *,
                 clock: Callable[[], float] = time.monotonic, instance: str | None = None,
                 on_batch: Callable[[BatchResult], None] | None = None, tracer: trace.Tracer | None = None,
                 dead_letters: DeadLetterStore | None = None, dead_letters_where: str = "the dead-letter store",
                 database: str = "default", user: str = "", wal: WriteAheadLog | None = None) -> None:
        self.ring = ring
        self.ledger = ring.ledger
        self.policy = policy
        self.lifecycle = lifecycle if lifecycle is not None else Lifecycle("gateway", 10.0, clock=clock)
        self.clock = clock
        self.instance = instance or uuid.uuid4().hex[:12]
        self.on_batch = on_batch
        self.tracer = tracer or trace.NoOpTracer()
        self.dead_letters = dead_letters
        self.dead_letters_where = dead_letters_where
        self.scheduler = Scheduler(policy)
        self.inserter = Inserter(sink, policy, self.scheduler, self.lifecycle, database=database, user=user,
                                 clock=clock)
        self.in_flight_grace = IN_FLIGHT_GRACE
        self._stopping = False
        self._wake = asyncio.Event()
        # Inserts under way: batch number → (key, batch, task); a key may have several (backlogs).
        self._in_flight: dict[int, tuple[Key, list[Entry], asyncio.Task[None]]] = {}
        self._batch_numbers = itertools.count()
        self._last_started: dict[Key, int] = {}  # key → number of its latest batch
        self.lifecycle.subscribe(self._phase_changed)
        # With a log, rows that cannot be flushed before exit stay in it (the next start sends them)
        # and whatever settles is recorded there; without one, rows left at exit are lost.
        self.wal = wal
        self._unflushed = _IN_LOG if wal is not None else _NOT_FLUSHED
        if wal is not None:
            ring.on_dropped = lambda entry: wal.settle(entry.lsns())

    @property
    def stats(self) -> FlushStats:
        return self.inserter.stats

    @property
    def held(self) -> dict[str, Held]:
        return self.inserter.held

    # ----- control --------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def _phase_changed(self, phase: Phase) -> None:
        if phase >= Phase.DRAINING:
            self.scheduler.draining = True
        if phase >= Phase.REFUSING and not self.ring.closed:
            self.ring.close()
            log.info("refusing new rows; flushing %d buffered rows", self.ring.rows)
        self.wake()

    def stop_budget(self) -> float | None:
        # Past the deadline, inserts already sent get in_flight_grace to say whether they committed,
        # and the accounting after that needs a moment too.
        return self.lifecycle.remaining() + self.in_flight_grace + 2.0

    async def stop(self) -> None:
        """Drains the ring until empty or the deadline (the gRPC server has stopped taking rows)."""
        self.lifecycle.shutdown()
        self._stopping = True
        self.wake()

    # ----- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                if not self.lifecycle.accepting and self.ring.outstanding == 0:
                    self.lifecycle.drained()
                if self._stopping and (self.ring.outstanding == 0 or self.lifecycle.past_deadline()):
                    break
                self._start_due()
                self._wake.clear()
                self.ring.arrived.clear()
                queued = [(key, Queued(*self.ring.queued(key))) for key in self.ring.queued_keys()]
                timeout = self.scheduler.next_timeout(self.clock(), queued, self.lifecycle.deadline)
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self.ring.arrived.wait())]
                try:
                    await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
        finally:
            await self._finish()

    def _start_due(self) -> None:
        s = self.scheduler
        s.refusing = not self.lifecycle.accepting
        now = self.clock()
        keys = self.ring.queued_keys()
        if len(keys) > 1:  # the key served longest ago first: a table with a backlog never starves another
            keys.sort(key=lambda k: self._last_started.get(k, -1))
        for key in keys:
            while s.can_start(key) and s.due(key, Queued(*self.ring.queued(key)), now):
                batch = self.ring.take(key, self.policy.max_rows, self.policy.max_bytes)
                if not batch:
                    break  # its first entry waits for its fsync: the service wakes the loop after it
                number = next(self._batch_numbers)
                self._last_started[key] = number
                task = asyncio.create_task(self._flush(key, batch), name=f"flush {key[0]}")
                self._in_flight[number] = (key, batch, task)
                s.started(key)
                task.add_done_callback(functools.partial(self._flush_done, number))

    def _flush_done(self, number: int, task: asyncio.Task[None]) -> None:
        key, batch, _ = self._in_flight.pop(number)
        self.scheduler.finished(key)
        if not task.cancelled() and (exc := task.exception()) is not None:
            rows = sum(e.rows for e in batch if e.state in (State.PENDING, State.IN_FLIGHT))
            log.error("flushing a batch of %s failed inside the buffer: its %d unsettled rows are lost", key[0],
                      rows, exc_info=exc, extra={"table": key[0], "rows_lost": rows})
            # With a log, the rows stay there for the next start; without one, they are lost.
            self.ring.release(batch, _IN_LOG if self.wal is not None else Outcome(Reason.INTERNAL_ERROR,
                                                                                   type(exc).__name__))
            self.lifecycle.fault(f"a flush of {key[0]} raised {exc!r}")
        self.wake()

    async def _finish(self) -> None:
        """Leaves nothing silent: whatever is still outstanding is counted and logged, even when the
        supervisor cancels the flusher while it waits for inserts under way."""
        self.ring.close()  # the flusher is gone (stopped, or crashed): no more rows may come in
        in_flight = [task for _, _, task in self._in_flight.values()]
        try:
            if in_flight:
                # An insert already sent may commit: give it a moment to say so, so that the count of
                # what did not reach ClickHouse is exact rather than a guess.
                await asyncio.wait(in_flight, timeout=self.in_flight_grace)
        finally:
            self._account_leftovers(in_flight)
        for task in in_flight:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # an exception: _flush_done reports it
                await task

    def _account_leftovers(self, in_flight: list[asyncio.Task[None]]) -> None:
        # Taken before cancelling: the tasks' done-callbacks forget their batches.
        doubtful = [batch for _, batch, task in self._in_flight.values() if not task.done()]
        for task in in_flight:
            task.cancel()  # their rows are settled below; the tasks end on their own
        doubt = sum(e.rows for batch in doubtful for e in batch if e.state is State.IN_FLIGHT)
        if doubt:
            for batch in doubtful:
                self.ring.release(batch, _IN_LOG if self.wal is not None else Outcome(Reason.IN_DOUBT_AT_EXIT))
            log.error("%d rows were being inserted when the drain deadline passed; ClickHouse may or may not "
                      "have them (%s)", doubt, "the next start resends them under the same deduplication token"
                      if self.wal is not None else "their deduplication token makes a replay safe",
                      extra={"rows_in_doubt": doubt})
        left = self.ring.fail_outstanding(self._unflushed)
        if left and self.wal is not None:
            log.warning("%d rows were not flushed to ClickHouse before the drain deadline; they stay in the "
                        "write-ahead log in %s and the next start flushes them", left, self.wal.directory,
                        extra={"rows_kept_in_log": left})
        elif left:
            lost = left
            held = f" (held tables: {', '.join(sorted(self.held))})" if self.held else ""
            log.error("%d rows were not flushed to ClickHouse before the drain deadline; they are lost%s "
                      "(raise --drain-timeout and the pod's terminationGracePeriodSeconds, or keep them in a "
                      "write-ahead log: --wal-dir)", lost, held, extra={"rows_not_flushed": lost})
        self.inserter.shutdown()

    # ----- one batch ------------------------------------------------------------------------

    def token(self, batch: list[Entry]) -> str:
        """The batch's deduplication token: recorded, for a batch resent after a restart; else from
        the log's instance and its requests' numbers (stable names, unique for the log's life), or
        without a log from this process's instance and the entries' places in the buffer."""
        head = batch[0]
        if head.replay_token is not None:
            return head.replay_token
        if self.wal is not None:
            lsns = [lsn for e in batch for lsn in e.lsns()]
            return self.wal.token(min(lsns), max(lsns))
        return f"{self.instance}-{head.seq}-{batch[-1].seq}"

    def in_flight(self) -> dict[str, tuple[int, int, float]]:
        """Rows and bytes being inserted now, and when the oldest of them was accepted, by table
        (GET /status)."""
        out: dict[str, tuple[int, int, float]] = {}
        for key, batch, _ in self._in_flight.values():
            rows, size, oldest = out.get(key[0], (0, 0, float("inf")))
            out[key[0]] = (rows + sum(e.rows for e in batch), size + sum(e.size for e in batch),
                           min([oldest, *(e.accepted_at for e in batch)]))
        return out

    async def _flush(self, key: Key, batch: list[Entry]) -> None:
        table, fmt = key[0], format_of(key[1])
        rows = sum(e.rows for e in batch)
        size = sum(e.size for e in batch)
        token = self.token(batch)
        t0 = time.monotonic()
        attempts = 0
        failure: InsertFailure | None = None
        settled = False
        span = self.tracer.start_span("ingest_buffer.flush", attributes={
            "db.system": "clickhouse", "db.collection.name": table, "ingest_buffer.format": fmt,
            "ingest_buffer.rows": rows, "ingest_buffer.bytes": size, "ingest_buffer.token": token})
        try:
            # The requests' payloads, not joined here: the sink joins them (in its worker thread)
            # only where it needs one body, and the embedded engine needs none.
            payload = [data for e in batch for data, _ in e.parts()]
            lsns = [lsn for e in batch for lsn in e.lsns()]  # now: settling frees the entries' parts
            await self._log_batch(batch, token, lsns)
            done = await self.inserter.insert(key, payload, token, rows)
            failure, attempts = done.failure, done.attempts
            if failure is None:
                unwritten = self._unwritten(key, payload, rows, done)
                if unwritten:
                    self.ring.settle(shortfall(batch, unwritten))
                else:
                    self.ring.release(batch)
                self.stats.batches += 1
                self.stats.last_success = time.time()
                self.stats.last_error = ""
                self.stats.table_errors.pop(table, None)
                self.stats.insert_seconds.append(time.monotonic() - t0)
                log.info("flushed %d rows (%d bytes) into %s in %.3fs", rows, size, table, time.monotonic() - t0,
                         extra={"table": table, "format": fmt, "rows": rows, "bytes": size, "attempts": attempts,
                                "seconds": round(time.monotonic() - t0, 4), "token": token})
            elif failure.retryable:  # the deadline came while retrying
                self.ring.release(batch, self._unflushed)
            else:
                self.ring.settle(await self._isolate(key, batch, token, failure))
            self._settle_in_log(batch, lsns)
            settled = True
        finally:
            # Not settled: cancelled mid-insert at exit (_finish counts these rows), or raised
            # (_flush_done does).
            span.set_attribute("ingest_buffer.attempts", attempts)
            if failure is not None or not settled:
                span.set_status(Status(StatusCode.ERROR, failure.message[:200] if failure else "not settled"))
                if failure is not None:
                    span.set_attribute("ingest_buffer.error", failure.name)
            span.end()
        if self.on_batch is not None:
            self.on_batch(BatchResult(key, rows, size, attempts, time.monotonic() - t0, failure is None, failure))

    def _unwritten(self, key: Key, parts: list[bytes], rows: int, done: Attempted) -> int:
        """Rows of a committed insert that ClickHouse did not write, and so did not reach it.

        One exception: a CSV field in quotes may hold a newline, and a CSV request without its
        row_count was counted by lines, so there ClickHouse's smaller count is the true one: the
        counts are corrected, nothing is lost."""
        short = self.inserter.unwritten(key[0], rows, done.written, done.attempts)
        if short and format_of(key[1]) == "CSV" and any(b'"' in part for part in parts):
            self.ledger.recount(short)
            log.warning("ClickHouse counted %d rows fewer than the buffer in a CSV insert into %s whose fields "
                        "are quoted: a quoted newline was taken for a row end. The counts are corrected; send "
                        "row_count with such rows to have them right from the start", short, key[0],
                        extra={"table": key[0], "rows_recounted": short})
            return 0
        return short

    async def _log_batch(self, batch: list[Entry], token: str, lsns: list[int]) -> None:
        """Records the batch's token and requests, synced, before its insert is sent, so that a restart
        after a commit sends exactly these rows under exactly this token (ClickHouse then drops them).

        While the log cannot take it (a failing disk) the batch waits and asks again, for up to
        BATCH_LOG_PATIENCE; then it is sent all the same, loudly: a disk that stays full must not stop
        every flush (which is also what frees it), and the only risk is a crash before the log
        works again, whose replay would send these rows a second time."""
        if self.wal is None or batch[0].replay_token is not None:
            return  # a resent batch is in the log as it was
        delay, waited = 0.05, 0.0
        while True:
            try:
                await self.wal.log_batch(token, lsns)
                return
            except OSError as exc:
                if waited >= BATCH_LOG_PATIENCE or self.lifecycle.out_of_time(within=delay):
                    log.error("could not record a batch of %s in the write-ahead log for %.0fs (%s): it is sent "
                              "anyway; should the buffer crash before the log works again, its %d rows could be "
                              "sent twice", batch[0].key[0], waited, exc, sum(e.rows for e in batch),
                              extra={"table": batch[0].key[0], "token": token})
                    return
                await asyncio.sleep(delay)
                waited += delay
                delay = min(1.0, delay * 2)

    def _settle_in_log(self, batch: list[Entry], lsns: list[int]) -> None:
        """Tells the log what settled, unless some of it stays there for the next start: then the
        whole batch is resent, under its token, and what landed before is deduplicated."""
        if self.wal is None or any(e.outcome is not None and e.outcome.fate is Fate.LOGGED for e in batch):
            return
        kept = any(e.outcome is not None and e.outcome.fate is Fate.KEPT for e in batch)
        self.wal.settle(lsns, durable=kept)  # dead letters: stored once

    async def _isolate(self, key: Key, batch: list[Entry], token: str, first: InsertFailure) -> list[Settlement]:
        """ClickHouse refused the batch for its data: insert the good rows, dead-letter the bad ones."""

        async def insert(parts: list[bytes], sub_token: str, rows: int) -> tuple[InsertFailure | None, int]:
            done = await self.inserter.insert(key, parts, sub_token, rows)
            if done.failure is not None:
                return done.failure, 0
            return None, self._unwritten(key, parts, rows, done)

        found = await isolate(batch, format_of(key[1]), token, first, insert, self.lifecycle.out_of_time)
        letters = found.letters(key, token)
        stored = True
        if letters:
            stored = self.dead_letters is not None
            if self.dead_letters is not None:
                try:
                    deleted = await self.inserter.in_thread(self.dead_letters.write, letters)
                    self.ledger.fail(Outcome(Reason.DEAD_LETTERS_DELETED), deleted)
                except Exception as exc:
                    stored = False
                    log.error("could not write %d dead letters for %s: %s", len(letters), key[0], exc,
                              extra={"table": key[0], "rows_lost": sum(p.rows for p, _ in found.bad)})
        return settle(key, batch, token, found, stored, self.dead_letters_where, unsent=self._unflushed)
