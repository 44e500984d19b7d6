"""``ingest-buffer send``: send rows from a file or stdin to a running buffer, through buffer.client.

Line formats are cut into requests of about ``--chunk-bytes`` at row boundaries (for CSV, only
between rows: never inside a quoted field), so files of any size go in constant memory. Binary
formats cannot be cut without decoding, so the file goes as one request with the ``--row-count``
the caller gives.

Resending is the client's (one implementation for the library and this command): every request
carries a resend key, so a request refused as full (RESOURCE_EXHAUSTED: after the buffer's
``retry-after-ms`` hint), or whose answer was lost (a draining buffer, a cut connection, a deadline),
is sent again for up to ``retry_for`` seconds and never lands twice. The first request that fails
for good stops the reading; what was sent before it is still waited for, and the summary says what
became of every row.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, BinaryIO

from buffer.api import FORMATS
from buffer.api import ingest_pb2 as pb
from buffer.client import ACK_NAMES, FORMAT_BY_NAME, Ack, Client, ClientFull, WriteFailed, format_named


class SendFailed(Exception):
    """A request failed for good: ``error`` is its failure, ``summary`` what became of every row."""

    def __init__(self, error: WriteFailed, summary: dict[str, object]) -> None:
        super().__init__(str(error))
        self.error = error
        self.summary = summary


# file extension → format
EXTENSIONS: dict[str, pb.Format] = {
    ".jsonl": pb.FORMAT_JSON_EACH_ROW, ".ndjson": pb.FORMAT_JSON_EACH_ROW, ".json": pb.FORMAT_JSON_EACH_ROW,
    ".csv": pb.FORMAT_CSV, ".tsv": pb.FORMAT_TSV, ".tab": pb.FORMAT_TSV,
    ".rowbinary": pb.FORMAT_ROW_BINARY, ".native": pb.FORMAT_NATIVE,
}


def resolve_format(name: str | None, path: str | None) -> pb.Format:
    if name:
        fmt = format_named(name)  # the client's spellings: one table of them
        if fmt is None:
            raise ValueError(f"--format {name!r} is unknown; use one of {', '.join(sorted(FORMAT_BY_NAME))}")
        return fmt  # type: ignore[return-value]
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


class Progress:
    """The progress bar on stderr, drawn by rich (the server's extra has it; without it, no bar)."""

    def __init__(self, total: int | None, enabled: bool) -> None:
        self.started = time.monotonic()
        self.sent_rows = 0
        self._bar: Any = None
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeElapsedColumn, TransferSpeedColumn
            from rich.progress import Progress as Bar
        except ImportError:
            return  # the client-only install: the summary says it all
        self._bar = Bar(BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TextColumn("{task.fields[rows]:>12,} rows {task.fields[rate]:>10,.0f} rows/s"),
                        TimeElapsedColumn(), console=Console(stderr=True))
        self._task = self._bar.add_task("send", total=total, rows=0, rate=0.0)
        self._bar.start()

    def update(self, size: int, rows: int) -> None:
        self.sent_rows += rows
        if self._bar is not None:
            rate = self.sent_rows / max(time.monotonic() - self.started, 1e-9)
            self._bar.update(self._task, advance=size, rows=self.sent_rows, rate=rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def send(target: str, table: str, fmt: pb.Format, stream: BinaryIO, *, total: int | None, chunk_bytes: int,
         ack: pb.AckLevel, row_count: int, flush: bool, progress: bool,
         timeout: float | None, retry_for: float = 60.0) -> dict[str, object]:
    """Sends the input; returns the summary. Raises SendFailed when a request failed for good, and
    ValueError for bad input."""
    name, is_lines = FORMATS[fmt]
    bar = Progress(total, progress)
    failed: list[WriteFailed] = []

    def note(future: Future[Ack]) -> None:
        error = future.exception()
        if isinstance(error, WriteFailed) and not failed:
            failed.append(error)

    _resends_on_stderr()
    # The buffer's --max-request-bytes decides what is too large (its refusal names it), not a guess here.
    client = Client(target, ack_level=ACK_NAMES[ack], batch_bytes=max(chunk_bytes, 1), linger=0.05,
                    max_bytes=max(64 << 20, 4 * chunk_bytes), retry_for=retry_for, block_timeout=retry_for,
                    call_timeout=timeout, max_request_bytes=max(1 << 30, chunk_bytes))
    summary: dict[str, object] = {"table": table, "format": name, "ack_level": ACK_NAMES[ack]}
    complete = False
    try:
        if is_lines:
            for payload, rows in chunks(stream, chunk_bytes, csv=name == "CSV", on_unterminated=lambda: print(
                    "ingest-buffer send: the input does not end with a newline; its last line was sent as a "
                    "complete row (if the file was cut short, that row is refused and dead-lettered)",
                    file=sys.stderr)):
                if failed:
                    break  # a request failed for good: stop reading, wait for what went before it
                try:
                    client.write(table, payload, format=fmt).add_done_callback(note)
                except ClientFull as exc:  # nothing acknowledged for --retry-for: the buffer is unreachable
                    failed.append(WriteFailed(None, str(exc), 0))
                    break
                bar.update(len(payload), rows)
            else:
                complete = True
        else:
            if not row_count:
                raise ValueError(f"{name} rows cannot be counted without decoding: pass --row-count N")
            payload = stream.read()
            client.write(table, payload, format=fmt, rows=row_count).add_done_callback(note)
            bar.update(len(payload), row_count)
            complete = True
        acknowledged = client.flush(timeout)
        if acknowledged and flush:
            summary["flush"] = _barrier(client, timeout)
    finally:
        bar.close()
        client.close(0 if failed else timeout)
        stats = client.stats()
        summary.update({"rows_sent": stats["written_rows"], "rows_acknowledged": stats["acknowledged_rows"],
                        "rows_failed": stats["failed_rows"], "requests": stats["batches_sent"],
                        "resends": stats["resends"], "input_read_whole": complete})
        elapsed = time.monotonic() - bar.started
        summary["seconds"] = round(elapsed, 3)
        summary["rows_per_second"] = round(stats["acknowledged_rows"] / elapsed) if elapsed > 0 else None
    if failed or stats["failed_rows"]:
        raise SendFailed(failed[0] if failed else WriteFailed(None, "a request was not acknowledged",
                                                              stats["failed_rows"]), summary)
    return summary


def _barrier(client: Client, timeout: float | None) -> dict[str, object]:
    """The buffer's Flush barrier, after every row sent was acknowledged: ``committed`` is true when
    everything the buffer held at that moment — these rows and any other client's — reached
    ClickHouse. The counts are of those held rows, not of this input: rows the buffer had written
    already were not held any more."""
    done = client.flush(timeout, committed=True)
    reply = client.last_barrier
    return {"committed": done, "held_rows_committed": reply.rows_committed if reply else None,
            "held_rows_failed": reply.rows_failed if reply else None}


def _resends_on_stderr() -> None:
    """The client says at INFO what it resends and why: on stderr, as send's own lines."""
    logger = logging.getLogger("buffer.client")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("ingest-buffer send: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
