"""What the write-ahead log costs, measured side by side on one embedded ClickHouse.

Usage: ``python bench/wal_bench.py [--seconds S] [--quick]``

1. Paced 1-row unary writes, 1,500 requests/s from 4 clients (one client process, the sidecar in
   another): ack latency p50/p99 for DURABLE, for BUFFERED with the log on, for BUFFERED without it,
   and for ``bench/reference_server.py`` (a server that does nothing but answer): the floor that
   Python gRPC and this machine set, tail included.
2. One stream per client (16 clients, pre-serialized messages, as fast as they go): 1-row messages
   DURABLE vs BUFFERED with the log on; 1,000-row messages with the log on vs off. Rows/s until the
   flush barrier returns, and the sidecar's CPU per row read from /proc.
3. Time to ready after a restart with about 1 GiB in the log (1,000-row requests), from the process
   start to ``/readyz`` 200, and the peak RSS of that start; the same with 256 MiB of 1-row requests
   (millions of them: a start keeps nothing per request).
4. ClickHouse down (its URL a closed port), a 128 MiB memory cap offered 10x its size in 1,000-row
   requests from 4 clients: with the log on, what is accepted (onto disk) and the sidecar's peak
   RSS; the same offer with the log off (the cap refuses the rest), for comparison.

Every server and client is a process of its own on 127.0.0.1, stopped by its PID in a finally block;
the data lives in a temp directory deleted afterwards. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cpu_seconds, encode, free_port, pct, stop  # noqa: E402  (bench/bench.py, beside this file)

DB, TABLE = "bench", "events"
DDL = (f"CREATE TABLE {DB}.{TABLE} (id UInt64, ts DateTime, kind LowCardinality(String), value Float64, "
       "payload String) ENGINE = MergeTree ORDER BY (kind, ts) SETTINGS non_replicated_deduplication_window = 1000, "
       "max_bytes_to_merge_at_max_space_in_pool = 1")
ACK = {"buffered": 1, "durable": 2}


class Sidecar:
    def __init__(self, data: Path, wal: Path | None, log: Path, extra: tuple[str, ...] = (),
                 reference: bool = False) -> None:
        self.grpc, self.http = free_port(), free_port()
        program = [str(ROOT / "bench" / "reference_server.py")] if reference else ["-m", "buffer"]
        cmd = [sys.executable, *program, "serve", "--grpc-listen", f"127.0.0.1:{self.grpc}", "--http-listen",
               f"127.0.0.1:{self.http}", "--clickhouse-url", f"chdb://{data}", "--database", DB, "--tables", TABLE,
               "--buffer-max-bytes", "256MiB", "--buffer-max-rows", "4000000", "--flush-max-bytes", "64MiB",
               "--flush-interval", "250ms", "--linger", "0s", "--log-level", "warning",
               "--wal-dir", str(wal) if wal else "", "--wal-max-bytes", "4GiB", *extra]
        self.started = time.perf_counter()
        self._log = open(log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def ready(self, timeout: float = 120) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, "the sidecar exited during its start"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - self.started
            except OSError:
                time.sleep(0.02)
        raise AssertionError("not ready in time")

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def flush(self) -> None:
        import grpc

        from buffer.api import ingest_pb2 as pb
        from buffer.api import ingest_pb2_grpc as pb_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.grpc}") as channel:
            pb_grpc.IngestServiceStub(channel).Flush(pb.FlushRequest(), timeout=300)

    def close(self, sig: int = signal.SIGTERM) -> None:
        stop(self.proc, sig, timeout=120)
        self._log.close()


# ----- the client process ------------------------------------------------------------------------

async def client(target: str, mode: str, ack: int, size: int, clients: int, seconds: float, rate: float,
                 first: int) -> dict[str, Any]:
    from grpc import aio

    from buffer.api import ingest_pb2 as pb

    channel = aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    await channel.channel_ready()
    unary = channel.unary_unary("/ingestbuffer.v1.IngestService/Write",
                                response_deserializer=pb.WriteResponse.FromString)
    stream = channel.stream_unary("/ingestbuffer.v1.IngestService/WriteStream",
                                  response_deserializer=pb.WriteStreamResponse.FromString)
    count = int(seconds * rate) if mode == "paced" else int(400_000 / size) if size == 1 else 3000
    msg = pb.WriteRequest if mode == "paced" else pb.WriteStreamRequest
    pool = [msg(table=TABLE, format=pb.FORMAT_JSON_EACH_ROW, ack_level=ack,
                rows=encode(first + k * size, size)).SerializeToString() for k in range(count)]
    lat: list[float] = []
    rows = [0]
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    t0 = loop.time()

    async def paced(k: int) -> None:
        interval = clients / rate
        for n, i in enumerate(range(k, len(pool), clients)):
            at = t0 + n * interval + k * interval / clients
            if (wait := at - loop.time()) > 0:
                await asyncio.sleep(wait)
            t = time.perf_counter()
            reply = await unary(pool[i])
            lat.append(time.perf_counter() - t)
            rows[0] += reply.rows

    async def streamed(k: int) -> None:
        call = stream()
        deadline = loop.time() + seconds
        for i in range(k, len(pool), clients):
            if loop.time() > deadline:
                break
            await call.write(pool[i])
        await call.done_writing()
        reply = await call  # (not `rows[0] += (await call).rows`: that reads rows[0] before the await)
        rows[0] += reply.rows

    await asyncio.gather(*((paced if mode == "paced" else streamed)(k) for k in range(clients)))
    await channel.close()
    return {"rows": rows[0], "lat": lat}


def run_client(sidecar: Sidecar, mode: str, ack: str, size: int, clients: int, seconds: float, rate: float,
               first: int) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, __file__, "_client", f"127.0.0.1:{sidecar.grpc}", mode, str(ACK[ack]),
                             str(size), str(clients), str(seconds), str(rate), str(first)], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        cpu0, t0 = cpu_seconds(sidecar.proc.pid), time.perf_counter()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        result: dict[str, Any] = json.loads(proc.communicate(timeout=seconds + 300)[0].splitlines()[-1])
        sidecar.flush()
        result["seconds"] = time.perf_counter() - t0
        result["cpu"] = cpu_seconds(sidecar.proc.pid) - cpu0
        return result
    finally:
        stop(proc)


async def outage_client(target: str, mib: int) -> dict[str, Any]:
    """Offers ``mib`` MiB of 1,000-row requests from 4 clients, one request at a time each; counts
    what was accepted and what refused. One request is built once and sent again and again."""
    import grpc
    from grpc import aio

    from buffer.api import ingest_pb2 as pb

    channel = aio.insecure_channel(target)
    await channel.channel_ready()
    unary = channel.unary_unary("/ingestbuffer.v1.IngestService/Write",
                                response_deserializer=pb.WriteResponse.FromString)
    raw = pb.WriteRequest(table=TABLE, format=pb.FORMAT_JSON_EACH_ROW, rows=encode(0, 1000)).SerializeToString()
    n = (mib << 20) // len(raw)
    counts = {"accepted": 0, "refused": 0, "bytes": 0}

    async def one(k: int) -> None:
        for _ in range(k, n, 4):
            try:
                await unary(raw, timeout=30)
                counts["accepted"] += 1
                counts["bytes"] += len(raw)
            except grpc.aio.AioRpcError:
                counts["refused"] += 1

    await asyncio.gather(*(one(k) for k in range(4)))
    await channel.close()
    return counts


def run_outage(data: Path, wal: Path | None, log: Path, cap_mib: int) -> tuple[dict[str, Any], float, float]:
    """The sidecar with ClickHouse down, offered 10x its memory cap: (counts, idle RSS, peak RSS) in MiB."""
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s = Sidecar(data, wal, log, ("--clickhouse-url", down, "--buffer-max-bytes", f"{cap_mib}MiB", "--when-full",
                                 "reject", "--flush-max-bytes", "16MiB", "--wal-max-bytes", f"{cap_mib * 12}MiB"))
    try:
        s.ready()
        time.sleep(1.0)
        idle = s.peak_rss_mib()
        out = subprocess.run([sys.executable, __file__, "_outage", f"127.0.0.1:{s.grpc}", str(cap_mib * 10)],
                             cwd=ROOT, capture_output=True, text=True, timeout=900, check=True)
        counts: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
        return counts, idle, s.peak_rss_mib()
    finally:
        s.close(signal.SIGKILL)


# ----- the parent ----------------------------------------------------------------------------------

def restart(data: Path, wal: Path, log: Path) -> tuple[int, float, float]:
    """A start on a full log that flushes nothing: (log bytes, seconds to ready, peak RSS in MiB)."""
    size = sum(p.stat().st_size for p in wal.iterdir())
    s = Sidecar(data, wal, log, ("--buffer-max-bytes", "64MiB", "--flush-interval", "1h", "--flush-max-bytes",
                                 "16MiB"))
    try:
        return size, s.ready(), s.peak_rss_mib()
    finally:
        s.close(signal.SIGKILL)


def make_table(data: Path) -> None:
    subprocess.run([sys.executable, "-m", "tests.chdb_query", str(data), f"CREATE DATABASE IF NOT EXISTS {DB}",
                    DDL], cwd=ROOT, check=True, capture_output=True)


def fill_log(wal: Path, gib: float, rows: int = 1000) -> int:
    """Writes about ``gib`` GiB of ``rows``-row requests into a fresh log, as a crash would leave them."""
    from buffer.wal import WriteAheadLog

    async def write() -> int:
        log = WriteAheadLog(wal, max_bytes=8 << 30, database=DB)
        log.open()
        log.start(asyncio.get_running_loop())
        payload = encode(9 * 10**12, rows)
        n = int(gib * (1 << 30) / len(payload))
        for i in range(n):
            log.append((TABLE, "JSONEachRow"), payload, rows, durable=i == n - 1)
            if i % 1000 == 999:
                await log.sync()
        await log.sync()
        log.close()
        return n * rows

    return asyncio.run(write())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="2 s phases and a 0.25 GiB log")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    tmp = Path(tempfile.mkdtemp(prefix="ingest-buffer-walbench-"))
    log = tmp / "sidecars.log"
    try:
        data = tmp / "chdb"
        make_table(data)
        print(f"ingest-buffer write-ahead log benchmark; 2 cores; data in {tmp}")
        print("\npaced 1-row unary writes, 1,500/s from 4 clients:")
        base = 0
        for label, ack, logged in (("DURABLE", "durable", True), ("BUFFERED, log on", "buffered", True),
                                   ("BUFFERED, log off", "buffered", False), ("do-nothing server", "buffered", False)):
            s = Sidecar(data, tmp / f"wal-{base}" if logged else None, log, reference=label == "do-nothing server")
            s.ready()
            try:
                r = run_client(s, "paced", ack, 1, 4, seconds, 1500, base)
            finally:
                s.close()
            lat = r["lat"]
            print(f"  {label:20s} {len(lat):6d} requests  p50 {pct(lat, .5) * 1000:6.2f} ms  "
                  f"p99 {pct(lat, .99) * 1000:6.2f} ms  max {max(lat) * 1000:6.1f} ms")
            base += 10**9
        print("\none stream per client, 16 clients:")
        results: dict[str, dict[str, Any]] = {}
        for label, ack, size, logged in (("1-row DURABLE", "durable", 1, True),
                                         ("1-row BUFFERED, log on", "buffered", 1, True),
                                         ("1,000-row BUFFERED, log on", "buffered", 1000, True),
                                         ("1,000-row BUFFERED, log off", "buffered", 1000, False)):
            s = Sidecar(data, tmp / f"wal-{base}" if logged else None, log)
            s.ready()
            try:
                r = run_client(s, "stream", ack, size, 16, seconds, 0, base)
            finally:
                s.close()
            results[label] = r
            print(f"  {label:28s} {r['rows']:9,d} rows  {r['rows'] / r['seconds']:11,.0f} rows/s  "
                  f"{r['cpu'] / r['rows'] * 1e6:6.2f} us sidecar CPU per row")
            base += 10**9

        def ratio(a: str, b: str) -> float:
            ra, rb = results[a], results[b]
            return float((ra["rows"] / ra["seconds"]) / (rb["rows"] / rb["seconds"]))

        print(f"  1-row DURABLE / BUFFERED: {ratio('1-row DURABLE', '1-row BUFFERED, log on'):.2f}; 1,000-row log on "
              f"/ off: {ratio('1,000-row BUFFERED, log on', '1,000-row BUFFERED, log off'):.2f}")
        empty = Sidecar(data, tmp / "wal-empty", log, ("--buffer-max-bytes", "64MiB"))
        try:
            empty_ready, empty_rss = empty.ready(), empty.peak_rss_mib()
        finally:
            empty.close(signal.SIGKILL)
        gib = 0.25 if args.quick else 1.0
        wal = tmp / "wal-big"
        t = time.perf_counter()
        rows = fill_log(wal, gib)
        wrote = time.perf_counter() - t
        size, ready, rss = restart(data, wal, log)
        print(f"\nrestart with {size / (1 << 30):.2f} GiB ({rows:,} rows) in the log (written in {wrote:.1f} s): ready "
              f"{ready:.2f} s after the process started; peak RSS {rss:.0f} MiB (memory cap 64 MiB). The same start "
              f"with an empty log: ready {empty_ready:.2f} s, peak RSS {empty_rss:.0f} MiB")
        small = tmp / "wal-small"
        rows = fill_log(small, gib / 4, rows=1)
        size, ready, rss = restart(data, small, log)
        print(f"restart with {size / (1 << 20):.0f} MiB of 1-row requests ({rows:,}) in the log: ready {ready:.2f} s; "
              f"peak RSS {rss:.0f} MiB")
        cap = 32 if args.quick else 128
        print(f"\nClickHouse down, a {cap} MiB memory cap offered {cap * 10} MiB in 1,000-row requests from 4 clients:")
        for label, logged in (("log on", True), ("log off", False)):
            counts, idle, peak = run_outage(data, tmp / "wal-outage" if logged else None, log, cap)
            print(f"  {label:8s} accepted {counts['bytes'] / (1 << 20):7.0f} MiB ({counts['accepted']:,} requests, "
                  f"{counts['refused']:,} refused); peak RSS {peak:.0f} MiB = cap + {peak - cap:.0f} MiB "
                  f"(idle {idle:.0f} MiB; peak - idle - cap = {peak - idle - cap:.0f} MiB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_outage":
        print(json.dumps(asyncio.run(outage_client(sys.argv[2], int(sys.argv[3])))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_client":
        target, mode, ack, size, clients, seconds, rate, first = sys.argv[2:]
        out = asyncio.run(client(target, mode, int(ack), int(size), int(clients), float(seconds), float(rate),
                                 int(first)))
        print(json.dumps(out))
    else:
        os.environ.setdefault("PYTHONHASHSEED", "0")
        main()
