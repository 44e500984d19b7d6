"""``ingest-buffer send``: stream rows from a file or stdin to a running buffer.

Line formats are cut into messages of about ``--chunk-bytes`` at row boundaries (for CSV, only
between rows: never inside a quoted field), so files of any size stream in constant memory.
Binary formats cannot be cut without decoding, so the file goes as one message with the
``--row-count`` the caller gives.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import grpc

from buffer._proto.ingestbuffer.v1 import ingest_pb2 as pb
from buffer._proto.ingestbuffer.v1 import ingest_pb2_grpc as pb_grpc
from buffer.framing import FORMATS

# file extension → format
EXTENSIONS: dict[str, pb.Format] = {
    ".jsonl": pb.FORMAT_JSON_EACH_ROW, ".ndjson": pb.FORMAT_JSON_EACH_ROW, ".json": pb.FORMAT_JSON_EACH_ROW,
    ".csv": pb.FORMAT_CSV, ".tsv": pb.FORMAT_TSV, ".tab": pb.FORMAT_TSV,
    ".rowbinary": pb.FORMAT_ROW_BINARY, ".native": pb.FORMAT_NATIVE,
}
# --format spellings → format
FORMAT_ALIASES: dict[str, pb.Format] = {
    "jsoneachrow": pb.FORMAT_JSON_EACH_ROW, "json": pb.FORMAT_JSON_EACH_ROW, "jsonl": pb.FORMAT_JSON_EACH_ROW,
    "ndjson": pb.FORMAT_JSON_EACH_ROW, "jsoncompacteachrow": pb.FORMAT_JSON_COMPACT_EACH_ROW,
    "csv": pb.FORMAT_CSV, "tsv": pb.FORMAT_TSV, "tabseparated": pb.FORMAT_TSV,
    "rowbinary": pb.FORMAT_ROW_BINARY, "native": pb.FORMAT_NATIVE,
}


def resolve_format(name: str | None, path: str | None) -> pb.Format:
    if name:
        key = name.lower().replace("_", "").replace("-", "")
        if key.startswith("format"):
            key = key[len("format"):]
        if key not in FORMAT_ALIASES:
            raise ValueError(f"--format {name!r} is unknown; use one of {', '.join(sorted(FORMAT_ALIASES))}")
        return FORMAT_ALIASES[key]
    if path and path != "-":
        for ext, fmt in EXTENSIONS.items():
            if path.lower().endswith(ext):
                return fmt
        raise ValueError(f"cannot tell the format of {path} from its extension "
                         f"({', '.join(EXTENSIONS)}); pass --format")
    raise ValueError("reading stdin: pass --format (e.g. --format JSONEachRow)")


def chunks(stream: BinaryIO, chunk_bytes: int, csv: bool,
           on_unterminated: Callable[[], None] | None = None) -> Iterator[tuple[bytes, int]]:
    """Yields (payload of complete rows, row count).

    A file whose last line lacks its newline (common with editors) gets one, and
    ``on_unterminated`` is called so the caller can say so: it may also be a truncated row.
    """
    carry = b""
    while True:
        block = stream.read(chunk_bytes)
        if not block:
            break
        data = carry + block
        cut = _last_row_end(data, csv)
        if cut <= 0:
            carry = data  # no complete row yet (a very long row): read more
            continue
        yield data[:cut], data.count(b"\n", 0, cut)
        carry = data[cut:]
    if carry.strip():
        if not carry.endswith(b"\n"):
            carry += b"\n"
            if on_unterminated is not None:
                on_unterminated()
        yield carry, carry.count(b"\n")


def _last_row_end(data: bytes, csv: bool) -> int:
    """Offset just past the last newline that ends a row (outside CSV quotes)."""
    end = data.rfind(b"\n")
    if not csv:
        return end + 1
    while end >= 0:
        if data.count(b'"', 0, end) % 2 == 0:
            return end + 1
        end = data.rfind(b"\n", 0, end)
    return 0


@dataclass
class Progress:
    total: int | None
    enabled: bool
    sent_bytes: int = 0
    sent_rows: int = 0
    messages: int = 0
    started: float = 0.0
    _last: float = 0.0

    def update(self, size: int, rows: int) -> None:
        self.sent_bytes += size
        self.sent_rows += rows
        self.messages += 1
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.2:
            self._last = now
            self.draw(now)

    def draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.sent_rows / elapsed
        if self.total:
            frac = min(1.0, self.sent_bytes / self.total)
            bar = "#" * int(frac * 30)
            head = f"[{bar:<30}] {frac * 100:5.1f}%"
        else:
            head = f"{self.sent_bytes / 1e6:8.1f} MB"
        sys.stderr.write(f"\r{head} {self.sent_rows:>12,} rows {rate:>10,.0f} rows/s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.draw(time.monotonic())
            sys.stderr.write("\n")


def send(target: str, table: str, fmt: pb.Format, stream: BinaryIO, *, total: int | None, chunk_bytes: int,
         ack: pb.AckLevel, row_count: int, flush: bool, progress: bool,
         timeout: float | None) -> dict[str, object]:
    name, is_lines = FORMATS[fmt]
    bar = Progress(total, progress, started=time.monotonic())

    def requests() -> Iterator[pb.WriteStreamRequest]:
        if is_lines:
            for payload, rows in chunks(stream, chunk_bytes, csv=name == "CSV", on_unterminated=lambda: print(
                    "ingest-buffer send: the input does not end with a newline; its last line was sent as a "
                    "complete row (if the file was cut short, that row is refused and dead-lettered)",
                    file=sys.stderr)):
                bar.update(len(payload), rows)
                yield pb.WriteStreamRequest(table=table, format=fmt, rows=payload, ack_level=ack)
        else:
            if not row_count:
                raise ValueError(f"{name} rows cannot be counted without decoding: pass --row-count N")
            payload = stream.read()
            bar.update(len(payload), row_count)
            yield pb.WriteStreamRequest(table=table, format=fmt, rows=payload, row_count=row_count,
                                        ack_level=ack)

    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 512 * 1024 * 1024)]) as channel:
        stub = pb_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = stub.WriteStream(requests(), timeout=timeout)
        finally:
            bar.close()
        summary: dict[str, object] = {
            "table": table, "format": name, "messages": reply.messages, "rows": reply.rows, "bytes": reply.bytes,
            "ack_level": pb.AckLevel.Name(reply.ack_level),
        }
        if flush:
            done = stub.Flush(pb.FlushRequest(), timeout=timeout)
            summary["flushed"] = {"rows_committed": done.rows_committed, "rows_failed": done.rows_failed}
        elapsed = time.monotonic() - bar.started
        summary["seconds"] = round(elapsed, 3)
        summary["rows_per_second"] = round(reply.rows / elapsed) if elapsed > 0 else None
        return summary
