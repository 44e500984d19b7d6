"""`ingest-buffer sql` while `serve` holds the embedded engine: the statements run in the serving
process (no other process can open the engine), and read queries over the ClickHouse HTTP interface
see the rows that landed."""

from __future__ import annotations

import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc

from buffer.api import ingest_pb2 as pb
from buffer.api import ingest_pb2_grpc as pb_grpc
from tests.conftest import free_port
from tests.lifecycle.conftest import ROOT, Serve


def sql(url: str, http_port: int, *statements: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "buffer", "sql", "--clickhouse-url", url, "--database", "app",
                           "--http-listen", f"127.0.0.1:{http_port}", *statements],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_sql_runs_in_the_serving_process_and_http_reads_see_what_landed(serve: Callable[..., Serve],
                                                                       tmp_path: Path) -> None:
    url = f"chdb://{tmp_path / 'chdb'}"
    made = subprocess.run([sys.executable, "-m", "buffer", "sql", "--clickhouse-url", url, "--database", "default",
                           "CREATE DATABASE app"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr  # no server yet: the command opens the engine itself
    port = free_port()
    s = serve("--clickhouse-url", url, "--database", "app", "--clickhouse-http-listen", f"127.0.0.1:{port}")
    s.wait_ready()
    created = sql(url, s.http_port, "CREATE TABLE app.events (id UInt64, s String) ENGINE = MergeTree ORDER BY id")
    assert created.returncode == 0, created.stderr
    with grpc.insecure_channel(s.target) as channel:
        stub = pb_grpc.IngestServiceStub(channel)
        stub.Write(pb.WriteRequest(table="events", format=pb.FORMAT_CSV, rows=b"1,a\n2,b\n3,c\n"), timeout=30)
        stub.Flush(pb.FlushRequest(), timeout=60)
    counted = sql(url, s.http_port, "SELECT count() FROM events")
    assert (counted.returncode, counted.stdout.strip()) == (0, "3"), counted.stderr
    query = urllib.parse.quote("SELECT id, s FROM events ORDER BY id FORMAT CSV")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/?query={query}", timeout=30) as r:
        assert r.read() == b'1,"a"\n2,"b"\n3,"c"\n'
    bad = sql(url, s.http_port, "SELECT * FROM missing")
    assert bad.returncode == 1 and "missing" in bad.stderr
