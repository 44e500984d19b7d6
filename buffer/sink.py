"""Where batches go: ClickHouse through clickhouse-connect (a server over HTTP, or embedded chDB).

Everything here is synchronous and runs in the flusher's worker threads, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from buffer.config import ClickHouseTarget, Config, clickhouse_target

log = logging.getLogger(__name__)

CHDB_MISSING = (
    "the embedded ClickHouse engine is not installed: run `pip install 'ingest-buffer[chdb]'` "
    "or point --clickhouse-url at a server (http://user:pass@host:8123/db)"
)


class SinkUnavailable(RuntimeError):
    """The sink cannot be used at all as configured (e.g. chDB missing); retrying will not help."""


class Sink(Protocol):
    def insert(self, table: str, fmt: str, payload: bytes, token: str) -> None:
        """Inserts the payload; raises on failure. ``token`` deduplicates retries."""

    def tables(self) -> set[str]:
        """Names of the tables in the configured database."""

    def close(self) -> None: ...


def quote_identifier(name: str) -> str:
    """Backtick-quotes an identifier, so a client string can never become SQL."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class ClickHouseSink:
    """A clickhouse-connect client per worker thread, created on first use.

    Created lazily so the buffer starts (and accepts rows) while ClickHouse is unreachable.
    """

    def __init__(self, cfg: Config) -> None:
        self.target: ClickHouseTarget = clickhouse_target(cfg.clickhouse_url)
        self.database = cfg.effective_database()
        self.insert_timeout = cfg.insert_timeout
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._connect()
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _connect(self) -> Any:
        import clickhouse_connect

        t = self.target
        if t.embedded_path is not None:
            try:
                import chdb  # noqa: F401
            except ImportError:
                raise SinkUnavailable(CHDB_MISSING) from None
            dsn = "chdb://" + (t.embedded_path if t.embedded_path != ":memory:" else "memory")
            client = clickhouse_connect.get_client(dsn=dsn)
            if self.database != "default":
                client.command(f"CREATE DATABASE IF NOT EXISTS {quote_identifier(self.database)}")
            client.database = self.database
            return client
        return clickhouse_connect.get_client(
            interface=t.interface, host=t.host, port=t.port, username=t.username, password=t.password,
            database=self.database, send_receive_timeout=self.insert_timeout, connect_timeout=5,
            autogenerate_session_id=False,
        )

    def insert(self, table: str, fmt: str, payload: bytes, token: str) -> None:
        client = self._client()
        client.raw_insert(
            f"{quote_identifier(self.database)}.{quote_identifier(table)}", None, payload,
            settings={"insert_deduplication_token": token}, fmt=fmt,
        )

    def tables(self) -> set[str]:
        result = self._client().query(
            "SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": self.database}
        )
        return {row[0] for row in result.result_rows}

    def command(self, sql: str) -> Any:
        return self._client().command(sql)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # closing is best effort at exit
                log.debug("closing a ClickHouse client failed", exc_info=True)
