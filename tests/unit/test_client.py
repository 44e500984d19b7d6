"""buffer.client's batching, bounds, resends and futures, over a fake channel (the real server is in
tests/integration/test_client.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from buffer.api import ingest_pb2 as pb
from buffer.client import Ack, Client, ClientClosed, ClientFull, WriteFailed


class FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "", trailers: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers


def ok(request: pb.WriteRequest) -> pb.WriteResponse:
    return pb.WriteResponse(rows=request.rows.count(b"\n"), bytes=len(request.rows), ack_level=pb.ACK_LEVEL_BUFFERED)


class FakeChannel:
    """Answers Write with ``answer(request)`` (a reply, or raises); records every request and when."""

    def __init__(self, answer: Callable[[pb.WriteRequest], pb.WriteResponse] = ok) -> None:
        self.answer = answer
        self.requests: list[tuple[float, pb.WriteRequest]] = []
        self.lock = threading.Lock()

    def stream_stream(self, path: str, *_: Any) -> Callable[..., Iterator[pb.WriteBatchesResponse]]:
        assert path.endswith("/WriteBatches")

        def call(requests: Iterator[bytes], timeout: float | None = None,
                 wait_for_ready: bool | None = None) -> FakeStream:
            return FakeStream(self, requests)

        return call

    def answer_one(self, raw: bytes) -> pb.WriteBatchesResponse:
        request = pb.WriteRequest.FromString(raw)  # the same fields, the same numbers
        with self.lock:
            self.requests.append((time.monotonic(), request))
        try:
            return pb.WriteBatchesResponse(sequence=request.sequence, ok=self.answer(request))
        except FakeError as exc:
            after = dict(exc.trailing_metadata()).get("retry-after-ms", "0")
            return pb.WriteBatchesResponse(sequence=request.sequence, code=exc.code().value[0], message=exc.details(),
                                           retry_after_ms=int(after))

    def close(self) -> None:
        pass

    def rows(self) -> list[int]:
        return [r.rows.count(b"\n") for _, r in self.requests]


class FakeStream:
    """A WriteBatches call: answers each request as the client's request iterator yields it."""

    def __init__(self, channel: FakeChannel, requests: Iterator[bytes]) -> None:
        self.channel, self.requests, self.cancelled = channel, requests, False

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self) -> FakeStream:
        return self

    def __next__(self) -> pb.WriteBatchesResponse:
        raw = next(self.requests)
        if self.cancelled:
            raise FakeError(grpc.StatusCode.CANCELLED, "cancelled")
        return self.channel.answer_one(raw)


def client(channel: FakeChannel, **options: Any) -> Client:
    class Faked(Client):
        def _connect(self) -> Any:
            return channel

    return Faked("fake:0", **options)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_rows_are_batched_by_count_and_share_their_batchs_future() -> None:
    channel = FakeChannel()
    c = client(channel, batch_rows=10, linger=10)
    futures = [c.write("t", {"id": i}) for i in range(25)]
    wait_for(lambda: len(channel.requests) == 2)  # two full batches go at once; the third lingers
    assert len(set(map(id, futures[:10]))) == 1 and futures[0] is not futures[10]
    assert c.flush(5)
    assert sorted(channel.rows()) == [5, 10, 10]
    assert futures[0].result() == Ack(10, len(channel.requests[0][1].rows), "buffered", False)
    assert c.stats()["acknowledged_rows"] == c.stats()["written_rows"] == 25
    c.close()


def test_a_batch_goes_by_bytes_or_after_its_linger_without_a_flush() -> None:
    channel = FakeChannel()
    c = client(channel, batch_bytes=100, linger=0.2)
    c.write("t", b'{"s":"' + b"x" * 120 + b'"}\n')  # alone over batch_bytes: goes at once
    wait_for(lambda: len(channel.requests) == 1, 0.15)
    written = time.monotonic()
    c.write("t", {"id": 1})
    wait_for(lambda: len(channel.requests) == 2)
    assert channel.requests[1][0] - written >= 0.18, "a batch below its bounds waits its linger"
    c.close()


def test_each_table_and_format_has_its_own_batch_and_every_request_a_new_key() -> None:
    channel = FakeChannel()
    c = client(channel)
    c.write("a", {"id": 1})
    c.write("b", {"id": 2})
    c.write("a", b"1,x\n", format="CSV")
    c.write("a", b"2\tx\n", format="TabSeparated")
    assert c.flush(5)
    got = {(r.table, r.format) for _, r in channel.requests}
    assert got == {("a", pb.FORMAT_JSON_EACH_ROW), ("b", pb.FORMAT_JSON_EACH_ROW), ("a", pb.FORMAT_CSV),
                   ("a", pb.FORMAT_TSV)}
    keys = {(r.producer, r.sequence) for _, r in channel.requests}
    assert len(keys) == 4 and len({p for p, _ in keys}) == 1 and all(len(p) == 32 for p, _ in keys)
    c.close()


def test_a_resend_repeats_the_same_request_and_its_future_resolves_once() -> None:
    failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]

    def flaky(request: pb.WriteRequest) -> pb.WriteResponse:
        if failures:
            raise FakeError(failures.pop(0), "try again")
        return ok(request)

    channel = FakeChannel(flaky)
    c = client(channel)
    future = c.write("t", {"id": 1})
    resolved: list[Any] = []
    future.add_done_callback(resolved.append)
    assert c.flush(10)
    assert len(channel.requests) == 3 and len({r.SerializeToString() for _, r in channel.requests}) == 1
    assert resolved == [future] and future.result().rows == 1
    assert c.stats()["resends"] == 2 and c.stats()["failed_rows"] == 0
    c.close()


def test_a_full_buffer_is_waited_out_for_its_retry_after_hint() -> None:
    hinted = [True]

    def full_once(request: pb.WriteRequest) -> pb.WriteResponse:
        if hinted:
            hinted.clear()
            raise FakeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", (("retry-after-ms", "300"),))
        return ok(request)

    channel = FakeChannel(full_once)
    c = client(channel)
    c.write("t", {"id": 1})
    assert c.flush(10)
    (first, _), (second, _) = channel.requests
    assert second - first >= 0.28
    c.close()


def test_a_refusal_that_cannot_succeed_fails_the_future_with_its_status() -> None:
    def missing(request: pb.WriteRequest) -> pb.WriteResponse:
        raise FakeError(grpc.StatusCode.NOT_FOUND, f"table {request.table} does not exist")

    channel = FakeChannel(missing)
    c = client(channel)
    future = c.write("nope", {"id": 1})
    assert not c.flush(5)
    error = future.exception(5)
    assert isinstance(error, WriteFailed) and error.code is grpc.StatusCode.NOT_FOUND and error.rows == 1
    assert "nope" in str(error) and len(channel.requests) == 1
    assert c.stats()["failed_rows"] == 1
    c.close()


def test_resends_stop_after_retry_for_and_the_future_says_why() -> None:
    def down(request: pb.WriteRequest) -> pb.WriteResponse:
        raise FakeError(grpc.StatusCode.UNAVAILABLE, "connection refused")

    c = client(FakeChannel(down), retry_for=0.3)
    future = c.write("t", {"id": 1})
    error = future.exception(10)
    assert isinstance(error, WriteFailed) and error.code is grpc.StatusCode.UNAVAILABLE
    c.close(0)


class Gate:
    """A channel answer that holds every call until opened."""

    def __init__(self) -> None:
        self.open = threading.Event()

    def __call__(self, request: pb.WriteRequest) -> pb.WriteResponse:
        assert self.open.wait(10)
        return ok(request)


def test_when_full_raise_refuses_at_once_and_counts_the_rows() -> None:
    gate = Gate()
    c = client(FakeChannel(gate), batch_rows=10, max_rows=20, when_full="raise", linger=0)
    for i in range(20):
        c.write("t", {"id": i})
    started = time.monotonic()
    with pytest.raises(ClientFull, match="max_rows 20"):
        c.write("t", {"id": 20})
    assert time.monotonic() - started < 0.1
    assert c.stats()["refused_rows"] == 1 and c.stats()["held_rows"] == 20
    gate.open.set()
    assert c.flush(5) and c.stats()["acknowledged_rows"] == 20
    c.write("t", {"id": 21})  # room again
    c.close()


def test_when_full_block_waits_for_room_then_raises_after_its_timeout() -> None:
    gate = Gate()
    c = client(FakeChannel(gate), batch_rows=10, max_rows=20, block_timeout=0.3, linger=0)
    for i in range(20):
        c.write("t", {"id": i})
    started = time.monotonic()
    with pytest.raises(ClientFull, match="block_timeout"):
        c.write("t", {"id": 20})
    assert time.monotonic() - started >= 0.28
    threading.Timer(0.2, gate.open.set).start()
    c.write("t", {"id": 21})  # waits until the acknowledgements free room
    assert c.flush(5) and c.stats()["acknowledged_rows"] == 21
    c.close()


def test_close_sends_and_acknowledges_everything_it_was_given() -> None:
    channel = FakeChannel()
    c = client(channel, linger=60)
    futures = [c.write("t", {"id": i}) for i in range(100)]
    assert c.close()
    assert all(f.result(0).rows == 100 for f in futures) and sum(channel.rows()) == 100
    with pytest.raises(ClientClosed):
        c.write("t", {"id": 101})


def test_close_past_its_timeout_fails_what_was_not_acknowledged_and_counts_it() -> None:
    gate = Gate()
    c = client(FakeChannel(gate))
    future = c.write("t", {"id": 1})
    assert not c.close(0.2)
    error = future.exception(0)
    assert isinstance(error, WriteFailed) and "closed before" in str(error)
    assert c.stats()["failed_rows"] == 1 and c.stats()["held_rows"] == 0
    gate.open.set()


def test_bad_rows_are_refused_at_write_with_the_buffers_own_message() -> None:
    c = client(FakeChannel())
    with pytest.raises(ValueError, match="newline"):
        c.write("t", b'{"id":1}')
    with pytest.raises(ValueError, match="row_count"):
        c.write("t", b"\x01\x00", format="RowBinary")
    with pytest.raises(ValueError, match="format"):
        c.write("t", b"x\n", format="Parquet")
    with pytest.raises(TypeError):
        c.write("t", {1: object()})  # orjson: not serializable
    with pytest.raises(ValueError, match="ack_level"):
        Client("fake:0", ack_level="sometimes")
    assert c.stats()["written_rows"] == 0
    c.write("t", b"\x01\x00\x02\x00", format="RowBinary", rows=2)
    assert c.flush(5) and c.stats()["acknowledged_rows"] == 2
    c.close()


def test_writers_that_waited_for_room_share_one_batch_and_none_is_left_behind() -> None:
    gate = Gate()
    c = client(FakeChannel(gate), batch_rows=10, max_rows=20, linger=0)
    for i in range(20):
        c.write("t", {"id": i})
    waiting = [threading.Thread(target=c.write, args=("t", {"id": 100 + k})) for k in range(3)]
    for t in waiting:
        t.start()
    time.sleep(0.2)  # all three wait for room
    gate.open.set()
    for t in waiting:
        t.join(5)
    assert c.flush(5), c.stats()
    stats = c.stats()
    assert stats["acknowledged_rows"] == stats["written_rows"] == 23 and stats["held_rows"] == 0
    c.close()


def test_a_shared_future_cannot_be_cancelled_by_one_of_its_rows() -> None:
    c = client(FakeChannel(), linger=60)
    future = c.write("t", {"id": 1})
    assert not future.cancel()
    assert c.close(5) and future.result(0).rows == 1


def test_a_row_too_large_for_any_request_is_refused_at_write_and_blocks_nothing() -> None:
    channel = FakeChannel()
    c = client(channel, max_request_bytes=1000, batch_bytes=1000)
    with pytest.raises(ValueError, match="max_request_bytes"):
        c.write("t", {"s": "x" * 2000})
    with pytest.raises(ValueError, match="batch_bytes"):
        Client("fake:0", batch_bytes=2000, max_request_bytes=1000)
    c.write("t", {"id": 1})
    assert c.flush(5) and sum(channel.rows()) == 1
    c.close()


def test_a_second_table_opens_its_batch_with_the_room_that_is_left() -> None:
    """Room is reserved a batch at a time: a second table's first row gets what is left, not a refusal."""
    gate = Gate()
    c = client(FakeChannel(gate), batch_rows=10_000, max_rows=10_000, when_full="raise", linger=60)
    c.write("a", {"id": 1})
    c.write("b", {"id": 2})  # not refused: "a" took half the room
    with pytest.raises(ClientFull):
        for i in range(10_000):
            c.write("a", {"id": i})
    assert 7_000 <= c.stats()["held_rows"] <= 10_000
    gate.open.set()
    assert c.flush(5)
    c.close()


async def test_an_async_callers_timeout_leaves_the_batchs_other_rows_acknowledged() -> None:
    import asyncio

    from buffer.client import AsyncClient

    gate = Gate()

    class Faked(AsyncClient):
        def __init__(self) -> None:
            self._client = client(FakeChannel(gate), linger=0)

    c = Faked()
    first = await c.write("t", {"id": 1})
    second = await c.write("t", {"id": 2})
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(first, 0.05)
    gate.open.set()
    assert (await asyncio.wait_for(second, 5)).rows == 2
    await c.close()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 2_097_152, 5_000_001])
def test_a_request_built_with_its_rows_appended_parses_as_the_message_protobuf_would_build(size: int) -> None:
    from buffer.client import _with_rows

    rows = bytearray(b"r" * size)
    head = pb.WriteBatchesRequest(table="t", format=pb.FORMAT_CSV, row_count=3, ack_level=pb.ACK_LEVEL_DURABLE,
                                  producer="p", sequence=2 ** 40)
    built = pb.WriteBatchesRequest.FromString(_with_rows(head, rows))
    head.rows = bytes(rows)
    assert built == head and built.rows == bytes(rows)
