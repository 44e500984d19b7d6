"""The admin listener's routes: probes, the drain entry point, metrics. They read the lifecycle, the
ledger and the buffer; what they change is the lifecycle (``POST /drain``) and, on the embedded
engine, what `ingest-buffer sql` runs there (``POST /sql``, from this host only)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from buffer import __version__
from buffer.admin import Handler, json_body
from buffer.errors import clean_message
from buffer.flusher import Flusher
from buffer.lifecycle import Lifecycle
from buffer.replay import Replay
from buffer.ring import Ring
from buffer.telemetry import Telemetry
from buffer.wal import WriteAheadLog


class AdminRoutes:
    def __init__(self, lifecycle: Lifecycle, ring: Ring, flusher: Flusher, telemetry: Telemetry,
                 replay: Callable[[], Replay | None] = lambda: None, *,
                 run_sql: Callable[[str], str] | None = None, embedded_path: str = "", database: str = "",
                 after_sql: Callable[[], Awaitable[None]] | None = None, wal: WriteAheadLog | None = None) -> None:
        self.wal = wal
        self.started = time.time()
        self.run_sql = run_sql  # the embedded engine: `ingest-buffer sql` runs here while this process holds it
        self.embedded_path = embedded_path
        self.database = database
        self.after_sql = after_sql  # a statement may have made a table: the catalog looks again
        self.lifecycle = lifecycle
        self.ring = ring
        self.ledger = ring.ledger
        self.flusher = flusher
        self.telemetry = telemetry
        self.replay = replay  # the write-ahead log's reader, once the log is open: rows on disk only

    def table(self) -> dict[tuple[str, str], Handler]:
        return {("GET", "/livez"): self.livez, ("GET", "/readyz"): self.readyz, ("POST", "/drain"): self.drain,
                ("GET", "/metrics"): self.metrics, ("POST", "/sql"): self.sql, ("GET", "/status"): self.status}

    async def status(self, _: bytes = b"") -> tuple[int, str, bytes]:
        """The buffer's state as JSON, for `ingest-buffer top` and scripts (documented in the README):
        counters only grow, so a reader takes rates from two readings."""
        lc, ring, ledger, stats = self.lifecycle, self.ring, self.ledger, self.flusher.stats
        summary = ledger.summary()
        replay = self.replay()
        on_disk = replay.rows_on_disk() if replay is not None else 0
        recent = sorted(stats.insert_seconds)
        tables: dict[str, dict[str, Any]] = {}

        def of(table: str) -> dict[str, Any]:
            return tables.setdefault(table, {"rows": 0, "bytes": 0, "oldest_row_seconds": 0.0})

        now = ring.clock()
        for key in ring.queued_keys():
            rows, size, oldest, _covered = ring.queued(key)
            t = of(key[0])
            t["rows"] += rows
            t["bytes"] += size
            if oldest is not None:
                t["oldest_row_seconds"] = round(max(t["oldest_row_seconds"], now - oldest), 3)
        for table, (rows, size, oldest) in self.flusher.in_flight().items():
            t = of(table)
            t["rows"] += rows
            t["bytes"] += size
            t["oldest_row_seconds"] = round(max(t["oldest_row_seconds"], now - oldest), 3)
        for table in {*stats.table_errors, *(h.table for h in self.flusher.held.values())}:
            of(table)
        for table, t in tables.items():
            held = next((h for h in self.flusher.held.values() if h.table == table), None)
            t["held"] = None if held is None else {"error": held.error, "fix": held.advice,
                                                   "since_unix": round(held.since, 3)}
            t["last_error"] = stats.table_errors.get(table)
        body: dict[str, Any] = {
            "version": __version__, "time_unix": round(time.time(), 3),
            "uptime_seconds": round(time.time() - self.started, 3), "state": lc.phase.label, "ready": lc.ready,
            "mode": lc.mode,
            "buffer": {"rows": ring.rows, "bytes": ring.bytes, "max_rows": ring.max_rows, "max_bytes": ring.max_bytes,
                       "oldest_row_seconds": round(ring.oldest_age(), 3), "when_full": ring.when_full.value},
            "rows": {"received": ledger.received_rows, "accepted": summary["rows_accepted"],
                     "committed": summary["rows_committed"], "dead_lettered": summary["rows_dead_lettered"],
                     "dropped": summary["rows_dropped"], "lost": summary["rows_lost"], "on_disk_only": on_disk},
            "refused_requests": {reason: n for reason, (n, _) in ledger.refused.items()},
            "inserts": {"batches": stats.batches, "retries": stats.retries, "errors": dict(stats.errors),
                        "last_success_unix": stats.last_success, "last_error": stats.last_error[:300] or None,
                        "recent_seconds_p50": _pct(recent, 0.5), "recent_seconds_p99": _pct(recent, 0.99)},
            "protocols": {p: {"ok": c[0], "rows": c[1], "refused": c[2]} for p, c in ledger.protocols.items()},
            "wal": None if self.wal is None else {"disk_bytes": self.wal.disk_bytes, "max_bytes": self.wal.max_bytes,
                                                  "rows_on_disk_only": on_disk},
            "tables": dict(sorted(tables.items())),
        }
        return json_body(200, body)

    async def sql(self, body: bytes = b"") -> tuple[int, str, bytes]:
        """``{"statement": SQL, "path": the engine's path}`` from `ingest-buffer sql` on this host: run in
        this process's embedded engine, which no other process can open while this one holds it."""
        if self.run_sql is None:
            return json_body(409, {"error": "this buffer does not run the embedded engine: run SQL against its "
                                            "ClickHouse"})
        try:
            request = json.loads(body)
            statement, path = str(request["statement"]), str(request.get("path") or self.embedded_path)
            database = str(request.get("database") or self.database)
        except (ValueError, KeyError, TypeError):
            return json_body(400, {"error": 'send {"statement": "...", "path": "...", "database": "..."} as JSON'})
        if not await asyncio.to_thread(_same_path, path, self.embedded_path):
            return json_body(409, {"error": f"this buffer serves the engine at {self.embedded_path}, not {path}"})
        if database != self.database:
            return json_body(409, {"error": f"this buffer runs SQL in the database {self.database}, not {database}"})
        try:
            output = await asyncio.to_thread(self.run_sql, statement)
        except Exception as exc:
            return json_body(400, {"error": clean_message(str(exc))})
        if self.after_sql is not None:
            await self.after_sql()
        return json_body(200, {"output": output})

    async def livez(self, _: bytes = b"") -> tuple[int, str, bytes]:
        if self.lifecycle.crashed:
            return json_body(503, {"live": False, "crashed": self.lifecycle.crashed})
        return json_body(200, {"live": True})

    async def readyz(self, _: bytes = b"") -> tuple[int, str, bytes]:
        lc, ring, stats = self.lifecycle, self.ring, self.flusher.stats
        body: dict[str, Any] = {
            "ready": lc.ready, "phase": lc.phase.label, "enabled": lc.ready, "draining": lc.is_draining,
            "buffer_rows": ring.rows, "buffer_bytes": ring.bytes, "oldest_row_seconds": round(ring.oldest_age(), 3),
            "last_flush_unix": stats.last_success, "last_insert_error": stats.last_error[:300] or None,
            "held_tables": {h.table: {"error": h.error, "fix": h.advice, "since_unix": round(h.since, 3),
                                      "attempts": h.attempts} for h in self.flusher.held.values()},
            "rows_lost": self.ledger.lost_rows,
        }
        if lc.faults:
            body["faults"] = lc.faults
        return json_body(200 if lc.ready else 503, body)

    async def drain(self, _: bytes = b"") -> tuple[int, str, bytes]:
        lc = self.lifecycle
        lc.drain("POST /drain")
        if lc.mode == "gateway":
            await self._until_deadline(lc.refusing.wait())
        await self._until_deadline(self._empty())
        replay = self.replay()
        on_disk = replay.rows_on_disk() if replay is not None else 0
        drained = self.ring.outstanding == 0 and not on_disk
        assert lc.drain_started is not None
        body = {"drained": drained, "mode": lc.mode, "phase": lc.phase.label, "accepting": lc.accepting,
                "rows_buffered": self.ring.rows, "rows_on_disk_only": on_disk, **self.ledger.summary(),
                "seconds": round(lc.clock() - lc.drain_started, 3), "deadline_in": round(lc.remaining(), 3)}
        return json_body(200 if drained else 503, body)

    async def _empty(self) -> None:
        """Until every row is out of memory and off the disk-only queue."""
        replay = self.replay()
        if replay is not None:
            await replay.all_back()
        await self.ring.emptied.wait()

    async def _until_deadline(self, aw: Awaitable[Any]) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(aw, self.lifecycle.remaining())

    async def metrics(self, _: bytes = b"") -> tuple[int, str, bytes]:
        return 200, "text/plain; version=0.0.4; charset=utf-8", self.telemetry.prometheus_text()


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _pct(ordered: list[float], q: float) -> float | None:
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4) if ordered else None
