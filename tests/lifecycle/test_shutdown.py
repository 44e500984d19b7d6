"""Shutdown of a real process: SIGTERM under load, /drain, the two modes, and loud losses."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from tests.lifecycle.conftest import Serve, chdb

J = pb.FORMAT_JSON_EACH_ROW


def jrows(ids: range) -> bytes:
    return b"".join(b'{"id":%d,"s":"x"}\n' % i for i in ids)


class Load:
    """Writers on threads, each recording which ids the buffer acknowledged; bounded in time."""

    def __init__(self, target: str, table: str, writers: int = 4, rows_per_write: int = 10,
                 max_seconds: float = 30) -> None:
        self.target = target
        self.table = table
        self.rows_per_write = rows_per_write
        self.acked: list[int] = []
        self.refused: dict[str, int] = {}
        self.stop = threading.Event()
        self.max_seconds = max_seconds
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._write, args=(w, writers)) for w in range(writers)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _write(self, worker: int, writers: int) -> None:
        end = time.monotonic() + self.max_seconds
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.IngestServiceStub(channel)
            n = worker
            while not self.stop.is_set() and time.monotonic() < end:
                ids = range(n * self.rows_per_write, (n + 1) * self.rows_per_write)
                n += writers
                try:
                    stub.Write(pb.WriteRequest(table=self.table, format=J, rows=jrows(ids)), timeout=5)
                except grpc.RpcError as e:
                    with self.lock:
                        key = e.code().name  # type: ignore[attr-defined]
                        self.refused[key] = self.refused.get(key, 0) + 1
                    if key == "UNAVAILABLE":
                        time.sleep(0.01)
                    continue
                with self.lock:
                    self.acked.extend(ids)


def landed(path: Path, table: str) -> tuple[int, int, set[int]]:
    count, unique, ids = chdb(path, f"SELECT count() FROM app.{table}", f"SELECT uniqExact(id) FROM app.{table}",
                              f"SELECT id FROM app.{table}")
    return int(count[0][0]), int(unique[0][0]), {int(r[0]) for r in ids}


def test_sigterm_under_load_loses_nothing_and_exits_zero(serve: Callable[..., Serve], chdb_dir: Path) -> None:
    s = serve("--clickhouse-url", f"chdb://{chdb_dir}", "--database", "app", "--linger", "500ms",
              "--flush-interval", "200ms")
    s.wait_ready()
    with Load(s.target, "events") as load:
        time.sleep(1.5)
        acked_before = len(load.acked)
        s.signal(signal.SIGTERM)
        code = s.wait(60)
    assert code == 0, s.log()
    assert acked_before > 0
    count, unique, ids = landed(chdb_dir, "events")
    assert set(load.acked) <= ids, f"{len(set(load.acked) - ids)} acknowledged rows are missing"
    assert count == unique, "no row landed twice"
    # Refused writes are retryable for the client: UNAVAILABLE while refusing, CANCELLED for calls
    # that reached the listener as it closed (never handled, so never acknowledged).
    assert set(load.refused) <= {"UNAVAILABLE", "CANCELLED"}, load.refused
    summary = [r for r in s.log_records() if r.get("msg", "").startswith("exiting")]
    assert summary and summary[-1]["rows_lost"] == 0 and summary[-1]["rows_accepted"] == count


def test_drain_flips_readiness_before_the_buffer_is_empty(serve: Callable[..., Serve], chdb_dir: Path) -> None:
    s = serve("--clickhouse-url", f"chdb://{chdb_dir}", "--database", "app", "--flush-interval", "1h",
              "--flush-max-rows", "200")
    s.wait_ready()
    with grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        for i in range(10):
            stub.Write(pb.WriteRequest(table="slow", format=J, rows=jrows(range(i * 100, (i + 1) * 100))))
    assert s.http("GET", "/readyz")[1]["buffer_rows"] == 1000
    result: dict[str, Any] = {}
    drain = threading.Thread(target=lambda: result.update(zip(("status", "body"), s.http("POST", "/drain"),
                                                              strict=True)))
    drain.start()
    seen: list[dict[str, Any]] = []
    while drain.is_alive():
        status, body = s.http("GET", "/readyz")
        seen.append({"status": status, **body})
        time.sleep(0.02)
    drain.join()
    assert any(r["status"] == 503 and r["buffer_rows"] > 0 for r in seen), seen[:5]
    assert result["status"] == 200 and result["body"]["drained"] is True
    assert result["body"]["rows_committed"] == 1000
    s.signal(signal.SIGTERM)
    assert s.wait(30) == 0, s.log()
    assert landed(chdb_dir, "slow")[0] == 1000


def test_sidecar_accepts_between_drain_and_sigterm_then_lingers(serve: Callable[..., Serve],
                                                                chdb_dir: Path) -> None:
    s = serve("--clickhouse-url", f"chdb://{chdb_dir}", "--database", "app", "--mode", "sidecar",
              "--linger", "1s")
    s.wait_ready()
    status, body = s.http("POST", "/drain")
    assert status == 200 and body["accepting"] is True
    assert s.http("GET", "/readyz")[0] == 503
    with grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        stub.Write(pb.WriteRequest(table="events", format=J, rows=jrows(range(0, 10))))  # after preStop
        s.signal(signal.SIGTERM)
        time.sleep(0.2)
        stub.Write(pb.WriteRequest(table="events", format=J, rows=jrows(range(10, 20))))  # during the linger
        refused = None
        end = time.monotonic() + 10
        while time.monotonic() < end and refused is None:
            try:
                stub.Write(pb.WriteRequest(table="events", format=J, rows=jrows(range(1000, 1001))), timeout=2)
            except grpc.RpcError as e:
                refused = e.code()  # type: ignore[attr-defined]
            time.sleep(0.05)
    assert refused == grpc.StatusCode.UNAVAILABLE or refused is not None
    assert s.wait(30) == 0, s.log()
    ids = landed(chdb_dir, "events")[2]
    assert set(range(20)) <= ids


def test_gateway_refuses_after_the_propagation_delay(serve: Callable[..., Serve], chdb_dir: Path) -> None:
    s = serve("--clickhouse-url", f"chdb://{chdb_dir}", "--database", "app", "--mode", "gateway",
              "--propagation-delay", "1s")
    s.wait_ready()
    drain = threading.Thread(target=s.http, args=("POST", "/drain"))
    t0 = time.monotonic()
    drain.start()
    with grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        time.sleep(0.2)
        stub.Write(pb.WriteRequest(table="events", format=J, rows=jrows(range(5))))  # still within the delay
        drain.join(30)
        assert time.monotonic() - t0 >= 1.0, "/drain returns only after the delay and the flush"
        try:
            stub.Write(pb.WriteRequest(table="events", format=J, rows=jrows(range(5, 6))))
            raise AssertionError("a write after the delay was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    s.signal(signal.SIGTERM)
    assert s.wait(30) == 0, s.log()
    assert landed(chdb_dir, "events")[2] == set(range(5))


def test_rows_that_cannot_be_flushed_are_counted_and_exit_non_zero(serve: Callable[..., Serve],
                                                                   tmp_path: Path) -> None:
    # A ClickHouse server that is not there: rows are accepted, never flushed, and must be reported.
    s = serve("--clickhouse-url", "http://127.0.0.1:9/", "--tables", "events", "--drain-timeout", "1s",
              "--linger", "0s")
    s.wait_ready()
    with grpc.insecure_channel(s.target) as channel:
        pb_grpc.IngestServiceStub(channel).Write(pb.WriteRequest(table="events", format=J, rows=jrows(range(42))))
    s.signal(signal.SIGTERM)
    assert s.wait(30) == 3, s.log()
    lost = [r for r in s.log_records() if "rows_not_flushed" in r]
    assert lost and lost[0]["rows_not_flushed"] == 42 and lost[0]["level"] == "error"


def test_sigint_twice_exits_at_once_and_says_what_was_lost(serve: Callable[..., Serve], tmp_path: Path) -> None:
    s = serve("--clickhouse-url", "http://127.0.0.1:9/", "--tables", "events", "--drain-timeout", "30s",
              "--linger", "0s")
    s.wait_ready()
    with grpc.insecure_channel(s.target) as channel:
        pb_grpc.IngestServiceStub(channel).Write(pb.WriteRequest(table="events", format=J, rows=jrows(range(5))))
    s.signal(signal.SIGINT)
    time.sleep(0.3)
    s.signal(signal.SIGINT)
    assert s.wait(10) == 3, s.log()
    assert any(r.get("rows_not_flushed") == 5 for r in s.log_records())


def test_send_command_and_drain_command(serve: Callable[..., Serve], chdb_dir: Path, tmp_path: Path) -> None:
    import json as _json
    import subprocess
    import sys

    from tests.lifecycle.conftest import ROOT

    s = serve("--clickhouse-url", f"chdb://{chdb_dir}", "--database", "app", "--linger", "0s")
    s.wait_ready()
    data = tmp_path / "rows.ndjson"
    data.write_bytes(jrows(range(30_000)))
    sent = subprocess.run([sys.executable, "-m", "buffer", "send", str(data), "--table", "events", "--target",
                           s.target, "--flush", "--chunk-bytes", "65536"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert sent.returncode == 0, sent.stderr
    summary = _json.loads(sent.stdout)
    assert summary["rows_sent"] == summary["rows_acknowledged"] == 30_000 and summary["requests"] > 5, summary
    assert summary["rows_failed"] == 0 and summary["flush"]["committed"] is True
    assert summary["flush"]["held_rows_failed"] == 0
    piped = subprocess.run([sys.executable, "-m", "buffer", "send", "--table", "events", "--format", "CSV",
                            "--target", s.target], input=b"30000,a\n30001,b", capture_output=True, timeout=60,
                           cwd=ROOT)
    assert piped.returncode == 0, piped.stderr
    bad = subprocess.run([sys.executable, "-m", "buffer", "send", str(data), "--table", "nope", "--target",
                          s.target], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "does not exist" in bad.stderr
    # The exec form of the preStop hook.
    drained = subprocess.run([sys.executable, "-m", "buffer", "drain", "--http-listen", f"127.0.0.1:{s.http_port}"],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert drained.returncode == 0, drained.stderr
    assert _json.loads(drained.stdout)["drained"] is True
    s.signal(signal.SIGTERM)
    assert s.wait(30) == 0, s.log()
    assert landed(chdb_dir, "events")[2] == set(range(30_002))


def test_bad_settings_exit_2_with_the_fix(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.lifecycle.conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "buffer", "serve", "--when-full", "sometimes"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "--when-full" in out.stderr and "block, reject, drop_oldest" in out.stderr
    shown = subprocess.run([sys.executable, "-m", "buffer", "check-config", "--clickhouse-url",
                            "https://u:topsecret@ch:8443/db"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert shown.returncode == 0 and "topsecret" not in shown.stdout and "u:***@ch:8443" in shown.stdout


def test_sql_command_creates_tables_and_check_config_connect_is_a_gate(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.lifecycle.conftest import ROOT

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "buffer", *args], capture_output=True, text=True, timeout=120,
                              cwd=ROOT)

    url = f"chdb://{tmp_path / 'chdb'}"
    made = cli("sql", "--clickhouse-url", url, "CREATE TABLE t (id UInt64) ENGINE = MergeTree ORDER BY id "
               "SETTINGS non_replicated_deduplication_window = 100", "INSERT INTO t VALUES (1), (2)",
               "SELECT count() FROM t")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "2"
    bad = cli("sql", "--clickhouse-url", url, "SELECT nope FROM t")
    assert bad.returncode == 1 and "UNKNOWN_IDENTIFIER" in bad.stderr and "DB::Exception: Code" not in bad.stderr
    ok = cli("check-config", "--connect", "--clickhouse-url", url, "--tables", "t")
    assert ok.returncode == 0, ok.stderr
    down = cli("check-config", "--connect", "--clickhouse-url", "http://127.0.0.1:9/")
    assert down.returncode == 1 and "not reachable" in down.stderr


def test_check_config_connect_changes_nothing_and_fails_what_it_cannot_check(
        tmp_path: Path, serve: Callable[..., Serve]) -> None:
    import subprocess
    import sys

    from tests.lifecycle.conftest import ROOT, chdb

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "buffer", *args], capture_output=True, text=True, timeout=120,
                              cwd=ROOT, env={**os.environ, "INGEST_BUFFER_FLUSH_INTERVALL": "2s"})

    path = tmp_path / "chdb"
    url = f"chdb://{path}"
    typo = cli("check-config", "--connect", "--clickhouse-url", url, "--database", "ap")
    assert typo.returncode == 1, typo.stderr
    assert "error: database 'ap' does not exist in ClickHouse: create it (CREATE DATABASE `ap`)" in typo.stderr
    assert "INGEST_BUFFER_FLUSH_INTERVALL is not a setting (did you mean INGEST_BUFFER_FLUSH_INTERVAL?)" in \
        typo.stderr, "an unknown variable is named, with the nearest setting"
    assert chdb(path, "SELECT count() FROM system.databases WHERE name = 'ap'") == [[[0]]], "nothing was created"
    hint = cli("sql", "--clickhouse-url", url, "--database", "ap", "CREATE TABLE t (id UInt64) ENGINE = Memory")
    assert hint.returncode == 1 and 'ingest-buffer sql --database default "CREATE DATABASE ap"' in hint.stderr
    running = serve("--clickhouse-url", url, env={"INGEST_BUFFER_LINGR": "1s"})
    running.wait_ready()
    locked = cli("check-config", "--connect", "--clickhouse-url", url)
    assert locked.returncode == 1 and "cannot open the embedded engine" in locked.stderr, locked.stderr
    running.signal(signal.SIGTERM)
    assert running.wait() == 0
    warned = [r for r in running.log_records() if "is not a setting" in r.get("msg", "")]
    assert len(warned) == 1 and "INGEST_BUFFER_LINGR" in warned[0]["msg"] and warned[0]["level"] == "warning"


def test_the_readme_demo_runs(tmp_path: Path) -> None:
    """The README's first command ends in `ingest-buffer demo`: it must keep working."""
    import subprocess
    import sys

    from tests.lifecycle.conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "buffer", "demo", "--rows", "5000", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 before, 5,000 now (+5,000)" in out.stdout
    assert f"chdb://{tmp_path / 'chdb'}" in out.stdout, "it names the engine path to go on with"
