"""Wires the buffer together and runs it: which part gets what, and the order of the routines.

The parts: the ledger (what became of every row), the lifecycle (the enabled flag and the drain:
see ``lifecycle``), the ring, the flusher, the table catalog, the gRPC service and listener, the
admin routes and listener, telemetry. The routines start in order — admin listener, flusher,
catalog refresher, metrics snapshots, gRPC listener — and the supervisor stops them in reverse on
SIGTERM: the gRPC server first (after the refusal point, letting calls in progress finish), then
the flusher (until the buffer is empty or the deadline), then the rest. The exit code is the
ledger's: whether every accepted row reached ClickHouse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence

from buffer import metrics
from buffer.admin import AdminServer
from buffer.catalog import TableCatalog
from buffer.checks import Finding, embedded_engine_error, startup_checks
from buffer.chhttp import ClickHouseHttp
from buffer.config import Config, parse_listen
from buffer.deadletter import FileDeadLetters, TableDeadLetters
from buffer.errors import clean_message
from buffer.flusher import Flusher
from buffer.ledger import EXIT_CONFIG, EXIT_CRASHED, EXIT_KEPT_IN_LOG, EXIT_OK, EXIT_ROWS_LOST, Ledger
from buffer.lifecycle import Lifecycle
from buffer.replay import Replay
from buffer.ring import Ring, WhenFull
from buffer.routes import AdminRoutes
from buffer.routines import PeriodicRoutine, Routine, Supervisor
from buffer.schedule import FlushPolicy
from buffer.server import GrpcServer
from buffer.service import IngestService
from buffer.sink import ClickHouseSink, Sink, command_text
from buffer.telemetry import Telemetry
from buffer.wal import WriteAheadLog
from buffer.walformat import LogError

log = logging.getLogger(__name__)

__all__ = ["EXIT_CONFIG", "EXIT_CRASHED", "EXIT_KEPT_IN_LOG", "EXIT_OK", "EXIT_ROWS_LOST", "App"]


class App:
    def __init__(self, cfg: Config, *, sink: Sink | None = None,
                 signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.sink: Sink = sink if sink is not None else ClickHouseSink(cfg)
        self.telemetry = Telemetry()
        self.ledger = Ledger()
        self.lifecycle = Lifecycle(cfg.mode, cfg.drain_timeout, cfg.propagation_delay, cfg.linger, clock=clock)
        database = cfg.effective_database()
        user = "" if cfg.is_embedded else cfg.targets()[0].username
        files = FileDeadLetters(cfg.dead_letter_dir, max_file_bytes=min(64 * 1024**2, cfg.dead_letter_max_bytes),
                                max_total_bytes=cfg.dead_letter_max_bytes)
        dead_letters = TableDeadLetters(self.sink.insert, cfg.dead_letter_table, files) if cfg.dead_letter_table \
            else files
        where = f"table {database}.{cfg.dead_letter_table}" if cfg.dead_letter_table \
            else os.path.abspath(cfg.dead_letter_dir)
        policy = FlushPolicy(cfg.flush_max_rows, cfg.flush_max_bytes, cfg.flush_interval, cfg.flush_concurrency,
                             cfg.retry_initial_backoff, cfg.retry_max_backoff)
        self.ring = Ring(cfg.buffer_max_bytes, cfg.buffer_max_rows, WhenFull(cfg.when_full), clock, ledger=self.ledger,
                         batch_rows=policy.max_rows, batch_bytes=policy.max_bytes)
        self.wal = WriteAheadLog(cfg.wal_dir, segment_bytes=cfg.wal_segment_bytes,
                                 sync_interval=cfg.wal_sync_interval, max_bytes=cfg.wal_max_bytes,
                                 database=cfg.effective_database()) if cfg.wal_dir else None
        self.flusher = Flusher(self.ring, self.sink, policy, self.lifecycle, clock=clock,
                               on_batch=metrics.batch_recorder(self.telemetry), tracer=self.telemetry.tracer,
                               dead_letters=dead_letters, dead_letters_where=where, database=database, user=user,
                               wal=self.wal)
        self.catalog = TableCatalog(cfg.tables, self.sink.schema, database)
        self.service = IngestService(self.ring, self.catalog, max_request_bytes=cfg.max_request_bytes,
                                     block_timeout=cfg.block_timeout, on_barrier=self.flusher.wake,
                                     dead_letters=where, wal=self.wal)
        self.grpc = GrpcServer(cfg.grpc_listen, self.service, self.lifecycle)
        self.clickhouse_http = self._clickhouse_http(cfg) if cfg.clickhouse_http_listen else None
        http = parse_listen(cfg.http_listen)
        assert not isinstance(http, str)
        embedded = cfg.targets()[0].embedded_path if cfg.is_embedded else None
        routes = AdminRoutes(self.lifecycle, self.ring, self.flusher, self.telemetry, lambda: self.replay,
                             run_sql=(lambda sql: command_text(self.sink.command(sql))) if embedded else None,
                             embedded_path=embedded or "", database=database, after_sql=self.catalog.refresh,
                             wal=self.wal)
        self.admin = AdminServer(http[0], http[1], routes.table(), local_only=frozenset({("POST", "/drain"),
                                                                                          ("POST", "/sql")}))
        self.replay: Replay | None = None
        self.signals = signals
        self.supervisor: Supervisor | None = None
        self._stop_requested = False
        metrics.register(self.telemetry, self.ledger, self.ring, self.flusher, self.lifecycle, self.wal,
                         lambda: self.replay)

    def _supervisor(self) -> Supervisor:
        # Stopped in reverse: metrics snapshots outlive the flusher, so OTLP sees the whole drain; the
        # replay stops before the flusher, which then counts what it left in the log.
        routines: list[Routine] = [
            self.admin,
            PeriodicRoutine("metrics-snapshot", 1.0, self._snapshot, "could not take a metrics snapshot"),
            self.flusher,
            *([self.replay] if self.replay is not None else []),
            PeriodicRoutine("table-catalog", 30.0, self.catalog.refresh, "could not refresh the list of ClickHouse "
                            "tables"),
            *([self.clickhouse_http] if self.clickhouse_http is not None else []),
            self.grpc]
        return Supervisor(routines, signals=self.signals, on_signal=self._on_signal,
                          on_crash=lambda r, exc: self.lifecycle.crash(r.name, exc), force_exit=self._force_exit)

    def _clickhouse_http(self, cfg: Config) -> ClickHouseHttp:
        address = parse_listen(cfg.clickhouse_http_listen)
        assert not isinstance(address, str)
        target = cfg.targets()[0]
        forward = None if cfg.is_embedded else f"{target.interface}://{target.host}:{target.port}/"
        server = None if cfg.is_embedded else lambda: self.sink.query_rows("SELECT version(), timezone()")[0]
        return ClickHouseHttp(address[0], address[1], self.service, self.catalog, self.lifecycle,
                              database=cfg.effective_database(), max_request_bytes=cfg.max_request_bytes,
                              logged=self.wal is not None, run_read=self.sink.raw_read if cfg.is_embedded else None,
                              forward_to=forward, auth=cfg.clickhouse_http_auth,
                              users_file=cfg.clickhouse_http_users_file,
                              forward_reads=cfg.clickhouse_http_reads == "forward", server_info=server)

    def ready(self) -> bool:
        return self.lifecycle.ready

    async def run(self) -> int:
        """Runs until stopped; returns the process exit code."""
        for warning in self.cfg.warnings:
            log.warning("%s", warning)
        if self.cfg.is_embedded and not await self._open_embedded():
            return EXIT_CONFIG
        if self.wal is not None and not await self._open_log(self.wal):
            return EXIT_CONFIG
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.catalog.refresh(), 10.0)
        await self.run_startup_checks()
        self.supervisor = self._supervisor()
        if self._stop_requested:
            self.supervisor.request_stop()
        try:
            clean = await self.supervisor.run()
        finally:
            if self.wal is not None:
                await asyncio.to_thread(self.wal.close)  # what is queued is written and synced first
        self.lifecycle.stop()
        if self.lifecycle.drained_in is not None:
            self.telemetry.drain_duration.record(self.lifecycle.drained_in)
        self.telemetry.snapshot()
        self.telemetry.shutdown()
        self.sink.close()
        crashed = not clean or bool(self.lifecycle.faults)
        summary = {**self.ledger.summary(), "drain_seconds": None if self.lifecycle.drained_in is None
                   else round(self.lifecycle.drained_in, 3)}
        code = self.ledger.exit_code(crashed)
        line = self.ledger.exit_line(crashed, self.lifecycle.crashed + self.lifecycle.faults,
                                     str(self.wal.directory) if self.wal is not None else "")
        {EXIT_OK: log.info, EXIT_KEPT_IN_LOG: log.warning}.get(code, log.error)("%s", line, extra=summary)
        return code

    async def _open_log(self, wal: WriteAheadLog) -> bool:
        """Opens the log and reads what it holds; False (exit 2) when it cannot be used as it is."""
        try:
            recovered = await asyncio.to_thread(wal.open)
        except LogError as exc:
            log.error("%s", exc, extra={"wal_dir": str(wal.directory)})
            return False
        except OSError as exc:
            log.error("cannot open the write-ahead log in %s: %s; give --wal-dir a writable directory", wal.directory,
                      exc, extra={"wal_dir": str(wal.directory)})
            return False
        damage = recovered.damage
        if damage.corrupt_records:
            log.error("the write-ahead log in %s has %d damaged places (%d bytes) that could not be trusted: "
                      "their rows are skipped and lost; the rest is replayed", wal.directory,
                      damage.corrupt_records, damage.corrupt_bytes,
                      extra={"wal_corrupt_bytes": damage.corrupt_bytes, "wal_corrupt_records": damage.corrupt_records})
        if damage.torn_bytes:
            log.warning("the write-ahead log in %s ended in a torn write (%d bytes, from a crash mid-write); cut off",
                        wal.directory, damage.torn_bytes, extra={"wal_torn_bytes": damage.torn_bytes})
        log.info("write-ahead log in %s: %d segments, %d rows to replay", wal.directory, len(recovered.segments),
                 recovered.unsettled_rows, extra={"wal_dir": str(wal.directory)})
        wal.start(asyncio.get_running_loop())
        self.replay = Replay(wal, recovered, self.ring, self.service.spill)
        self.replay.until(self.lifecycle.remaining)
        self.service.replay = self.replay
        return True

    async def _open_embedded(self) -> bool:
        """The embedded engine either opens now or never will (its path is locked by another process):
        fail the start rather than accept rows that could only be dead-lettered."""
        error = await asyncio.to_thread(embedded_engine_error, self.sink)
        if error is None:
            return True
        log.error("cannot open the embedded ClickHouse engine at %s: %s. chDB lets one process use a path at a time: "
                  "is another ingest-buffer (or chdb program) using it? Stop it, or give this one its own "
                  "--clickhouse-url chdb:///other/path", self.cfg.targets()[0].embedded_path,
                  clean_message(error)[:300])
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

    def stop(self) -> None:
        """Starts a drain and a shutdown, as SIGTERM does (for embedding and tests)."""
        self.lifecycle.terminate("SIGTERM")
        self._stop_requested = True
        if self.supervisor is not None:
            self.supervisor.request_stop()

    async def _snapshot(self) -> None:
        self.telemetry.snapshot()

    def _on_signal(self, sig: signal.Signals) -> None:
        # SIGTERM is Kubernetes stopping the pod: a sidecar lingers for its siblings' last rows.
        # SIGINT is a person at a terminal: no one else is writing, refuse at once.
        if sig is signal.SIGTERM:
            self.lifecycle.terminate(sig.name)
        else:
            self.lifecycle.shutdown(sig.name)

    def _force_exit(self) -> None:
        held, lost = self.ring.rows, self.ledger.lost_rows
        log.error("forced exit: %d buffered rows are lost (%d lost before)", held, lost,
                  extra={"rows_not_flushed": held, "rows_lost": held + lost})
        os._exit(EXIT_ROWS_LOST if held + lost else EXIT_OK)
