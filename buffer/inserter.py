"""One insert into ClickHouse, retried while that can help: backoff, held tables, what ClickHouse wrote.

Inserts run in a small thread pool (the ClickHouse client is synchronous and chDB has no async
client), so the event loop keeps accepting rows meanwhile. Every retry of a payload reuses its
deduplication token, so a retry after a commit whose reply was lost inserts nothing twice.

* *retry* failures back off exponentially with full jitter — capped at ``max_backoff`` when the
  server answered (it is busy: give it room), at NO_ANSWER_MAX_BACKOFF when nothing answered
  (probing a server that is down costs it nothing, and flushing resumes soon after it returns);
* *hold* failures (the table or database is missing, a grant or the credentials are wrong) back
  off up to ``max_backoff`` and mark the table *held*: one log line naming the table and the fix
  (then one a minute), the ``ingest_buffer_table_held`` metric, the ``/readyz`` body. Once the
  operator fixes it, the same payload goes in under the same token: nothing lost, nothing twice;
* *poison* failures return at once: the caller isolates the bad rows.

Retries stop at the drain deadline, once the buffer refuses new rows. The sink reports the rows
ClickHouse wrote where it can; when that is fewer than the batch held, the difference is counted as
not written and logged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from buffer.errors import InsertFailure, Kind, classify, held_advice
from buffer.lifecycle import Lifecycle
from buffer.ring import Key
from buffer.schedule import FlushPolicy, Scheduler
from buffer.sink import Payload, Sink, SinkUnavailable

log = logging.getLogger(__name__)

NO_ANSWER_MAX_BACKOFF = 1.0
HELD_LOG_INTERVAL = 60.0  # a held table is reported once when it starts, then once a minute
MISMATCH_LOG_INTERVAL = 600.0

T = TypeVar("T")


@dataclass
class FlushStats:
    batches: int = 0
    retries: int = 0
    # ClickHouse error name → failed attempts
    errors: dict[str, int] = field(default_factory=dict)
    last_success: float | None = None
    last_error: str = ""
    # For GET /status: each table's last failed attempt (cleared when it flushes), recent inserts' seconds.
    table_errors: dict[str, str] = field(default_factory=dict)
    insert_seconds: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=512))


@dataclass
class Held:
    """A table whose inserts ClickHouse refuses as a whole, for a reason the operator can fix."""

    table: str
    error: str
    advice: str
    since: float  # wall-clock seconds
    attempts: int = 0
    last_logged: float = 0.0  # monotonic


@dataclass(frozen=True, slots=True)
class Attempted:
    failure: InsertFailure | None
    attempts: int
    written: int | None = None  # rows ClickHouse reported written, where it says


class Inserter:
    def __init__(self, sink: Sink, policy: FlushPolicy, scheduler: Scheduler, lifecycle: Lifecycle, *,
                 database: str = "default", user: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.policy = policy
        self.scheduler = scheduler
        self.lifecycle = lifecycle
        self.database = database
        self.user = user
        self.clock = clock
        self.stats = FlushStats()
        self.held: dict[str, Held] = {}
        self._mismatch_logged: dict[str, float] = {}
        # Every key with an insert running may have one more beside it: at most 2 * concurrency - 1;
        # held tables wait without a slot, so their retries may queue here for a moment.
        self._executor = ThreadPoolExecutor(max_workers=2 * policy.concurrency, thread_name_prefix="flusher")

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def backoff(self, attempt: int, failure: InsertFailure | None = None) -> float:
        """Full jitter: uniform in [0, min(cap, initial * 2**(attempt-1))]."""
        p = self.policy
        cap = p.max_backoff
        if failure is not None and failure.code is None and failure.kind is Kind.RETRY:
            cap = min(cap, NO_ANSWER_MAX_BACKOFF)
        return random.uniform(0, min(cap, p.initial_backoff * 2 ** (attempt - 1)))

    async def insert(self, key: Key, payload: Payload, token: str, rows: int) -> Attempted:
        """One payload, retried while retryable and time allows."""
        table = key[0]
        attempt = 0
        retrying = held = False
        try:
            while True:
                attempt += 1
                try:
                    written = await self.in_thread(self.sink.insert, table, key[1], payload, token)
                    self._release(table)  # whichever insert into the table gets through ends its hold
                    return Attempted(None, attempt, written)
                except SinkUnavailable as exc:
                    return Attempted(InsertFailure(Kind.POISON, None, str(exc)), attempt)
                except Exception as exc:
                    failure = classify(exc, attempt)
                self.stats.errors[failure.name] = self.stats.errors.get(failure.name, 0) + 1
                self.stats.last_error = failure.message
                self.stats.table_errors[table] = f"{failure.name}: {failure.message[:300]}"
                if failure.kind is Kind.POISON:
                    self._release(table)  # the table takes inserts again; these rows are the problem
                    return Attempted(failure, attempt)
                if failure.kind is Kind.HOLD and not held:
                    held = True
                    self.scheduler.hold(key)  # waits without a slot: other tables keep flowing
                delay = self.backoff(attempt, failure)
                if self.lifecycle.out_of_time(within=delay):
                    log.error("insert into %s failed (%s) and the drain deadline leaves no time to retry: "
                              "%d rows are lost", table, failure.name, rows,
                              extra={"table": table, "rows_not_flushed": rows, "error": failure.message[:300]})
                    return Attempted(failure, attempt)
                if not retrying:
                    retrying = True
                    self.scheduler.retry_began(key)  # no further batches of this key beside this one meanwhile
                self.stats.retries += 1
                if failure.kind is Kind.HOLD:
                    self._report_held(table, failure, rows)
                else:
                    # One line when trouble starts, then one every tenth attempt: an outage is not a log flood.
                    (log.warning if attempt == 1 or attempt % 10 == 0 else log.debug)(
                        "insert into %s failed, retrying in %.2fs (attempt %d): %s", table, delay, attempt,
                        failure.message[:300], extra={"table": table, "rows": rows, "code": failure.code})
                await asyncio.sleep(delay)
        finally:
            if retrying:
                self.scheduler.retry_ended(key)
            if held:
                self.scheduler.unhold(key)

    def _report_held(self, table: str, failure: InsertFailure, rows: int) -> None:
        now = self.clock()
        held = self.held.get(table)
        if held is None or held.error != failure.name:
            held = self.held[table] = Held(table, failure.name, held_advice(failure, self.database, table, self.user),
                                           time.time(), last_logged=float("-inf"))
        held.attempts += 1
        if now - held.last_logged >= HELD_LOG_INTERVAL:
            held.last_logged = now
            log.error("table %s is held: %s. Its rows stay buffered and are retried (nothing is lost, nothing is "
                      "split or dead-lettered); they flow once this is fixed", table, held.advice,
                      extra={"table": table, "error": failure.name, "attempts": held.attempts,
                             "rows_waiting": rows})

    def _release(self, table: str) -> None:
        if not self.held:
            return  # the common case: nothing held, one truth test per insert
        held = self.held.pop(table, None)
        if held is not None:
            log.warning("table %s accepts inserts again after %.0fs held (%s); its rows flow", table,
                        time.time() - held.since, held.error, extra={"table": table, "attempts": held.attempts})

    def unwritten(self, table: str, rows: int, written: int | None, attempts: int) -> int:
        """Rows of a committed insert that ClickHouse says it did not write (0 when it agrees)."""
        if written is None or written == rows:
            return 0
        # 0 rows: a deduplicated insert (a retry, or a replay, of one that committed). Fewer on a
        # retry: part of the batch committed before, and its blocks were deduplicated.
        if written == 0 or (written < rows and attempts > 1):
            return 0
        now = self.clock()
        if now - self._mismatch_logged.get(table, float("-inf")) >= MISMATCH_LOG_INTERVAL or written < rows:
            self._mismatch_logged[table] = now
            if written < rows:
                log.error("ClickHouse wrote %d of the %d rows of an insert into %s: %d are counted as not written. "
                          "Rows that are not one per line, or input_format_allow_errors_* settings, do this",
                          written, rows, table, rows - written,
                          extra={"table": table, "rows_not_written": rows - written})
            else:
                log.warning("ClickHouse reports %d rows written for an insert of %d into %s (materialized views "
                            "count their rows too; otherwise the rows were not one per line)", written, rows, table,
                            extra={"table": table})
        return max(0, rows - written)
