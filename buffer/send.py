"""``ingest-buffer send``: stream rows from a file or stdin to a running buffer.

Line formats are cut into messages of about ``--chunk-bytes`` at row boundaries (for CSV, only
between rows: never inside a quoted field), so files of any size stream in constant memory.
Binary formats cannot be cut without decoding, so the file goes as one message with the
``--row-count`` the caller gives.

When the buffer refuses a message because it is full (RESOURCE_EXHAUSTED) or draining
(UNAVAILABLE), its error says how many messages of the stream it accepted: send waits (the
``retry-after-ms`` hint, or a growing pause) and opens a new stream from the first refused message,
until refusals without progress have lasted ``retry_for`` seconds. Nothing is sent twice: messages
the buffer accepted are never replayed, and neither a failure that does not say what was accepted
(a connection cut) nor a COMMITTED stream (its accepted messages are not confirmed committed) is
resumed. A stream ends after about STREAM_BYTES, so at most that much waits in memory to be
replayed.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import grpc

from buffer.api import ACCEPTED_MESSAGES_KEY, FORMATS, RETRY_AFTER_KEY
from buffer.api import ingest_pb2 as pb
from buffer.api import ingest_pb2_grpc as pb_grpc

STREAM_BYTES = 64 * 1024 * 1024
RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})

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
         timeout: float | None, retry_for: float = 60.0) -> dict[str, object]:
    name, is_lines = FORMATS[fmt]
    bar = Progress(total, progress, started=time.monotonic())

    def messages() -> Iterator[tuple[bytes, int]]:
        if is_lines:
            for payload, rows in chunks(stream, chunk_bytes, csv=name == "CSV", on_unterminated=lambda: print(
                    "ingest-buffer send: the input does not end with a newline; its last line was sent as a "
                    "complete row (if the file was cut short, that row is refused and dead-lettered)",
                    file=sys.stderr)):
                bar.update(len(payload), rows)
                yield payload, rows
        else:
            if not row_count:
                raise ValueError(f"{name} rows cannot be counted without decoding: pass --row-count N")
            payload = stream.read()
            bar.update(len(payload), row_count)
            yield payload, row_count

    source = messages()
    # Messages sent in the current stream and not yet known to be accepted, oldest first. gRPC pulls
    # requests in a thread of its own that may still be inside a stream's generator after the
    # stream failed: the lock and the generation keep such a straggler from reading the input, and
    # an error reading the input is kept for this thread to raise (gRPC would only log it).
    pending: list[tuple[bytes, int]] = []
    lock = threading.Lock()
    generation = [0]
    done = {"messages": 0, "rows": 0, "bytes": 0}
    exhausted = threading.Event()
    input_error: list[BaseException] = []
    retries = total_retries = 0  # refusals in the current run (for the backoff) / in all
    ack_name = pb.AckLevel.Name(ack)

    def request(payload: bytes, rows: int) -> pb.WriteStreamRequest:
        return pb.WriteStreamRequest(table=table, format=fmt, rows=payload, row_count=0 if is_lines else rows,
                                     ack_level=ack)

    def requests(gen: int) -> Iterator[pb.WriteStreamRequest]:
        with lock:
            replay = list(pending)  # refused last time: sent again first
        size = 0
        for payload, rows in replay:
            size += len(payload)
            yield request(payload, rows)
        while size < STREAM_BYTES:
            with lock:
                if gen != generation[0] or input_error:
                    return
                try:
                    item = next(source)
                except StopIteration:
                    exhausted.set()
                    return
                except BaseException as exc:
                    input_error.append(exc)
                    raise
                pending.append(item)
            size += len(item[0])
            yield request(*item)

    def settle(count: int) -> None:
        """The stream is over and the buffer accepted its first ``count`` messages."""
        with lock:
            generation[0] += 1
            for payload, rows in pending[:count]:
                done["messages"] += 1
                done["rows"] += rows
                done["bytes"] += len(payload)
            del pending[:count]

    give_up: float | None = None  # while refusals go on without progress: when to stop resuming
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 512 * 1024 * 1024)]) as channel:
        stub = pb_grpc.IngestServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            while True:
                try:
                    reply = stub.WriteStream(requests(generation[0]), timeout=timeout)
                except grpc.RpcError as exc:
                    if input_error:
                        raise input_error[0] from None
                    told = dict(exc.trailing_metadata() or ()).get(ACCEPTED_MESSAGES_KEY)
                    if told is not None:
                        settle(int(told))
                        if int(told):
                            give_up, retries = None, 0  # progress: a new run of refusals starts afresh
                    if give_up is None:
                        give_up = time.monotonic() + retry_for
                    wait = _retry_wait(exc, told is not None and ack != pb.ACK_LEVEL_COMMITTED, retries, give_up)
                    if wait is None:
                        if told is None and pending:
                            known = " (and perhaps some of the last ones: the error does not say)"
                        elif ack == pb.ACK_LEVEL_COMMITTED:
                            known = " (buffered: their commit was not confirmed, so they are not resent)"
                        else:
                            known = ""
                        print(f"ingest-buffer send: the buffer accepted {done['rows']:,} rows in {done['messages']} "
                              f"messages{known} before the error below", file=sys.stderr)
                        raise
                    retries += 1
                    total_retries += 1
                    time.sleep(wait)
                    continue
                if input_error:
                    raise input_error[0]
                settle(len(pending))
                give_up, retries = None, 0
                if reply.messages:
                    ack_name = pb.AckLevel.Name(reply.ack_level)
                if exhausted.is_set() and not pending:
                    break
        finally:
            bar.close()
        summary: dict[str, object] = {"table": table, "format": name, **done, "ack_level": ack_name,
                                      "retries": total_retries}
        if flush:
            barrier = stub.Flush(pb.FlushRequest(), timeout=timeout)
            summary["flushed"] = {"rows_committed": barrier.rows_committed, "rows_failed": barrier.rows_failed}
        elapsed = time.monotonic() - bar.started
        summary["seconds"] = round(elapsed, 3)
        summary["rows_per_second"] = round(done["rows"] / elapsed) if elapsed > 0 else None
        return summary


def _retry_wait(exc: grpc.RpcError, told: bool, retries: int, give_up: float) -> float | None:
    """Seconds to wait before resuming after ``exc``, or None when it must not be retried.

    Only refusals that say how many messages the buffer accepted (``told``) are retried: after any
    other failure a replay could send rows twice. COMMITTED streams are not resumed either: the
    messages a refused stream had sent are buffered, but their commit was never confirmed.
    """
    if exc.code() not in RETRYABLE or not told:
        return None
    hint = dict(exc.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
    wait = int(hint) / 1000 if hint else min(5.0, 0.1 * 2 ** retries)
    if time.monotonic() + wait > give_up:
        print("ingest-buffer send: giving up: the buffer kept refusing, with no progress, for --retry-for",
              file=sys.stderr)
        return None
    print(f"ingest-buffer send: {exc.code().name}: {exc.details()}; resuming in {wait:g}s", file=sys.stderr)
    return wait
