"""The disk-backed buffer: with the log on, rows that find memory full go onto disk only and come
back in order. ClickHouse over HTTP behind a proxy that refuses connections plays the outage."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from buffer.ledger import EXIT_KEPT_IN_LOG
from tests.conftest import ClickHouse
from tests.faultproxy import FaultProxy
from tests.integration.test_faults import clickhouse, proxied, proxy  # noqa: F401 (fixtures)
from tests.integration.test_ingest import jrows

J = pb.FORMAT_JSON_EACH_ROW
CAP = 64 * 1024  # the buffer's memory; every test offers several times that
OUTAGE = {"buffer_max_bytes": CAP, "max_request_bytes": 16 * 1024, "flush_max_bytes": CAP // 2,
          "when_full": "reject", "retry_initial_backoff": "50ms", "retry_max_backoff": "100ms",
          "flush_interval": "50ms", "wal_segment_bytes": 64 * 1024}


def post_drain(http: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(http + "/drain", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def counts(ch: ClickHouse) -> list[int]:
    return [int(x) for x in ch.command(f"SELECT count(), uniqExact(id) FROM {ch.database}.t")]


async def write_many(stub: pb_grpc.IngestServiceStub, start: int, requests: int, rows: int = 50,
                     ack: pb.AckLevel = pb.ACK_LEVEL_BUFFERED) -> int:
    for i in range(requests):
        reply = await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(start + i * rows, rows),
                                                 ack_level=ack))
        assert reply.rows == rows
    return requests * rows


async def test_rows_past_the_memory_cap_go_to_disk_and_land_once(
        clickhouse: ClickHouse, proxy: FaultProxy, start_buffer: Callable[..., Any],  # noqa: F811
        tmp_path: Path) -> None:
    clickhouse.create("t")
    buf = await start_buffer(clickhouse_url=proxied(proxy, clickhouse), wal_dir=tmp_path / "wal", **OUTAGE)
    stub = pb_grpc.IngestServiceStub(buf.channel)
    proxy.set("refuse")  # ClickHouse is down
    n = await write_many(stub, 0, 100)  # ~240 KB of rows: nearly 4x the memory, with when_full=reject
    spill = buf.app.service.spill
    assert spill.rows > 0, "past the memory cap, rows wait on disk only"
    assert buf.app.ring.bytes <= CAP, "memory stays within its cap"
    durable = await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(n, 10), ack_level=pb.ACK_LEVEL_DURABLE))
    assert durable.ack_level == pb.ACK_LEVEL_DURABLE, "a DURABLE write onto disk only is acked after its fsync"
    committed = asyncio.ensure_future(stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(n + 10, 10),
                                                                 ack_level=pb.ACK_LEVEL_COMMITTED)))
    await asyncio.sleep(0.3)
    assert not committed.done(), "a COMMITTED write waits for ClickHouse, on disk or not"
    proxy.set("pass")
    assert (await asyncio.wait_for(committed, 30)).ack_level == pb.ACK_LEVEL_COMMITTED
    await stub.Flush(pb.FlushRequest())
    assert counts(clickhouse) == [n + 20, n + 20], "every row once"
    assert spill.rows == 0 and spill.spilled_rows > 0
    ledger = buf.app.ledger
    assert ledger.accepted_rows == ledger.committed_rows == n + 20


async def test_a_flush_waits_for_rows_still_on_disk(clickhouse: ClickHouse, proxy: FaultProxy,  # noqa: F811
                                                    start_buffer: Callable[..., Any], tmp_path: Path) -> None:
    clickhouse.create("t")
    buf = await start_buffer(clickhouse_url=proxied(proxy, clickhouse), wal_dir=tmp_path / "wal", **OUTAGE)
    stub = pb_grpc.IngestServiceStub(buf.channel)
    proxy.set("refuse")
    n = await write_many(stub, 0, 60)
    assert buf.app.service.spill.rows > 0
    flush = asyncio.ensure_future(stub.Flush(pb.FlushRequest()))
    await asyncio.sleep(0.3)
    assert not flush.done()
    proxy.set("pass")
    done = await asyncio.wait_for(flush, 30)
    assert done.rows_failed == 0
    assert counts(clickhouse) == [n, n], "the Flush covered the rows that were on disk only when it was called"


async def test_rows_on_disk_only_at_the_deadline_stay_in_the_log_for_the_next_start(
        clickhouse: ClickHouse, proxy: FaultProxy, start_buffer: Callable[..., Any],  # noqa: F811
        tmp_path: Path) -> None:
    clickhouse.create("t")
    wal = tmp_path / "wal"
    buf = await start_buffer(clickhouse_url=proxied(proxy, clickhouse), wal_dir=wal, drain_timeout="1s", **OUTAGE)
    stub = pb_grpc.IngestServiceStub(buf.channel)
    proxy.set("refuse")
    n = await write_many(stub, 0, 100)
    on_disk = buf.app.service.spill.rows
    assert on_disk > 0
    status, body = await asyncio.to_thread(post_drain, buf.http)
    assert status == 503 and not body["drained"], "rows on disk only are not drained"
    assert body["rows_on_disk_only"] > 0 and body["rows_buffered"] > 0
    buf.app.stop()
    assert await asyncio.wait_for(buf.task, 30) == EXIT_KEPT_IN_LOG
    summary = buf.app.ledger.summary()
    assert summary["rows_kept_in_log"] == n and summary["rows_lost"] == 0
    proxy.set("pass")
    again = await start_buffer(clickhouse_url=proxied(proxy, clickhouse), wal_dir=wal, **OUTAGE)
    stub = pb_grpc.IngestServiceStub(again.channel)
    more = await write_many(stub, n, 5)  # while the last run's rows come back: they queue behind them
    await stub.Flush(pb.FlushRequest())
    assert counts(clickhouse) == [n + more, n + more]
    ledger = again.app.ledger
    assert ledger.committed_rows == ledger.accepted_rows == n + more


async def test_a_full_disk_refuses_with_resource_exhausted_and_loses_nothing(
        clickhouse: ClickHouse, proxy: FaultProxy, start_buffer: Callable[..., Any],  # noqa: F811
        tmp_path: Path) -> None:
    clickhouse.create("t")
    buf = await start_buffer(clickhouse_url=proxied(proxy, clickhouse), wal_dir=tmp_path / "wal",
                             wal_max_bytes=4 * CAP, **OUTAGE)
    stub = pb_grpc.IngestServiceStub(buf.channel)
    proxy.set("refuse")
    accepted = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        for i in range(1000):
            accepted += await write_many(stub, i * 50, 1)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--wal-max-bytes" in (info.value.details() or "")
    assert accepted * 20 > 2 * CAP, "well past the memory cap before the disk bound"
    proxy.set("pass")
    await stub.Flush(pb.FlushRequest())
    assert counts(clickhouse) == [accepted, accepted]
