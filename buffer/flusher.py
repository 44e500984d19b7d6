"""The background flusher: takes batches out of the ring and inserts them into ClickHouse.

A (table, format) key is flushed when its queue holds ``flush_max_rows`` rows or
``flush_max_bytes`` bytes, when its oldest row is ``flush_interval`` old, and at once while
draining or while a flush barrier waits. Inserts run in a small thread pool (the ClickHouse client
is synchronous and chDB has no async client), so the event loop keeps accepting rows meanwhile.
Up to ``flush_concurrency`` keys have inserts running at once, and one key's backlog never takes
a slot another key needs. A key with a backlog also sends further full batches side by side while
fewer than ``flush_concurrency`` inserts run in all (unless its inserts are being retried: that
would only add load to a table that is struggling); a partial batch waits for its key's insert to
finish and grows meanwhile.

Each batch gets a deterministic deduplication token, ``<instance>-<first seq>-<last seq>``, that
every retry of it reuses, so a retry after a commit whose reply was lost inserts nothing twice.
Retryable failures back off exponentially with full jitter; permanent ones fail the batch with the
ClickHouse error as the reason. Retries stop at the drain deadline, and whatever is left then is
counted and logged as not flushed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from buffer.deadletter import DeadLetter, DeadLetterStore
from buffer.errors import InsertFailure, classify
from buffer.ring import Entry, Key, Ring
from buffer.routines import Routine
from buffer.sink import Payload, Sink, SinkUnavailable

log = logging.getLogger(__name__)

DRAINING_MAX_AGE = 0.1
NO_ANSWER_MAX_BACKOFF = 1.0
# At exit, how long inserts already sent may take to finish before their rows count as in doubt.
IN_FLIGHT_GRACE = 2.0


@dataclass(frozen=True)
class FlushPolicy:
    max_rows: int
    max_bytes: int
    max_age: float
    concurrency: int = 1
    initial_backoff: float = 0.2
    max_backoff: float = 10.0


@dataclass
class FlushStats:
    batches: int = 0
    retries: int = 0
    # ClickHouse error name → failed attempts
    errors: dict[str, int] = field(default_factory=dict)
    last_success: float | None = None
    last_error: str = ""


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

    def __init__(self, ring: Ring, sink: Sink, policy: FlushPolicy, *,
                 clock: Callable[[], float] = time.monotonic,
                 instance: str | None = None,
                 on_batch: Callable[[BatchResult], None] | None = None,
                 tracer: trace.Tracer | None = None,
                 dead_letters: DeadLetterStore | None = None) -> None:
        self.ring = ring
        self.sink = sink
        self.policy = policy
        self.clock = clock
        self.instance = instance or uuid.uuid4().hex[:12]
        self.on_batch = on_batch
        self.tracer = tracer or trace.NoOpTracer()
        self.dead_letters = dead_letters
        self.dead_lettered_rows = 0
        self.stats = FlushStats()
        self.draining = False
        # Monotonic time after which retries stop and leftovers are reported; None = no deadline.
        self.deadline: float | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        # Inserts under way: batch number → (key, batch, task); a key may have several (backlogs).
        self._in_flight: dict[int, tuple[Key, list[Entry], asyncio.Task[None]]] = {}
        self._busy: collections.Counter[Key] = collections.Counter()
        self._retrying: collections.Counter[Key] = collections.Counter()  # inserts now between retries
        self._batch_numbers = itertools.count()
        self.in_doubt_rows = 0
        self.in_flight_grace = IN_FLIGHT_GRACE
        # Every key with an insert running may have one more beside it: at most 2 * concurrency - 1.
        self._executor = ThreadPoolExecutor(max_workers=2 * policy.concurrency, thread_name_prefix="flusher")
        self.not_flushed_rows = 0
        ring.wake_rows, ring.wake_bytes = policy.max_rows, policy.max_bytes
        ring.coalesce_bytes = min(ring.coalesce_bytes, policy.max_bytes)

    # ----- control --------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def drain(self, deadline: float) -> None:
        """Flush everything now, keep retrying until ``deadline`` (monotonic seconds)."""
        self.draining = True
        if self.deadline is None or deadline < self.deadline:
            self.deadline = deadline
        self.wake()

    def stop_budget(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self.clock()) + 2.0

    async def stop(self) -> None:
        """Drains the ring (the caller has closed it to new rows) until empty or the deadline."""
        if self.deadline is None:
            self.drain(self.clock() + 10.0)
        self._stopping = True
        self.wake()

    # ----- the loop -------------------------------------------------------------------------

    def _max_age(self) -> float:
        # Draining while rows still arrive (a sidecar before SIGTERM): flush often, but not per
        # request, or the application's last seconds would become hundreds of tiny inserts.
        return min(self.policy.max_age, DRAINING_MAX_AGE) if self.draining else self.policy.max_age

    def _due(self, key: Key, now: float) -> bool:
        rows, size, oldest = self.ring.queued(key)
        if not rows:
            return False
        p = self.policy
        if rows >= p.max_rows or size >= p.max_bytes:
            return True  # a full batch goes out even while another of the key's batches is in flight
        if self._busy[key]:
            return False  # a partial batch waits for the key's insert to finish, and grows meanwhile
        if self.ring.barrier_waiting or (self.draining and self.ring.closed):
            return True
        return oldest is not None and now - oldest >= self._max_age()

    def _can_start(self, key: Key) -> bool:
        if self._busy[key]:
            return len(self._in_flight) < self.policy.concurrency and not self._retrying[key]
        return len(self._busy) < self.policy.concurrency

    def _next_timeout(self, now: float) -> float | None:
        waits = []
        for key in self.ring.queued_keys():
            # A key with an insert running, or with no slot free, waits for a flush to finish
            # (which wakes the loop), not for its age: a timeout now would only spin.
            if self._busy[key] or not self._can_start(key):
                continue
            _, _, oldest = self.ring.queued(key)
            if oldest is not None:
                waits.append(oldest + self._max_age() - now)
        if self.deadline is not None:
            waits.append(self.deadline - now)
        return max(0.0, min(waits)) if waits else None

    async def run(self) -> None:
        try:
            while True:
                now = self.clock()
                if self._stopping and (self.ring.outstanding == 0 or self._past_deadline()):
                    break
                for key in self.ring.queued_keys():
                    while self._can_start(key) and self._due(key, now):
                        # max_rows only triggers a flush; a backlog goes out in batches as large as
                        # max_bytes allows, because ClickHouse ingests fewer, larger inserts faster.
                        batch = self.ring.take(key, self.ring.max_rows, self.policy.max_bytes)
                        number = next(self._batch_numbers)
                        task = asyncio.create_task(self._flush(key, batch), name=f"flush {key[0]}")
                        self._in_flight[number] = (key, batch, task)
                        self._busy[key] += 1
                        task.add_done_callback(functools.partial(self._flush_done, number))
                self._wake.clear()
                self.ring.arrived.clear()
                timeout = self._next_timeout(self.clock())
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self.ring.arrived.wait())]
                try:
                    await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
        finally:
            await self._finish()

    def _flush_done(self, number: int, _task: asyncio.Task[None]) -> None:
        done = self._in_flight.pop(number, None)
        if done is not None:
            self._busy[done[0]] -= 1
            if not self._busy[done[0]]:
                del self._busy[done[0]]
        self.wake()

    def _past_deadline(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    async def _finish(self) -> None:
        """Leaves nothing silent: whatever is still outstanding is counted and logged."""
        in_flight = [task for _, _, task in self._in_flight.values()]
        if in_flight:
            # An insert already sent may commit: give it a moment to say so, so that the count of
            # what did not reach ClickHouse is exact rather than a guess.
            await asyncio.wait(in_flight, timeout=self.in_flight_grace)
        # Taken before cancelling: the tasks' done-callbacks forget their batches.
        doubtful = [batch for _, batch, task in self._in_flight.values() if not task.done()]
        for task in in_flight:
            task.cancel()
        for task in in_flight:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        doubt = sum(e.rows for batch in doubtful for e in batch)
        if doubt:
            for batch in doubtful:
                self.ring.release(batch, committed=False, reason="in_doubt_at_exit")
            self.in_doubt_rows += doubt
            log.error("%d rows were being inserted when the drain deadline passed; ClickHouse may or may not "
                      "have them (their deduplication token makes a replay safe)", doubt,
                      extra={"rows_in_doubt": doubt})
        lost = self.ring.fail_outstanding("not_flushed_before_exit")
        self.not_flushed_rows += lost
        if lost:
            log.error("%d rows were not flushed to ClickHouse before the drain deadline; they are lost "
                      "(raise --drain-timeout and the pod's terminationGracePeriodSeconds)", lost,
                      extra={"rows_not_flushed": lost})
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ----- one batch ------------------------------------------------------------------------

    def token(self, batch: list[Entry]) -> str:
        return f"{self.instance}-{batch[0].seq}-{batch[-1].seq}"

    def backoff(self, attempt: int, failure: InsertFailure | None = None) -> float:
        """Full jitter: uniform in [0, min(cap, initial * 2**(attempt-1))].

        The cap is ``max_backoff`` for errors the server answered (it is busy: give it room), and at
        most NO_ANSWER_MAX_BACKOFF when nothing answered: probing a server that is down costs it
        nothing, and flushing then resumes within that long of its return.
        """
        p = self.policy
        cap = p.max_backoff
        if failure is not None and failure.code is None and failure.retryable:
            cap = min(cap, NO_ANSWER_MAX_BACKOFF)
        return random.uniform(0, min(cap, p.initial_backoff * 2 ** (attempt - 1)))

    async def _insert(self, table: str, fmt: str, payload: Payload, token: str, rows: int) -> tuple[
            InsertFailure | None, int]:
        """One payload, retried while retryable and time allows. Returns (failure or None, attempts)."""
        loop = asyncio.get_running_loop()
        key = (table, fmt)
        attempt = 0
        retrying = False
        try:
            while True:
                attempt += 1
                try:
                    await loop.run_in_executor(self._executor, self.sink.insert, table, fmt, payload, token)
                    return None, attempt
                except SinkUnavailable as exc:
                    return InsertFailure(False, None, str(exc)), attempt
                except Exception as exc:
                    failure = classify(exc, attempt)
                self.stats.errors[failure.name] = self.stats.errors.get(failure.name, 0) + 1
                self.stats.last_error = failure.message
                if not failure.retryable:
                    return failure, attempt
                delay = self.backoff(attempt, failure)
                if self.deadline is not None and self.clock() + delay >= self.deadline:
                    log.error("insert into %s failed (%s) and the drain deadline leaves no time to retry: "
                              "%d rows are lost", table, failure.name, rows,
                              extra={"table": table, "rows_not_flushed": rows, "error": failure.message[:300]})
                    return failure, attempt
                if not retrying:
                    retrying = True
                    self._retrying[key] += 1  # no further batches of this key beside this one meanwhile
                self.stats.retries += 1
                # One line when trouble starts, then one every tenth attempt: an outage is not a log flood.
                (log.warning if attempt == 1 or attempt % 10 == 0 else log.debug)(
                    "insert into %s failed, retrying in %.2fs (attempt %d): %s", table, delay, attempt,
                    failure.message[:300], extra={"table": table, "rows": rows, "code": failure.code})
                await asyncio.sleep(delay)
        finally:
            if retrying:
                self._retrying[key] -= 1
                if not self._retrying[key]:
                    del self._retrying[key]

    async def _flush(self, key: Key, batch: list[Entry]) -> None:
        table, fmt = key
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
            failure, attempts = await self._insert(table, fmt, payload, token, rows)
            seconds = time.monotonic() - t0
            if failure is None:
                self.ring.release(batch, committed=True)
                self.stats.batches += 1
                self.stats.last_success = time.time()
                self.stats.last_error = ""
                log.info("flushed %d rows (%d bytes) into %s in %.3fs", rows, size, table, seconds,
                         extra={"table": table, "format": fmt, "rows": rows, "bytes": size,
                                "attempts": attempts, "seconds": round(seconds, 4), "token": token})
            elif failure.retryable:
                self.ring.release(batch, committed=False, reason="not_flushed_before_exit")
                self.not_flushed_rows += rows
            else:
                self.ring.settle(await self._isolate(key, batch, token, failure))
            settled = True
        finally:
            # Not settled: cancelled mid-insert at exit; _finish counts these rows via fail_outstanding.
            span.set_attribute("ingest_buffer.attempts", attempts)
            if failure is not None or not settled:
                span.set_status(Status(StatusCode.ERROR, failure.message[:200] if failure else "cancelled at exit"))
                if failure is not None:
                    span.set_attribute("ingest_buffer.error", failure.name)
            span.end()
            if self.on_batch is not None:
                self.on_batch(BatchResult(key, rows, size, attempts, time.monotonic() - t0,
                                          failure is None and settled, failure))

    # ----- poison rows ----------------------------------------------------------------------

    async def _isolate(self, key: Key, batch: list[Entry], token: str,
                       first: InsertFailure) -> list[tuple[Entry, int, dict[str, int], str]]:
        """ClickHouse refused the batch for its data: find the bad rows by bisection, insert the
        rest, dead-letter the bad ones. Returns each entry's outcome for Ring.settle."""
        table, fmt = key
        splittable = fmt in LINE_FORMATS
        good = {id(e): 0 for e in batch}
        bad: list[tuple[Piece, InsertFailure]] = []
        unsent: list[Piece] = []
        # Each group is tried as one insert; a refused group is halved, a refused single request
        # is cut into its rows (line formats), a refused single row is a poison row. An entry that
        # holds several requests starts as one piece per request, so one odd request (a CSV field
        # with a newline, a row_count below its line count) cannot keep the others from splitting.
        groups: list[tuple[list[Piece], InsertFailure | None]] = [(
            [Piece(e, data, n, str(e.seq) if e.extra is None else f"{e.seq}+{i}")
             for e in batch for i, (data, n) in enumerate(e.parts())], first)]
        while groups:
            group, failure = groups.pop()
            if failure is None:
                if self._past_deadline():
                    unsent.extend(group)
                    continue
                rows = sum(p.rows for p in group)
                label = f"{token}/{group[0].label}-{group[-1].label}"
                failure, _ = await self._insert(table, fmt, [p.data for p in group], label, rows)
                if failure is None:
                    for p in group:
                        good[id(p.entry)] += p.rows
                    continue
                if failure.retryable:  # the deadline came while retrying
                    unsent.extend(group)
                    continue
            if len(group) > 1:
                mid = len(group) // 2
                groups.extend([(group[mid:], None), (group[:mid], None)])
            elif splittable and group[0].rows > 1 and len(rows_of := split_rows(group[0], fmt)) > 1:
                groups.append((rows_of, None))
            else:
                bad.append((group[0], failure))
        return await self._dead_letter(key, batch, token, good, bad, unsent)

    async def _dead_letter(self, key: Key, batch: list[Entry], token: str, good: dict[int, int],
                           bad: list[tuple[Piece, InsertFailure]],
                           unsent: list[Piece]) -> list[tuple[Entry, int, dict[str, int], str]]:
        table, fmt = key
        letters = [DeadLetter(table, fmt, f.code, f.name, f.message[:2000], p.rows, token, p.data) for p, f in bad]
        failed_of: dict[int, dict[str, int]] = collections.defaultdict(lambda: collections.defaultdict(int))
        detail_of: dict[int, str] = {}
        stored = True
        if letters and self.dead_letters is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.dead_letters.write, letters)
            except Exception as exc:
                stored = False
                log.error("could not write %d dead letters for %s: %s", len(letters), table, exc,
                          extra={"table": table, "rows_lost": sum(p.rows for p, _ in bad)})
        elif letters:
            stored = False
        for p, f in bad:
            where = "dead_lettered" if stored else "rejected_by_clickhouse"
            failed_of[id(p.entry)][f"{where}:{f.name}"] += p.rows
            detail_of.setdefault(id(p.entry), f.message[:500])
        for p in unsent:
            failed_of[id(p.entry)]["not_flushed_before_exit"] += p.rows
            detail_of.setdefault(id(p.entry), "the drain deadline passed")
            self.not_flushed_rows += p.rows
        bad_rows = sum(p.rows for p, _ in bad)
        good_rows = sum(good.values())
        self.dead_lettered_rows += bad_rows if stored else 0
        if bad:
            sample = bad[0][1]
            log.error("ClickHouse refused %d of %d rows for %s (%s: %s); %d good rows inserted, the bad ones %s",
                      bad_rows, good_rows + bad_rows + sum(p.rows for p in unsent), table, sample.name,
                      sample.message[:300], good_rows,
                      "written to the dead-letter store" if stored else "are lost",
                      extra={"table": table, "rows_dead_lettered": bad_rows if stored else 0,
                             "rows_lost": 0 if stored else bad_rows, "code": sample.code, "token": token})
        return [(e, good[id(e)], dict(failed_of.get(id(e), {})), detail_of.get(id(e), "")) for e in batch]


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of an entry sent on its own while isolating poison rows."""

    entry: Entry
    data: bytes
    rows: int
    label: str  # stable within the batch, for deterministic deduplication tokens


LINE_FORMATS = frozenset({"JSONEachRow", "JSONCompactEachRow", "CSV", "TabSeparated"})


def split_rows(piece: Piece, fmt: str) -> list[Piece]:
    """Cuts a line-format piece into single rows (CSV: never inside a quoted field)."""
    rows: list[bytes] = []
    start = 0
    data = piece.data
    quotes = 0
    for i, byte in enumerate(data):
        if fmt == "CSV" and byte == 0x22:
            quotes += 1
        elif byte == 0x0A and quotes % 2 == 0:
            rows.append(data[start:i + 1])
            start = i + 1
    if start < len(data):
        rows.append(data[start:])
    if len(rows) != piece.rows:
        return [piece]  # lines are not rows here (pretty-printed JSON…): it stays whole
    return [Piece(piece.entry, r, 1, f"{piece.label}.{n}") for n, r in enumerate(rows)]
