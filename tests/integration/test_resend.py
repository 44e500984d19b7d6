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


async def test_write_batches_answers_each_request_and_a_refusal_does_not_end_the_stream(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    stub = pb_grpc.IngestServiceStub(buf.channel)

    def req(rows: bytes, sequence: int, table: str = "t") -> pb.WriteBatchesRequest:
        return pb.WriteBatchesRequest(table=table, format=J, rows=rows, producer="s-1", sequence=sequence)

    requests = [req(jrows(0, 3), 1), req(jrows(3, 3), 2, table="missing"), req(b'{"id":9}', 3),
                req(jrows(6, 4), 4), req(jrows(6, 4), 4)]
    answers = {}
    async for answer in stub.WriteBatches(iter(requests)):
        answers.setdefault(answer.sequence, []).append(answer)
    assert sorted(answers) == [1, 2, 3, 4] and len(answers[4]) == 2
    assert answers[1][0].HasField("ok") and answers[1][0].ok.rows == 3 and answers[1][0].code == 0
    assert not answers[2][0].HasField("ok")
    assert answers[2][0].code == grpc.StatusCode.NOT_FOUND.value[0] and "missing" in answers[2][0].message
    assert answers[3][0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "newline" in answers[3][0].message
    assert sorted(a.ok.duplicate for a in answers[4]) == [False, True], "the same key twice: one answer a duplicate"
    await buf.flush()
    assert clickhouse.count("t") == 7
