"""Inserts over ClickHouse's HTTP interface, a real `serve` process and SIGKILL: every 200 lands exactly
once, and the rows replayed from the log are inserted the way they came (their column list and
parsing settings)."""

from __future__ import annotations

import signal
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from buffer.api import ingest_pb2 as pb
from buffer.api import ingest_pb2_grpc as pb_grpc
from tests.conftest import HttpEndpoint, free_port
from tests.lifecycle.conftest import Serve


@pytest.fixture
def clickhouse(tmp_path: Path) -> Iterator[HttpEndpoint]:
    endpoint = HttpEndpoint(tmp_path / "clickhouse")  # in a process of its own, as in production
    endpoint.query("CREATE DATABASE app")
    endpoint.query("CREATE TABLE app.wide (id UInt64, s String, n UInt32 DEFAULT 7) ENGINE = MergeTree ORDER BY id "
                   "SETTINGS non_replicated_deduplication_window = 10000")
    yield endpoint
    endpoint.stop()


def insert(port: int, body: bytes, **params: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{port}/?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=30) as r:
            return r.status, r.headers.get("X-Ingest-Buffer-Ack", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_a_sigkill_loses_no_acknowledged_http_insert_and_the_replay_keeps_its_columns_and_settings(
        serve: Callable[..., Serve], clickhouse: HttpEndpoint, tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    port = free_port()

    def start(*flags: str) -> Serve:
        s = serve("--clickhouse-url", clickhouse.url, "--database", "app", "--wal-dir", str(wal), "--linger", "0s",
                  "--clickhouse-http-listen", f"127.0.0.1:{port}", *flags)
        s.wait_ready()
        return s

    # Nothing is flushed for an hour: every acknowledged row is only in the log when the kill comes.
    s = start("--flush-interval", "1h", "--flush-max-rows", "10000000", "--flush-max-bytes", "16MiB")
    acked = 0
    for k in range(40):
        # A column list without `n` (ClickHouse fills its default), and a field the table does not
        # have, which only input_format_skip_unknown_fields lets through: both must survive the replay.
        body = b"".join(b'{"id":%d,"s":"r","unknown":1}\n' % (k * 100 + i) for i in range(100))
        status, ack = insert(port, body, query="INSERT INTO wide (id, s) FORMAT JSONEachRow",
                             input_format_skip_unknown_fields="1")
        assert (status, ack) == (200, "durable")
        acked += 100
    assert clickhouse.query("SELECT count() FROM app.wide")[0][0] in (0, "0")
    s.signal(signal.SIGKILL)
    assert s.wait(10) == -signal.SIGKILL
    s = start("--flush-interval", "200ms")
    with grpc.insecure_channel(s.target) as channel:
        done = pb_grpc.IngestServiceStub(channel).Flush(pb.FlushRequest(), timeout=120)
    assert done.rows_failed == 0, s.log()[-3000:]
    s.signal(signal.SIGTERM)
    assert s.wait(60) == 0, s.log()[-3000:]
    count, unique, defaults = (int(x) for x in clickhouse.query(
        "SELECT count(), uniqExact(id), countIf(n = 7) FROM app.wide")[0])
    assert count == unique == defaults == acked
