"""Wires the buffer together and owns its lifecycle: the enabled flag and the drain.

Enabled means: accepting rows and ready (``/readyz`` 200, gRPC health SERVING). The first drain
signal — ``POST /drain`` from a preStop hook, or SIGTERM — turns it off for good: readiness fails,
health goes NOT_SERVING, the flusher flushes eagerly, and one deadline (``--drain-timeout`` from
that first signal) bounds everything that follows. When the buffer *refuses* new rows depends on
the mode:

* gateway: ``--propagation-delay`` after the first signal, so load balancers stop routing here
  first; then writes get UNAVAILABLE and clients go to another replica.
* sidecar: only after SIGTERM plus ``--linger``. A native sidecar's preStop runs beside the
  application's, and its SIGTERM comes after the application exited; an old-style sidecar gets
  SIGTERM together with the application. Either way the application's last rows are accepted.

On SIGTERM the supervisor stops the routines in reverse order: the gRPC server (after the refusal
point, letting in-flight calls finish), then the flusher (drained until empty or the deadline),
then the admin listener. The exit code says whether every accepted row reached ClickHouse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from grpc_health.v1._async import HealthServicer

from buffer.admin import AdminServer, json_body
from buffer.catalog import TableCatalog
from buffer.checks import Finding, startup_checks
from buffer.config import Config, parse_listen
from buffer.deadletter import FileDeadLetters, TableDeadLetters
from buffer.errors import clean_message
from buffer.flusher import BatchResult, Flusher, FlushPolicy
from buffer.ring import Ring, WhenFull
from buffer.routines import PeriodicRoutine, Routine, Supervisor
from buffer.server import GrpcServer
from buffer.service import IngestService
from buffer.sink import ClickHouseSink, Sink
from buffer.telemetry import Telemetry

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_CONFIG = 2
EXIT_ROWS_LOST = 3

# Rows failed for these reasons were dropped on purpose (the configured full policy).
INTENTIONAL = frozenset({"dropped_oldest"})
# Rows failed for these reasons are not lost: they are on disk, in the dead-letter store.
DEAD_LETTERED = "dead_lettered"


def is_lost(reason: str) -> bool:
    return reason not in INTENTIONAL and not reason.startswith(DEAD_LETTERED)


class App:
    def __init__(self, cfg: Config, *, sink: Sink | None = None,
                 signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.clock = clock
        self.sink: Sink = sink if sink is not None else ClickHouseSink(cfg)
        self.telemetry = Telemetry()
        files = FileDeadLetters(cfg.dead_letter_dir, max_file_bytes=min(64 * 1024**2, cfg.dead_letter_max_bytes),
                                max_total_bytes=cfg.dead_letter_max_bytes)
        self.dead_letters: FileDeadLetters | TableDeadLetters = files
        if cfg.dead_letter_table:
            self.dead_letters = TableDeadLetters(self.sink.insert, cfg.dead_letter_table, files)
        self.ring = Ring(cfg.buffer_max_bytes, cfg.buffer_max_rows, WhenFull(cfg.when_full), clock)
        self.flusher = Flusher(
            self.ring, self.sink,
            FlushPolicy(cfg.flush_max_rows, cfg.flush_max_bytes, cfg.flush_interval, cfg.flush_concurrency,
                        cfg.retry_initial_backoff, cfg.retry_max_backoff),
            clock=clock, on_batch=self._record_batch, tracer=self.telemetry.tracer, dead_letters=self.dead_letters)
        database = cfg.effective_database()
        self.catalog = TableCatalog(cfg.tables, None if cfg.tables else self.sink.tables, database)
        self.service = IngestService(self.ring, self.catalog, max_request_bytes=cfg.max_request_bytes,
                                     block_timeout=cfg.block_timeout, on_barrier=self.flusher.wake,
                                     dead_letters=(f"table {database}.{cfg.dead_letter_table}" if cfg.dead_letter_table
                                                   else os.path.abspath(cfg.dead_letter_dir)))
        self.health = HealthServicer()
        # The gRPC limit sits above ours so an oversized payload gets our precise INVALID_ARGUMENT.
        grpc_limit = min(2**31 - 1, max(2 * cfg.max_request_bytes, cfg.max_request_bytes + 1024 * 1024))
        self.grpc = GrpcServer(cfg.grpc_listen, self.service, self.health, max_message_bytes=grpc_limit,
                               before_stop=self._until_refusing, grace=self._grpc_grace,
                               stop_budget=self._grpc_stop_budget)
        http = parse_listen(cfg.http_listen)
        assert not isinstance(http, str)
        self.admin = AdminServer(http[0], http[1], {
            ("GET", "/livez"): self._livez,
            ("GET", "/readyz"): self._readyz,
            ("POST", "/drain"): self._drain_route,
            ("GET", "/metrics"): self._metrics,
        }, local_only=frozenset({("POST", "/drain")}))
        self.catalog_refresher = PeriodicRoutine("table-catalog", 30.0, self.catalog.refresh,
                                                 "could not refresh the list of ClickHouse tables")
        routines: list[Routine] = [self.admin, self.flusher, self.catalog_refresher, self.grpc]
        self.supervisor = Supervisor(routines, signals=signals, on_signal=self._on_signal,
                                     on_crash=self._on_crash, force_exit=self._force_exit)
        self.enabled = False
        self.crashed = False
        self.drain_started: float | None = None
        self.deadline: float | None = None
        self.drained_in: float | None = None
        self.refusing = asyncio.Event()
        self._refuse_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._register_metrics()

    # ----- running --------------------------------------------------------------------------

    async def run(self) -> int:
        """Runs until stopped; returns the process exit code."""
        if self.cfg.is_embedded and not await self._open_embedded():
            return EXIT_CONFIG
        self.enabled = True  # readiness still waits for the gRPC listener (see _readyz)
        if not self.cfg.tables:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.catalog.refresh(), 10.0)
        await self.run_startup_checks()
        clean = await self.supervisor.run()
        self.telemetry.shutdown()
        self.sink.close()
        return self._exit_code(clean)

    async def _open_embedded(self) -> bool:
        """The embedded engine either opens now or never will (its path is locked by another process):
        fail the start rather than accept rows that could only be dead-lettered."""
        try:
            await asyncio.to_thread(self.sink.query_rows, "SELECT 1")
            return True
        except Exception as exc:
            path = self.cfg.targets()[0].embedded_path
            log.error("cannot open the embedded ClickHouse engine at %s: %s. chDB lets one process use a path at "
                      "a time: is another ingest-buffer (or chdb program) using it? Stop it, or give this one "
                      "its own --clickhouse-url chdb:///other/path", path, clean_message(str(exc))[:300])
            return False

    async def run_startup_checks(self) -> list[Finding]:
        user = self.cfg.targets()[0].username if not self.cfg.is_embedded else ""
        try:
            findings = await asyncio.wait_for(asyncio.to_thread(
                startup_checks, self.sink, self.cfg.effective_database(), self.cfg.tables, user), 15.0)
        except TimeoutError:
            findings = [Finding("warning", "ClickHouse did not answer the startup checks within 15s; rows are "
                                           "accepted up to the buffer's capacity and flushed once it answers")]
        for f in findings:
            (log.error if f.level == "error" else log.warning)(f.message, extra={"check": "startup"})
        return findings

    def _exit_code(self, clean: bool) -> int:
        c = self.ring.counters
        failed = dict(c.failed_rows)
        lost = sum(rows for reason, rows in failed.items() if is_lost(reason))
        summary = {"rows_accepted": c.accepted_rows, "rows_committed": c.committed_rows,
                   "rows_failed": failed, "rows_lost": lost,
                   "rows_dead_lettered": self.flusher.dead_lettered_rows,
                   "rows_in_doubt": self.flusher.in_doubt_rows,
                   "dead_letter_rows_deleted": self.dead_letters.lost_rows,
                   "drain_seconds": None if self.drained_in is None else round(self.drained_in, 3)}
        if not clean:
            log.error("exiting after a routine crashed: %s", self.supervisor.crashed, extra=summary)
            return EXIT_CRASHED
        if lost:
            log.error("exiting with %d accepted rows that did not reach ClickHouse", lost, extra=summary)
            return EXIT_ROWS_LOST
        kept = self.flusher.dead_lettered_rows
        log.info("exiting: every accepted row reached ClickHouse" + (
            f" or, {kept} refused for their data, the dead-letter store" if kept else ""), extra=summary)
        return EXIT_OK

    def stop(self) -> None:
        """Starts a drain and a shutdown, as SIGTERM does (for embedding and tests)."""
        self._on_signal(signal.SIGTERM)
        self.supervisor.request_stop()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # strong reference until done
        task.add_done_callback(self._tasks.discard)
        return task

    # ----- the drain ------------------------------------------------------------------------

    def begin_drain(self, source: str) -> None:
        """Idempotent. The first call sets the deadline and turns the enabled flag off."""
        now = self.clock()
        if self.drain_started is None:
            self.drain_started = now
            self.deadline = now + self.cfg.drain_timeout
            self.enabled = False
            self._spawn(self.health.enter_graceful_shutdown())
            self.flusher.drain(self.deadline)
            log.info("drain started by %s: not ready any more; deadline in %.1fs", source, self.cfg.drain_timeout,
                     extra={"mode": self.cfg.mode, "rows_buffered": self.ring.rows})
            self._spawn(self._record_drain())
            if self.cfg.mode == "gateway":
                self._refuse_after(self.cfg.propagation_delay, "propagation delay")
        if source == "SIGTERM" and self.cfg.mode == "sidecar":
            self._refuse_after(self.cfg.linger, "linger")

    def _refuse_after(self, delay: float, why: str) -> None:
        if self._refuse_task is not None:
            return

        async def refuse() -> None:
            assert self.deadline is not None
            wait = max(0.0, min(delay, self.deadline - self.clock()))
            if wait:
                log.info("accepting rows for %.1fs more (%s)", wait, why)
                await asyncio.sleep(wait)
            elif delay > 0:
                log.warning("no %s: the drain deadline (--drain-timeout from the first drain signal) has passed",
                            why)
            self.ring.close()
            self.refusing.set()
            log.info("refusing new rows; flushing %d buffered rows", self.ring.rows)

        self._refuse_task = self._spawn(refuse())

    async def _until_refusing(self) -> None:
        if self._refuse_task is None:
            self.begin_drain("shutdown")
            self._refuse_after(0.0, "shutdown")
        await self.refusing.wait()

    def _remaining(self) -> float:
        return 0.0 if self.deadline is None else max(0.0, self.deadline - self.clock())

    def _grpc_grace(self) -> float:
        # In-flight calls (a COMMITTED write waiting for its flush) get part of what is left.
        return min(5.0, self._remaining() / 2)

    def _grpc_stop_budget(self) -> float:
        return self._remaining() + 2.0 if self.deadline is not None else self.cfg.drain_timeout + 2.0

    async def _record_drain(self) -> None:
        # Drained means empty once no more rows can arrive (a sidecar accepts until SIGTERM).
        await self.refusing.wait()
        await self.ring.emptied.wait()
        assert self.drain_started is not None
        self.drained_in = self.clock() - self.drain_started
        self.telemetry.drain_duration.record(self.drained_in)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.begin_drain(sig.name)

    def _on_crash(self, routine: Routine, exc: BaseException) -> None:
        self.crashed = True
        self.begin_drain(f"crash of {routine.name}")

    def _force_exit(self) -> None:
        lost = self.ring.rows
        log.error("forced exit: %d buffered rows are lost", lost, extra={"rows_not_flushed": lost})
        os._exit(EXIT_ROWS_LOST if lost else EXIT_OK)

    # ----- HTTP routes ----------------------------------------------------------------------

    def ready(self) -> bool:
        return self.enabled and not self.crashed and bool(self.grpc.bound)

    async def _livez(self) -> tuple[int, str, bytes]:
        if self.crashed:
            return json_body(503, {"live": False, "crashed": [name for name, _ in self.supervisor.crashed]})
        return json_body(200, {"live": True})

    async def _readyz(self) -> tuple[int, str, bytes]:
        stats = self.flusher.stats
        body = {"ready": self.ready(), "enabled": self.enabled, "draining": self.drain_started is not None,
                "buffer_rows": self.ring.rows, "buffer_bytes": self.ring.bytes,
                "oldest_row_seconds": round(self.ring.oldest_age(), 3),
                "last_flush_unix": stats.last_success, "last_insert_error": stats.last_error[:300] or None}
        return json_body(200 if body["ready"] else 503, body)

    async def _drain_route(self) -> tuple[int, str, bytes]:
        self.begin_drain("POST /drain")
        if self.cfg.mode == "gateway":
            await self._wait_deadline(self.refusing.wait())
        await self._wait_deadline(self.ring.emptied.wait())
        drained = self.ring.outstanding == 0
        assert self.drain_started is not None
        body = {"drained": drained, "mode": self.cfg.mode, "accepting": not self.ring.closed,
                "rows_buffered": self.ring.rows, "rows_committed": self.ring.counters.committed_rows,
                "seconds": round(self.clock() - self.drain_started, 3),
                "deadline_in": round(self._remaining(), 3)}
        return json_body(200 if drained else 503, body)

    async def _wait_deadline(self, aw: Any) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(aw, self._remaining())

    async def _metrics(self) -> tuple[int, str, bytes]:
        return 200, "text/plain; version=0.0.4; charset=utf-8", self.telemetry.prometheus_text()

    # ----- telemetry ------------------------------------------------------------------------

    def _record_batch(self, result: BatchResult) -> None:
        attrs = {"table": result.key[0]}
        t = self.telemetry
        t.flush_duration.record(result.seconds, attrs)
        if result.committed:
            t.batch_rows.record(result.rows, attrs)
            t.batch_bytes.record(result.bytes, attrs)

    def _register_metrics(self) -> None:
        t, ring, svc, fl = self.telemetry, self.ring, self.service, self.flusher
        c = ring.counters

        def one(value: float) -> Callable[[], Iterable[tuple[float, dict[str, str]]]]:
            return lambda: [(value, {})]

        t.observe("ingest_buffer_received_rows", "rows in requests received (valid framing)",
                  lambda: [(svc.received_rows, {})], unit="{row}")
        t.observe("ingest_buffer_received_requests", "write requests and stream messages received",
                  lambda: [(svc.received_requests, {})])
        t.observe("ingest_buffer_received", "payload bytes received", lambda: [(svc.received_bytes, {})], unit="By")
        t.observe("ingest_buffer_accepted_rows", "rows accepted into the buffer", lambda: [(c.accepted_rows, {})],
                  unit="{row}")
        t.observe("ingest_buffer_accepted", "bytes accepted into the buffer", lambda: [(c.accepted_bytes, {})],
                  unit="By")
        t.observe("ingest_buffer_rejected_requests", "requests refused, by reason",
                  lambda: [(n, {"reason": r}) for r, (n, _) in list(svc.rejected.items())])
        t.observe("ingest_buffer_flushed_rows", "rows ClickHouse acknowledged", lambda: [(c.committed_rows, {})],
                  unit="{row}")
        t.observe("ingest_buffer_flushed", "bytes ClickHouse acknowledged", lambda: [(c.committed_bytes, {})],
                  unit="By")
        t.observe("ingest_buffer_dropped_rows", "accepted rows that will not reach ClickHouse, by reason",
                  lambda: [(n, {"reason": r.split(":")[0], "intentional": str(r in INTENTIONAL).lower()})
                           for r, n in list(c.failed_rows.items()) if not r.startswith(DEAD_LETTERED)],
                  unit="{row}")
        t.observe("ingest_buffer_dead_lettered_rows", "rows ClickHouse refused, kept in the dead-letter store",
                  lambda: [(n, {"error": r.split(":", 1)[1]}) for r, n in list(c.failed_rows.items())
                           if r.startswith(DEAD_LETTERED)], unit="{row}")
        t.observe("ingest_buffer_insert_retries", "insert attempts retried", lambda: [(fl.stats.retries, {})])
        t.observe("ingest_buffer_insert_errors", "failed insert attempts, by ClickHouse error",
                  lambda: [(n, {"error": e}) for e, n in list(fl.stats.errors.items())])
        t.observe("ingest_buffer_buffer_rows", "rows held (queued and in flight)", lambda: [(ring.rows, {})],
                  unit="{row}", kind="gauge")
        t.observe("ingest_buffer_buffer", "bytes held (queued and in flight)", lambda: [(ring.bytes, {})],
                  unit="By", kind="gauge")
        t.observe("ingest_buffer_buffer_capacity_rows", "row capacity", one(ring.max_rows), unit="{row}",
                  kind="gauge")
        t.observe("ingest_buffer_buffer_capacity", "byte capacity", one(ring.max_bytes), unit="By", kind="gauge")
        t.observe("ingest_buffer_blocked_writers", "writes waiting for room", lambda: [(ring.blocked_writers, {})],
                  kind="gauge")
        t.observe("ingest_buffer_oldest_row_age", "age of the oldest row not yet in ClickHouse",
                  lambda: [(ring.oldest_age(), {})], unit="s", kind="gauge")
        t.observe("ingest_buffer_enabled", "1 while accepting rows and ready", lambda: [(int(self.ready()), {})],
                  kind="gauge")
