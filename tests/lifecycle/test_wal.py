"""The write-ahead log with real processes and SIGKILL: what was acknowledged DURABLE lands exactly once.

Several clients write under load, the buffer is killed at random moments (SIGKILL: no drain, no
flush, nothing runs), restarted on the same log, again and again; at the end one clean drain, and
ClickHouse must hold every DURABLE row acknowledged, each once, and no row twice. BUFFERED rows may
be lost only inside the sync window; the test reports how many were.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from tests.conftest import HttpEndpoint
from tests.lifecycle.conftest import Serve

J = pb.FORMAT_JSON_EACH_ROW
KILLS = int(os.environ.get("WAL_TEST_KILLS", "20"))


class Client(threading.Thread):
    """Writes rows with ids from its own range until the server goes away; remembers what was acked."""

    def __init__(self, target: str, first_id: int, ack: int, rows: int) -> None:
        super().__init__(daemon=True)
        self.target, self.next_id, self.ack, self.rows = target, first_id, ack, rows
        self.acked: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.IngestServiceStub(channel)
            while not self.stop.is_set():
                ids = range(self.next_id, self.next_id + self.rows)
                self.next_id += self.rows
                payload = b"".join(b'{"id":%d,"s":"r"}\n' % i for i in ids)
                try:
                    stub.Write(pb.WriteRequest(table="events", format=J, rows=payload, ack_level=self.ack), timeout=5)
                except grpc.RpcError:
                    return  # killed (or draining): what was not acked may or may not land
                self.acked.extend(ids)


@pytest.fixture
def clickhouse(tmp_path: Path) -> Iterator[HttpEndpoint]:
    """ClickHouse in a process of its own, as in production: a SIGKILL of the buffer never lands inside
    ClickHouse's own commit. (With the embedded engine it can, between the insert's deduplication
    record and its part: a batch resent after that is taken for a duplicate of a part that never
    became active — ClickHouse#110429. The README says so.)"""
    endpoint = HttpEndpoint(tmp_path / "clickhouse")
    endpoint.query("CREATE DATABASE app")
    endpoint.query("CREATE TABLE app.events (id UInt64, s String) ENGINE = MergeTree ORDER BY id "
                    "SETTINGS non_replicated_deduplication_window = 10000")
    yield endpoint
    endpoint.stop()


def start(serve: Callable[..., Serve], clickhouse: HttpEndpoint, wal: Path, *flags: str) -> Serve:
    s = serve("--clickhouse-url", clickhouse.url, "--database", "app", "--wal-dir", str(wal),
              "--flush-interval", "150ms", "--flush-max-rows", "2000", "--linger", "0s", *flags)
    s.wait_ready()
    return s


def spilled_rows(s: Serve) -> int:
    """Rows this process accepted onto disk only, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(r"^ingest_buffer_wal_spilled_rows\S* (\S+)$", text, re.M)
    assert found, "the metric is exported"
    return int(float(found.group(1)))


# A buffer whose memory is one batch: it is full whenever a batch is being inserted, and the rows
# that arrive meanwhile go onto disk only; many are there when the kill comes.
SMALL_MEMORY = ("--buffer-max-bytes", "32KiB", "--max-request-bytes", "16KiB", "--flush-max-bytes", "32KiB")


@pytest.mark.parametrize("memory", ["roomy", "spilling"])
def test_sigkill_under_load_again_and_again_loses_no_durable_row_and_doubles_none(
        serve: Callable[..., Serve], clickhouse: HttpEndpoint, tmp_path: Path, memory: str) -> None:
    flags = SMALL_MEMORY if memory == "spilling" else ()
    kills = KILLS if memory == "roomy" else max(5, KILLS // 2)  # (every request goes through the disk: slower)
    wal = tmp_path / "wal"
    rng = random.Random(7)
    durable: list[int] = []
    buffered: list[int] = []
    next_id = 0
    spilled = 0
    t0 = time.monotonic()
    for _ in range(kills):
        s = start(serve, clickhouse, wal, *flags)
        clients = [Client(s.target, next_id + k * 1_000_000, pb.ACK_LEVEL_DURABLE, rows=rng.choice((1, 5, 40)))
                   for k in range(3)]
        clients.append(Client(s.target, next_id + 3 * 1_000_000, pb.ACK_LEVEL_BUFFERED, rows=20))
        for c in clients:
            c.start()
        time.sleep(rng.uniform(0.2, 0.9))
        spilled += spilled_rows(s)
        s.signal(signal.SIGKILL)
        assert s.wait(10) == -signal.SIGKILL
        for c in clients:
            c.stop.set()
            c.join(10)
        for c in clients[:3]:
            durable += c.acked
        buffered += clients[3].acked
        next_id += 4 * 1_000_000
    # One last start: it replays what the kills left, then drains cleanly.
    s = start(serve, clickhouse, wal, *flags)
    with grpc.insecure_channel(s.target) as channel:
        done = pb_grpc.IngestServiceStub(channel).Flush(pb.FlushRequest(), timeout=60)
    assert done.rows_failed == 0
    s.signal(signal.SIGTERM)
    assert s.wait(60) == 0, s.log()[-3000:]
    seconds = time.monotonic() - t0
    count, unique = (int(x) for x in clickhouse.query("SELECT count(), uniqExact(id) FROM app.events")[0])
    landed = {int(r[0]) for r in clickhouse.query("SELECT id FROM app.events")}
    missing = [i for i in durable if i not in landed]
    lost_buffered = sum(1 for i in buffered if i not in landed)
    print(f"\n{memory} memory, {kills} SIGKILLs in {seconds:.0f}s: {len(durable)} DURABLE rows acked, "
          f"{len(missing)} missing; {len(buffered)} BUFFERED acked, {lost_buffered} lost (inside the sync window); "
          f"{count} rows landed; {spilled} rows went onto disk only")
    if memory == "spilling":
        assert spilled > 1000, "rows went onto disk only: the test covers the disk-backed buffer"
    assert len(durable) > 1000, "the clients wrote under load"
    assert not missing, f"acknowledged DURABLE rows lost: {missing[:10]}"
    assert count == unique, f"{count - unique} rows landed twice"


def test_a_kill_during_replay_then_a_clean_start_lands_every_row_once(
        serve: Callable[..., Serve], clickhouse: HttpEndpoint, tmp_path: Path) -> None:
    wal = tmp_path / "wal"

    def start(*flags: str) -> Serve:
        s = serve("--clickhouse-url", clickhouse.url, "--database", "app", "--wal-dir", str(wal),
                  "--linger", "0s", *flags)
        s.wait_ready()
        return s

    # A roomy buffer that flushes nothing for an hour: every row written stays unsettled in the log.
    s = start("--flush-interval", "1h", "--flush-max-bytes", "16MiB", "--flush-max-rows", "10000000")
    acked = 0
    with grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        for k in range(300):  # 300 x ~20 KiB: 6 MiB
            payload = b"".join(b'{"id":%d,"s":"%s"}\n' % (k * 1000 + i, b"x" * 100) for i in range(180))
            stub.Write(pb.WriteRequest(table="events", format=J, rows=payload, ack_level=pb.ACK_LEVEL_DURABLE),
                       timeout=30)
            acked += 180
    s.signal(signal.SIGKILL)
    s.wait(10)
    # A small buffer: the replay puts back 256 KiB, the rest waits on disk for flushes to make room.
    small = ("--buffer-max-bytes", "256KiB", "--max-request-bytes", "64KiB", "--flush-max-bytes", "64KiB",
             "--flush-interval", "300ms")
    s = start(*small)
    end = time.monotonic() + 20
    while int(clickhouse.query("SELECT count() FROM app.events")[0][0]) == 0:  # the replay has begun to land
        assert time.monotonic() < end, "the replay landed nothing"
        time.sleep(0.02)
    s.signal(signal.SIGKILL)  # in the middle of the replay
    s.wait(10)
    during = int(clickhouse.query("SELECT count() FROM app.events")[0][0])
    s = start(*small)
    with grpc.insecure_channel(s.target) as channel:
        pb_grpc.IngestServiceStub(channel).Flush(pb.FlushRequest(), timeout=120)
    s.signal(signal.SIGTERM)
    assert s.wait(60) == 0, s.log()[-3000:]
    count, unique = (int(x) for x in clickhouse.query("SELECT count(), uniqExact(id) FROM app.events")[0])
    print(f"\n{acked} DURABLE rows acked; {during} had landed when the replay was killed; now {count}, "
          f"{unique} distinct")
    assert 0 < during < acked, "the kill came in the middle of the replay"
    assert count == unique == acked
