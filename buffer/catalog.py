"""Which tables a client may write to.

With an allowlist (``--tables``) the answer never needs ClickHouse. Without one, any table that
exists in the configured database is allowed: the list is read from ``system.tables`` and read
again (at most once a second) when a client names a table it does not know yet. While ClickHouse
cannot be asked at all, names are let through with a warning rather than refusing every write;
the flusher then reports a missing table as a permanent error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from buffer.framing import RequestError

log = logging.getLogger(__name__)


class TableCatalog:
    def __init__(self, allowlist: tuple[str, ...], list_tables: Callable[[], set[str]] | None,
                 database: str, refresh_interval: float = 1.0) -> None:
        self.allowlist = frozenset(allowlist)
        self.list_tables = list_tables
        self.database = database
        self.refresh_interval = refresh_interval
        self.known: set[str] = set()
        self.reachable: bool | None = None  # None until the first look-up
        self._last_refresh = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        if self.list_tables is None:
            return
        if self._refreshing is None:
            self._refreshing = asyncio.create_task(self._refresh())
        task = self._refreshing
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._refreshing = None

    async def _refresh(self) -> None:
        assert self.list_tables is not None
        self._last_refresh = time.monotonic()
        try:
            self.known = await asyncio.to_thread(self.list_tables)
            if self.reachable is False:
                log.info("ClickHouse answers again: %d tables in %s", len(self.known), self.database)
            self.reachable = True
        except Exception as exc:
            if self.reachable is not False:
                log.warning("cannot list the tables of %s in ClickHouse (%s); table names are accepted "
                            "unverified until it answers", self.database, exc)
            self.reachable = False

    def allows(self, table: str) -> bool:
        """True when the table is known to be allowed, without asking ClickHouse (the fast path)."""
        return table in self.allowlist if self.allowlist else table in self.known

    async def check(self, table: str) -> None:
        """Raises RequestError(NOT_FOUND) for a table the client may not write to."""
        if self.allowlist:
            if table not in self.allowlist:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"table {table!r} is not in this buffer's allowlist "
                                   f"({', '.join(sorted(self.allowlist))}); add it to --tables", "not_allowed")
            return
        if table in self.known:
            return
        if time.monotonic() - self._last_refresh >= self.refresh_interval:
            await self.refresh()
        if table in self.known:
            return
        if self.reachable is False:
            return
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"table {table!r} does not exist in database {self.database!r}: create it first "
                           "(the buffer never creates tables)", "unknown_table")
