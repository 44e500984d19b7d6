"""Throughput and ack latency of ingest-buffer against direct ClickHouse inserts, on one embedded chDB.

Usage: ``python bench/bench.py [--seconds S] [--clients N] [--client-procs P] [--repeat R] [--quick] [--reference]
[--profile DIR]``; ``--wal`` measures the write-ahead log (bench/wal_bench.py), ``--client`` the client
library (bench/client_bench.py) and ``--http`` the ClickHouse HTTP interface (bench/http_bench.py) instead.

Design (chDB lets one process open one data path, and never two processes the same path at once,
so everything touching the data runs in turn, each phase in its own process):

1. ``bench.py _direct`` (a child process) opens the path, creates ``bench.events``, runs the
   baseline (one ``raw_insert`` per request from ``--clients`` threads, each with its own chdb
   client) for 1-row and 1,000-row writes, then one bulk ``raw_insert`` of all large-phase rows,
   checks each phase's count and exits.
2. Per sidecar phase (unary ``Write`` and one long-lived ``WriteStream`` per client, each write
   size) a fresh ``python -m buffer serve`` child is started on the same path (127.0.0.1, free
   ports) and warmed up with one row. ``--client-procs`` client processes (``bench.py _client``,
   grpc.aio, the clients split evenly over them as coroutines; one process by default, since the
   sidecar needs the other core) pre-encode and pre-serialize their requests, report ready, and
   start on "go". The clock runs from "go" until a ``Flush`` RPC (the flush barrier) returns after
   every client is done. Sidecar CPU is read from /proc/PID/stat around the phase. Then the sidecar
   gets SIGTERM and exits, and a short-lived ``python -m tests.chdb_query`` child counts the rows.
3. Every phase (and every round of it) writes its own id range, so ``count() == uniqExact(id) ==
   rows acknowledged`` shows each row landed exactly once. After every phase the table is merged
   (``OPTIMIZE ... FINAL``, untimed), so no phase pays for the merges of the one before (1-row
   direct inserts leave a part per row behind).

With ``--reference`` every sidecar phase also runs against ``bench/reference_server.py`` (the
simplest server that takes the same requests: no checks, no bounds, no retries, no accounting), so
what the sidecar's guarantees cost and what its flushing gains are measured side by side.

Each phase stops at ``--seconds`` or when its pre-encoded rows run out, whichever comes first.
The whole sequence runs ``--repeat`` times (default 3), one round after the other so that a slow
spell of the machine spreads over every scenario; the table shows each scenario's median round and
the range over rounds, since a 2-core machine varies by ±10 % from one minute to the next.
Every process started here is stopped by its PID (terminate, then kill) in a finally block, and
the data directory lives in a temp dir that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DB, TABLE = "bench", "events"
DDL = (f"CREATE TABLE {DB}.{TABLE} (id UInt64, ts DateTime, kind LowCardinality(String), value Float64, "
       "payload String) ENGINE = MergeTree ORDER BY (kind, ts) SETTINGS non_replicated_deduplication_window = 1000")
KINDS = ("click", "view", "purchase", "signup")
SIZES = (1, 1000)
SHAPES = ("unary", "stream")
REFERENCE_SHAPES = ("reference-unary", "reference-stream")
# Each phase writes ids [lo, lo + rows): lo = (phase number) * ID_SPAN + (round) * ROUND_SPAN.
PHASES = {"baseline/1": 1, "baseline/1000": 2, "bulk": 3, "unary/1": 4, "unary/1000": 5,
          "stream/1": 6, "stream/1000": 7, "reference-unary/1": 8, "reference-unary/1000": 9,
          "reference-stream/1": 10, "reference-stream/1000": 11}
ID_SPAN = 10**10
ROUND_SPAN = 10**9
SERVE_SETTINGS = ["--database", DB, "--tables", TABLE, "--when-full", "block", "--buffer-max-bytes", "256MiB",
                  "--buffer-max-rows", "4000000", "--flush-max-rows", "100000", "--flush-max-bytes", "64MiB",
                  "--flush-interval", "250ms", "--linger", "0s", "--drain-timeout", "60s", "--log-level", "warning"]


def encode(lo: int, n: int) -> bytes:
    return "".join([f'{{"id":{i},"ts":{1_700_000_000 + i % 86_400},"kind":"{KINDS[i & 3]}","value":{i % 1000}.25,'
                    f'"payload":"p{i:012d}"}}\n' for i in range(lo, lo + n)]).encode()


def first_id(phase: str, round_: int) -> int:
    return PHASES[phase] * ID_SPAN + round_ * ROUND_SPAN


def payloads(phase: str, round_: int, size: int, rows: int, part: int = 0, parts: int = 1) -> list[bytes]:
    """This process's share (every parts-th payload) of a phase's pre-encoded requests."""
    lo = first_id(phase, round_)
    return [encode(lo + k * size, size) for k in range(part, rows // size, parts)]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def check_sql(phase: str, round_: int) -> str:
    lo = first_id(phase, round_)
    return f"SELECT count(), uniqExact(id) FROM {DB}.{TABLE} WHERE id >= {lo} AND id < {lo + ROUND_SPAN}"


def drive(pool: list[bytes], clients: int, seconds: float,
          sender: Callable[[], Callable[[bytes], str | None]]) -> tuple[list[float], list[str], float]:
    """Sends the pool's requests from ``clients`` threads, each with a sender of its own (``sender()``
    makes one: it sends a request and returns None, or why it failed), until the pool or ``seconds``
    run out. Returns each request's latency, the failures (a thread stops at its first) and the time."""
    ticket = itertools.count()
    lat: list[float] = []  # list.append is atomic under the GIL
    failed: list[str] = []
    deadline = time.perf_counter() + seconds

    def worker(send: Callable[[bytes], str | None]) -> None:
        while (i := next(ticket)) < len(pool) and time.perf_counter() < deadline:
            t = time.perf_counter()
            error = send(pool[i])
            if error is not None:
                failed.append(error)
                return
            lat.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(sender(),)) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return lat, failed, time.perf_counter() - t0


# ----- child: direct inserts (a) and the bulk insert (c) -----------------------------------------

def run_direct(path: str, clients: int, seconds: float, budget: dict[int, int], round_: int) -> dict[str, Any]:
    import clickhouse_connect

    main = clickhouse_connect.get_client(dsn=f"chdb://{path}")
    main.command(f"CREATE DATABASE IF NOT EXISTS {DB}")
    main.command(DDL.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
    out: dict[str, Any] = {}
    for size in SIZES:
        phase = f"baseline/{size}"
        def sender() -> Callable[[bytes], str | None]:
            conn = clickhouse_connect.get_client(dsn=f"chdb://{path}")

            def send(body: bytes) -> None:
                conn.raw_insert(f"{DB}.{TABLE}", None, body, fmt="JSONEachRow")  # raises on failure
            return send

        lat, _, elapsed = drive(payloads(phase, round_, size, budget[size]), clients, seconds, sender)
        out[phase] = {"rows": len(lat) * size, "seconds": elapsed, "lat": lat,
                      "landed": list(main.query(check_sql(phase, round_)).result_rows[0])}
        main.command(f"OPTIMIZE TABLE {DB}.{TABLE} FINAL")  # settle merges: the next phase starts clean
    big = b"".join(payloads("bulk", round_, 1000, budget[1000]))
    t0 = time.perf_counter()
    main.raw_insert(f"{DB}.{TABLE}", None, big, fmt="JSONEachRow")
    elapsed = time.perf_counter() - t0
    out["bulk"] = {"rows": big.count(b"\n"), "seconds": elapsed, "lat": [elapsed],
                   "landed": list(main.query(check_sql("bulk", round_)).result_rows[0])}
    main.command(f"OPTIMIZE TABLE {DB}.{TABLE} FINAL")
    return out


# ----- child: gRPC load (b) ------------------------------------------------------------------------

async def run_client(target: str, shape: str, size: int, clients: int, rows: int, part: int, parts: int,
                     seconds: float, round_: int) -> dict[str, Any]:
    from grpc import aio

    from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb

    unary = shape.endswith("unary")  # "unary" or "reference-unary", and the same for streams
    msg = pb.WriteRequest if unary else pb.WriteStreamRequest
    pool = [msg(table=TABLE, format=pb.FORMAT_JSON_EACH_ROW, rows=p).SerializeToString()
            for p in payloads(f"{shape}/{size}", round_, size, rows, part, parts)]
    channel = aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    await channel.channel_ready()
    # Requests go out pre-serialized: no serializer (bytes pass through as they are).
    write = channel.unary_unary("/ingestbuffer.v1.IngestService/Write",
                                response_deserializer=pb.WriteResponse.FromString)
    stream = channel.stream_unary("/ingestbuffer.v1.IngestService/WriteStream",
                                  response_deserializer=pb.WriteStreamResponse.FromString)
    ticket = itertools.count()
    lat: list[float] = []
    acked = [0]
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    cpu0, deadline = time.process_time(), time.perf_counter() + seconds

    async def unary_client() -> None:
        while (i := next(ticket)) < len(pool) and time.perf_counter() < deadline:
            t = time.perf_counter()
            reply = await write(pool[i])
            lat.append(time.perf_counter() - t)
            acked[0] += reply.rows

    async def stream_client() -> None:
        call = stream()
        while (i := next(ticket)) < len(pool) and time.perf_counter() < deadline:
            await call.write(pool[i])
        await call.done_writing()
        t = time.perf_counter()
        reply = await call
        lat.append(time.perf_counter() - t)
        acked[0] += reply.rows

    await asyncio.gather(*(unary_client() if unary else stream_client() for _ in range(clients)))
    cpu = time.process_time() - cpu0
    await channel.close()
    return {"rows": acked[0], "lat": lat, "cpu": cpu}


# ----- parent --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def child(*args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, text=True, stdout=subprocess.PIPE, **kw)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sidecar_phase(target: str, pid: int, shape: str, size: int, args: argparse.Namespace, budget: int,
                  flush: Any, profile: Path | None, round_: int) -> dict[str, Any]:
    procs: list[subprocess.Popen[str]] = []
    spy: subprocess.Popen[bytes] | None = None
    per = [args.clients // args.client_procs + (k < args.clients % args.client_procs) for k in range(args.client_procs)]
    try:
        for k, n in enumerate(per):
            procs.append(child("_client", target, shape, str(size), str(n), str(budget), str(k),
                               str(args.client_procs), str(args.seconds), str(round_), stdin=subprocess.PIPE))
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", "a client failed to start"
        if profile is not None:
            spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            spy = subprocess.Popen([spy_bin, "record", "-p", str(pid), "-d", str(int(args.seconds)), "-r", "200",
                                    "-o", str(profile / f"sidecar-{shape}-{size}-round{round_}.svg")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.communicate(timeout=args.seconds + 120)[0].splitlines()[-1]) for p in procs]
        done = flush()
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
        if spy is not None:
            spy.wait(args.seconds + 30)
    finally:
        for p in procs:
            stop(p)
        if spy is not None:
            stop(spy)
    return {"rows": sum(r["rows"] for r in results), "seconds": elapsed,
            "lat": [x for r in results for x in r["lat"]], "server_cpu": cpu / elapsed,
            "client_cpu": sum(r["cpu"] for r in results) / elapsed,
            "flushed": [done.rows_committed, done.rows_failed]}


def run_sidecar(path: Path, shape: str, size: int, args: argparse.Namespace, budget: int,
                log: Path, round_: int) -> dict[str, Any]:
    """One phase against a fresh `ingest-buffer serve` process (or, for a ``reference-`` shape, the
    reference server) on the path; returns after it exited."""
    import grpc

    from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb

    grpc_port, http_port = free_port(), free_port()
    target = f"127.0.0.1:{grpc_port}"
    server = ([str(ROOT / "bench" / "reference_server.py")] if shape.startswith("reference-")
              else ["-m", "buffer"])
    cmd = [sys.executable, *server, "serve", "--grpc-listen", target, "--http-listen",
           f"127.0.0.1:{http_port}", "--clickhouse-url", f"chdb://{path}", *SERVE_SETTINGS]
    if not shape.startswith("reference-"):  # the sidecar as it ships: its write-ahead log on, beside the data
        cmd += ["--wal-dir", f"{path}-wal-{grpc_port}"]
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            end = time.monotonic() + 60
            while True:
                assert proc.poll() is None and time.monotonic() < end, f"sidecar not ready: {log.read_text()}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.05)
            with grpc.insecure_channel(target) as channel:
                flush = channel.unary_unary("/ingestbuffer.v1.IngestService/Flush",
                                            request_serializer=pb.FlushRequest.SerializeToString,
                                            response_deserializer=pb.FlushResponse.FromString)
                write = channel.unary_unary("/ingestbuffer.v1.IngestService/Write",
                                            request_serializer=pb.WriteRequest.SerializeToString,
                                            response_deserializer=pb.WriteResponse.FromString)

                def barrier() -> Any:
                    return flush(pb.FlushRequest(), timeout=120)

                # Warm-up (id 0, outside every phase's range): the first insert loads and connects chDB.
                write(pb.WriteRequest(table=TABLE, format=pb.FORMAT_JSON_EACH_ROW, rows=encode(0, 1)), timeout=30)
                barrier()
                out = sidecar_phase(target, proc.pid, shape, size, args, budget, barrier, args.profile, round_)
            stop(proc, signal.SIGTERM, 90)
            out["exit_code"] = proc.returncode
        finally:
            stop(proc, signal.SIGKILL)
    return out


def settle(path: Path, phase: str, round_: int) -> list[int]:
    """Counts a phase's rows and merges the table's parts (untimed), from a short-lived process."""
    out = subprocess.run([sys.executable, "-m", "tests.chdb_query", str(path), check_sql(phase, round_),
                          f"OPTIMIZE TABLE {DB}.{TABLE} FINAL"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    counts: list[int] = json.loads(out.stdout.splitlines()[-1])[0][0]
    return counts


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.2f} ms"


def rate(run: dict[str, Any]) -> float:
    return float(run["rows"] / run["seconds"])


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median rows/s (the lower middle one for an even count)."""
    return sorted(runs, key=rate)[(len(runs) - 1) // 2]


def landed_ok(run: dict[str, Any]) -> bool:
    count, unique = run["landed"]
    return bool(count == unique == run["rows"] and run.get("flushed", [0, 0])[1] == 0)


def report(results: dict[str, list[dict[str, Any]]]) -> None:
    rounds = len(results["bulk"])
    head = ("scenario", "write size", "rows", "seconds", "rows/s", f"range ({rounds} rounds)", "x baseline",
            "ack p50", "ack p99", "landed OK")
    lines = []
    names = {"baseline": "(a) direct INSERT per request", "unary": "(b) sidecar, unary Write",
             "stream": "(b) sidecar, WriteStream/client*", "bulk": "(c) one bulk INSERT",
             "reference-unary": "(d) reference server, unary", "reference-stream": "(d) reference, stream/client*"}
    reference = bool(results["reference-unary/1"])
    order = [f"{kind}/{size}" for size in SIZES
             for kind in ("baseline", *SHAPES, *(REFERENCE_SHAPES if reference else ()))] + ["bulk"]
    for phase in order:
        runs = results[phase]
        r = median_run(runs)
        kind, _, size = phase.partition("/")
        base = rate(median_run(results[f"baseline/{size or 1000}"]))
        rates = sorted(rate(x) for x in runs)
        ok = all(landed_ok(x) for x in runs)
        lines.append((names[kind], f"{int(size):,}" if size else f"all ({r['rows']:,})", f"{r['rows']:,}",
                      f"{r['seconds']:.2f}", f"{rate(r):,.0f}", f"{rates[0]:,.0f}-{rates[-1]:,.0f}",
                      f"{rate(r) / base:.1f}x", fmt_ms(pct(r["lat"], 0.5)), fmt_ms(pct(r["lat"], 0.99)),
                      f"{'yes' if ok else 'NO'} ({sum(x['landed'][0] for x in runs):,} rows)"))
    widths = [max(len(str(row[i])) for row in (head, *lines)) for i in range(len(head))]
    for row in (head, tuple("-" * w for w in widths), *lines):
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    streams, bulks = results["stream/1000"], results["bulk"]
    per_round = ", ".join(f"{rate(a) / rate(b):.2f}" for a, b in zip(streams, bulks, strict=True))
    print(f"\n1,000-row streams / one bulk insert: {rate(median_run(streams)) / rate(median_run(bulks)):.2f} "
          f"(medians; round by round: {per_round})")
    print("* rows/s, seconds and latencies are the median round's; range is the lowest and highest rows/s over\n"
          "  the rounds; x baseline is against the median direct-insert round of the same write size (bulk:\n"
          "  the 1,000-row one). Streams: per-message acks are not observable; ack p50/p99 is the latency of\n"
          "  each stream's single final ack (done_writing -> reply), one sample per client. Bulk: the insert\n"
          "  itself. landed OK: in every round count() == uniqExact(id) == rows acked (and, for the sidecar,\n"
          "  the final Flush reported no failed rows). Sidecar exit code 0 = it reported every accepted row\n"
          "  committed.")
    if reference:
        ratios = []
        for rows in SIZES:
            for shape in SHAPES:
                ours, theirs = (rate(median_run(results[f"{p}{shape}/{rows}"])) for p in ("", "reference-"))
                ratios.append(f"{shape} {rows:,}-row {ours / theirs:.2f}")
        print("sidecar / reference server, rows/s (medians): " + ", ".join(ratios))
    for phase in [p for p in order if not p.startswith(("baseline", "bulk"))]:
        r = median_run(results[phase])
        codes = ",".join(str(x["exit_code"]) for x in results[phase])
        print(f"  {phase:<22} server CPU {r['server_cpu'] * 100:5.0f}%   client procs CPU "
              f"{r['client_cpu'] * 100:5.0f}%   (of one core)   server exit codes {codes}")


def busy_warning() -> None:
    load = os.getloadavg()[0]
    if load > 0.7:
        print(f"WARNING: 1-minute load average is {load:.1f}: other processes (or a run that just ended) use the "
              "CPU; figures will be low and noisy", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="time limit of each phase (default 6)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--client-procs", type=int, default=1, help="processes the gRPC clients run in (default 1)")
    parser.add_argument("--rows", type=int, default=3_000_000, help="row budget of 1,000-row phases and bulk")
    parser.add_argument("--small-rows", type=int, default=400_000, help="row budget of 1-row phases")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every phase; medians are shown (default 3)")
    parser.add_argument("--quick", action="store_true", help="one round of 2 s phases, smaller budgets (<1 min)")
    parser.add_argument("--profile", type=Path, default=None, help="record py-spy flame graphs of the sidecar here")
    parser.add_argument("--wal", action="store_true",
                        help="measure the write-ahead log's costs instead (bench/wal_bench.py; --seconds, --quick)")
    parser.add_argument("--client", action="store_true",
                        help="measure the client library instead (bench/client_bench.py: 1,000,000 one-row dicts "
                             "from one application thread; --rows, --repeat)")
    parser.add_argument("--http", action="store_true",
                        help="measure inserts over the ClickHouse HTTP interface instead (bench/http_bench.py: "
                             "through the buffer, straight into ClickHouse, ClickHouse's async inserts; --seconds, "
                             "--clients, --repeat)")
    parser.add_argument("--reference", action="store_true",
                        help="also run the sidecar's phases against bench/reference_server.py, the simplest "
                             "server that takes the same requests (about 2 more minutes)")
    args = parser.parse_args()
    if args.wal:
        import wal_bench  # beside this file

        given = ["--seconds", str(args.seconds)] if any(a.startswith("--seconds") for a in sys.argv) else []
        sys.argv = [wal_bench.__file__, *given, *(["--quick"] if args.quick else [])]
        wal_bench.main()
        return 0
    if args.client:
        import client_bench  # beside this file

        rows = ["--rows", str(args.rows)] if any(a.startswith("--rows") for a in sys.argv) else []
        rounds = ["--rounds", str(args.repeat)] if any(a.startswith("--repeat") for a in sys.argv) else []
        sys.argv = [client_bench.__file__, *rows, *rounds]
        client_bench.main()
        return 0
    if args.http:
        import http_bench  # beside this file

        given = [x for name in ("seconds", "clients", "repeat", "rows", "small_rows")
                 if any(a.startswith("--" + name.replace("_", "-")) for a in sys.argv)
                 for x in ("--" + name.replace("_", "-"), str(getattr(args, name)))]
        sys.argv = [http_bench.__file__, *given]
        http_bench.main()
        return 0
    if args.quick:
        args.seconds, args.rows, args.small_rows = 2.0, min(args.rows, 600_000), min(args.small_rows, 100_000)
        args.repeat = 1
    args.repeat = max(1, args.repeat)
    assert max(args.rows, args.small_rows) < ROUND_SPAN, "a round's ids must stay in its own range"
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    args.client_procs = max(1, min(args.client_procs, args.clients))
    budget = {1: args.small_rows, 1000: args.rows}
    tmp = Path(tempfile.mkdtemp(prefix="ingest-buffer-bench-"))
    path = tmp / "chdb"
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    print(f"ingest-buffer {rev.stdout.strip() or '(no git)'}; {os.cpu_count()} cores; {args.clients} clients; "
          f"phases of <= {args.seconds:g}s; data in {path}", flush=True)
    busy_warning()
    try:
        print("sidecar: ingest-buffer serve --clickhouse-url chdb://<data> " + " ".join(SERVE_SETTINGS)
              + " (127.0.0.1 free ports; a fresh process per phase)", flush=True)
        results: dict[str, list[dict[str, Any]]] = {phase: [] for phase in PHASES}
        if args.reference:
            print("reference: bench/reference_server.py with the same flags, same clients, same phases", flush=True)
        for round_ in range(args.repeat):
            direct = child("_direct", str(path), str(args.clients), str(args.seconds), json.dumps(budget),
                           str(round_))
            try:
                out = direct.communicate(timeout=args.seconds * 3 + 180)[0]
            finally:
                stop(direct)
            assert direct.returncode == 0 and out.strip(), "the direct-insert phase failed (its stderr is above)"
            for phase, run in json.loads(out.splitlines()[-1]).items():
                results[phase].append(run)
            for shape in SHAPES + (REFERENCE_SHAPES if args.reference else ()):
                for size in SIZES:
                    phase = f"{shape}/{size}"
                    run = run_sidecar(path, shape, size, args, budget[size], tmp / "serve.log", round_)
                    run["landed"] = settle(path, phase, round_)
                    results[phase].append(run)
            print(f"round {round_ + 1}/{args.repeat}: done", flush=True)
        print()
        report(results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_direct"]:
        p, n, s, b, r = sys.argv[2:7]
        budgets = {int(k): v for k, v in json.loads(b).items()}
        print(json.dumps(run_direct(p, int(n), float(s), budgets, int(r))))
    elif sys.argv[1:2] == ["_client"]:
        t, sh, sz, n, rows, part, parts, s, r = sys.argv[2:11]
        sys.path.insert(0, str(ROOT))
        print(json.dumps(asyncio.run(run_client(t, sh, int(sz), int(n), int(rows), int(part), int(parts), float(s),
                                                int(r)))))
    else:
        sys.exit(main())
