"""The background flusher: takes batches out of the ring and inserts them into ClickHouse.

A (table, format) key is flushed when its queue holds ``flush_max_rows`` rows or
``flush_max_bytes`` bytes, when its oldest row is ``flush_interval`` old, and at once while
draining or while a flush barrier waits. Inserts run in a small thread pool (the ClickHouse client
is synchronous and chDB has no async client), so the event loop keeps accepting rows meanwhile.

Each batch gets a deterministic deduplication token, ``<instance>-<first seq>-<last seq>``, that
every retry of it reuses, so a retry after a commit whose reply was lost inserts nothing twice.
Retryable failures back off exponentially with full jitter; permanent ones fail the batch with the
ClickHouse error as the reason. Retries stop at the drain deadline, and whatever is left then is
counted and logged as not flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from buffer.errors import InsertFailure, classify
from buffer.ring import Entry, Key, Ring
from buffer.routines import Routine
from buffer.sink import Sink, SinkUnavailable

log = logging.getLogger(__name__)

DRAINING_MAX_AGE = 0.1
NO_ANSWER_MAX_BACKOFF = 1.0


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
                 tracer: trace.Tracer | None = None) -> None:
        self.ring = ring
        self.sink = sink
        self.policy = policy
        self.clock = clock
        self.instance = instance or uuid.uuid4().hex[:12]
        self.on_batch = on_batch
        self.tracer = tracer or trace.NoOpTracer()
        self.stats = FlushStats()
        self.draining = False
        # Monotonic time after which retries stop and leftovers are reported; None = no deadline.
        self.deadline: float | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._in_flight: dict[Key, asyncio.Task[None]] = {}
        self._executor = ThreadPoolExecutor(max_workers=policy.concurrency, thread_name_prefix="flusher")
        self.not_flushed_rows = 0
        ring.wake_rows, ring.wake_bytes = policy.max_rows, policy.max_bytes

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
        if self.ring.barrier_waiting or (self.draining and self.ring.closed):
            return True
        p = self.policy
        return rows >= p.max_rows or size >= p.max_bytes or (oldest is not None and now - oldest >= self._max_age())

    def _next_timeout(self, now: float) -> float | None:
        waits = []
        for key in self.ring.queued_keys():
            if key in self._in_flight:
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
                    if len(self._in_flight) >= self.policy.concurrency:
                        break
                    if key not in self._in_flight and self._due(key, now):
                        batch = self.ring.take(key, self.policy.max_rows, self.policy.max_bytes)
                        task = asyncio.create_task(self._flush(key, batch), name=f"flush {key[0]}")
                        self._in_flight[key] = task
                        task.add_done_callback(functools.partial(self._flush_done, key))
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

    def _flush_done(self, key: Key, _task: asyncio.Task[None]) -> None:
        self._in_flight.pop(key, None)
        self.wake()

    def _past_deadline(self) -> bool:
        return self.deadline is not None and self.clock() >= self.deadline

    async def _finish(self) -> None:
        """Leaves nothing silent: whatever is still outstanding is counted and logged."""
        for task in list(self._in_flight.values()):
            task.cancel()
        for task in list(self._in_flight.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
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

    async def _flush(self, key: Key, batch: list[Entry]) -> None:
        table, fmt = key
        payload = b"".join(e.payload for e in batch)
        rows = sum(e.rows for e in batch)
        token = self.token(batch)
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        attempt = 0
        failure: InsertFailure | None = None
        committed = False
        span = self.tracer.start_span("ingest_buffer.flush", attributes={
            "db.system": "clickhouse", "db.collection.name": table, "ingest_buffer.format": fmt,
            "ingest_buffer.rows": rows, "ingest_buffer.bytes": len(payload), "ingest_buffer.token": token})
        try:
            while True:
                attempt += 1
                try:
                    await loop.run_in_executor(self._executor, self.sink.insert, table, fmt, payload, token)
                    committed = True
                    break
                except SinkUnavailable as exc:
                    failure = InsertFailure(False, None, str(exc))
                    break
                except Exception as exc:
                    failure = classify(exc, attempt)
                    self.stats.errors[failure.name] = self.stats.errors.get(failure.name, 0) + 1
                    self.stats.last_error = failure.message
                    if not failure.retryable:
                        break
                    delay = self.backoff(attempt, failure)
                    if self.deadline is not None and self.clock() + delay >= self.deadline:
                        log.error("insert into %s failed (%s) and the drain deadline leaves no time to retry: "
                                  "%d rows are lost", table, failure.name, rows,
                                  extra={"table": table, "rows_not_flushed": rows, "error": failure.message[:300]})
                        break
                    self.stats.retries += 1
                    log.warning("insert into %s failed, retrying in %.2fs (attempt %d): %s", table, delay,
                                attempt, failure.message[:300],
                                extra={"table": table, "rows": rows, "code": failure.code})
                    await asyncio.sleep(delay)
        finally:
            seconds = time.monotonic() - t0
            if committed:
                self.ring.release(batch, committed=True)
                self.stats.batches += 1
                self.stats.last_success = time.time()
                log.info("flushed %d rows (%d bytes) into %s in %.3fs", rows, len(payload), table, seconds,
                         extra={"table": table, "format": fmt, "rows": rows, "bytes": len(payload),
                                "attempts": attempt, "seconds": round(seconds, 4), "token": token})
            elif failure is not None and not failure.retryable:
                reason = f"rejected_by_clickhouse:{failure.name}"
                self.ring.release(batch, committed=False, reason=reason)
                log.error("ClickHouse refused %d rows for %s (%s): %s", rows, table, failure.name,
                          failure.message[:500], extra={"table": table, "rows": rows, "code": failure.code})
            elif failure is not None:
                self.ring.release(batch, committed=False, reason="not_flushed_before_exit")
                self.not_flushed_rows += rows
            # else: cancelled mid-insert at exit; _finish counts these rows via fail_outstanding.
            span.set_attribute("ingest_buffer.attempts", attempt)
            if not committed:
                span.set_status(Status(StatusCode.ERROR, failure.message[:200] if failure else "cancelled at exit"))
                if failure is not None:
                    span.set_attribute("ingest_buffer.error", failure.name)
            span.end()
            if self.on_batch is not None:
                self.on_batch(BatchResult(key, rows, len(payload), attempt, seconds, committed, failure))
