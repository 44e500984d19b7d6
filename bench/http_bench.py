"""Inserts over ClickHouse's HTTP interface through the buffer, against the same inserts straight
into ClickHouse, side by side in one run, on one embedded ClickHouse.

Usage: ``python bench/http_bench.py [--seconds S] [--clients N] [--repeat R]`` (or ``python bench/bench.py --http``)

Per round, for 1-row and 1,000-row JSONEachRow inserts, from ``--clients`` (16) clients at once,
each on a keep-alive connection (or its own engine client), as fast as they go:

1. **through the buffer**: ``ingest-buffer serve --clickhouse-http-listen`` (its log on, as it
   ships: a 200 means DURABLE), one client process of 16 threads posting ``INSERT … FORMAT
   JSONEachRow`` with ``http.client``; the clock stops when the flush barrier returns, so every row
   is in ClickHouse;
2. **straight into ClickHouse**: a process of its own opens the engine and runs one ``raw_insert``
   per request from 16 threads (each insert committed before it returns);
3. **ClickHouse's own asynchronous inserts**: the same, with ``async_insert=1,
   wait_for_async_insert=1`` (the server buffers and answers after its flush), where the embedded
   engine takes them.

Rows/s, each insert's p50/p99, and, for the buffer, its CPU per row from /proc. Each phase writes
ids of its own, and ``count() == uniqExact(id) == rows acknowledged`` is checked after it: every
acknowledged row landed exactly once. chDB lets one process open a path at a time, so the phases
run one after the other. Every process is stopped by its PID; the data lives in a temp directory
deleted afterwards. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wal_bench import DB, TABLE, Sidecar, make_table  # noqa: E402

from bench import cpu_seconds, drive, encode, free_port, pct, stop  # noqa: E402  (bench/bench.py, beside this file)

SIZES = (1, 1000)
SCENARIOS = ("buffer", "direct", "async_insert")
SPAN = 10**9


def bodies(lo: int, size: int, rows: int) -> list[bytes]:
    return [encode(lo + k * size, size) for k in range(rows // size)]


def first_id(scenario: str, size: int, round_: int) -> int:
    return (SCENARIOS.index(scenario) * 10 + SIZES.index(size)) * 10 * SPAN + round_ * SPAN


def check(path: Path, lo: int) -> tuple[int, int]:
    """The phase's rows, counted; then the table is merged (untimed), so that no phase pays for the
    parts the one before left (1-row direct inserts leave a part per row)."""
    out = subprocess.run([sys.executable, "-m", "tests.chdb_query", str(path),
                          f"SELECT count(), uniqExact(id) FROM {DB}.{TABLE} WHERE id >= {lo} AND id < {lo + SPAN}",
                          f"OPTIMIZE TABLE {DB}.{TABLE} FINAL"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    count, unique = json.loads(out.stdout)[0][0]
    return int(count), int(unique)


# ----- the client processes ----------------------------------------------------------------------

def http_clients(port: int, lo: int, size: int, rows: int, clients: int, seconds: float) -> dict[str, Any]:
    path = "/?" + urllib.parse.urlencode({"query": f"INSERT INTO {TABLE} FORMAT JSONEachRow"})

    def sender() -> Callable[[bytes], str | None]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # one keep-alive connection each

        def send(body: bytes) -> str | None:
            conn.request("POST", path, body=body)
            answer = conn.getresponse()
            text = answer.read()
            return None if answer.status == 200 else f"{answer.status} {text[:200]!r}"
        return send

    lat, failed, seconds = drive(bodies(lo, size, rows), clients, seconds, sender)
    return {"acked": len(lat) * size, "seconds": seconds, "lat": lat, "failed": failed}


def engine_clients(path: str, lo: int, size: int, rows: int, clients: int, seconds: float,
                   settings: dict[str, Any]) -> dict[str, Any]:
    import clickhouse_connect

    def sender() -> Callable[[bytes], str | None]:
        conn = clickhouse_connect.get_client(dsn=f"chdb://{path}")

        def send(body: bytes) -> str | None:
            try:
                conn.raw_insert(f"{DB}.{TABLE}", None, body, fmt="JSONEachRow", settings=settings)
            except Exception as exc:  # a setting the engine does not take: reported, not hidden
                return str(exc)[:300]
            return None
        return send

    lat, failed, seconds = drive(bodies(lo, size, rows), clients, seconds, sender)
    return {"acked": len(lat) * size, "seconds": seconds, "lat": lat, "failed": failed}


def run_child(*args: str) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=900)
        result: dict[str, Any] = json.loads(out.splitlines()[-1])
        return result
    finally:
        stop(proc)


# ----- the phases ------------------------------------------------------------------------------

def through_buffer(tmp: Path, lo: int, size: int, rows: int, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    sidecar = Sidecar(tmp / "chdb", tmp / "wal", tmp / "sidecar.log", ("--clickhouse-http-listen", f"127.0.0.1:{port}"))
    try:
        sidecar.ready()
        cpu0 = cpu_seconds(sidecar.proc.pid)
        t0 = time.perf_counter()
        result = run_child("_http", str(port), str(lo), str(size), str(rows), str(args.clients), str(args.seconds))
        sidecar.flush()  # every acknowledged row is in ClickHouse before the clock stops
        result["seconds"] = time.perf_counter() - t0
        result["sidecar_cpu"] = cpu_seconds(sidecar.proc.pid) - cpu0
    finally:
        sidecar.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--small-rows", type=int, default=100_000, help="row budget of a 1-row phase")
    parser.add_argument("--rows", type=int, default=3_000_000, help="row budget of a 1,000-row phase")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ingest-buffer-httpbench-"))
    try:
        make_table(tmp / "chdb")
        print(f"{args.clients} clients, JSONEachRow over keep-alive, as fast as they go; 2 cores; {tmp}")
        print(f"{'scenario':14s} {'rows':>6s} {'rows/s':>11s}  {'p50 / p99 per insert':>22s}  buffer CPU/row  landed")
        results: dict[tuple[str, int], list[float]] = {}
        for round_ in range(args.repeat):
            for size in SIZES:
                rows = args.small_rows if size == 1 else args.rows
                for scenario in SCENARIOS:
                    lo = first_id(scenario, size, round_)
                    if scenario == "buffer":
                        r = through_buffer(tmp, lo, size, rows, args)
                    else:
                        settings = {"async_insert": 1, "wait_for_async_insert": 1} if scenario == "async_insert" else {}
                        r = run_child("_engine", str(tmp / "chdb"), str(lo), str(size), str(rows), str(args.clients),
                                      str(args.seconds), json.dumps(settings))
                    count, unique = check(tmp / "chdb", lo)
                    ok = count == unique == r["acked"]
                    rate = r["acked"] / r["seconds"] if r["seconds"] else 0.0
                    results.setdefault((scenario, size), []).append(rate)
                    lat = r["lat"]
                    timing = (f"{pct(lat, 0.5) * 1e3:7.2f} / {pct(lat, 0.99) * 1e3:7.2f} ms" if lat else "")
                    cpu = (f"{r['sidecar_cpu'] / r['acked'] * 1e6:9.2f} us" if r.get("sidecar_cpu") and r["acked"]
                           else "")
                    failed = f"  FAILED: {r['failed'][0]}" if r["failed"] else ""
                    print(f"{scenario:14s} {size:6d} {rate:11,.0f}  {timing:>22s}  {cpu:>14s}  "
                          f"{count:,} of {r['acked']:,} {'ok' if ok else 'MISMATCH'}{failed}", flush=True)
            if args.repeat > 1:
                print(f"(round {round_ + 1} of {args.repeat})", flush=True)
        print("median rows/s over rounds (range):")
        for (scenario, size), rates in results.items():
            rates.sort()
            print(f"  {scenario:14s} {size:6d} {rates[len(rates) // 2]:11,.0f}  ({rates[0]:,.0f}–{rates[-1]:,.0f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_http":
        print(json.dumps(http_clients(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                                      int(sys.argv[6]), float(sys.argv[7]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_engine":
        print(json.dumps(engine_clients(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                                        int(sys.argv[6]), float(sys.argv[7]), json.loads(sys.argv[8]))))
    else:
        main()
