"""The data path end to end: a real gRPC server on a real port, the real ClickHouse engine."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from tests.conftest import ClickHouse

J = pb.FORMAT_JSON_EACH_ROW


def jrows(start: int, n: int) -> bytes:
    return b"".join(b'{"id":%d,"s":"row %d"}\n' % (i, i) for i in range(start, start + n))


async def http_get(url: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await asyncio.to_thread(fetch)


async def http_post(url: str) -> tuple[int, dict[str, Any]]:
    def post() -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(url, method="POST", data=b"")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    return await asyncio.to_thread(post)


async def test_unary_writes_land_exactly_once_in_several_tables(clickhouse: ClickHouse,
                                                                start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("a")
    clickhouse.create("b")
    buf = await start_buffer()
    stub = pb_grpc.IngestServiceStub(buf.channel)
    for i in range(20):
        reply = await stub.Write(pb.WriteRequest(table="a" if i % 2 else "b", format=J, rows=jrows(i * 10, 10)))
        assert reply.rows == 10 and reply.ack_level == pb.ACK_LEVEL_BUFFERED
    done = await stub.Flush(pb.FlushRequest())
    assert done.rows_committed == 200 and done.rows_failed == 0
    assert clickhouse.count("a") == 100 and clickhouse.count("b") == 100
    assert int(clickhouse.command(f"SELECT uniqExact(id) FROM {clickhouse.database}.a")) == 100


async def test_stream_of_mixed_tables_and_formats(clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("a")
    clickhouse.create("c")
    buf = await start_buffer(flush_max_rows=250)
    stub = pb_grpc.IngestServiceStub(buf.channel)

    async def messages() -> AsyncIterator[pb.WriteStreamRequest]:
        for i in range(50):
            yield pb.WriteStreamRequest(table="a", format=J, rows=jrows(i * 20, 20))
            yield pb.WriteStreamRequest(table="c", format=pb.FORMAT_CSV, rows=b"%d,\"csv\"\n" % i)

    reply = await stub.WriteStream(messages())
    assert (reply.messages, reply.rows) == (100, 1050)
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("a") == 1000 and clickhouse.count("c") == 50


async def test_committed_ack_means_the_rows_are_in_clickhouse(clickhouse: ClickHouse,
                                                              start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(flush_interval="100ms")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    reply = await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 5), ack_level=pb.ACK_LEVEL_COMMITTED))
    assert reply.ack_level == pb.ACK_LEVEL_COMMITTED
    assert clickhouse.count("t") == 5, "no Flush needed: the reply came after ClickHouse acknowledged"

    async def stream() -> AsyncIterator[pb.WriteStreamRequest]:
        for i in range(3):
            yield pb.WriteStreamRequest(table="t", format=J, rows=jrows(100 + i, 1), ack_level=pb.ACK_LEVEL_COMMITTED)

    sreply = await stub.WriteStream(stream())
    assert sreply.ack_level == pb.ACK_LEVEL_COMMITTED and clickhouse.count("t") == 8


async def test_flush_barrier_does_not_wait_for_the_interval(clickhouse: ClickHouse,
                                                           start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(flush_interval="1h")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 3)))
    await asyncio.sleep(0.1)
    assert clickhouse.count("t") == 0, "an hour-long interval holds the rows"
    done = await asyncio.wait_for(stub.Flush(pb.FlushRequest()), 10)
    assert done.rows_committed == 3 and clickhouse.count("t") == 3


async def test_retried_batch_with_the_same_token_is_not_duplicated(clickhouse: ClickHouse) -> None:
    from buffer.config import load
    from buffer.sink import ClickHouseSink

    clickhouse.create("t")
    sink = ClickHouseSink(load({"clickhouse_url": clickhouse.url, "database": clickhouse.database}, env={}))
    try:
        for _ in range(3):  # as a retry after a lost reply would
            sink.insert("t", "JSONEachRow", jrows(0, 10), token="instance-1-10")
        sink.insert("t", "JSONEachRow", jrows(0, 10), token="instance-11-20")
    finally:
        sink.close()
    assert clickhouse.count("t") == 20


BAD = [
    ({"table": ""}, grpc.StatusCode.INVALID_ARGUMENT, "table is empty"),
    ({"table": "t`; DROP TABLE t; --"}, grpc.StatusCode.INVALID_ARGUMENT, "not a plain table name"),
    ({"format": pb.FORMAT_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT, "format is unset"),
    ({"format": 42}, grpc.StatusCode.INVALID_ARGUMENT, "format is unknown"),
    ({"rows": b""}, grpc.StatusCode.INVALID_ARGUMENT, "rows is empty"),
    ({"rows": b'{"id":1}\n{"id":'}, grpc.StatusCode.INVALID_ARGUMENT, "looks truncated"),
    ({"rows": b"x" * 2000 + b"\n"}, grpc.StatusCode.INVALID_ARGUMENT, "limit of 1024 bytes per request"),
    # Far over gRPC's own default limit (4 MiB): still our precise refusal, never a retryable RESOURCE_EXHAUSTED.
    ({"rows": b"x" * (40 * 1024**2) + b"\n"}, grpc.StatusCode.INVALID_ARGUMENT, "(--max-request-bytes)"),
    ({"rows": b'[{"id":1,"s":"a"},{"id":2,"s":"b"}]\n'}, grpc.StatusCode.INVALID_ARGUMENT,
     "is a JSON array: send its objects, one per line"),
    ({"rows": b'{\n  "id": 1,\n  "s": "a"\n}\n'}, grpc.StatusCode.INVALID_ARGUMENT, "spread over several lines"),
    ({"format": pb.FORMAT_ROW_BINARY, "rows": b"\x01"}, grpc.StatusCode.INVALID_ARGUMENT, "row_count is required"),
    ({"table": "missing"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    ({"ack_level": pb.ACK_LEVEL_DURABLE}, grpc.StatusCode.FAILED_PRECONDITION, "--wal-dir"),
    ({"ack_level": 17}, grpc.StatusCode.INVALID_ARGUMENT, "ack_level 17 is unknown"),
]


async def test_a_batch_given_as_parts_lands_as_their_concatenation(clickhouse: ClickHouse) -> None:
    from buffer.config import load
    from buffer.sink import FILE_CHUNK, ClickHouseSink

    clickhouse.create("t")
    big = jrows(1000, 4000)
    assert len(big) > FILE_CHUNK  # written as it is; the one-row parts around it in joined runs
    parts = [jrows(i, 1) for i in range(1000)] + [big] + [jrows(i, 1) for i in range(5000, 6000)]
    sink = ClickHouseSink(load({"clickhouse_url": clickhouse.url, "database": clickhouse.database}, env={}))
    query = ("SELECT count(), uniqExact(id), min(id), max(id), sum(s = concat('row ', toString(id))) "
             f"FROM {clickhouse.database}.t")
    try:
        sink.insert("t", "JSONEachRow", parts, token="instance-1-2001")
        assert [int(x) for x in clickhouse.command(query)] == [6000, 6000, 0, 5999, 6000]
        sink.insert("t", "JSONEachRow", parts, token="instance-1-2001")  # a retry: nothing twice
        assert clickhouse.count("t") == 6000
        sink.insert("t", "JSONEachRow", parts, token="instance-2002-4002")  # the same parts sent again, whole
        assert [int(x) for x in clickhouse.command(query)] == [12000, 6000, 0, 5999, 12000]
    finally:
        sink.close()


@pytest.mark.parametrize(("override", "code", "words"), BAD, ids=[b[2] for b in BAD])
async def test_bad_input_gets_a_precise_status(clickhouse: ClickHouse, start_buffer: Callable[..., Any],
                                              override: dict[str, Any], code: grpc.StatusCode, words: str) -> None:
    clickhouse.create("t")
    buf = await start_buffer(max_request_bytes=1024, flush_max_bytes=1024)
    stub = pb_grpc.IngestServiceStub(buf.channel)
    fields = {"table": "t", "format": J, "rows": jrows(0, 1), **override}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Write(pb.WriteRequest(**fields))
    assert info.value.code() == code
    assert words in (info.value.details() or "")
    # The buffer is unharmed: a good write right after still lands.
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(7, 1)))
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 1


async def test_garbage_bytes_are_invalid_argument_not_internal(clickhouse: ClickHouse,
                                                              start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    write = buf.channel.unary_unary("/ingestbuffer.v1.IngestService/Write")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await write(b"\xff\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ingestbuffer.v1.WriteRequest" in (info.value.details() or "")
    stream = buf.channel.stream_unary("/ingestbuffer.v1.IngestService/WriteStream")
    good = pb.WriteStreamRequest(table="t", format=J, rows=jrows(0, 1)).SerializeToString()

    async def frames() -> AsyncIterator[bytes]:
        yield good
        yield b"\x0a\xff"  # a length that runs past the end

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stream(frames())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 2 of the stream" in (info.value.details() or "")
    await pb_grpc.IngestServiceStub(buf.channel).Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 1, "the good message before the garbage landed"


async def test_bad_message_ends_the_stream_but_keeps_what_came_before(clickhouse: ClickHouse,
                                                                      start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    stub = pb_grpc.IngestServiceStub(buf.channel)

    async def messages() -> AsyncIterator[pb.WriteStreamRequest]:
        for i in range(3):
            yield pb.WriteStreamRequest(table="t", format=J, rows=jrows(i, 1))
        yield pb.WriteStreamRequest(table="t", format=J, rows=b'{"id":9')
        yield pb.WriteStreamRequest(table="t", format=J, rows=jrows(99, 1))

    call = stub.WriteStream(messages())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 4 of the stream" in (info.value.details() or "")
    assert "3 messages before it, 3 rows, were accepted" in (info.value.details() or "")
    trailers = dict(await call.trailing_metadata() or ())
    assert trailers.get("accepted-messages") == "3"
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 3


async def test_allowlist_refuses_other_tables(clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("ok")
    clickhouse.create("other")
    buf = await start_buffer(tables="ok")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="ok", format=J, rows=jrows(0, 1)))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Write(pb.WriteRequest(table="other", format=J, rows=jrows(0, 1)))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "allowlist" in (info.value.details() or "")


async def test_a_table_created_after_start_is_found(clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("first")
    buf = await start_buffer()
    stub = pb_grpc.IngestServiceStub(buf.channel)
    clickhouse.create("later")
    await asyncio.sleep(1.1)  # the table list is re-read at most once a second
    await stub.Write(pb.WriteRequest(table="later", format=J, rows=jrows(0, 1)))


async def test_full_buffer_rejects_with_retry_hint(clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(when_full="reject", buffer_max_bytes=2048, max_request_bytes=1024,
                             flush_max_bytes=1024, flush_interval="1h")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    payload = jrows(0, 20)  # ~400 bytes
    accepted = 0
    with pytest.raises(grpc.aio.AioRpcError) as info:
        for _ in range(10):
            call = stub.Write(pb.WriteRequest(table="t", format=J, rows=payload))
            await call
            accepted += 1
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "buffer full" in (info.value.details() or "")
    assert dict(info.value.trailing_metadata() or ()).get("retry-after-ms")
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == accepted * 20, "everything accepted before the refusal lands"


async def test_block_policy_waits_for_room_then_accepts(clickhouse: ClickHouse,
                                                        start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(when_full="block", buffer_max_bytes=2048, max_request_bytes=1024,
                             flush_max_bytes=1024, flush_interval="200ms", block_timeout="10s")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await asyncio.gather(*(stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(i * 20, 20)))
                           for i in range(30)))
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 600


async def test_health_reflection_and_probes_follow_the_enabled_flag(clickhouse: ClickHouse,
                                                                   start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(mode="gateway")
    health = health_pb2_grpc.HealthStub(buf.channel)
    check = await health.Check(health_pb2.HealthCheckRequest(service="ingestbuffer.v1.IngestService"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert (await http_get(buf.http + "/readyz"))[0] == 200
    assert (await http_get(buf.http + "/livez"))[0] == 200

    refl = reflection_pb2_grpc.ServerReflectionStub(buf.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    services = [s.name async for r in refl.ServerReflectionInfo(ask()) for s in r.list_services_response.service]
    assert "ingestbuffer.v1.IngestService" in services and "grpc.health.v1.Health" in services

    status, body = await http_post(buf.http + "/drain")
    assert status == 200 and body["drained"] is True and body["accepting"] is False
    check = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert (await http_get(buf.http + "/readyz"))[0] == 503
    assert (await http_get(buf.http + "/livez"))[0] == 200, "draining is alive, not ready"
    stub = pb_grpc.IngestServiceStub(buf.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 1)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "another" in (info.value.details() or "")


async def test_metrics_show_the_flow(clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 7)))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Write(pb.WriteRequest(table="t", format=J, rows=b"{"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Write(pb.WriteRequest(table="t", format=J, rows=b"{}\n", ack_level=pb.ACK_LEVEL_DURABLE))
    await stub.Flush(pb.FlushRequest())
    status, text = await http_get(buf.http + "/metrics")
    assert status == 200
    values = {}
    for line in text.splitlines():
        if line.startswith("ingest_buffer_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["ingest_buffer_accepted_rows_total"] == 7
    assert values["ingest_buffer_flushed_rows_total"] == 7
    assert values['ingest_buffer_rejected_requests_total{reason="truncated"}'] == 1
    assert values['ingest_buffer_rejected_requests_total{reason="no_log"}'] == 1
    assert values["ingest_buffer_buffer_rows"] == 0
    assert any(k.startswith("ingest_buffer_flush_duration_seconds_count") for k in values)
    assert (await http_get(buf.http + "/nope"))[0] == 404


async def test_unix_socket_listener(clickhouse: ClickHouse, start_buffer: Callable[..., Any], tmp_path: Any) -> None:
    clickhouse.create("t")
    sock = tmp_path / "grpc.sock"
    buf = await start_buffer(grpc_listen=f"unix:{sock}")
    assert buf.app.grpc.bound == f"unix:{sock}"
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 2)))
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 2


async def test_poison_rows_fail_a_committed_write_with_the_reason(clickhouse: ClickHouse,
                                                                 start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(flush_interval="50ms")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Write(pb.WriteRequest(table="t", format=J, rows=b'{"id":"not a number"}\n',
                                         ack_level=pb.ACK_LEVEL_COMMITTED))
    assert info.value.code() == grpc.StatusCode.ABORTED
    details = info.value.details() or ""
    assert "1 of 1 rows were refused by ClickHouse and written to the dead-letter store" in details
    assert "Cannot parse input" in details and "dead-letters" in details, "says why, and where they are"
    # The queue is not blocked by it.
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 2), ack_level=pb.ACK_LEVEL_COMMITTED))
    assert clickhouse.count("t") == 2


async def test_a_crashed_routine_makes_the_buffer_unready_and_exit_non_zero(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 4)))

    async def broken() -> None:
        raise RuntimeError("simulated bug in a routine")

    # A routine that dies on its own, as a bug would make it: the supervisor must notice.
    from buffer.routines import PeriodicRoutine

    crash = PeriodicRoutine("doomed", 3600, broken, "never logged")
    crash.run = broken  # type: ignore[method-assign]
    task = asyncio.create_task(crash.run())
    task.add_done_callback(lambda t: buf.app.supervisor._task_done(crash, t))
    await asyncio.wait([task], timeout=1)
    await asyncio.sleep(0)  # done-callbacks run on the next turn of the loop
    assert not buf.app.ready(), "unready at once"
    # The process then stops (draining what it holds first) and exits non-zero: never a hang.
    assert await asyncio.wait_for(buf.task, 20) == 1
    assert [name for name, _ in buf.app.supervisor.crashed] == ["doomed"]
    assert clickhouse.count("t") == 4


async def test_poison_rows_are_dead_lettered_and_the_rest_land(clickhouse: ClickHouse, tmp_path: Any,
                                                               start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(flush_interval="1h")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    for i in range(10):
        rows = jrows(i * 100, 100)
        if i in (2, 7):
            rows = rows.replace(b'{"id":%d,' % (i * 100 + 50), b'{"id":"not a number",')
        await stub.Write(pb.WriteRequest(table="t", format=J, rows=rows))
    done = await stub.Flush(pb.FlushRequest())
    assert (done.rows_committed, done.rows_failed) == (998, 2)
    assert clickhouse.count("t") == 998
    records = [json.loads(line) for p in sorted((tmp_path / "dead-letters").glob("*.jsonl"))
               for line in p.read_text().splitlines()]
    assert len(records) == 2 and all(r["table"] == "t" and r["code"] for r in records)
    assert all('"not a number"' in r["data"] for r in records)
    _, text = await http_get(buf.http + "/metrics")
    assert any(line.startswith("ingest_buffer_dead_lettered_rows_total") and line.endswith(" 2.0")
               for line in text.splitlines())
    # Dead letters are on disk, not lost: the process exits 0.
    buf.app.stop()
    assert await asyncio.wait_for(buf.task, 30) == 0


async def test_dead_letters_can_go_to_a_clickhouse_table(clickhouse: ClickHouse,
                                                         start_buffer: Callable[..., Any]) -> None:
    from buffer.deadletter import TABLE_SCHEMA

    clickhouse.create("t")
    clickhouse.command(TABLE_SCHEMA.format(name=f"{clickhouse.database}.dead_letters"))
    buf = await start_buffer(flush_interval="1h", dead_letter_table="dead_letters", tables="t")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 5) + b'{"id":"x","s":"bad"}\n'))
    done = await stub.Flush(pb.FlushRequest())
    assert (done.rows_committed, done.rows_failed) == (5, 1)
    rows = clickhouse.client.query(
        f"SELECT table, code, error, rows, data FROM {clickhouse.database}.dead_letters").result_rows
    assert len(rows) == 1
    table, code, error, n, data = rows[0]
    assert (table, n, data) == ("t", 1, '{"id":"x","s":"bad"}\n') and code > 0 and error


async def test_a_csv_header_line_is_refused_and_rows_without_it_land(clickhouse: ClickHouse,
                                                                    start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    stub = pb_grpc.IngestServiceStub(buf.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Write(pb.WriteRequest(table="t", format=pb.FORMAT_CSV, rows=b"id,s\n1,a\n2,b\n"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is a header (id,s): send rows only — drop the header line" in (info.value.details() or "")
    done = await stub.Write(pb.WriteRequest(table="t", format=pb.FORMAT_CSV, rows=b"1,a\n2,b\n",
                                            ack_level=pb.ACK_LEVEL_COMMITTED))
    assert done.rows == 2 and clickhouse.count("t") == 2
