"""HTTP inserts from several clients while the buffer is killed (SIGKILL) again and again, then
drained (SIGTERM): every insert answered 200 lands exactly once, and nothing lands twice."""

from __future__ import annotations

import http.client
import random
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from tests.conftest import HttpEndpoint, free_port
from tests.lifecycle.conftest import Serve
from tests.lifecycle.test_http_kill import clickhouse  # noqa: F401  (the fixture: ClickHouse in its own process)


class Poster(threading.Thread):
    """Posts 50-row inserts of ids of its own until stopped; remembers which were answered 200."""

    def __init__(self, port: int, first: int) -> None:
        super().__init__(daemon=True)
        self.port, self.next = port, first
        self.acked: list[int] = []  # the first id of each insert answered 200
        self.stop = threading.Event()

    def run(self) -> None:
        path = "/?" + urllib.parse.urlencode({"query": "INSERT INTO wide (id, s) FORMAT CSV"})
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set():
            first = self.next
            body = b"".join(b"%d,r\n" % i for i in range(first, first + 50))
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("POST", path, body=body)
                answer = conn.getresponse()
                answer.read()
                if answer.status == 200:
                    self.acked.append(first)
                self.next += 50  # answered (200 or a refusal): the next insert gets new ids
            except (OSError, http.client.HTTPException):
                conn = None  # the buffer went away mid-call: this insert may or may not have landed
                self.next += 50
                time.sleep(0.02)


def test_every_http_200_lands_once_across_sigkills_and_a_drain(serve: Callable[..., Serve],
                                                               clickhouse: HttpEndpoint,  # noqa: F811
                                                               tmp_path: Path) -> None:
    wal, port = tmp_path / "wal", free_port()

    def start() -> Serve:
        s = serve("--clickhouse-url", clickhouse.url, "--database", "app", "--wal-dir", str(wal), "--linger", "0s",
                  "--flush-interval", "150ms", "--clickhouse-http-listen", f"127.0.0.1:{port}")
        s.wait_ready()
        return s

    posters = [Poster(port, k * 10**8) for k in range(4)]
    s = start()
    for p in posters:
        p.start()
    rng = random.Random(7)
    for _ in range(4):
        time.sleep(rng.uniform(0.3, 1.0))
        s.signal(signal.SIGKILL)
        assert s.wait(10) == -signal.SIGKILL
        s = start()
    time.sleep(0.5)
    s.signal(signal.SIGTERM)  # the drain: inserts get 503 once it refuses; what was taken is flushed
    for p in posters:
        p.stop.set()
    for p in posters:
        p.join(15)
    assert s.wait(60) == 0, s.log()[-3000:]
    count, unique = (int(x) for x in clickhouse.query("SELECT count(), uniqExact(id) FROM app.wide")[0])
    acked = {first for p in posters for first in p.acked}
    landed = {int(r[0]) for r in clickhouse.query("SELECT DISTINCT intDiv(id, 50) * 50 FROM app.wide")}
    assert count == unique, "nothing landed twice"
    assert acked <= landed, f"{len(acked - landed)} inserts answered 200 did not land"
    assert len(acked) * 50 <= count and len(acked) > 20, (len(acked), count)
