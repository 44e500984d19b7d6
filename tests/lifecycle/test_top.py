"""`ingest-buffer top` under a real terminal (tmux, a fixed size), against a real buffer under load
whose ClickHouse goes away and comes back, and which itself restarts: the captured screens show the
fill rising and the error, then recovery, then the buffer down and back; `q` ends it."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from buffer.api import ingest_pb2 as pb
from buffer.api import ingest_pb2_grpc as pb_grpc
from tests.conftest import HttpEndpoint, free_port
from tests.lifecycle.conftest import ROOT, Serve

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    def __init__(self, command: list[str], width: int = 110, height: int = 42) -> None:
        self.name = f"ib-top-{free_port()}"
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height),
                        " ".join(command)], check=True, cwd=ROOT)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True,
                              check=True).stdout

    def wait_for(self, pattern: str, timeout: float = 30, absent: str | None = None) -> str:
        """The screen once ``pattern`` shows on it (and ``absent`` does not)."""
        end = time.monotonic() + timeout
        text = ""
        while time.monotonic() < end:
            text = self.screen()
            if re.search(pattern, text, re.S) and not (absent and re.search(absent, text, re.S)):
                return text
            time.sleep(0.25)
        raise AssertionError(f"{pattern!r} never showed (without {absent!r}); the screen:\n{text}")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "has-session", "-t", self.name], capture_output=True).returncode == 0

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def test_top_shows_fill_and_errors_while_clickhouse_is_away_then_recovery_then_a_restart(
        serve: Callable[..., Serve], tmp_path: Path) -> None:
    ch_port = free_port()
    clickhouse = HttpEndpoint(tmp_path / "clickhouse", port=ch_port)
    clickhouse.query("CREATE DATABASE app")
    clickhouse.query("CREATE TABLE app.events (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
    flags = ("--clickhouse-url", clickhouse.url, "--database", "app", "--wal-dir", str(tmp_path / "wal"),
             "--flush-interval", "200ms", "--retry-max-backoff", "500ms", "--linger", "0s",
             "--buffer-max-bytes", "1MiB", "--max-request-bytes", "256KiB", "--flush-max-bytes", "256KiB")
    s = serve(*flags)
    s.wait_ready()
    top = Tmux([sys.executable, "-m", "buffer", "top", "--url", f"http://127.0.0.1:{s.http_port}"])
    stop = threading.Event()

    def load() -> None:
        k = 0
        while not stop.is_set():
            try:
                with grpc.insecure_channel(s.target) as channel:
                    stub = pb_grpc.IngestServiceStub(channel)
                    while not stop.is_set():
                        rows = b"".join(b"%d,row\n" % i for i in range(k, k + 200))
                        stub.Write(pb.WriteRequest(table="events", format=pb.FORMAT_CSV, rows=rows), timeout=5)
                        k += 200
                        time.sleep(0.05)
            except grpc.RpcError:
                time.sleep(0.2)  # the buffer is restarting

    writer = threading.Thread(target=load, daemon=True)
    writer.start()
    try:
        top.wait_for(r"serving.*rows/s [0-9,]+ in, [0-9,]+ out")
        clickhouse.stop()  # ClickHouse goes away: rows pile up, inserts fail
        # The fill rises past 5 % of the 1 MiB cap, and the error shows, for the buffer and its table.
        away = top.wait_for(r"bytes [^\n]*\((?:[5-9]|\d\d)%\).*last error: .*events .*NETWORK", timeout=60)
        (tmp_path / "screen-clickhouse-away.txt").write_text(away)
        clickhouse = HttpEndpoint(tmp_path / "clickhouse", port=ch_port)  # back, on the same port
        back = top.wait_for(r"bytes [^\n]*\(0%\).*rows/s [0-9,]+ in, [1-9][0-9,]* out", timeout=60,
                            absent="last error: ")
        (tmp_path / "screen-recovered.txt").write_text(back)
        print("\n" + away + "\n" + back)
        s.signal(signal.SIGTERM)
        assert s.wait(60) == 0, s.log()[-2000:]
        top.wait_for(r"down")
        http_port, grpc_port = s.http_port, s.grpc_port
        s = serve(*flags, "--http-listen", f"127.0.0.1:{http_port}", "--grpc-listen", f"127.0.0.1:{grpc_port}")
        s.http_port, s.grpc_port = http_port, grpc_port  # the same addresses again (the last flag counts)
        s.wait_ready()
        top.wait_for(r"serving")
        subprocess.run(["tmux", "send-keys", "-t", top.name, "q"], check=True)
        end = time.monotonic() + 10
        while top.alive() and time.monotonic() < end:
            time.sleep(0.1)
        assert not top.alive(), "q ended it"
    finally:
        stop.set()
        writer.join(10)
        top.close()
        clickhouse.stop()
