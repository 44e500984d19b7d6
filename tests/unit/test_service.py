"""The gRPC boundary without a network: one table maps refusals to status codes; replies never depend
on ``context.abort`` raising."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from buffer import refusals
from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer.api import ACCEPTED_MESSAGES_KEY, RETRY_AFTER_KEY
from buffer.catalog import TableCatalog
from buffer.ring import Entry, Ring, WhenFull
from buffer.service import STATUS, IngestService

J = pb.FORMAT_JSON_EACH_ROW


class Context:
    """Records what the service tells gRPC; ``abort`` returns instead of raising."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailers: tuple[tuple[str, str], ...] = ()

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details


def service(capacity: int = 1000) -> IngestService:
    ring = Ring(capacity, 1000, WhenFull.REJECT)
    return IngestService(ring, TableCatalog(("t",), None, "db"), max_request_bytes=500, block_timeout=0)


def write(table: str = "t", rows: bytes = b'{"a":1}\n', **kw: Any) -> bytes:
    return bytes(pb.WriteRequest(table=table, format=J, rows=rows, **kw).SerializeToString())


def test_every_refusal_has_a_status() -> None:
    every = {c for c in vars(refusals).values() if isinstance(c, type) and issubclass(c, refusals.Refusal)}
    assert set(STATUS) == every - {refusals.Refusal}, "every kind of refusal has its status"


async def test_a_refused_write_sets_its_status_and_returns_even_when_abort_does_not_raise() -> None:
    svc, ctx = service(), Context()
    reply = await svc.Write(write(table="u"), ctx)  # type: ignore[arg-type]
    assert reply == pb.WriteResponse() and ctx.code == grpc.StatusCode.NOT_FOUND and "allowlist" in ctx.details
    assert svc.ledger.refused == {"not_allowed": [1, len(write(table="u"))]}
    ctx = Context()
    await svc.Write(b"\xff\xff", ctx)  # type: ignore[arg-type]
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid ingestbuffer.v1.WriteRequest" in ctx.details
    ctx = Context()
    await svc.Write(write(ack_level=pb.ACK_LEVEL_DURABLE), ctx)  # type: ignore[arg-type]
    assert ctx.code == grpc.StatusCode.FAILED_PRECONDITION and "--wal-dir" in ctx.details


async def test_a_full_buffer_answers_with_a_retry_hint_and_a_stream_says_what_it_accepted() -> None:
    svc = service(capacity=20)
    svc.ring.offer(Entry(("t", "JSONEachRow"), b"x" * 15, 1))
    ctx = Context()

    async def messages() -> AsyncIterator[bytes]:
        yield bytes(pb.WriteStreamRequest(table="t", format=J, rows=b'{"a":1}\n').SerializeToString())
        yield bytes(pb.WriteStreamRequest(table="t", format=J, rows=b'{"a":2}\n').SerializeToString())

    reply = await svc.WriteStream(messages(), ctx)  # type: ignore[arg-type]
    assert reply == pb.WriteStreamResponse() and ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ctx.details.startswith("message 1 of the stream: buffer full")
    assert dict(ctx.trailers) == {RETRY_AFTER_KEY: "500", ACCEPTED_MESSAGES_KEY: "0"}


async def test_keyed_writes_are_forgotten_past_the_window_even_behind_one_still_handled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A first write that waits long (a COMMITTED one for a held table) must not stop the others going."""
    import asyncio

    import buffer.service as service

    monkeypatch.setattr(service, "REMEMBERED_WRITES", 5)
    svc = service.IngestService.__new__(service.IngestService)
    svc._keyed = {}
    loop = asyncio.get_running_loop()
    slow: asyncio.Future[object] = loop.create_future()  # never answered during the test
    svc._keyed[("p", 0)] = slow  # type: ignore[assignment]
    for k in range(1, 101):
        done: asyncio.Future[object] = loop.create_future()
        done.set_result(object())
        svc._keyed[("p", k)] = done  # type: ignore[assignment]
        svc._keyed_done(("p", k), done)  # type: ignore[arg-type]
    assert len(svc._keyed) == 5 and ("p", 0) in svc._keyed and ("p", 100) in svc._keyed
    slow.cancel()
