"""The table catalog with a fake schema reader: what is writable, what is refused, and that a write
never waits long for ClickHouse."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from buffer.catalog import TableCatalog
from buffer.refusals import UnknownTable
from buffer.sink import Schema


class Reader:
    def __init__(self, schema: Schema | None) -> None:
        self.schema = schema  # None: ClickHouse does not answer
        self.gate: threading.Event | None = None
        self.calls = 0

    def __call__(self) -> Schema:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.schema is None:
            raise ConnectionRefusedError("refused")
        return self.schema


async def test_with_an_allowlist_a_table_must_also_exist() -> None:
    reader = Reader(Schema(True, {"events": ("id", "s")}))
    cat = TableCatalog(("events", "absent"), reader, "app", refresh_interval=0)
    await cat.refresh()
    assert cat.allows("events") and not cat.allows("absent") and cat.columns("events") == {b"id", b"s"}
    with pytest.raises(UnknownTable, match="table 'absent' does not exist in database 'app'") as info:
        await cat.check("absent")
    assert info.value.reason == "unknown_table"
    with pytest.raises(UnknownTable, match="not in this buffer's allowlist"):
        await cat.check("other")
    reader.schema = Schema(False)
    await cat.refresh()
    with pytest.raises(UnknownTable, match="database 'app' does not exist in ClickHouse") as info:
        await cat.check("events")
    assert info.value.reason == "unknown_database" and not cat.allows("events")


async def test_while_clickhouse_does_not_answer_the_allowlist_decides_at_once() -> None:
    reader = Reader(None)
    cat = TableCatalog(("events",), reader, "app", refresh_interval=0)
    await cat.refresh()
    assert cat.reachable is False
    reader.gate = threading.Event()  # from now on a look-up would hang, as a connect to a dead host does
    t0 = time.monotonic()
    await cat.check("events")
    await cat.check("events")
    assert time.monotonic() - t0 < 0.5, "never waits for ClickHouse"
    with pytest.raises(UnknownTable, match="allowlist"):
        await cat.check("other")
    reader.gate.set()
    await asyncio.sleep(0.05)


async def test_a_write_waits_at_most_a_moment_for_a_clickhouse_that_stopped_answering() -> None:
    reader = Reader(Schema(True, {"events": ()}))
    cat = TableCatalog((), reader, "app", refresh_interval=0)
    await cat.refresh()
    reader.gate = threading.Event()
    import buffer.catalog as module

    module.CHECK_WAIT, saved = 0.2, module.CHECK_WAIT
    try:
        t0 = time.monotonic()
        with pytest.raises(UnknownTable):  # what ClickHouse said last: it does not exist
            await cat.check("new_table")
        assert time.monotonic() - t0 < 1.0, "the write got its answer in a moment, not the connect timeout"
    finally:
        module.CHECK_WAIT = saved
        reader.gate.set()
        await asyncio.sleep(0.05)
