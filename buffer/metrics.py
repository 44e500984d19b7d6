"""The buffer's metrics: what each one reads, in one list. Row counts all come from the ledger."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from buffer.flusher import BatchResult, Flusher
from buffer.ledger import Fate, Ledger, Reason
from buffer.lifecycle import Lifecycle
from buffer.replay import Replay
from buffer.ring import Ring
from buffer.telemetry import Telemetry
from buffer.wal import WriteAheadLog

Readings = Callable[[], Iterable[tuple[float, dict[str, str]]]]


def _one(value: Callable[[], float]) -> Readings:
    return lambda: [(value(), {})]


def register(t: Telemetry, ledger: Ledger, ring: Ring, flusher: Flusher, lifecycle: Lifecycle,
             wal: WriteAheadLog | None = None, replay: Callable[[], Replay | None] = lambda: None) -> None:
    fl = flusher

    def not_kept() -> list[tuple[float, dict[str, str]]]:
        # Every reason, at 0 until it happens: an alert on an increase sees a series from the start.
        counts = ledger.by_reason()
        return [(counts.get(r, 0), {"reason": r.label, "intentional": str(r.fate is Fate.DROPPED).lower()})
                for r in Reason if r.fate is not Fate.KEPT]

    def dead_lettered() -> list[tuple[float, dict[str, str]]]:
        return [(n, {"error": o.error}) for o, n in ledger.failed.items() if o.reason is Reason.DEAD_LETTERED]

    t.observe("ingest_buffer_received_rows", "rows in requests received (valid framing)",
              _one(lambda: ledger.received_rows), unit="{row}")
    t.observe("ingest_buffer_received_requests", "write requests and stream messages received",
              _one(lambda: ledger.received_requests))
    t.observe("ingest_buffer_duplicate_requests", "keyed writes resent after the first was accepted: answered with "
              "the first one's reply, their rows not added again", _one(lambda: ledger.duplicate_requests))
    t.observe("ingest_buffer_received", "payload bytes received", _one(lambda: ledger.received_bytes), unit="By")
    t.observe("ingest_buffer_accepted_rows", "rows accepted into the buffer", _one(lambda: ledger.accepted_rows),
              unit="{row}")
    t.observe("ingest_buffer_accepted", "bytes accepted into the buffer", _one(lambda: ledger.accepted_bytes),
              unit="By")
    t.observe("ingest_buffer_protocol_requests", "write requests (stream messages) answered, by the way they came "
              "(grpc, clickhouse_http) and outcome (ok, refused)",
              lambda: [(n, {"protocol": p, "outcome": o}) for p, c in ledger.protocols.items()
                       for o, n in (("ok", c[0]), ("refused", c[2]))])
    t.observe("ingest_buffer_protocol_rows", "rows in write requests answered OK, by the way they came",
              lambda: [(c[1], {"protocol": p}) for p, c in ledger.protocols.items()], unit="{row}")
    t.observe("ingest_buffer_rejected_requests", "requests refused, by reason",
              lambda: [(n, {"reason": r}) for r, (n, _) in ledger.refused.items()])
    t.observe("ingest_buffer_flushed_rows", "rows ClickHouse acknowledged (and wrote)",
              _one(lambda: ledger.committed_rows), unit="{row}")
    t.observe("ingest_buffer_flushed", "bytes ClickHouse acknowledged", _one(lambda: ledger.committed_bytes),
              unit="By")
    t.observe("ingest_buffer_dropped_rows", "accepted rows that will not reach ClickHouse, by reason", not_kept,
              unit="{row}")
    t.observe("ingest_buffer_dead_lettered_rows", "rows ClickHouse refused, kept in the dead-letter store",
              dead_lettered, unit="{row}")
    t.observe("ingest_buffer_insert_retries", "insert attempts retried", _one(lambda: fl.stats.retries))
    t.observe("ingest_buffer_insert_errors", "failed insert attempts, by ClickHouse error",
              lambda: [(n, {"error": e}) for e, n in fl.stats.errors.items()])
    t.observe("ingest_buffer_table_held", "1 for each table whose inserts ClickHouse refuses as a whole (missing, "
              "no grant): its rows wait", lambda: [(1, {"table": h.table, "error": h.error})
                                                   for h in fl.held.values()], kind="gauge")
    t.observe("ingest_buffer_buffer_rows", "rows held (queued and in flight)", _one(lambda: ring.rows),
              unit="{row}", kind="gauge")
    t.observe("ingest_buffer_buffer", "bytes held (queued and in flight)", _one(lambda: ring.bytes), unit="By",
              kind="gauge")
    t.observe("ingest_buffer_buffer_capacity_rows", "row capacity", _one(lambda: ring.max_rows), unit="{row}",
              kind="gauge")
    t.observe("ingest_buffer_buffer_capacity", "byte capacity", _one(lambda: ring.max_bytes), unit="By",
              kind="gauge")
    t.observe("ingest_buffer_blocked_writers", "writes waiting for room", _one(lambda: ring.blocked_writers),
              kind="gauge")
    t.observe("ingest_buffer_oldest_row_age", "age of the oldest row not yet in ClickHouse", _one(ring.oldest_age),
              unit="s", kind="gauge")
    t.observe("ingest_buffer_enabled", "1 while accepting rows and ready", _one(lambda: int(lifecycle.ready)),
              kind="gauge")
    if wal is not None:
        _register_wal(t, wal, replay)


def _register_wal(t: Telemetry, wal: WriteAheadLog, replay: Callable[[], Replay | None]) -> None:
    fsync, groups = t.wal_fsync_duration, t.wal_group_size

    def drain() -> list[tuple[float, dict[str, str]]]:
        # Called on the loop at every snapshot: moves what the writer thread measured into histograms.
        stats = wal.writer.stats if wal.started else None
        if stats is not None:
            while stats.fsync_seconds:
                fsync.record(stats.fsync_seconds.popleft())
            while stats.groups:
                groups.record(stats.groups.popleft())
        return [(wal.disk_bytes, {})]

    def damage(field: str) -> Readings:
        return lambda: [(getattr(wal.recovered.damage, field) if wal.recovered else 0, {})]

    t.observe("ingest_buffer_wal", "bytes of the write-ahead log on disk", drain, unit="By", kind="gauge")
    t.observe("ingest_buffer_wal_capacity", "disk bound of the write-ahead log", _one(lambda: wal.max_bytes),
              unit="By", kind="gauge")
    t.observe("ingest_buffer_wal_segments", "segment files of the write-ahead log", _one(lambda: wal.segments),
              kind="gauge")
    t.observe("ingest_buffer_wal_fsyncs", "fdatasyncs of the write-ahead log",
              _one(lambda: wal.writer.stats.fsyncs if wal.started else 0))
    t.observe("ingest_buffer_wal_replayed_rows", "rows read back from the write-ahead log at start",
              _one(lambda: (r.replayed_rows if (r := replay()) is not None else 0)), unit="{row}")
    t.observe("ingest_buffer_wal_disk_only_rows", "rows accepted onto disk only (memory was full), not yet read back",
              _one(lambda: (r.spill.rows if (r := replay()) is not None else 0)), unit="{row}", kind="gauge")
    t.observe("ingest_buffer_wal_spilled_rows", "rows accepted onto disk only because memory was full",
              _one(lambda: (r.spill.spilled_rows if (r := replay()) is not None else 0)), unit="{row}")
    t.observe("ingest_buffer_wal_torn", "bytes of a torn last write cut off at start", damage("torn_bytes"),
              unit="By")
    t.observe("ingest_buffer_wal_corrupt", "bytes of the log skipped at start as damaged (their rows are lost)",
              damage("corrupt_bytes"), unit="By")
    t.observe("ingest_buffer_wal_failed", "1 while the write-ahead log cannot be written",
              _one(lambda: int(wal.error is not None)), kind="gauge")


def batch_recorder(t: Telemetry) -> Callable[[BatchResult], None]:
    """Records each flushed batch in the histograms (the flusher's on_batch)."""

    def record(result: BatchResult) -> None:
        attrs = {"table": result.key[0]}
        t.flush_duration.record(result.seconds, attrs)
        if result.committed:
            t.batch_rows.record(result.rows, attrs)
            t.batch_bytes.record(result.bytes, attrs)

    return record
