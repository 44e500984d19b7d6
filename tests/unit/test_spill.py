"""The disk-backed buffer's books under disk faults, on real files: the service, the ring and the
spill reader in one process, fdatasync made to fail where a failing disk would."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

import buffer.replay as replay_module
import buffer.wal as wal_module
from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer.catalog import TableCatalog
from buffer.replay import Replay
from buffer.ring import Ring, WhenFull
from buffer.service import IngestService
from buffer.wal import LogFailed, WriteAheadLog, recover

KEY = ("t", "JSONEachRow")
DURABLE = pb.ACK_LEVEL_DURABLE


class Context:
    def __init__(self) -> None:
        self.code: Any = None
        self.trailers: tuple[tuple[str, str], ...] = ()

    def time_remaining(self) -> None:
        return None

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = trailers

    async def abort(self, code: Any, details: str) -> None:
        self.code = code


def raw(i: int, ack: int = pb.ACK_LEVEL_BUFFERED, pad: int = 0, stream: bool = False) -> bytes:
    message = pb.WriteStreamRequest if stream else pb.WriteRequest
    rows = b'{"id":%d%s}\n' % (i, b" " * pad)
    return bytes(message(table="t", format=pb.FORMAT_JSON_EACH_ROW, rows=rows, ack_level=ack).SerializeToString())


def failing_fsyncs(monkeypatch: pytest.MonkeyPatch, count: int, delay: float = 0.0) -> None:
    """The next ``count`` fdatasyncs fail with EIO (after ``delay``, as a slow failing disk would)."""
    real = os.fdatasync
    left = [count]

    def fdatasync(fd: int) -> None:
        if left[0]:
            left[0] -= 1
            if delay:
                import time
                time.sleep(delay)
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not predicate():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


class Setup:
    """A buffer of 200 bytes with the log on; its replay done, so requests spill only for want of room."""

    def __init__(self, path: Path) -> None:
        self.wal = WriteAheadLog(path, sync_interval=30)
        recovered = self.wal.open()
        self.wal.start(asyncio.get_running_loop())
        self.ring = Ring(200, 1000, WhenFull.REJECT)
        self.service = IngestService(self.ring, TableCatalog(("t",), None, "db"), max_request_bytes=500,
                                     block_timeout=0, wal=self.wal)
        self.replay = Replay(self.wal, recovered, self.ring, self.service.spill)
        self.service.replay = self.replay
        self.replay.done.set()
        self.reader: asyncio.Task[None] | None = None

    def in_memory(self) -> list[int]:
        return sorted(lsn for e in self.ring._outstanding.values() for lsn in e.lsns())

    def read(self) -> None:
        self.reader = asyncio.ensure_future(self.replay._read_spilled())

    def free(self) -> None:
        self.ring.release(self.ring.take(KEY, 1000, 10**6))

    async def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        self.wal.close()


@pytest.fixture
async def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Setup]:
    monkeypatch.setattr(wal_module, "FAULT_RETRY", 0.05)
    s = Setup(tmp_path)
    yield s
    await s.close()


async def test_a_spilled_durable_request_whose_fsync_failed_is_never_read_back(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    s = setup
    await s.service.Write(raw(0, pad=170), Context())  # lsn 1 fills memory
    await s.service.Write(raw(1, pad=20), Context())  # lsn 2: onto disk only
    failing_fsyncs(monkeypatch, 1)
    ctx = Context()
    await s.service.Write(raw(2, ack=DURABLE), ctx)  # lsn 3: written, its fsync fails: refused, withdrawn
    assert ctx.code is not None and ctx.code.name == "UNAVAILABLE"
    await until(lambda: s.wal.error is None)
    for i in (3, 4):
        await s.service.Write(raw(i), Context())  # lsns 4, 5
    s.read()
    await asyncio.sleep(0.2)
    s.free()
    await until(lambda: not s.service.spill.active)
    assert s.in_memory() == [2, 4, 5], "the refused one stays out, the one after it comes back"
    assert s.replay.unreadable_requests == 0 and s.ring.ledger.lost_rows == 0
    await asyncio.wait_for(s.replay.caught_up(), 2)
    ledger = s.ring.ledger
    assert ledger.accepted_rows == 4 and ledger.held_rows == 3  # lsn 1 went, 2, 4 and 5 wait


async def test_a_stream_refused_at_a_failed_fsync_lands_none_of_its_later_messages(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    s = setup
    await s.service.Write(raw(0, pad=185), Context())  # lsn 1 fills memory
    failing_fsyncs(monkeypatch, 2, delay=0.2)

    async def stream() -> AsyncIterator[bytes]:
        yield raw(1, ack=DURABLE, stream=True)  # lsn 2: onto disk, its fsync fails
        await asyncio.sleep(0.05)
        yield raw(2, ack=DURABLE, stream=True)  # lsn 3: queued during that fsync; its own fails too

    ctx = Context()
    await s.service.WriteStream(stream(), ctx)
    assert ctx.code.name == "UNAVAILABLE" and dict(ctx.trailers)["accepted-messages"] == "0"
    await asyncio.sleep(0.6)
    await until(lambda: s.wal.error is None)
    s.read()
    s.free()
    await asyncio.sleep(0.3)
    assert s.in_memory() == [], "neither message of the refused stream goes to ClickHouse"
    assert not s.service.spill.active and not s.service.spill.entries


async def test_a_batch_logged_twice_after_a_failed_fsync_is_resent_once_and_nothing_is_left_behind(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wal_module, "FAULT_RETRY", 0.05)
    wal = WriteAheadLog(tmp_path)
    wal.open()
    wal.start(asyncio.get_running_loop())
    lsns = [wal.append(KEY, b'{"id":%d}\n' % i, 1, durable=False)[0] for i in range(10)]
    await wal.sync()
    failing_fsyncs(monkeypatch, 1)
    token = wal.token(lsns[0], lsns[3])
    with pytest.raises(LogFailed):
        await wal.log_batch(token, lsns[:4])  # on disk, not synced: the flusher asks again
    await wal.log_batch(token, lsns[:4])
    monkeypatch.undo()
    wal.close()
    got = recover(tmp_path)
    assert [(b.token, [p.lsn for p in b.parts]) for b in got.pending] == [(token, lsns[:4])]
    assert got.unsettled_requests == 6 and got.unsettled_rows == 10
    again = WriteAheadLog(tmp_path)
    recovered = again.open()
    again.start(asyncio.get_running_loop())
    monkeypatch.setattr(replay_module, "CHUNK_BYTES", 30)  # as a log with several chunks to read back
    ring = Ring(10**6, 10**6, WhenFull.REJECT)
    replay = Replay(again, recovered, ring)
    await replay.start()
    await replay._admit(wait=True)
    in_memory = sorted(lsn for e in ring._outstanding.values() for lsn in e.lsns())
    assert in_memory == lsns, "every request once, the batch's once"
    assert ring.ledger.accepted_rows == 10
    again.close()
