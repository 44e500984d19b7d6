"""buffer.client against a real buffer on a real port and the real ClickHouse engine: 1-row writes from
one thread, from 16, from an asyncio app; failures reach the futures; cut connections never
duplicate a row."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from buffer.client import AsyncClient, Client, WriteFailed
from tests.conftest import ClickHouse
from tests.faultproxy import FaultProxy


def distinct(clickhouse: ClickHouse, table: str = "t") -> int:
    return int(clickhouse.command(f"SELECT uniqExact(id) FROM {clickhouse.database}.{table}"))


async def test_one_thread_of_1_row_writes_lands_every_row_once(clickhouse: ClickHouse,
                                                               start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()

    def app() -> tuple[bool, dict[str, int], set[int]]:
        with Client(buf.target, batch_rows=1000) as client:
            futures = {id(client.write("t", {"id": i, "s": f"row {i}"})): None for i in range(20_000)}
            ok = client.flush(30)
            return ok, client.stats(), set(futures)

    ok, stats, futures = await asyncio.to_thread(app)
    assert ok
    assert stats["written_rows"] == stats["acknowledged_rows"] == 20_000 and stats["failed_rows"] == 0
    assert stats["held_rows"] == 0 and stats["batches_sent"] >= 20
    assert len(futures) <= stats["batches_sent"], "rows share their batch's future"
    await buf.flush()
    assert clickhouse.count("t") == 20_000 and distinct(clickhouse) == 20_000


async def test_sixteen_threads_share_one_client(clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()

    def app() -> dict[str, int]:
        client = Client(buf.target)

        def thread(k: int) -> None:
            for i in range(2000):
                client.write("t", {"id": k * 2000 + i, "s": "x"})

        threads = [threading.Thread(target=thread, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert client.close(30)
        return client.stats()

    stats = await asyncio.to_thread(app)
    assert stats["acknowledged_rows"] == 32_000
    await buf.flush()
    assert clickhouse.count("t") == 32_000 and distinct(clickhouse) == 32_000


async def test_an_asyncio_app_awaits_acks_and_committed_flush(clickhouse: ClickHouse,
                                                               start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    async with AsyncClient(buf.target, ack_level="buffered") as client:
        futures = [await client.write("t", {"id": i, "s": "a"}) for i in range(5000)]
        first = await futures[0]
        assert first.rows >= 1 and first.ack_level == "buffered" and not first.duplicate
        assert await client.flush(30, committed=True)
        assert clickhouse.count("t") == 5000, "a committed flush returns once ClickHouse has the rows"
        await asyncio.gather(*futures)


async def test_a_failed_batch_fails_its_future_with_the_status_and_other_tables_land(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()

    def app() -> tuple[BaseException | None, dict[str, int], bool]:
        with Client(buf.target) as client:
            good = client.write("t", {"id": 1, "s": "ok"})
            bad = client.write("missing", {"id": 2})
            ok = client.flush(30)
            good.result(5)
            return bad.exception(5), client.stats(), ok

    error, stats, ok = await asyncio.to_thread(app)
    assert not ok, "flush says a batch failed"
    assert isinstance(error, WriteFailed) and error.code is grpc.StatusCode.NOT_FOUND and error.rows == 1
    assert "missing" in error.details
    assert stats["failed_rows"] == 1 and stats["acknowledged_rows"] == 1
    await buf.flush()
    assert clickhouse.count("t") == 1


async def test_malformed_bytes_are_refused_at_write_and_nothing_else_is_lost(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer()

    def app() -> None:
        with Client(buf.target) as client:
            client.write("t", b'{"id":1,"s":"a"}\n{"id":2,"s":"b"}\n')
            with pytest.raises(ValueError, match="newline"):
                client.write("t", b'{"id":3}')
            with pytest.raises(ValueError, match="format"):
                client.write("t", b"3,x\n", format="Parquet")
            client.write("t", b'4,"csv"\n', format="CSV")
            with pytest.raises(TypeError):
                client.write("t", ["not", "a", "row"])  # type: ignore[arg-type]
            assert client.flush(30)

    await asyncio.to_thread(app)
    await buf.flush()
    assert clickhouse.count("t") == 3


async def test_connections_cut_many_times_mid_call_never_duplicate_a_row(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    """The proxy between client and buffer drops the buffer's answers on open connections (the rows
    were taken, the client never hears it), resets connections or cuts requests mid-way, 40 times while rows are written
    without pause: every row lands, once, and the buffer answered resends it had taken as duplicates."""
    clickhouse.create("t")
    buf = await start_buffer()
    host, port = buf.target.rsplit(":", 1)
    proxy = FaultProxy(host, int(port)).start()
    rng = random.Random(7)
    try:
        def app() -> tuple[int, dict[str, int]]:
            done = threading.Event()

            def faults() -> None:
                # First, for certain: a batch taken by the buffer whose answer never arrives.
                proxy.set("mute", close_open=False)
                time.sleep(0.3)
                proxy.set("pass")
                for _ in range(39):
                    time.sleep(rng.uniform(0.02, 0.08))
                    mode = rng.choice(["mute", "drop_responses", "reset", "cut"])
                    proxy.set(mode, cut_after=rng.randint(50, 5000), close_open=mode != "mute")
                    time.sleep(rng.uniform(0.02, 0.1))
                    proxy.set("pass")
                done.set()

            chaos = threading.Thread(target=faults)
            written = 0
            with Client(f"127.0.0.1:{proxy.port}", batch_rows=500, call_timeout=0.5, retry_for=120) as client:
                client.write("t", {"id": written, "s": "r"})
                written += 1
                assert client.flush(10)  # connected before the first fault
                chaos.start()
                while not done.is_set():
                    for _ in range(100):
                        client.write("t", {"id": written, "s": "r"})
                        written += 1
                    time.sleep(0.002)
                chaos.join()
                assert client.flush(120)
                return written, client.stats()

        written, stats = await asyncio.to_thread(app)
    finally:
        proxy.stop()
    print(f"\n{written:,} rows through 40 faults: {proxy.counters.connections} connections, {stats['resends']} "
          f"resends, {stats['duplicates']} answered as duplicates")
    assert stats["acknowledged_rows"] == written and stats["failed_rows"] == 0, stats
    assert stats["resends"] > 0 and proxy.counters.dropped_responses > 0
    assert stats["duplicates"] > 0, ("some resends repeated a batch the buffer had taken", stats, proxy.counters)
    await buf.flush()
    assert clickhouse.count("t") == written and distinct(clickhouse) == written


async def test_a_full_buffer_holds_the_client_back_and_nothing_is_lost(clickhouse: ClickHouse,
                                                                        start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(buffer_max_rows=2000, when_full="reject", flush_interval="200ms")

    def app() -> dict[str, int]:
        with Client(buf.target, batch_rows=500) as client:
            for i in range(20_000):
                client.write("t", {"id": i, "s": "f"})
            assert client.flush(60)
            return client.stats()

    stats = await asyncio.to_thread(app)
    assert stats["acknowledged_rows"] == 20_000 and stats["resends"] > 0, "RESOURCE_EXHAUSTED was waited out"
    await buf.flush()
    assert clickhouse.count("t") == 20_000 and distinct(clickhouse) == 20_000
