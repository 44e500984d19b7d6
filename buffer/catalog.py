"""Which tables a client may write to, and what their columns are.

A table is writable when it exists in the configured database and, with an allowlist
(``--tables``), is on it. What exists is read from ClickHouse (``Sink.schema``) at start, every
30 s, and again (at most once a second) when a client names a table not known to exist — so a table
created a moment ago is found, and one that is missing is refused with NOT_FOUND at once, with the
same words the startup check uses, never acknowledged for rows that could only be lost. While
ClickHouse cannot be asked at all, the allowlist alone decides (without one, any valid name is let
through) and a write never waits for ClickHouse to answer; the flusher then holds a missing table's
rows until it appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from buffer.errors import missing_database, missing_table
from buffer.refusals import UnknownTable
from buffer.sink import Schema

log = logging.getLogger(__name__)

CHECK_WAIT = 2.0  # the longest a write to a table not known yet waits for ClickHouse to say it exists


class TableCatalog:
    def __init__(self, allowlist: tuple[str, ...], read_schema: Callable[[], Schema] | None,
                 database: str, refresh_interval: float = 1.0) -> None:
        self.allowlist = frozenset(allowlist)
        self.read_schema = read_schema
        self.database = database
        self.refresh_interval = refresh_interval
        self.schema: Schema | None = None  # None until ClickHouse answered once
        self.reachable: bool | None = None  # None until the first look-up
        self._writable: frozenset[str] = frozenset()
        self._headers: dict[str, frozenset[bytes]] = {}  # table → its column names, for CSV header checks
        self._last_refresh = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        task = self._start_refresh()
        if task is not None:
            await asyncio.shield(task)

    def _start_refresh(self) -> asyncio.Task[None] | None:
        """The refresh under way, or a new one; one at a time, shared by every caller."""
        if self.read_schema is None:
            return None
        if self._refreshing is None:
            self._refreshing = task = asyncio.create_task(self._refresh())
            task.add_done_callback(self._refreshed)
        return self._refreshing

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refreshing = None
        if not task.cancelled() and task.exception() is not None:  # _refresh catches what reading raises
            log.error("refreshing the table catalog failed", exc_info=task.exception())

    async def _refresh(self) -> None:
        assert self.read_schema is not None
        self._last_refresh = time.monotonic()
        try:
            schema = await asyncio.to_thread(self.read_schema)
        except Exception as exc:
            if self.reachable is not False:
                log.warning("cannot read the tables of %s from ClickHouse (%s); %s until it answers", self.database,
                            str(exc)[:300], "the allowlist alone decides which tables are written to"
                            if self.allowlist else "table names are accepted unverified")
            self.reachable = False
            return
        if self.reachable is False:
            log.info("ClickHouse answers again: %d tables in %s", len(schema.columns), self.database)
        self.reachable = True
        self.schema = schema
        tables = frozenset(schema.columns)
        self._writable = tables & self.allowlist if self.allowlist else tables
        self._headers = {t: frozenset(c.encode() for c in cols) for t, cols in schema.columns.items()}

    def allows(self, table: str) -> bool:
        """True when the table is known to be writable, without asking ClickHouse (the fast path)."""
        return table in self._writable

    def columns(self, table: str) -> frozenset[bytes] | None:
        """The table's column names as bytes (None when not known)."""
        return self._headers.get(table)

    def column_order(self, table: str) -> tuple[str, ...] | None:
        """The table's columns in order (None when not known)."""
        return self.schema.columns.get(table) if self.schema is not None else None

    @property
    def settings(self) -> frozenset[str]:
        """The settings ClickHouse knows (empty until it answered)."""
        return self.schema.settings if self.schema is not None else frozenset()

    def column_types(self, table: str) -> dict[str, str]:
        """The types of the columns an insert may name (empty when not known)."""
        return dict(self.schema.inserted.get(table, ())) if self.schema is not None else {}

    def inserted(self, table: str) -> tuple[tuple[str, str], ...] | None:
        """(name, type) of what an insert without a column list takes, in order (None when not known)."""
        return self.schema.inserted.get(table) if self.schema is not None else None

    async def check(self, table: str) -> None:
        """Raises UnknownTable for a table the client may not write to (the slow path)."""
        if self.allowlist and table not in self.allowlist:
            raise UnknownTable(f"table {table!r} is not in this buffer's allowlist "
                               f"({', '.join(sorted(self.allowlist))}); add it to --tables", "not_allowed")
        if table in self._writable:
            return
        if time.monotonic() - self._last_refresh >= self.refresh_interval:
            if self.reachable:
                # ClickHouse answered last time: a table created a moment ago is found now. A write
                # never waits long for it, though: should ClickHouse have gone away, it goes on.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.refresh(), CHECK_WAIT)
            else:
                self._start_refresh()  # ClickHouse has not answered: ask again, but do not wait
        if table in self._writable or self.reachable is not True or self.schema is None:
            return  # writable now, or ClickHouse cannot say: the allowlist (or nothing) decided
        if not self.schema.database_exists:
            raise UnknownTable(missing_database(self.database), "unknown_database")
        raise UnknownTable(missing_table(self.database, table), "unknown_table")
