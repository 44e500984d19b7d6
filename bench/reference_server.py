"""The simplest server that takes the same requests: a yardstick for the benchmark, not a product.

``python bench/reference_server.py serve --grpc-listen H:P --http-listen H:P --clickhouse-url chdb://PATH
--database DB`` (other flags are ignored). It answers ``Write``, ``WriteStream`` and ``Flush`` of
ingestbuffer.v1 and ``GET /readyz``, appends each request's rows to a list, and every 250 ms (or at
100,000 rows) inserts the list with one ``raw_insert`` in a worker thread. Nothing else: no checks
of tables, formats or framing, no bound on memory, no retries, no deduplication token, no
accounting, one insert at a time. ``bench.py --reference`` runs the sidecar's phases against it, so
the cost and the gain of everything the sidecar adds are measured on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import clickhouse_connect
import grpc
from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb

TABLE = "events"


async def serve(args: argparse.Namespace) -> None:
    client = clickhouse_connect.get_client(dsn=args.clickhouse_url)
    pending: list[bytes] = []
    rows = 0
    busy = False
    stop = asyncio.Event()

    async def flusher() -> None:
        nonlocal rows, busy
        while not stop.is_set() or pending:
            if rows < 100_000:
                await asyncio.sleep(0.25)
            if pending:
                batch = b"".join(pending)
                pending.clear()
                rows, busy = 0, True
                try:  # a failure ends the flusher (and the process, non-zero, at exit): rows are lost
                    await asyncio.to_thread(client.raw_insert, f"{args.database}.{TABLE}", None, batch,
                                            fmt="JSONEachRow")
                finally:
                    busy = False

    def take(req: Any) -> int:
        nonlocal rows
        n = req.rows.count(b"\n")
        pending.append(req.rows)
        rows += n
        return int(n)

    async def write(req: Any, ctx: Any) -> Any:
        return pb.WriteResponse(rows=take(req))

    async def write_stream(requests: Any, ctx: Any) -> Any:
        n = 0
        async for req in requests:
            n += take(req)
        return pb.WriteStreamResponse(rows=n)

    async def flush(req: Any, ctx: Any) -> Any:
        while pending or busy:  # noqa: ASYNC110 (polling, as the simplest server would)
            await asyncio.sleep(0.005)
        return pb.FlushResponse()

    server = aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    server.add_registered_method_handlers("ingestbuffer.v1.IngestService", {
        "Write": grpc.unary_unary_rpc_method_handler(write, pb.WriteRequest.FromString,
                                                     pb.WriteResponse.SerializeToString),
        "WriteStream": grpc.stream_unary_rpc_method_handler(write_stream, pb.WriteStreamRequest.FromString,
                                                            pb.WriteStreamResponse.SerializeToString),
        "Flush": grpc.unary_unary_rpc_method_handler(flush, pb.FlushRequest.FromString,
                                                     pb.FlushResponse.SerializeToString)})
    server.add_insecure_port(args.grpc_listen)
    await server.start()

    class Ready(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    host, port = args.http_listen.rsplit(":", 1)
    http = ThreadingHTTPServer((host, int(port)), Ready)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.create_task(flusher())
    await stop.wait()
    await server.stop(1)
    await task
    http.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--grpc-listen", required=True)
    parser.add_argument("--http-listen", required=True)
    parser.add_argument("--clickhouse-url", required=True)
    parser.add_argument("--database", required=True)
    args, _ = parser.parse_known_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
