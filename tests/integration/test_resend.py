"""Keyed Writes (producer, sequence): a resend is answered, never added twice — a real gRPC server on a
real port and the real ClickHouse engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc import aio

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from tests.conftest import ClickHouse
from tests.integration.test_ingest import J, http_get, jrows


def keyed(rows: bytes, sequence: int, producer: str = "p-1", **kw: Any) -> pb.WriteRequest:
    return pb.WriteRequest(table="t", format=J, rows=rows, producer=producer, sequence=sequence, **kw)


async def test_the_same_key_twice_is_answered_with_the_first_reply_and_lands_once(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    stub = pb_grpc.IngestServiceStub(buf.channel)
    first = await stub.Write(keyed(jrows(0, 5), 1))
    again = await stub.Write(keyed(jrows(0, 5), 1))
    other_producer = await stub.Write(keyed(jrows(5, 5), 1, producer="p-2"))
    next_one = await stub.Write(keyed(jrows(10, 5), 2))
    assert (first.rows, first.duplicate) == (5, False)
    assert (again.rows, again.bytes, again.duplicate) == (5, first.bytes, True)
    assert not other_producer.duplicate and not next_one.duplicate
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 15
    _, metrics = await http_get(buf.http + "/metrics")
    assert "ingest_buffer_duplicate_requests_total 1.0" in metrics


async def test_a_resend_after_the_client_gave_up_waits_for_the_first_and_adds_nothing(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    """The case resends are for: the client's call ended (here: cancelled) while the buffer was still
    handling it. The first goes on to the end; the resend gets its outcome."""
    clickhouse.create("t")
    buf = await start_buffer(flush_interval="1h")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    call = stub.Write(keyed(jrows(0, 7), 9, ack_level=pb.ACK_LEVEL_COMMITTED))
    await asyncio.sleep(0.3)  # accepted, waiting for its commit (no flush for an hour)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    resend = asyncio.ensure_future(stub.Write(keyed(jrows(0, 7), 9, ack_level=pb.ACK_LEVEL_COMMITTED)))
    await asyncio.sleep(0.3)
    assert not resend.done(), "the resend waits for the first one's commit"
    await stub.Flush(pb.FlushRequest())
    reply = await asyncio.wait_for(resend, 10)
    assert (reply.rows, reply.duplicate, reply.ack_level) == (7, True, pb.ACK_LEVEL_COMMITTED)
    assert clickhouse.count("t") == 7


async def test_a_refused_write_is_handled_afresh_when_resent(clickhouse: ClickHouse,
                                                             start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(buffer_max_rows=10, when_full="reject", flush_interval="1h")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(keyed(jrows(0, 8), 1))
    with pytest.raises(aio.AioRpcError) as refused:
        await stub.Write(keyed(jrows(8, 8), 2))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    await stub.Flush(pb.FlushRequest())
    reply = await stub.Write(keyed(jrows(8, 8), 2))
    assert (reply.rows, reply.duplicate) == (8, False)
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 16


async def test_a_producer_id_too_long_is_refused_naming_the_bound(clickhouse: ClickHouse,
                                                                  start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    stub = pb_grpc.IngestServiceStub(buf.channel)
    with pytest.raises(aio.AioRpcError) as refused:
        await stub.Write(keyed(jrows(0, 1), 1, producer="x" * 65))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 64" in (refused.value.details() or "")
