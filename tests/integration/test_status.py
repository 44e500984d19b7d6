"""GET /status, the JSON `ingest-buffer top` reads, from a real buffer holding rows and then flushing them."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from typing import Any

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from tests.conftest import ClickHouse, Running


async def status(buf: Running) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with urllib.request.urlopen(f"{buf.http}/status", timeout=5) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    return await asyncio.to_thread(read)


async def test_status_says_what_is_held_where_and_what_was_committed(clickhouse: ClickHouse,
                                                                    start_buffer: Callable[..., Any]) -> None:
    clickhouse.create("t")
    buf = await start_buffer(flush_interval="1h", buffer_max_rows=5000)
    await pb_grpc.IngestServiceStub(buf.channel).Write(pb.WriteRequest(table="t", format=pb.FORMAT_CSV,
                                                                       rows=b"".join(b"%d,x\n" % i for i in range(10))))
    held = await status(buf)
    assert (held["state"], held["ready"], held["buffer"]["rows"], held["buffer"]["max_rows"]) == ("serving", True, 10,
                                                                                                  5000)
    assert held["tables"]["t"]["rows"] == 10 and held["tables"]["t"]["oldest_row_seconds"] >= 0
    assert held["rows"]["accepted"] == 10 and held["rows"]["committed"] == 0
    assert held["protocols"]["grpc"] == {"ok": 1, "rows": 10, "refused": 0}
    await buf.flush()
    done = await status(buf)
    assert done["rows"]["committed"] == 10 and done["buffer"]["rows"] == 0 and done["tables"] == {}
    assert done["inserts"]["batches"] == 1 and done["inserts"]["recent_seconds_p50"] is not None
    assert done["wal"] is None and done["time_unix"] >= held["time_unix"]
