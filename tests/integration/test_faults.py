"""The network path under faults: ClickHouse over HTTP through a fault-injecting proxy.

Every test here goes clickhouse-connect → HTTP → tests/faultproxy.py → tests/clickhouse_http.py
(the real engine), and checks rows sent / landed / duplicated.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from buffer.ledger import Fate
from tests.conftest import ClickHouse, HttpEndpoint, open_clickhouse
from tests.faultproxy import FaultProxy

J = pb.FORMAT_JSON_EACH_ROW


def jrows(start: int, n: int) -> bytes:
    return b"".join(b'{"id":%d,"s":"r"}\n' % i for i in range(start, start + n))


@pytest.fixture
def clickhouse(http_endpoint: HttpEndpoint) -> Iterator[ClickHouse]:
    """These tests are about the HTTP path: always the HTTP endpoint (or CLICKHOUSE_TEST_URL's server)."""
    import os

    with open_clickhouse(os.environ.get("CLICKHOUSE_TEST_URL") or http_endpoint.url) as ch:
        yield ch


@pytest.fixture
def proxy(clickhouse: ClickHouse) -> Iterator[FaultProxy]:
    from buffer.config import clickhouse_target

    target = clickhouse_target(clickhouse.url)
    p = FaultProxy(target.host, target.port).start()
    yield p
    p.stop()


needs_test_endpoint = pytest.mark.skipif(
    bool(__import__("os").environ.get("CLICKHOUSE_TEST_URL")),
    reason="injects server errors through tests/clickhouse_http.py, which a real server does not have")


def endpoint_call(endpoint: HttpEndpoint, path: str) -> Any:
    req = urllib.request.Request(endpoint.url + path, method="POST" if "faults" in path else "GET", data=None)
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
    return json.loads(body) if path.startswith("/__stats") else body


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def report(scenario: str, clickhouse: ClickHouse, sent: int, dead_lettered: int = 0) -> None:
    """One line per scenario (pytest -s shows them): rows sent, landed, duplicated, dead-lettered."""
    landed, unique = (int(v) for v in clickhouse.client.query(
        f"SELECT count(), uniqExact(id) FROM {clickhouse.database}.t").result_rows[0])
    print(json.dumps({"scenario": scenario, "sent": sent, "landed": landed, "duplicated": landed - unique,
                      "dead_lettered": dead_lettered}))


def proxied(proxy: FaultProxy, clickhouse: ClickHouse) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(clickhouse.url)
    auth = f"{parts.username}:{parts.password}@" if parts.username else ""
    return f"http://{auth}127.0.0.1:{proxy.port}"


async def test_unreachable_at_start_then_flushes_once_it_appears(
        clickhouse: ClickHouse, proxy: FaultProxy, start_buffer: Callable[..., Any],
        caplog: pytest.LogCaptureFixture) -> None:
    clickhouse.create("t")
    proxy.set("refuse")
    buf = await start_buffer(clickhouse_url=proxied(proxy, clickhouse), retry_initial_backoff="50ms",
                             flush_interval="100ms")
    assert buf.app.ready(), "ready although ClickHouse is down: readiness follows the enabled flag"
    assert any("ClickHouse is not reachable" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    stub = pb_grpc.IngestServiceStub(buf.channel)
    for i in range(5):
        await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(i * 10, 10)))
    await asyncio.sleep(0.5)
    assert clickhouse.count("t") == 0 and buf.app.ring.rows == 50
    proxy.set("pass")
    await until(lambda: buf.app.ring.rows == 0)
    assert clickhouse.count("t") == 50
    report("unreachable at start", clickhouse, 50)


async def test_outage_under_load_fills_buffer_keeps_ready_and_recovers_within_2s(
        clickhouse: ClickHouse, proxy: FaultProxy, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(clickhouse_url=proxied(proxy, clickhouse), when_full="reject",
                             buffer_max_bytes="64KiB", max_request_bytes="4KiB", flush_max_bytes="16KiB",
                             flush_interval="50ms", retry_initial_backoff="50ms")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    acked: list[int] = []
    refused = 0
    ready_seen: set[bool] = set()
    n = 0

    async def write_for(seconds: float) -> None:
        nonlocal n, refused
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(n * 10, 10)))
                acked.extend(range(n * 10, n * 10 + 10))
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                refused += 1
                await asyncio.sleep(0.01)
            n += 1
            ready_seen.add(buf.app.ready())

    await write_for(0.5)
    proxy.set("refuse")
    await write_for(2.0)
    assert refused > 0, "the buffer filled and the reject policy applied"
    assert ready_seen == {True}, "readiness never followed ClickHouse"
    proxy.set("pass")
    t_recover = time.monotonic()
    committed_before = buf.app.ledger.committed_rows
    await until(lambda: buf.app.ledger.committed_rows > committed_before)
    resumed = time.monotonic() - t_recover
    assert resumed < 2.0, f"flushing resumed {resumed:.2f}s after recovery"
    await write_for(0.3)
    await stub.Flush(pb.FlushRequest())
    landed = {int(r[0]) for r in clickhouse.client.query(f"SELECT id FROM {clickhouse.database}.t").result_rows}
    assert set(acked) <= landed
    assert clickhouse.count("t") == len(landed), "no duplicates"
    report(f"outage under load (refused {refused} requests, resumed in {resumed:.2f}s)", clickhouse, len(acked))


async def run_send(*args: str) -> tuple[int, dict[str, Any] | None, str]:
    """`ingest-buffer send` as a real process: (exit code, its JSON summary or None, its stderr)."""
    import sys

    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "buffer", "send", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if out.strip() else None, err.decode()


async def refusing_buffer(clickhouse: ClickHouse, proxy: FaultProxy, start_buffer: Callable[..., Any],
                          tmp_path: Any) -> tuple[Any, Any]:
    """A small reject-policy buffer whose ClickHouse is down, and a file five times its size (20,000 rows)."""
    clickhouse.create("t")
    buf = await start_buffer(clickhouse_url=proxied(proxy, clickhouse), when_full="reject", tables="t",
                             buffer_max_bytes="64KiB", max_request_bytes="8KiB", flush_max_bytes="16KiB",
                             flush_interval="50ms", retry_initial_backoff="50ms")
    data = tmp_path / "rows.ndjson"
    data.write_bytes(jrows(0, 20_000))  # about 360 kB
    proxy.set("refuse")  # the buffer fills and refuses
    return buf, data


async def test_send_resumes_where_a_full_buffer_refused_it_and_sends_nothing_twice(
        clickhouse: ClickHouse, proxy: FaultProxy, start_buffer: Callable[..., Any], tmp_path: Any) -> None:
    buf, data = await refusing_buffer(clickhouse, proxy, start_buffer, tmp_path)
    sending = asyncio.create_task(run_send(str(data), "--table", "t", "--target", buf.app.grpc.bound,
                                           "--chunk-bytes", "4096", "--flush", "--progress", "off"))
    await asyncio.sleep(1.5)
    assert not sending.done(), "send waits while the buffer refuses"
    proxy.set("pass")
    code, summary, err = await sending
    assert code == 0, err
    assert summary is not None and summary["rows_sent"] == summary["rows_acknowledged"] == 20_000, summary
    assert summary["resends"] > 0 and summary["rows_failed"] == 0
    assert "RESOURCE_EXHAUSTED" in err and "resending" in err
    assert summary["flush"]["committed"] is True  # every row the buffer held at the barrier reached ClickHouse
    count, unique = clickhouse.client.query(f"SELECT count(), uniqExact(id) FROM {clickhouse.database}.t"
                                            ).result_rows[0]
    assert count == unique == 20_000
    report("send against a full buffer", clickhouse, 20_000)


async def test_send_gives_up_after_retry_for_and_says_what_was_accepted(
        clickhouse: ClickHouse, proxy: FaultProxy, start_buffer: Callable[..., Any], tmp_path: Any) -> None:
    buf, data = await refusing_buffer(clickhouse, proxy, start_buffer, tmp_path)
    code, summary, err = await run_send(str(data), "--table", "t", "--target", buf.app.grpc.bound,
                                        "--chunk-bytes", "4096", "--retry-for", "1", "--progress", "off")
    accepted = buf.app.ledger.accepted_rows
    assert code == 1 and summary is not None, err
    assert summary["rows_acknowledged"] == accepted and 0 < accepted < 20_000, (summary, accepted)
    assert summary["rows_failed"] == summary["rows_sent"] - accepted, "every row sent is acknowledged or failed"
    assert "RESOURCE_EXHAUSTED" in err and f"the buffer acknowledged {accepted:,}" in err
    proxy.set("pass")  # the accepted rows still land
    await pb_grpc.IngestServiceStub(buf.channel).Flush(pb.FlushRequest())
    count, unique = clickhouse.client.query(f"SELECT count(), uniqExact(id) FROM {clickhouse.database}.t"
                                            ).result_rows[0]
    assert count == unique == accepted


async def test_send_with_committed_acks_resends_what_a_full_buffer_refused_and_lands_each_row_once(
        clickhouse: ClickHouse, proxy: FaultProxy, start_buffer: Callable[..., Any], tmp_path: Any) -> None:
    """A refused request took nothing, so even a COMMITTED one is resent safely (its resend key)."""
    buf, data = await refusing_buffer(clickhouse, proxy, start_buffer, tmp_path)
    sending = asyncio.create_task(run_send(str(data), "--table", "t", "--target", buf.app.grpc.bound, "--ack",
                                           "committed", "--chunk-bytes", "4096", "--progress", "off"))
    await asyncio.sleep(1.5)
    assert not sending.done()
    proxy.set("pass")
    code, summary, err = await sending
    assert code == 0, err
    assert summary is not None and summary["rows_acknowledged"] == 20_000 and summary["ack_level"] == "committed"
    assert clickhouse.count("t") == 20_000, "committed acks: in ClickHouse before send returned"
    assert int(clickhouse.command(f"SELECT uniqExact(id) FROM {clickhouse.database}.t")) == 20_000


@needs_test_endpoint
async def test_lost_reply_after_commit_is_retried_without_duplicates(
        clickhouse: ClickHouse, proxy: FaultProxy, http_endpoint: HttpEndpoint,
        start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(clickhouse_url=proxied(proxy, clickhouse), insert_timeout="1s",
                             retry_initial_backoff="50ms", flush_interval="50ms", tables="t")
    proxy.set("drop_responses")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 100)))
    await until(lambda: proxy.counters.dropped_responses >= 1 and buf.app.flusher.stats.retries >= 1)
    proxy.set("pass")
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 100, "the retry reused the token: ClickHouse dropped the duplicate"
    report("reply lost after commit", clickhouse, 100)
    stats = endpoint_call(http_endpoint, "/__stats")
    assert stats["inserts"] >= 2, "the first attempt did reach ClickHouse and commit"


async def test_connection_cut_mid_request_is_retried_and_lands_once(
        clickhouse: ClickHouse, proxy: FaultProxy, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(clickhouse_url=proxied(proxy, clickhouse), retry_initial_backoff="50ms",
                             flush_interval="50ms", tables="t")
    proxy.set("cut", cut_after=300)
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 200)))  # ~3.6 KB body
    await until(lambda: proxy.counters.cut_requests >= 2)
    assert clickhouse.count("t") == 0, "a cut body commits nothing"
    proxy.set("pass")
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 200
    report("connection cut mid-request", clickhouse, 200)


@needs_test_endpoint
@pytest.mark.parametrize(("code", "name"), [(252, "TOO_MANY_PARTS"), (241, "MEMORY_LIMIT_EXCEEDED"),
                                            (202, "TOO_MANY_SIMULTANEOUS_QUERIES"), (159, "TIMEOUT_EXCEEDED"),
                                            (164, "READONLY"), (242, "TABLE_IS_READ_ONLY")])  # held: retried alike
async def test_retryable_server_errors_back_off_and_succeed(
        clickhouse: ClickHouse, http_endpoint: HttpEndpoint, start_buffer: Callable[..., Any],
        code: int, name: str) -> None:
    clickhouse.create("t")
    buf = await start_buffer(retry_initial_backoff="20ms", flush_interval="50ms", tables="t")
    endpoint_call(http_endpoint, f"/__faults?code={code}&count=3")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 10)))
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 10
    assert buf.app.flusher.stats.errors.get(name) == 3 and buf.app.flusher.stats.retries == 3
    report(f"{name} x3", clickhouse, 10)


@needs_test_endpoint
@pytest.mark.parametrize(("code", "name", "fix"), [
    (497, "ACCESS_DENIED", "may not insert into"), (516, "AUTHENTICATION_FAILED", "rejected the credentials"),
    (81, "UNKNOWN_DATABASE", "does not exist in ClickHouse")])
async def test_errors_an_operator_fixes_hold_the_table_and_its_rows_land_once_fixed(
        clickhouse: ClickHouse, http_endpoint: HttpEndpoint, start_buffer: Callable[..., Any], tmp_path: Any,
        code: int, name: str, fix: str) -> None:
    clickhouse.create("t")
    buf = await start_buffer(retry_initial_backoff="20ms", retry_max_backoff="50ms", flush_interval="50ms",
                             tables="t")
    endpoint_call(http_endpoint, f"/__faults?code={code}&count=30")  # until the operator grants, logs in, creates
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 10)))
    barrier = asyncio.ensure_future(stub.Flush(pb.FlushRequest()))
    await until(lambda: "t" in buf.app.flusher.held)
    held = buf.app.flusher.held["t"]
    assert held.error == name and fix in held.advice
    done = await asyncio.wait_for(barrier, 30)
    assert (done.rows_committed, done.rows_failed) == (10, 0) and clickhouse.count("t") == 10
    assert buf.app.flusher.stats.errors.get(name) == 30, "retried, never split: one insert per attempt"
    assert not list((tmp_path / "dead-letters").glob("*.jsonl")) and not buf.app.flusher.held
    report(f"{name} x30 (held)", clickhouse, 10)


@needs_test_endpoint
async def test_error_after_commit_does_not_duplicate(
        clickhouse: ClickHouse, http_endpoint: HttpEndpoint, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(retry_initial_backoff="20ms", flush_interval="50ms", tables="t")
    endpoint_call(http_endpoint, "/__faults?code=209&count=1&after=1")  # committed, then "socket timeout"
    stub = pb_grpc.IngestServiceStub(buf.channel)
    await stub.Write(pb.WriteRequest(table="t", format=J, rows=jrows(0, 25)))
    await stub.Flush(pb.FlushRequest())
    assert clickhouse.count("t") == 25
    assert buf.app.flusher.stats.retries == 1
    report("error after commit", clickhouse, 25)


async def test_poison_rows_through_the_http_path(clickhouse: ClickHouse, start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(flush_interval="1h", tables="t")
    stub = pb_grpc.IngestServiceStub(buf.channel)
    for i in range(10):
        rows = jrows(i * 100, 100)
        if i % 3 == 0:
            rows = rows.replace(b'{"id":%d,' % (i * 100 + 7), b'{"id":-1e999,')
        await stub.Write(pb.WriteRequest(table="t", format=J, rows=rows))
    done = await stub.Flush(pb.FlushRequest())
    assert (done.rows_committed, done.rows_failed) == (996, 4)
    assert buf.app.ledger.rows_by(Fate.KEPT) == 4
    report("poison rows (4 in 1000)", clickhouse, 1000, dead_lettered=buf.app.ledger.rows_by(Fate.KEPT))


async def test_send_draws_its_progress_with_rich_and_its_summary_stays_json(
        clickhouse: ClickHouse, start_buffer: Callable[..., Any], tmp_path: Any) -> None:
    clickhouse.create("t")
    buf = await start_buffer()
    data = tmp_path / "rows.ndjson"
    data.write_bytes(jrows(0, 5_000))
    code, summary, err = await run_send(str(data), "--table", "t", "--target", buf.app.grpc.bound, "--progress", "on")
    assert code == 0 and summary is not None and summary["rows_acknowledged"] == 5_000, err
    # rich's last frame, on stderr: the bytes sent of the file's size, and the rows.
    size_kb = f"{data.stat().st_size / 1000:.1f}"
    assert re.search(rf"{size_kb}/{size_kb} kB .* 5,000 rows", err), err
