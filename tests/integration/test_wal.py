"""The write-ahead log in a running buffer, against the real engine and the HTTP endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from buffer.ledger import EXIT_KEPT_IN_LOG
from tests.conftest import ROOT, ClickHouse
from tests.integration.test_ingest import jrows

J = pb.FORMAT_JSON_EACH_ROW
DURABLE = pb.ACK_LEVEL_DURABLE


def inspect(wal: Path) -> dict[str, Any]:
    """What another process reads in the log (the server keeps running)."""
    out = subprocess.run([sys.executable, "-m", "buffer", "wal", "inspect", str(wal)], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    info: dict[str, Any] = json.loads(out.stdout)
    return info


async def test_a_durable_ok_means_the_row_is_in_the_log_file(clickhouse: ClickHouse, start_buffer: Callable[..., Any],
                                                            tmp_path: Path) -> None:
    clickhouse.create("t")
    wal = tmp_path / "wal"
    buf = await start_buffer(wal_dir=wal, flush_interval="1h")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    reply = await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 3), ack_level=DURABLE))
    assert reply.ack_level == DURABLE and reply.rows == 3
    info = await asyncio.to_thread(inspect, wal)
    assert info["unsettled"]["rows"] == 3, "read back by another process while the buffer holds the rows"
    done = await stub.Flush(pb.FlushRequest())
    assert done.rows_committed == 3 and clickhouse.count("t") == 3
    committed = asyncio.ensure_future(stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(3, 2),
                                                                 ack_level=pb.ACK_LEVEL_COMMITTED)))
    await asyncio.sleep(0.05)
    await stub.Flush(pb.FlushRequest())  # (the flush interval is an hour: the barrier sends them)
    assert (await committed).ack_level == pb.ACK_LEVEL_COMMITTED
    assert clickhouse.count("t") == 5, "COMMITTED works with the log on"
    buf.app.stop()
    assert await asyncio.wait_for(buf.task, 30) == 0
    assert inspect(wal)["unsettled"]["rows"] == 0, "what committed is settled in the log"


async def test_durable_without_a_log_is_refused_naming_the_flag(clickhouse: ClickHouse,
                                                                start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    stub = pb_grpc.IngestServiceStub(buf.channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 1), ack_level=DURABLE))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--wal-dir" in (info.value.details() or "")


async def test_dead_lettered_rows_are_settled_and_not_replayed(clickhouse: ClickHouse, start_buffer: Callable[..., Any],
                                                               tmp_path: Path) -> None:
    clickhouse.create("t")
    wal = tmp_path / "wal"
    buf = await start_buffer(wal_dir=wal, flush_interval="1h")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 4) + b'{"id":"x","s":"bad"}\n',
                                     ack_level=DURABLE))
    done = await stub.Flush(pb.FlushRequest())
    assert (done.rows_committed, done.rows_failed) == (4, 1)
    buf.app.stop()
    assert await asyncio.wait_for(buf.task, 30) == 0
    again = await start_buffer(wal_dir=wal)
    assert again.app.replay is not None and again.app.replay.replayed_rows == 0
    assert clickhouse.count("t") == 4


async def test_rows_a_drain_cannot_flush_stay_in_the_log_and_land_once_at_the_next_start(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any], tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    buf = await start_buffer(wal_dir=wal, drain_timeout="1s", retry_initial_backoff="50ms", retry_max_backoff="100ms",
                             flush_interval="50ms")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    clickhouse.create("t")
    await asyncio.sleep(1.1)  # the catalog sees the new table
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 50), ack_level=DURABLE))
    clickhouse.command(f"DROP TABLE {clickhouse.database}.t")  # ClickHouse refuses every insert now: held
    buf.app.stop()
    code = await asyncio.wait_for(buf.task, 30)
    assert code == EXIT_KEPT_IN_LOG, "nothing lost, rows wait in the log"
    assert buf.app.ledger.summary()["rows_kept_in_log"] == 50
    clickhouse.create("t")
    again = await start_buffer(wal_dir=wal)
    await pb_grpc.IngestServiceStub(again.channel).Flush(pb.FlushRequest())
    query = f"SELECT count(), uniqExact(id) FROM {clickhouse.database}.t"
    assert [int(x) for x in clickhouse.command(query)] == [50, 50]


@contextlib.contextmanager
def tiny_disk(path: Path, size: str = "256k") -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_full_disk_refuses_durable_writes_naming_the_directory_and_the_buffer_stays_up(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any], tmp_path: Path) -> None:
    clickhouse.create("t")
    with tiny_disk(tmp_path / "disk") as disk:
        buf = await start_buffer(wal_dir=disk / "wal", flush_interval="1h", wal_max_bytes="100MiB")
        stub = pb_grpc.IngestServiceStub(buf.channel)
        codes = []
        for i in range(400):  # 400 x ~1.1 KiB: more than the 256 KiB disk
            try:
                row = b'{"id":%d,"s":"%s"}\n' % (i, b"x" * 1000)
                await stub.Write(pb.WriteRequest(table="t", format=J, rows=row, ack_level=DURABLE))
                codes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and str(disk / "wal") in (exc.details() or "")
        accepted = codes.count(grpc.StatusCode.OK)
        assert 0 < accepted < 400
        assert buf.app.lifecycle.ready or buf.app.lifecycle.phase.label == "serving", "the process stays up"
        done = await stub.Flush(pb.FlushRequest())
        assert done.rows_failed == 0 and clickhouse.count("t") == accepted, "every DURABLE OK landed, no refusal did"
        buf.app.stop()
        await asyncio.wait_for(buf.task, 30)
