"""buffer.client against real `ingest-buffer serve` processes that go away under it: a sidecar drained
and restarted on the same port, and a gateway replica drained while another takes over. The
application writes throughout; every row lands exactly once."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from buffer.client import Client
from tests.conftest import HttpEndpoint
from tests.faultproxy import FaultProxy
from tests.lifecycle.conftest import Serve


@pytest.fixture
def clickhouse(tmp_path: Path) -> Iterator[HttpEndpoint]:
    """ClickHouse in a process of its own: two buffers at once can share it (chDB allows one process)."""
    endpoint = HttpEndpoint(tmp_path / "clickhouse")
    endpoint.query("CREATE DATABASE app")
    endpoint.query("CREATE TABLE app.events (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
    yield endpoint
    endpoint.stop()


class App(threading.Thread):
    """An application thread writing 1-row dicts through one Client until stopped."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.client = Client(target, call_timeout=5, retry_for=60)
        self.written = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for _ in range(200):
                self.client.write("events", {"id": self.written, "s": "app"})
                self.written += 1
            time.sleep(0.01)

    def finish(self) -> dict[str, int]:
        self.stop.set()
        self.join(10)
        assert self.client.close(60), self.client.stats()
        return self.client.stats()


def start(serve: Callable[..., Serve], clickhouse: HttpEndpoint, *flags: str) -> Serve:
    s = serve("--clickhouse-url", clickhouse.url, "--database", "app", "--flush-interval", "200ms",
              "--propagation-delay", "0s", *flags)
    s.wait_ready()
    return s


def landed(clickhouse: HttpEndpoint) -> tuple[int, int]:
    count, unique = clickhouse.query("SELECT count(), uniqExact(id) FROM app.events")[0]
    return int(count), int(unique)


def test_a_sidecar_drained_and_restarted_mid_write_loses_and_doubles_nothing(
        serve: Callable[..., Serve], clickhouse: HttpEndpoint) -> None:
    first = start(serve, clickhouse)
    app = App(first.target)
    app.start()
    time.sleep(1.0)
    first.signal(signal.SIGTERM)  # refuses new writes (UNAVAILABLE), flushes what it took, exits
    assert first.wait(60) == 0, first.log()
    during = app.written  # the calls made meanwhile wait for the port to answer again (or are resent)
    second = start(serve, clickhouse, "--grpc-listen", first.target)  # the same port, as a restarted container
    time.sleep(1.0)
    stats = app.finish()
    assert app.written > during, "the application kept writing while the sidecar was away"
    second.signal(signal.SIGTERM)
    assert second.wait(60) == 0, second.log()
    assert stats["acknowledged_rows"] == app.written and stats["failed_rows"] == 0, stats
    assert landed(clickhouse) == (app.written, app.written)
    print(f"\n{app.written:,} rows across a sidecar restart: {stats['resends']} resends, "
          f"{stats['duplicates']} answered as duplicates")


def test_a_gateway_replica_drained_mid_write_hands_over_to_another_without_doubles(
        serve: Callable[..., Serve], clickhouse: HttpEndpoint) -> None:
    """The proxy stands for the Service: new connections go to the replica it points at. Replica A is
    taken out (the proxy points at B, as the endpoints change) and drained; the client's open
    connection to A hears UNAVAILABLE, and its resends go out on a new connection, to B."""
    a = start(serve, clickhouse)
    b = start(serve, clickhouse)
    host, port = a.target.rsplit(":", 1)
    service = FaultProxy(host, int(port)).start()
    try:
        app = App(f"127.0.0.1:{service.port}")
        app.start()
        time.sleep(1.0)
        service.upstream_port = b.grpc_port  # A leaves the endpoints
        a.signal(signal.SIGTERM)
        assert a.wait(60) == 0, a.log()
        time.sleep(1.0)
        stats = app.finish()
    finally:
        service.stop()
    b.signal(signal.SIGTERM)
    assert b.wait(60) == 0, b.log()
    assert stats["acknowledged_rows"] == app.written and stats["failed_rows"] == 0, stats
    assert service.counters.connections >= 2, "the client reconnected"
    assert landed(clickhouse) == (app.written, app.written)
    print(f"\n{app.written:,} rows across a gateway drain: {stats['resends']} resends, "
          f"{service.counters.connections} connections")
