"""What the client library gives an application that writes one row at a time, side by side in one run.

Usage: ``python bench/client_bench.py [--rows N] [--rounds R]`` (or ``python bench/bench.py --client``)

One application thread (a process of its own) writes N one-row dicts (default 1,000,000), as fast
as it can, end to end until everything is acknowledged (BUFFERED), four ways, against one
`ingest-buffer serve` (its write-ahead log on, as it ships) on the embedded ClickHouse:

1. ``buffer.client.Client``: ``write(table, dict)`` per row, then ``flush()``;
2. a naive batching client (a lock, a list, a queue, one stream; no bounds, no retries, no
   resend keys), the yardstick the library must beat;
3. raw one-row stream messages (one ``WriteStreamRequest`` per row: the path without a client),
   over N/10 rows;
4. the same rows, encoded before the clock starts, sent as 15 MiB stream messages: the ceiling for
   an application that already has its rows in bulk.

For each: rows/s, the application's CPU per row (from getrusage in its process) and the sidecar's
(from /proc), and for 1 and 2 the p50/p99/max of one ``write()`` call, timed around every call, and
where the application's CPU went, thread by thread (from /proc/self/task; the timing of every call
is in the application thread's share).
Every process is stopped by its PID; the data lives in a temp directory deleted afterwards.
Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wal_bench import TABLE, Sidecar, make_table  # noqa: E402

from bench import cpu_seconds, pct, stop  # noqa: E402  (bench/bench.py, beside this file)

SHAPES = tuple(os.environ.get("CLIENT_BENCH_SHAPES", "client,naive,raw-stream,bulk").split(","))


def rows(first: int, n: int) -> list[dict[str, Any]]:
    return [{"id": first + i, "ts": 1_700_000_000 + i % 86_400, "kind": ("click", "view", "buy")[i % 3],
             "value": i * 0.5, "payload": "x" * 16} for i in range(n)]


class NaiveClient:
    """The 40-line batching client: a lock, a list, a queue, one stream. No bounds, no retries."""

    def __init__(self, target: str, batch: int = 1000, linger: float = 0.005) -> None:
        import grpc
        import orjson

        from buffer.api import ingest_pb2 as pb

        self.pb, self.dumps, self.nl = pb, orjson.dumps, orjson.OPT_APPEND_NEWLINE
        self.batch, self.linger = batch, linger
        self.sent = 0
        self.lock = threading.Lock()
        self.rows: list[bytes] = []
        self.q: queue.Queue[bytes | None] = queue.Queue()
        self.channel = grpc.insecure_channel(target)
        stub = self.channel.stream_unary("/ingestbuffer.v1.IngestService/WriteStream",
                                         response_deserializer=pb.WriteStreamResponse.FromString)
        self.reply: list[Any] = []
        self.cpu: list[float] = []  # each thread's CPU seconds, as it ends (for the figures)

        def send() -> None:
            self.reply.append(stub(iter(self.q.get, None)))
            self.cpu.append(time.thread_time())

        self.sender = threading.Thread(target=send)
        self.sender.start()
        self.timer = threading.Thread(target=self._tick)
        self.done = threading.Event()
        self.timer.start()

    def write(self, table: str, row: dict[str, Any]) -> None:
        line = self.dumps(row, option=self.nl)
        with self.lock:
            self.rows.append(line)
            if len(self.rows) >= self.batch:
                self._send(table)

    def _send(self, table: str) -> None:
        if self.rows:
            self.q.put(self.pb.WriteStreamRequest(table=table, format=self.pb.FORMAT_JSON_EACH_ROW,
                                                  rows=b"".join(self.rows)).SerializeToString())
            self.rows = []
            self.sent += 1

    def _tick(self) -> None:
        while not self.done.wait(self.linger):
            with self.lock:
                self._send(TABLE)
        self.cpu.append(time.thread_time())

    def close(self) -> None:
        self.done.set()
        self.timer.join()
        with self.lock:
            self._send(TABLE)
        self.q.put(None)
        self.sender.join()
        self.channel.close()


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads, by role: the application's thread, the client's
    threads (by name), and gRPC's own (threads Python did not start)."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(task.name), "gRPC and other native threads")
        if name == "MainThread":
            name = "application thread"
        elif name.startswith("Thread-") and name.endswith("(_run)"):
            name = "gRPC's request threads"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def app(target: str, shape: str, n: int) -> dict[str, Any]:
    """The application process: writes n rows its way, returns its figures."""
    data = rows(0, n)
    chunks: list[bytes] = []
    if shape == "bulk":  # an application that has its rows encoded already: 15 MiB requests
        import orjson

        lines = [orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE) for row in data]
        step = max(1, len(lines) * 15 // max(1, sum(map(len, lines)) >> 20))
        chunks = [b"".join(lines[i:i + step]) for i in range(0, len(lines), step)]
        del lines
    lat: list[float] = []
    batches = 0
    clock = time.perf_counter
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    before = thread_cpu()
    t0 = clock()
    if shape == "client":
        from buffer.client import Client

        client = Client(target, **json.loads(os.environ.get("CLIENT_BENCH_OPTIONS", "{}")))
        write = client.write
        for row in data:
            t = clock()
            write(TABLE, row)
            lat.append(clock() - t)
        assert client.flush(600), client.stats()
        stats = client.stats()
        threads = thread_cpu()
        client.close()
        assert stats["acknowledged_rows"] == n, stats
        batches = stats["batches_sent"]
    elif shape == "naive":
        naive = NaiveClient(target)
        nwrite = naive.write
        for row in data:
            t = clock()
            nwrite(TABLE, row)
            lat.append(clock() - t)
        naive.close()
        threads = {**thread_cpu(), "naive sender and timer threads": sum(naive.cpu)}
        batches = naive.sent
    else:
        import grpc
        import orjson

        from buffer.api import ingest_pb2 as pb

        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stream = channel.stream_unary("/ingestbuffer.v1.IngestService/WriteStream",
                                          request_serializer=pb.WriteStreamRequest.SerializeToString,
                                          response_deserializer=pb.WriteStreamResponse.FromString)
            if shape == "raw-stream":
                def one_per_row() -> Any:
                    for row in data:
                        yield pb.WriteStreamRequest(table=TABLE, format=pb.FORMAT_JSON_EACH_ROW,
                                                    rows=orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
                reply = stream(one_per_row())
            else:
                reply = stream(pb.WriteStreamRequest(table=TABLE, format=pb.FORMAT_JSON_EACH_ROW, rows=chunk)
                               for chunk in chunks)
            assert reply.rows == n, reply
    seconds = clock() - t0
    if shape not in ("client", "naive"):
        threads = thread_cpu()
    threads = {name: cpu - before.get(name, 0.0) for name, cpu in threads.items()}
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"seconds": seconds, "cpu": cpu, "lat": [pct(lat, 0.5), pct(lat, 0.99), max(lat)] if lat else None,
            "threads": threads, "batches": batches}


def run(sidecar: Sidecar, shape: str, n: int) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, __file__, "_app", f"127.0.0.1:{sidecar.grpc}", shape, str(n)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        cpu0 = cpu_seconds(sidecar.proc.pid)
        out, _ = proc.communicate(timeout=900)
        result: dict[str, Any] = json.loads(out.splitlines()[-1])
        result["sidecar_cpu"] = cpu_seconds(sidecar.proc.pid) - cpu0
        sidecar.flush()
        return result
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ingest-buffer-clientbench-"))
    try:
        data = tmp / "chdb"
        make_table(data)
        sidecar = Sidecar(data, tmp / "wal", tmp / "sidecar.log")
        sidecar.ready()
        print(f"one application thread writing one-row dicts, BUFFERED, until acknowledged; 2 cores; {tmp}")
        print(f"{'shape':12s} {'rows':>10s} {'rows/s':>10s}  {'app CPU/row':>11s}  {'sidecar CPU/row':>15s}  "
              "write() p50 / p99 / max")
        try:
            for round_ in range(args.rounds):
                for shape in SHAPES:
                    n = args.rows // 10 if shape == "raw-stream" else args.rows
                    r = run(sidecar, shape, n)
                    lat = ("  {:.2f} / {:.2f} / {:.0f} us".format(*(x * 1e6 for x in r["lat"]))
                           if r["lat"] else "")
                    print(f"{shape:12s} {n:10,d} {n / r['seconds']:10,.0f}  {r['cpu'] / n * 1e6:8.2f} us  "
                          f"{r['sidecar_cpu'] / n * 1e6:12.2f} us{lat}", flush=True)
                    if shape in ("client", "naive"):
                        where = sorted(r["threads"].items(), key=lambda kv: -kv[1])
                        print(f"             {r['batches']:,} batches; application CPU by thread: " + ", ".join(
                            f"{name} {cpu / n * 1e6:.2f} us/row" for name, cpu in where if cpu > 0), flush=True)
                if args.rounds > 1:
                    print(f"(round {round_ + 1} of {args.rounds})")
        finally:
            sidecar.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_app":
        print(json.dumps(app(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
    else:
        main()
