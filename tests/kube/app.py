"""Plays an application container: writes rows to its buffer until told to stop, and records them.

Writes 10-row JSONEachRow requests with ids ``<prefix>*10**9 + n`` to ``--target`` and appends each
acknowledged request's first id to ``--acked`` (one per line, flushed). On SIGTERM it keeps
writing for ``--after-sigterm`` seconds (the application's own shutdown work), calls the flush
barrier, and exits 0. Refused writes are counted by status in ``--refused`` (JSON) at exit.
With ``--service FILE`` it reads the list of ready endpoints from FILE before each write and
retries refused writes against another endpoint (a client behind a Service).

    python -m tests.kube.app --target HOST:PORT --acked FILE --refused FILE [--after-sigterm S]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import threading
import time
from pathlib import Path

import grpc

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc

ROWS = 10


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="")
    p.add_argument("--service", default="")
    p.add_argument("--table", default="events")
    p.add_argument("--acked", required=True)
    p.add_argument("--refused", required=True)
    p.add_argument("--prefix", type=int, default=1)
    p.add_argument("--after-sigterm", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=300)
    p.add_argument("--pause", type=float, default=0.002)
    args = p.parse_args()

    term = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: term.set())
    refused: dict[str, int] = {}
    channels: dict[str, grpc.Channel] = {}

    def stub_for(target: str) -> pb_grpc.IngestServiceStub:
        if target not in channels:
            channels[target] = grpc.insecure_channel(target)
        return pb_grpc.IngestServiceStub(channels[target])  # type: ignore[no-untyped-call]

    def targets() -> list[str]:
        if args.service:
            try:
                return [t for t in Path(args.service).read_text().split() if t] or [args.target]
            except OSError:
                return [args.target]
        return [args.target]

    if not args.service:
        # Like a real application beside an old-style sidecar, which may start after it: wait for it.
        grpc.channel_ready_future(grpc.insecure_channel(args.target)).result(timeout=60)
    n = 0
    end = time.monotonic() + args.max_seconds
    stop_at: float | None = None
    with open(args.acked, "a") as acked:
        while time.monotonic() < end:
            if term.is_set() and stop_at is None:
                stop_at = time.monotonic() + args.after_sigterm
            if stop_at is not None and time.monotonic() >= stop_at:
                break
            first = args.prefix * 10**9 + n * ROWS
            body = b"".join(b'{"id":%d,"s":"app"}\n' % i for i in range(first, first + ROWS))
            for attempt in range(20):
                choices = [t for t in targets() if t]
                target = random.choice(choices)
                try:
                    stub_for(target).Write(pb.WriteRequest(table=args.table, format=pb.FORMAT_JSON_EACH_ROW,
                                                           rows=body), timeout=10)
                    acked.write(f"{first}\n")
                    acked.flush()
                    break
                except grpc.RpcError as e:
                    code = e.code().name  # type: ignore[attr-defined]
                    refused[code] = refused.get(code, 0) + 1
                    if not args.service:
                        break  # a sidecar's client has nowhere else to go
                    time.sleep(0.02 * (attempt + 1))
            n += 1
            time.sleep(args.pause)
        # A flush barrier covers one buffer: it means something for a sidecar's client, not for a
        # client spread over gateway replicas (their own drains flush them).
        if stop_at is not None and not args.service:
            try:
                stub_for(random.choice(targets())).Flush(pb.FlushRequest(), timeout=10)
            except grpc.RpcError as e:
                refused["flush_" + e.code().name] = 1  # type: ignore[attr-defined]
    Path(args.refused).write_text(json.dumps(refused))


if __name__ == "__main__":
    main()
