"""Where batches go: ClickHouse through clickhouse-connect (a server over HTTP, or embedded chDB).

Everything here is synchronous and runs in the flusher's worker threads, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from buffer.config import ClickHouseTarget, Config
from buffer.errors import error_code, quote_identifier
from buffer.shape import parse as parse_shape

__all__ = ["ClickHouseSink", "Payload", "Schema", "Sink", "SinkUnavailable", "quote_identifier"]

log = logging.getLogger(__name__)

UNKNOWN_DATABASE = 81
FILE_CHUNK = 64 * 1024  # requests smaller than this go to chDB's input file in joined runs

CHDB_MISSING = (
    "the embedded ClickHouse engine is not installed: run `pip install 'ingest-buffer[chdb]'` "
    "or point --clickhouse-url at a server (http://user:pass@host:8123/db)"
)


class SinkUnavailable(RuntimeError):
    """The sink cannot be used at all as configured (e.g. chDB missing); retrying will not help."""


# An insert body: one bytes object, or the requests' payloads in order (not joined yet).
Payload = bytes | Sequence[bytes]


@dataclass(frozen=True)
class Schema:
    """What ClickHouse holds in the configured database: whether it exists, its tables and columns."""

    database_exists: bool
    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # table → column names
    # table → (name, type) of the columns an INSERT without a column list takes (not MATERIALIZED, ALIAS,
    # EPHEMERAL)
    inserted: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    settings: frozenset[str] = frozenset()  # the settings ClickHouse knows (empty: not known)


class Sink(Protocol):
    def insert(self, table: str, fmt: str, payload: Payload, token: str) -> int | None:
        """Inserts the payload (its parts concatenated); raises on failure. ``token`` deduplicates retries;
        ``fmt`` is the key's shape (buffer.shape): a format's name, or one with columns and settings.

        Returns the rows ClickHouse reported written, or None when it does not say.
        """

    def schema(self) -> Schema:
        """The configured database's tables and their columns."""

    def query_rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        """Runs a read-only query (startup checks)."""

    def raw_read(self, sql: str, parameters: dict[str, str], fmt: str | None) -> bytes:
        """Runs a client's read query, read-only; its output as ClickHouse gives it."""

    def command(self, sql: str) -> Any:
        """Runs any statement (`ingest-buffer sql`, on the embedded engine)."""

    def close(self) -> None: ...


class Endpoint:
    """One ClickHouse server (a replica) and what the sink has seen of its health."""

    def __init__(self, target: ClickHouseTarget) -> None:
        self.target = target
        self.name = f"{target.host}:{target.port}" if target.embedded_path is None else "chdb"
        self.down_until = 0.0
        self.failures = 0

    def succeeded(self) -> None:
        self.failures = 0
        self.down_until = 0.0

    def failed(self, now: float) -> None:
        # Passive health: after a failure with no answer, other replicas are preferred for a while
        # that grows with repeated failures (1, 2, 4 … 30 s), then this one is tried again.
        self.failures += 1
        self.down_until = now + min(30.0, 2.0 ** (self.failures - 1))

    @property
    def healthy(self) -> bool:
        return self.down_until <= time.monotonic()


class ClickHouseSink:
    """clickhouse-connect clients, one per worker thread and endpoint, created on first use.

    Created lazily so the buffer starts (and accepts rows) while ClickHouse is unreachable. With
    several endpoints (replicas of the same Replicated tables, so that a retry's deduplication
    token works wherever it lands) inserts stick to the last endpoint that worked, and move to
    another when it stops answering.
    """

    def __init__(self, cfg: Config) -> None:
        self.endpoints = [Endpoint(t) for t in cfg.targets()]
        self.database = cfg.effective_database()
        self.insert_timeout = cfg.insert_timeout
        self.ca_file = cfg.clickhouse_ca_file or None
        self.compression = None if cfg.clickhouse_compression == "none" else cfg.clickhouse_compression
        self.embedded = cfg.is_embedded  # no HTTP body to compress
        # The embedded engine shares this process's cores with the gRPC server, and the flusher
        # already runs inserts side by side: splitting each one's parsing over more threads only
        # adds hand-over work (measured: about 10 % more rows/s with it off).
        self.insert_settings = {"input_format_parallel_parsing": 0} if self.embedded else {}
        self._preferred = 0
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    def _choose(self) -> Endpoint:
        preferred = self.endpoints[self._preferred]
        if preferred.healthy:
            return preferred
        healthy = [e for e in self.endpoints if e.healthy]
        if healthy:
            return healthy[0]
        return min(self.endpoints, key=lambda e: e.down_until)

    def _client(self, endpoint: Endpoint) -> Any:
        clients: dict[str, Any] | None = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        client = clients.get(endpoint.name)
        if client is None:
            client = self._connect(endpoint.target)
            clients[endpoint.name] = client
            with self._lock:
                self._clients.append(client)
        return client

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        endpoint = self._choose()
        try:
            result = fn(self._client(endpoint))
        except SinkUnavailable:
            raise
        except Exception as exc:
            if error_code(exc) is None:  # no answer at all: this endpoint is unhealthy
                endpoint.failed(time.monotonic())
                if len(self.endpoints) > 1:
                    log.warning("ClickHouse endpoint %s did not answer (%s); trying the other replicas",
                                endpoint.name, str(exc)[:200], extra={"endpoint": endpoint.name})
            raise
        if endpoint.failures:
            log.info("ClickHouse endpoint %s answers again", endpoint.name, extra={"endpoint": endpoint.name})
        endpoint.succeeded()
        self._preferred = self.endpoints.index(endpoint)
        return result

    def _connect(self, t: ClickHouseTarget) -> Any:
        import clickhouse_connect

        if t.embedded_path is not None:
            try:
                import chdb  # noqa: F401
            except ImportError:
                raise SinkUnavailable(CHDB_MISSING) from None
            dsn = "chdb://" + (t.embedded_path if t.embedded_path != ":memory:" else "memory")
            client = clickhouse_connect.get_client(dsn=dsn)
            # Never creates the database: a typo in --database must show as a missing database.
            client.database = self.database
            return client
        return clickhouse_connect.get_client(
            interface=t.interface, host=t.host, port=t.port, username=t.username, password=t.password,
            database=self.database, send_receive_timeout=self.insert_timeout, connect_timeout=5,
            autogenerate_session_id=False, ca_cert=self.ca_file, verify=True, compress=False,
        )

    def insert(self, table: str, fmt: str, payload: Payload, token: str) -> int | None:
        parts = [payload] if isinstance(payload, bytes) else payload
        compression = None if self.embedded else self.compression
        if self.embedded:
            # chDB's client writes the body to a file that the engine then reads: the parts go
            # there one after the other, with no joined copy of the batch in memory.
            def body() -> Any:
                return file_chunks(parts)
        else:
            joined = b"".join(parts)
            data = compress(joined, compression) if compression else joined

            def body() -> Any:
                return data
        how = parse_shape(fmt)
        # Names quoted here: clickhouse-connect leaves a name that is quoted already as it is.
        columns = [quote_identifier(c) for c in how.columns] or None
        settings = {**dict(how.settings), "insert_deduplication_token": token, **self.insert_settings}
        summary = self._call(lambda client: client.raw_insert(
            f"{quote_identifier(self.database)}.{quote_identifier(table)}", columns, body(),
            settings=settings, fmt=how.format, compression=compression))
        written = getattr(summary, "summary", {}).get("written_rows")
        return int(written) if written not in (None, "") else None

    def schema(self) -> Schema:
        params = {"db": self.database}
        try:
            tables = self.query_rows("SELECT name FROM system.tables WHERE database = {db:String}", params)
            rows = self.query_rows("SELECT table, name, type, default_kind FROM system.columns WHERE database = "
                                   "{db:String} ORDER BY table, position", params)
            settings = frozenset(str(name) for name, in self.query_rows("SELECT name FROM system.settings"))
        except Exception as exc:
            if error_code(exc) == UNKNOWN_DATABASE:  # every query names the database, so this one says it
                return Schema(False)
            raise
        columns: dict[str, list[str]] = {str(name): [] for name, in tables}
        inserted: dict[str, list[tuple[str, str]]] = {}
        for table, column, type_, kind in rows:
            columns.setdefault(str(table), []).append(str(column))
            if kind not in ("MATERIALIZED", "ALIAS", "EPHEMERAL"):
                inserted.setdefault(str(table), []).append((str(column), str(type_)))
        return Schema(True, {t: tuple(c) for t, c in columns.items()}, {t: tuple(c) for t, c in inserted.items()},
                      settings)

    def query_rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        result = self._call(lambda client: client.query(sql, parameters=parameters))
        return [tuple(r) for r in result.result_rows]

    def raw_read(self, sql: str, parameters: dict[str, str], fmt: str | None) -> bytes:
        """A client's read query, read-only (``readonly=1``: no writes, no settings changed, no table
        functions such as file() or url()), its output as ClickHouse gives it; for the embedded engine,
        which has no users of its own. buffer.chhttp refuses INTO OUTFILE and a second statement first."""
        result = self._call(lambda client: client.raw_query(sql, parameters=parameters or None,
                                                            settings={"readonly": 1}, fmt=fmt))
        return bytes(result)

    def command(self, sql: str) -> Any:
        return self._call(lambda client: client.command(sql))

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # closing is best effort at exit
                log.debug("closing a ClickHouse client failed", exc_info=True)


def command_text(out: Any) -> str:
    """What a statement returned, as `ingest-buffer sql` prints it (DDL and inserts: nothing)."""
    if isinstance(out, (list, tuple)):
        return "\t".join(map(str, out))
    if isinstance(out, (str, int, float)) and out != "":
        return str(out)
    return ""


def file_chunks(parts: Sequence[bytes], size: int = FILE_CHUNK) -> Iterator[bytes]:
    """The parts in order, runs of small ones joined into chunks of about ``size`` bytes (one
    write each, instead of one per 80-byte request), large ones as they are (no copy)."""
    run: list[bytes] = []
    pending = 0
    for part in parts:
        if len(part) >= size:
            if run:
                yield b"".join(run)
                run, pending = [], 0
            yield part
            continue
        run.append(part)
        pending += len(part)
        if pending >= size:
            yield b"".join(run)
            run, pending = [], 0
    if run:
        yield b"".join(run)


def compress(payload: bytes, method: str) -> bytes:
    """Compresses an insert body as ClickHouse's HTTP Content-Encoding expects it."""
    if method == "lz4":
        import lz4.frame

        data: bytes = lz4.frame.compress(payload)
        return data
    if method == "zstd":
        import zstandard

        return zstandard.ZstdCompressor().compress(payload)
    if method == "gzip":
        import gzip

        return gzip.compress(payload, compresslevel=3)
    raise ValueError(f"unknown compression {method!r}")
