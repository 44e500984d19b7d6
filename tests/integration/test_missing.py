"""Tables and databases that do not exist, or stop existing: refused at once, or held until they are back.

Against the real engine and the HTTP endpoint: a write to a table or database that does not exist
gets NOT_FOUND with the startup check's words (with and without --tables), never an OK for rows that
could only be lost; rows already buffered when their table goes away are held, not split or
dead-lettered, and land exactly once when it is back.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from tests.conftest import ClickHouse
from tests.integration.test_ingest import http_get, jrows

J = pb.FORMAT_JSON_EACH_ROW


async def readyz(buf: Any) -> dict[str, Any]:
    _, text = await http_get(buf.http + "/readyz")
    body: dict[str, Any] = json.loads(text)
    return body


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.05)


async def refused(stub: Any, table: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Write(pb.WriteRequest(table=table, format=J, rows=jrows(0, 1)))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
    return info.value.details() or ""


@pytest.mark.parametrize("allowlist", [False, True], ids=["any-table", "tables"])
async def test_a_missing_table_is_refused_at_once_then_accepted_once_created(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any], allowlist: bool) -> None:
    clickhouse.create("present")
    buf = await start_buffer(**({"tables": "present,absent"} if allowlist else {}))
    stub = pb_grpc.IngestServiceStub(buf.channel)
    message = await refused(stub, "absent")
    assert message == (f"table 'absent' does not exist in database '{clickhouse.database}': create it first "
                       "(the buffer never creates tables)")
    clickhouse.create("absent")
    await asyncio.sleep(1.1)  # the catalog asks ClickHouse again at most once a second
    await stub.Write(pb.WriteRequest(table="absent", format=J, rows=jrows(0, 3), ack_level=pb.ACK_LEVEL_COMMITTED))
    assert clickhouse.count("absent") == 3
    assert buf.app.ledger.refused["unknown_table"][0] == 1


@pytest.mark.parametrize("allowlist", [False, True], ids=["any-table", "tables"])
async def test_a_missing_database_is_refused_with_the_startup_checks_words(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any], allowlist: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    database = f"absent_{uuid.uuid4().hex[:8]}"
    buf = await start_buffer(database=database, **({"tables": "events"} if allowlist else {}))
    try:
        stub = pb_grpc.IngestServiceStub(buf.channel)
        advice = (f"database {database!r} does not exist in ClickHouse: create it (CREATE DATABASE `{database}`) "
                  "or fix --database")
        assert await refused(stub, "events") == advice
        assert any(r.getMessage().startswith(advice) for r in caplog.records if r.levelname == "ERROR"), \
            "the startup check said the same"
        assert buf.app.ledger.accepted_rows == 0, "no OK for rows that could only be lost"
        clickhouse.command(f"CREATE DATABASE {database}")
        clickhouse.command(f"CREATE TABLE {database}.events (id UInt64, s String) ENGINE = MergeTree ORDER BY id "
                           "SETTINGS non_replicated_deduplication_window = 100")
        await asyncio.sleep(1.1)
        await stub.Write(pb.WriteRequest(table="events", format=J, rows=jrows(0, 4),
                                         ack_level=pb.ACK_LEVEL_COMMITTED))
        assert int(clickhouse.command(f"SELECT count() FROM {database}.events")) == 4
    finally:
        clickhouse.command(f"DROP DATABASE IF EXISTS {database}")


async def test_a_table_dropped_while_rows_are_buffered_is_held_and_they_land_once_it_is_back(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any], tmp_path: Path) -> None:
    clickhouse.create("t")
    clickhouse.create("other")
    buf = await start_buffer(flush_interval="1h", retry_initial_backoff="0.05s", retry_max_backoff="0.2s")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    for i in range(10):
        await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(i * 100, 100)))
    clickhouse.command(f"DROP TABLE {clickhouse.database}.t")
    barrier = asyncio.ensure_future(stub.Flush(pb.FlushRequest()))  # the barrier flushes now: into a missing table
    await until(lambda: "t" in buf.app.flusher.held)
    body = await readyz(buf)
    assert body["ready"] is True, "a held table is ClickHouse's state: readiness follows the enabled flag"
    assert body["held_tables"]["t"]["error"] == "UNKNOWN_TABLE"
    assert "table 't' does not exist" in body["held_tables"]["t"]["fix"]
    # Other tables keep flowing meanwhile (a second barrier makes their young rows due).
    await stub.Write(pb.WriteRequest(table="other", format=J, rows=jrows(0, 5)))
    second = asyncio.ensure_future(stub.Flush(pb.FlushRequest()))
    # (ClickHouse has them a moment before the flusher has settled them)
    await until(lambda: clickhouse.count("other") == 5 and buf.app.ring.rows == 1000)
    assert not barrier.done() and not second.done() and buf.app.ring.rows == 1000
    clickhouse.create("t")  # the operator re-creates it
    done = await asyncio.wait_for(barrier, 30)
    assert (done.rows_committed, done.rows_failed) == (1000, 0)
    assert (await asyncio.wait_for(second, 30)).rows_failed == 0
    query = f"SELECT count(), uniqExact(id) FROM {clickhouse.database}.t"
    assert [int(x) for x in clickhouse.command(query)] == [1000, 1000], "every row once"
    assert not list((tmp_path / "dead-letters").glob("*.jsonl")), "nothing dead-lettered"
    assert "t" not in (await readyz(buf))["held_tables"]
    buf.app.stop()
    assert await asyncio.wait_for(buf.task, 30) == 0
