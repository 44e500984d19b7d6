"""Real `ingest-buffer serve` processes, real ports, real signals; each one stopped by its PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def chdb(path: Path, *sql: str) -> list[Any]:
    """Runs SQL against a chDB path in a separate process (the buffer process owns it while running)."""
    out = subprocess.run([sys.executable, "-m", "tests.chdb_query", str(path), *sql], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result: list[Any] = json.loads(out.stdout)
    return result


class Serve:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.args = [sys.executable, "-m", "buffer", "serve", "--grpc-listen", f"127.0.0.1:{self.grpc_port}",
                     "--http-listen", f"127.0.0.1:{self.http_port}", "--log-format", "json",
                     "--dead-letter-dir", str(log_path.parent / "dead-letters"),
                     "--wal-dir", "",  # no log unless the test passes its own --wal-dir (the last one counts)
                     *args]
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **env})

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def http(self, method: str, path: str, timeout: float = 30) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.http("GET", "/readyz", timeout=2)[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"serve not ready in {timeout}s:\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
        return records

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Serve:
        s = Serve(list(args), tmp_path / f"serve-{len(started)}.log", env or {})
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def chdb_dir(tmp_path: Path) -> Path:
    path = tmp_path / "chdb"
    chdb(path, "CREATE DATABASE app",
         "CREATE TABLE app.events (id UInt64, s String) ENGINE = MergeTree ORDER BY id "
         "SETTINGS non_replicated_deduplication_window = 10000",
         # Inserts into `slow` take 2 ms a row: long enough to watch a drain in progress.
         "CREATE TABLE app.slow (id UInt64, s String, pause UInt8 MATERIALIZED sleepEachRow(0.002)) "
         "ENGINE = MergeTree ORDER BY id")
    return path
