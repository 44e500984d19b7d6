"""``ingest-buffer demo``: the whole data path on the embedded engine, in one command.

Starts the real buffer (gRPC and HTTP listeners on free local ports, chDB as ClickHouse), creates
a demo table, streams rows to it over gRPC as an application would, waits on the flush barrier,
shows what landed, and shuts down through the same drain a SIGTERM triggers.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import time

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer.app import App
from buffer.config import load
from buffer.sink import ClickHouseSink

TABLE = "demo_events"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def demo_rows(n: int) -> bytes:
    base = int(time.time())
    kinds = ("click", "view", "purchase", "signup")
    row = b'{"ts":%d,"user_id":%d,"kind":"%s","value":%d.5}\n'
    return b"".join(row % (base + i // 1000, i % 997, kinds[i % 4].encode(), i % 100) for i in range(n))


def run_demo(rows: int, data_dir: str) -> int:
    from buffer import logs
    from buffer.send import send

    logs.setup("warning", "text")
    grpc_port, http_port = free_port(), free_port()
    cfg = load({"clickhouse_url": f"chdb://{os.path.abspath(os.path.join(data_dir, 'chdb'))}",
                "grpc_listen": f"127.0.0.1:{grpc_port}", "http_listen": f"127.0.0.1:{http_port}",
                "wal_dir": os.path.abspath(os.path.join(data_dir, "wal")),
                "drain_timeout": "20s", "linger": "0s"}, env={})
    sink = ClickHouseSink(cfg)

    def say(text: str) -> None:
        print(text, flush=True)

    async def main() -> int:
        await asyncio.to_thread(sink.command, f"""CREATE TABLE IF NOT EXISTS {TABLE} (
            ts DateTime, user_id UInt32, kind LowCardinality(String), value Float64)
            ENGINE = MergeTree ORDER BY (kind, ts)
            SETTINGS non_replicated_deduplication_window = 1000""")
        before = int(await asyncio.to_thread(sink.command, f"SELECT count() FROM {TABLE}"))
        app = App(cfg, sink=sink, signals=())
        running = asyncio.create_task(app.run())
        while not app.ready():
            if running.done():
                return await running
            await asyncio.sleep(0.05)
        say(f"ingest-buffer is up: gRPC 127.0.0.1:{grpc_port}, admin http://127.0.0.1:{http_port} "
            f"(readyz, metrics), ClickHouse: embedded chDB in {os.path.join(data_dir, 'chdb')}, write-ahead log in "
            f"{os.path.join(data_dir, 'wal')}")
        payload = demo_rows(rows)
        say(f"sending {rows:,} JSONEachRow rows ({len(payload) / 1e6:.1f} MB) to table {TABLE} through the client "
            "library (buffer.client)…")
        summary = await asyncio.to_thread(
            send, f"127.0.0.1:{grpc_port}", TABLE, pb.FORMAT_JSON_EACH_ROW, io.BytesIO(payload),
            total=len(payload), chunk_bytes=256 * 1024, ack=pb.ACK_LEVEL_BUFFERED, row_count=0, flush=True,
            progress=False, timeout=60)
        say(f"acknowledged {summary['rows_acknowledged']:,} rows in {summary['requests']} requests; flush barrier: "
            f"{json.dumps(summary['flush'])}; {summary['rows_per_second']:,} rows/s end to end")
        after = int(await asyncio.to_thread(sink.command, f"SELECT count() FROM {TABLE}"))
        say(f"rows in ClickHouse table {TABLE}: {before:,} before, {after:,} now (+{after - before:,})")
        if app.wal is not None:
            written = app.wal.writer.stats
            say(f"write-ahead log: every row was on disk before ClickHouse had it "
                f"({written.bytes_written / 1e6:.1f} MB written, {written.fsyncs} fsyncs); committed batches are "
                f"settled there, so a crash now would replay nothing twice (see for yourself: ingest-buffer wal "
                f"inspect {os.path.join(data_dir, 'wal')})")
        table = await asyncio.to_thread(
            sink.command, f"SELECT kind, count() AS n, round(avg(value), 2) AS avg_value FROM {TABLE} "
            "GROUP BY kind ORDER BY kind FORMAT PrettyCompactMonoBlock")
        say(table if isinstance(table, str) else "\n".join(map(str, table)))
        app.stop()
        code = await running
        say(f"drained and stopped (exit code {code}). Go on with the same data: ingest-buffer serve "
            f"--clickhouse-url chdb://{os.path.join(data_dir, 'chdb')}")
        say(f"  then, from another shell: ingest-buffer send FILE.jsonl --table {TABLE} --flush")
        return code if after - before == rows else 1

    return asyncio.run(main())
