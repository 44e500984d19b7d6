"""Send rows to ingest-buffer from an application: batched in the process, acknowledged in batches.

The five lines most applications need::

    from buffer.client import Client

    client = Client("127.0.0.1:50051")            # or "unix:/run/ingest/grpc.sock"
    client.write("events", {"id": 1, "kind": "click"})   # returns at once
    ...
    client.close()                                # sends the rest, waits for the acks

``write`` never does I/O on the caller's thread. It encodes a ``dict`` as one JSONEachRow line
(orjson), appends it to the open batch of its table and format, and returns that batch's
:class:`concurrent.futures.Future`: many rows share one future, which resolves with a
:class:`Ack` once the buffer acknowledged the batch at the client's ack level, or fails with
:class:`WriteFailed` (the gRPC status and the buffer's message). ``bytes`` holding complete rows in
any format the buffer takes are checked for framing at once (a ``ValueError`` names what is wrong)
and batched the same way.

A batch is sent when it reaches ``batch_rows`` or ``batch_bytes``, or ``linger`` seconds after its
first row — but while an earlier batch of its table and format is still unanswered, it keeps
filling until that answer comes (as Nagle's algorithm does for packets), so under load batches grow
with the round trip instead of the call rate. Batches go out on one long-lived ``WriteBatches``
stream, which answers each request on its own (at most ``max_in_flight`` unanswered): a stream
message costs a Python client a fraction of a unary call. Each batch carries the client's
``producer`` id and a sequence number, so a resend is answered by the buffer with the first reply
and never lands twice. Resent, with the same key:

* ``RESOURCE_EXHAUSTED`` (the buffer is full) — after the ``retry-after-ms`` hint; nothing is sent
  meanwhile;
* ``UNAVAILABLE`` (a draining replica, a restarting sidecar), a stream that broke (a cut
  connection: what it had unanswered), or one that left a batch unanswered for ``call_timeout`` —
  on a new stream over a new connection, after a growing pause.

Each batch is resent for at most ``retry_for`` seconds after its first attempt (which may take
``call_timeout``); then, or at once for any other status
(a missing table, malformed rows, ``ABORTED`` for a COMMITTED batch that did not commit), its future
fails. Nothing is dropped silently: :meth:`Client.stats` counts rows written, acknowledged and
failed, and what is held.

A row over ``max_request_bytes`` (the buffer's ``--max-request-bytes``) raises ``ValueError`` at
``write``. The futures are shared by the rows of a batch and cannot be cancelled; AsyncClient gives
each caller a shield of its batch's future.

The client holds at most ``max_rows`` rows and ``max_bytes`` bytes not yet acknowledged. When a
write would go past them, ``when_full="block"`` (the default) waits up to ``block_timeout`` seconds
for room, then raises :class:`ClientFull`; ``when_full="raise"`` raises at once.

``flush(timeout=None)`` sends what is open and waits until everything written before it was
acknowledged; ``flush(committed=True)`` then also waits for the buffer's Flush barrier (every row
the buffer held reached ClickHouse, or failed). ``close()`` flushes and stops. Both clients are
context managers. Nothing is flushed from ``atexit`` or a finalizer: call ``close`` (or leave the
``with`` block) before the process exits, or what is held is lost with it.

:class:`AsyncClient` takes the same options for asyncio applications: ``await client.write(...)``
returns an :class:`asyncio.Future` (it waits only for room in the client, like aiokafka's
``send``), and ``flush``/``close`` are coroutines. Its batches are sent by the same kind of thread,
never by the event loop.

The resend key is remembered by the buffer process in memory (its newest 16,384 keyed requests): a
resend reaches the same buffer when it runs beside the application (the sidecar shape). Through a
gateway Service a resend after a cut connection may reach another replica, and a buffer killed
between taking a batch and answering (SIGKILL, OOM) forgets the key: in those two cases a batch can
land twice.

Installing only the client: ``pip install ingest-buffer`` brings grpcio, protobuf and orjson; the
server's dependencies come with ``pip install 'ingest-buffer[server]'``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import orjson

from buffer.api import FORMATS, SERVICE_NAME
from buffer.api import ingest_pb2 as pb
from buffer.config import SETTINGS_BY_NAME
from buffer.framing import check_request
from buffer.refusals import InvalidRequest

__all__ = ["Ack", "AsyncClient", "Client", "ClientClosed", "ClientFull", "WriteFailed"]

log = logging.getLogger(__name__)

ACK_LEVELS = {"buffered": pb.ACK_LEVEL_BUFFERED, "durable": pb.ACK_LEVEL_DURABLE,
              "committed": pb.ACK_LEVEL_COMMITTED}
ACK_NAMES = {level: name for name, level in ACK_LEVELS.items()}
# write(..., format=...): ClickHouse's names and the enum's, any case, "_" and "-" ignored, and the
# usual short names (the ones `ingest-buffer send --format` takes).
FORMAT_BY_NAME: dict[str, int] = {**{name.lower(): f for f, (name, _) in FORMATS.items()},
                                  "json": pb.FORMAT_JSON_EACH_ROW, "jsonl": pb.FORMAT_JSON_EACH_ROW,
                                  "ndjson": pb.FORMAT_JSON_EACH_ROW, "tsv": pb.FORMAT_TSV}
_CODES = {code.value[0]: code for code in grpc.StatusCode}
RESEND = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
MAX_REQUEST_BYTES: int = SETTINGS_BY_NAME["max_request_bytes"].default  # the buffer's default
_DUMPS = orjson.dumps
_NEWLINE = orjson.OPT_APPEND_NEWLINE
_JSON: int = pb.FORMAT_JSON_EACH_ROW


def format_named(name: str) -> int | None:
    """The format a name means (``JSONEachRow``, ``FORMAT_CSV``, ``tsv``, ``ndjson``…), or None."""
    return FORMAT_BY_NAME.get(name.lower().replace("_", "").replace("-", "").removeprefix("format"))


class ClientFull(Exception):
    """The client holds ``max_rows`` rows or ``max_bytes`` bytes not yet acknowledged."""


class _NoRoom(Exception):
    """The client is full (a probe that neither waits nor counts)."""


class ClientClosed(Exception):
    """The client was closed: it takes no more rows."""


class WriteFailed(Exception):
    """A batch the buffer did not acknowledge: ``code`` is the gRPC status, ``rows`` the rows lost with it."""

    def __init__(self, code: grpc.StatusCode | None, message: str, rows: int) -> None:
        super().__init__(f"{code.name if code else 'CLOSED'}: {message}" if code else message)
        self.code = code
        self.details = message
        self.rows = rows


@dataclass(frozen=True)
class Ack:
    """What the buffer said about a batch: its rows and bytes, the level they reached, and whether
    the reply was to a resend the buffer had already taken."""

    rows: int
    bytes: int
    ack_level: str
    duplicate: bool


_ROWS_TAG = bytes([pb.WriteBatchesRequest.ROWS_FIELD_NUMBER << 3 | 2])  # a length-delimited field


def varint(n: int) -> bytes:
    """``n`` as a base-128 varint (protobuf's lengths, ClickHouse's Native format)."""
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _with_rows(request: pb.WriteBatchesRequest, rows: bytearray) -> bytes:
    """``request`` serialized with ``rows`` as its rows field, copying the rows once: a serialized
    message followed by one more field parses as that message with the field set, so the rows go
    straight from the batch into the request (setting the field first would copy them twice)."""
    return b"".join((request.SerializeToString(), _ROWS_TAG, varint(len(rows)), rows))


class _Batch:
    __slots__ = ("afuture", "attempts", "created", "data", "deadline", "format", "full_bytes", "full_rows", "future",
                 "key", "nbytes", "nrows", "request", "reserved_bytes", "reserved_rows", "sealed", "sent_at",
                 "sequence", "table")

    def __init__(self, table: str, fmt: int, now: float, full_rows: int, full_bytes: int) -> None:
        self.table = table
        self.format = fmt
        self.key = table if fmt == _JSON else (table, fmt)  # its key in Client._open
        self.sealed = False
        self.full_rows, self.full_bytes = full_rows, full_bytes  # sealed when it reaches either
        self.data = bytearray()  # its rows, encoded: each row's bytes are freed as it is written
        self.nbytes = 0  # its size, once sealed (len(data) while open)
        self.nrows = 0
        self.reserved_rows = 0  # room taken in the client's bounds: a whole batch while open, then its size
        self.reserved_bytes = 0
        self.created = now
        self.future: concurrent.futures.Future[Ack] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()  # shared by all its rows: none of them may cancel it
        self.afuture: asyncio.Future[Ack] | None = None
        self.request: bytes | None = None
        self.attempts = 0
        self.sequence = 0  # the resend key's second half, set when first sent
        self.sent_at = 0.0  # when it last went out
        self.deadline = 0.0  # when resending stops (set at the first send)


class _Stream:
    """One WriteBatches stream: the requests it is to send, and those sent and not yet answered."""

    __slots__ = ("call", "closed", "inflight", "requests")

    def __init__(self) -> None:
        self.call: Any = None  # gRPC's call: an iterator of answers, with cancel()
        self.requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.inflight: dict[int, _Batch] = {}  # by sequence
        self.closed = False  # takes no more requests


class Client:
    """Batches rows in the application and sends them to an ingest-buffer (see the module's docs)."""

    def __init__(self, target: str, *, ack_level: str = "buffered", linger: float = 0.005,
                 batch_rows: int = 10_000, batch_bytes: int = 1 << 20, max_rows: int = 1_000_000,
                 max_bytes: int = 64 << 20, when_full: str = "block", block_timeout: float = 10.0,
                 max_in_flight: int = 4, retry_for: float = 60.0, call_timeout: float | None = None,
                 max_request_bytes: int = MAX_REQUEST_BYTES,
                 credentials: grpc.ChannelCredentials | None = None,
                 channel_options: tuple[tuple[str, Any], ...] = ()) -> None:
        if ack_level.lower() not in ACK_LEVELS:
            raise ValueError(f"ack_level {ack_level!r} is unknown: use one of {', '.join(ACK_LEVELS)}")
        if when_full not in ("block", "raise"):
            raise ValueError(f"when_full {when_full!r} is unknown: use 'block' or 'raise'")
        for name, value in (("batch_rows", batch_rows), ("batch_bytes", batch_bytes), ("max_rows", max_rows),
                            ("max_bytes", max_bytes), ("max_in_flight", max_in_flight),
                            ("max_request_bytes", max_request_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        if batch_bytes > max_request_bytes:
            raise ValueError(f"batch_bytes {batch_bytes:,} is over max_request_bytes {max_request_bytes:,} (the "
                             "buffer's --max-request-bytes): the buffer would refuse every full batch")
        if call_timeout is None:  # a COMMITTED answer waits for ClickHouse: flushes, retries
            call_timeout = 60.0 if ack_level.lower() == "committed" else 10.0
        if linger < 0 or block_timeout < 0 or retry_for < 0 or call_timeout <= 0:
            raise ValueError("linger, block_timeout and retry_for must be >= 0 and call_timeout > 0")
        self.target = target
        self.ack_level = ACK_LEVELS[ack_level.lower()]
        self.linger = linger
        self.batch_rows = min(batch_rows, max_rows)
        self.batch_bytes = min(batch_bytes, max_bytes)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.block = when_full == "block"
        self.block_timeout = block_timeout
        self.max_in_flight = max_in_flight
        self.retry_for = retry_for
        self.call_timeout = call_timeout
        self.max_request_bytes = max_request_bytes
        self.producer = uuid.uuid4().hex  # the resend key's first half; the sequence is the second
        self._credentials = credentials
        # A sidecar restarts in seconds: reconnect within 2 s, not gRPC's default of up to 2 minutes.
        # No gRPC limit on what is sent: the buffer's own limit, checked at write(), is the one that counts.
        self._options = (("grpc.max_send_message_length", -1), ("grpc.initial_reconnect_backoff_ms", 100),
                         ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000),
                         *channel_options)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the dispatcher waits on it
        self._room = threading.Condition(self._lock)  # writers waiting for room wait on it
        # Open batches by table (JSONEachRow, the dicts' format) or (table, format): no tuple per dict.
        self._open: dict[str | tuple[str, int], _Batch] = {}
        self._sendq: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()  # sealed, to send now
        self._out = collections.Counter[str | tuple[str, int]]()  # batches sealed and not answered, by key
        self._later: list[tuple[float, int, _Batch]] = []  # to resend at a time (a heap)
        self._wake_at = -math.inf  # when the dispatcher wakes next (-inf: it is awake)
        self._unresolved: dict[int, _Batch] = {}  # every batch not yet acknowledged or failed, by id
        self._paused_until = 0.0
        self._sequence = itertools.count(1)  # the resend key's second half (next() is atomic)
        self._closed = False
        self._closed_ok = False  # what close() returned
        self._stop = False
        self._reconnect = False
        # Room taken: a reservation for each open batch (a whole batch's worth, so a row costs no
        # bound check), the real size of each batch sealed and not yet acknowledged.
        self._reserved_rows = 0
        self._reserved_bytes = 0
        self._counts = collections.Counter[str]()
        self.last_barrier: pb.FlushResponse | None = None  # the reply of the last flush(committed=True)
        self._channel = self._connect()
        self._call = self._write_method(self._channel)
        self._stream: _Stream | None = None  # the WriteBatches stream open now
        self._streamed = threading.Condition(self._lock)  # a new stream is open
        self._slots = threading.BoundedSemaphore(max_in_flight)  # batches out and unanswered
        self._threads = [threading.Thread(target=self._run, name="ingest-buffer-client-stream", daemon=True),
                         threading.Thread(target=self._feed, name="ingest-buffer-client-feed", daemon=True),
                         threading.Thread(target=self._dispatch, name="ingest-buffer-client-linger", daemon=True)]
        for thread in self._threads:
            thread.start()

    # ----- the application's side ----------------------------------------------------------

    def write(self, table: str, row: dict[str, Any] | bytes, *, format: str | int | None = None,
              rows: int | None = None) -> concurrent.futures.Future[Ack]:
        """Queues one row (a ``dict``) or complete rows (``bytes`` in ``format``; ``rows`` counts them
        for RowBinary and Native). Returns the future of the batch that holds them."""
        if row.__class__ is not dict:
            data, fmt, n = self._checked(table, row, format, rows)
            return self._append(table, fmt, data, n, self.block).future
        # The common case, _append inlined: the cost of this path is the client's cost per row.
        data = _DUMPS(row, option=_NEWLINE)
        with self._lock:
            batch = self._open.get(table)
            if batch is not None and len(buf := batch.data) + len(data) <= batch.reserved_bytes:
                buf += data  # the row's bytes are freed now, not when the batch is sent
                batch.nrows += 1
                if batch.nrows >= batch.full_rows or len(buf) >= batch.full_bytes:
                    self._seal(batch)
                return batch.future
        return self._append(table, _JSON, data, 1, self.block).future  # a new batch (it may wait for room)

    def _checked(self, table: str, row: Any, format: str | int | None, rows: int | None) -> tuple[bytes, int, int]:
        if isinstance(row, dict):  # a dict subclass
            return _DUMPS(row, option=_NEWLINE), _JSON, 1
        if not isinstance(row, bytes | bytearray | memoryview):
            raise TypeError(f"row must be a dict or bytes, not {type(row).__name__}")
        if format is None:
            fmt = _JSON
        elif isinstance(format, int):
            fmt = format
        else:
            fmt = format_named(format) or -1  # -1: check_request names the formats that work
        data = bytes(row)
        try:
            _, n, _ = check_request(table, fmt, data, rows or 0, self.max_request_bytes, 1 << 62)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return data, fmt, n

    def _append(self, table: str, fmt: int, data: bytes, n: int, block: bool | None) -> _Batch:
        """Adds rows to their open batch; ``block`` None only probes for room (raises _NoRoom)."""
        size = len(data)
        if size > self.max_request_bytes:
            raise ValueError(f"the row is {size:,} bytes encoded, over max_request_bytes ({self.max_request_bytes:,}, "
                             "the buffer's --max-request-bytes): it could never be sent")
        with self._lock:
            batch = self._open.get(table if fmt == _JSON else (table, fmt))
            if batch is None or batch.nrows + n > batch.reserved_rows or len(batch.data) + size > batch.reserved_bytes:
                if batch is not None:  # these rows would go past its reservation: the next batch takes them
                    self._seal(batch)
                batch = self._open_batch(table, fmt, size, n, block)
            batch.data += data
            batch.nrows += n
            if batch.nrows >= batch.full_rows or len(batch.data) >= batch.full_bytes:
                self._seal(batch)
            return batch

    def _open_batch(self, table: str, fmt: int, size: int, n: int, block: bool | None) -> _Batch:
        """Under the lock: a new open batch, once there is room for these rows (or raises). It reserves
        a whole batch's room, or half of what is left when that is less (then it is full sooner)."""
        if self._closed or self._reserved_rows + n > self.max_rows or self._reserved_bytes + size > self.max_bytes:
            self._wait_room(n, size, n, block)
            # While it waited (the lock released), another writer may have opened this key's batch.
            other = self._open.get(table if fmt == _JSON else (table, fmt))
            if other is not None:
                if other.nrows + n <= other.reserved_rows and len(other.data) + size <= other.reserved_bytes:
                    return other
                self._seal(other)
        # A whole batch, or half the room left when that is less: other tables still find room.
        rows = max(n, min(self.batch_rows, (self.max_rows - self._reserved_rows) // 2))
        nbytes = max(size, min(self.batch_bytes, (self.max_bytes - self._reserved_bytes) // 2))
        batch = _Batch(table, fmt, time.monotonic(), rows, nbytes)
        self._open[batch.key] = batch
        batch.reserved_rows, batch.reserved_bytes = rows, nbytes
        self._reserved_rows += rows
        self._reserved_bytes += nbytes
        self._unresolved[id(batch)] = batch
        if batch.key not in self._out:  # else it waits for that batch's answer (_resolve)
            self._soon(batch.created + self.linger)
        return batch

    def _wait_room(self, rows: int, nbytes: int, n: int, block: bool | None) -> None:
        """Under the lock: returns once ``rows`` and ``nbytes`` fit, or raises."""
        end = time.monotonic() + self.block_timeout
        while not self._closed:
            if (self._reserved_rows + rows <= self.max_rows and self._reserved_bytes + nbytes <= self.max_bytes) or (
                    self._reserved_rows == 0):  # one write larger than the bounds goes alone
                return
            left = end - time.monotonic()
            if block is None:
                raise _NoRoom
            if not block or left <= 0:
                self._counts["refused_rows"] += n
                held_rows, held_bytes = self._held()
                raise ClientFull(f"the client holds {held_rows:,} rows and {held_bytes:,} bytes the buffer has not "
                                 f"acknowledged yet (max_rows {self.max_rows:,}, max_bytes {self.max_bytes:,})"
                                 + (f", and no room came within block_timeout {self.block_timeout:g}s" if block else "")
                                 + ": the buffer is not keeping up, or is unreachable")
            self._room.wait(left)
        raise ClientClosed("the client is closed")

    def _held(self) -> tuple[int, int]:
        batches = self._unresolved.values()
        return sum(b.nrows for b in batches), sum(b.nbytes if b.sealed else len(b.data) for b in batches)

    def flush(self, timeout: float | None = None, *, committed: bool = False) -> bool:
        """Sends what is open; True once everything written before this call was acknowledged (and,
        with ``committed``, the buffer's Flush barrier returned with no row failed), False if a batch
        failed or ``timeout`` passed first."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            for batch in list(self._open.values()):
                self._seal(batch)
            futures = [b.future for b in self._unresolved.values()]
        done, not_done = concurrent.futures.wait(futures, timeout)
        ok = not not_done and all(f.exception() is None for f in done)
        if ok and committed:
            left = None if end is None else max(0.0, end - time.monotonic())
            if self._stop:
                return False  # closed: no channel to ask on
            try:
                reply = self._channel.unary_unary(f"/{SERVICE_NAME}/Flush", pb.FlushRequest.SerializeToString,
                                                  pb.FlushResponse.FromString)(pb.FlushRequest(), timeout=left)
            except grpc.RpcError as exc:
                log.warning("the buffer's Flush failed: %s: %s", exc.code().name, exc.details())
                return False
            except ValueError:  # the channel was closed meanwhile
                return False
            self.last_barrier = reply
            ok = reply.rows_failed == 0
        return ok

    def close(self, timeout: float | None = None) -> bool:
        """Flushes (up to ``timeout``), then stops: a batch still unacknowledged fails with
        :class:`WriteFailed` (``code`` None), counted in ``failed_rows``; later writes raise
        :class:`ClientClosed`. True when everything was acknowledged (a second call: what the
        first returned)."""
        with self._lock:
            if self._closed and self._stop:
                return self._closed_ok
            self._closed = True
            self._room.notify_all()
        end = None if timeout is None else time.monotonic() + timeout
        ok = self.flush(timeout)
        with self._lock:
            self._stop = True
            self._closed_ok = ok
            left = list(self._unresolved.values())
            self._open.clear()
            self._later.clear()
            self._work.notify_all()
            channels = [self._channel]
            self._streamed.notify_all()
            if self._stream is not None:
                self._stream.requests.put(None)
        self._sendq.put(None)
        for batch in left:
            self._resolve(batch, error=WriteFailed(None, "the client was closed before the buffer acknowledged "
                                                   "this batch (if it was on its way, it may still land)", batch.nrows))
        for channel in channels:  # calls still out end at once (CANCELLED), so the threads can stop
            channel.close()
        for thread in self._threads:
            if thread is not threading.current_thread():  # close() from a future's callback
                thread.join(None if end is None else max(0.1, end - time.monotonic()))
        return ok

    def stats(self) -> dict[str, int]:
        """The client's counters: rows written, acknowledged, failed (their batch failed, or the client
        closed first), refused (``ClientFull``), and what it holds now."""
        with self._lock:
            held_rows, held_bytes = self._held()
            done = self._counts["acknowledged_rows"] + self._counts["failed_rows"]
            return {"written_rows": done + held_rows, "acknowledged_rows": self._counts["acknowledged_rows"],
                    "failed_rows": self._counts["failed_rows"],
                    "refused_rows": self._counts["refused_rows"], "held_rows": held_rows,
                    "held_bytes": held_bytes, "batches_sent": self._counts["batches_sent"],
                    "resends": self._counts["resends"], "duplicates": self._counts["duplicates"]}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- the background threads ----------------------------------------------------------
    #
    # The dispatcher seals batches past their linger, releases resends when their time comes, and
    # gives up a stream that leaves a batch unanswered for call_timeout. The feeder takes sealed
    # batches from a queue and puts them on the stream; the stream thread reads the answers and, when
    # the stream ends, resends what it had unanswered on the next. The application's lock is taken by
    # them only to seal, to count an outcome, or to switch streams.

    def _seal(self, batch: _Batch) -> None:
        """Under the lock: the batch takes no more rows and goes to the senders."""
        del self._open[batch.key]
        self._out[batch.key] += 1
        batch.sealed = True
        batch.nbytes = len(batch.data)
        self._reserved_rows += batch.nrows - batch.reserved_rows  # from its reservation to its size
        self._reserved_bytes += batch.nbytes - batch.reserved_bytes
        batch.reserved_rows, batch.reserved_bytes = batch.nrows, batch.nbytes
        self._sendq.put(batch)

    def _connect(self) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(self.target, self._credentials, options=self._options)
        return grpc.insecure_channel(self.target, options=self._options)

    def _dispatch(self) -> None:
        """Seals each open batch past its linger — unless a batch of its table and format is still
        out, in which case it keeps filling until that one is answered (_resolve seals it then) or it
        is full: under load batches grow with the round trip, as Nagle's algorithm does for packets."""
        with self._lock:
            while not self._stop:
                now = time.monotonic()
                lingering = [b for b in self._open.values() if b.key not in self._out]
                for batch in lingering:
                    if now - batch.created >= self.linger:
                        self._seal(batch)
                while self._later and self._later[0][0] <= now:
                    self._sendq.put(heapq.heappop(self._later)[2])
                stream = self._stream
                overdue = math.inf
                if stream is not None and stream.inflight and not stream.closed:
                    overdue = min(b.sent_at for b in stream.inflight.values()) + self.call_timeout
                    if overdue <= now and stream.call is not None:
                        # Unanswered for call_timeout: give the stream up; _run resends what it had.
                        stream.closed = True
                        stream.call.cancel()
                        self._reconnect = True
                        overdue = math.inf
                wake = min([b.created + self.linger for b in lingering if b.key in self._open]
                           + ([self._later[0][0]] if self._later else []) + [overdue], default=math.inf)
                self._wake_at = wake  # a new batch or resend due sooner notifies (_soon)
                self._work.wait(None if wake == math.inf else max(0.0, wake - now))
                self._wake_at = -math.inf  # awake: it looks at everything before it waits again

    def _soon(self, when: float) -> None:
        """Under the lock: something is due at ``when``; wakes the dispatcher if it sleeps past it."""
        if when < self._wake_at:
            self._wake_at = when
            self._work.notify()

    def _feed(self) -> None:
        """Puts sealed batches on the current stream, at most ``max_in_flight`` unanswered."""
        while True:
            batch = self._sendq.get()
            if batch is None:
                return
            if id(batch) not in self._unresolved:
                continue  # failed by close() while it waited here
            pause = self._paused_until - time.monotonic()
            if pause > 0:  # the buffer said it is full: nothing goes before its hint
                time.sleep(pause)
            self._slots.acquire()  # released when its answer comes, or its stream ends
            if batch.request is None:
                lines = FORMATS[batch.format][1]
                batch.sequence = next(self._sequence)
                batch.request = _with_rows(pb.WriteBatchesRequest(
                    table=batch.table, format=batch.format,  # type: ignore[arg-type]
                    row_count=0 if lines else batch.nrows,
                    ack_level=self.ack_level, producer=self.producer, sequence=batch.sequence), batch.data)
                batch.data = bytearray()
                batch.deadline = time.monotonic() + self.retry_for
            with self._lock:
                while not self._stop and (self._stream is None or self._stream.closed):
                    self._streamed.wait()  # the stream is being replaced
                if self._stop:
                    self._slots.release()
                    continue
                stream = self._stream
                assert stream is not None
                stream.inflight[batch.sequence] = batch
                batch.attempts += 1
                batch.sent_at = time.monotonic()
                stream.requests.put(batch.request)
                self._soon(batch.sent_at + self.call_timeout)  # unanswered by then: the stream is given up

    def _run(self) -> None:
        """Keeps one WriteBatches stream open and reads its answers; when it ends, what it had
        unanswered is resent (with its key) on the next one."""
        pause = 0.0
        while True:
            with self._lock:
                if self._stop:
                    return
                if self._reconnect:  # a new connection: a draining replica's clients go elsewhere
                    self._reconnect = False
                    old, self._channel = self._channel, self._connect()
                    self._call = self._write_method(self._channel)
                    old.close()
                stream = self._stream = _Stream()
                stream.call = self._call(iter(stream.requests.get, None), wait_for_ready=True)
                self._streamed.notify_all()
            code, message = grpc.StatusCode.UNAVAILABLE, "the stream ended"
            try:
                for answer in stream.call:
                    pause = 0.0
                    self._answered(stream, answer)
            except grpc.RpcError as exc:
                code, message = exc.code(), exc.details() or ""
            except ValueError:  # the channel was closed (by close())
                code, message = grpc.StatusCode.CANCELLED, "the client was closed"
            with self._lock:
                stream.closed = True
                left = list(stream.inflight.values())
                stream.inflight.clear()
            stream.requests.put(None)
            for batch in left:
                self._slots.release()
                self._retry_or_fail(batch, code, message, 0)
            if code is not grpc.StatusCode.CANCELLED:  # a broken or refused connection: a new one
                self._reconnect = True
            if not self._stop:
                time.sleep(pause)  # a stream that fails at once: do not spin
                pause = min(2.0, max(0.05, pause * 2))

    def _answered(self, stream: _Stream, answer: pb.WriteBatchesResponse) -> None:
        with self._lock:
            batch = stream.inflight.pop(answer.sequence, None)
        if batch is None:
            return  # not one of ours (a stray answer): nothing waits for it
        self._slots.release()
        if answer.HasField("ok"):
            reply = answer.ok
            if reply.duplicate:
                with self._lock:
                    self._counts["duplicates"] += 1
            self._resolve(batch, Ack(reply.rows, reply.bytes, ACK_NAMES.get(reply.ack_level, "buffered"),
                                     reply.duplicate))
        else:
            self._retry_or_fail(batch, _CODES.get(answer.code, grpc.StatusCode.UNKNOWN), answer.message,
                                answer.retry_after_ms)
            if answer.code == grpc.StatusCode.UNAVAILABLE.value[0]:  # draining: go elsewhere
                with self._lock:
                    self._reconnect = True
                    if not stream.closed:
                        stream.closed = True  # ends it once its answers are in; the next goes out anew
                        stream.requests.put(None)

    @staticmethod
    def _write_method(channel: grpc.Channel) -> Any:
        return channel.stream_stream(f"/{SERVICE_NAME}/WriteBatches", None, pb.WriteBatchesResponse.FromString)

    def _retry_or_fail(self, batch: _Batch, code: grpc.StatusCode, message: str, retry_after_ms: int) -> None:
        now = time.monotonic()
        wait = 0.0
        with self._lock:
            again = now < batch.deadline and not self._stop and id(batch) in self._unresolved
            if again and code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                wait = retry_after_ms / 1000 if retry_after_ms else min(2.0, 0.05 * 2 ** batch.attempts)
                self._paused_until = max(self._paused_until, now + wait)  # the buffer is full: nothing meanwhile
                self._sendq.put(batch)
                self._counts["resends"] += 1
            elif again and code in RESEND:
                wait = min(2.0, 0.02 * 2 ** batch.attempts)
                heapq.heappush(self._later, (now + wait, id(batch), batch))
                self._soon(now + wait)
                self._counts["resends"] += 1
            else:
                again = False
        if again:
            log.info("%s: %s; resending %d rows in %gs", code.name, message, batch.nrows, wait)
            return
        if id(batch) in self._unresolved and not self._stop:
            log.warning("a batch of %d rows for %s failed: %s: %s", batch.nrows, batch.table, code.name, message)
        self._resolve(batch, error=WriteFailed(code, message, batch.nrows))

    def _resolve(self, batch: _Batch, ack: Ack | None = None, error: WriteFailed | None = None) -> None:
        with self._lock:
            if self._unresolved.pop(id(batch), None) is None:
                return  # resolved already (close() failed it while its call was out)
            if batch.request is not None:
                self._counts["batches_sent"] += 1
            if batch.sealed:
                out = self._out
                out[batch.key] -= 1
                if out[batch.key] <= 0:
                    del out[batch.key]
                    waiting = self._open.get(batch.key)  # it lingered behind this one: its turn now
                    if waiting is not None:
                        if time.monotonic() - waiting.created >= self.linger:
                            self._seal(waiting)
                        else:
                            self._soon(waiting.created + self.linger)
            self._reserved_rows -= batch.reserved_rows
            self._reserved_bytes -= batch.reserved_bytes
            self._counts["acknowledged_rows" if error is None else "failed_rows"] += batch.nrows
            self._room.notify_all()
        if error is None:
            batch.future.set_result(ack)  # type: ignore[arg-type]
        else:
            batch.future.set_exception(error)


class AsyncClient:
    """The same client for asyncio applications: ``await write(...)`` returns an asyncio future."""

    def __init__(self, target: str, **options: Any) -> None:
        self._client = Client(target, **options)

    async def write(self, table: str, row: dict[str, Any] | bytes, *, format: str | int | None = None,
                    rows: int | None = None) -> asyncio.Future[Ack]:
        """Queues the row(s); waits only while the client is full (``when_full="block"``). Returns
        the future of the batch holding them."""
        client = self._client
        data, fmt, n = client._checked(table, row, format, rows)
        try:
            batch = client._append(table, fmt, data, n, None)
        except _NoRoom:  # wait for room in a thread, not on the loop (or raise at once, as told)
            batch = await asyncio.to_thread(client._append, table, fmt, data, n, client.block)
        if batch.afuture is None:
            batch.afuture = asyncio.wrap_future(batch.future)
        # Shared by the batch's rows: each caller gets a shield of it, so a caller's timeout
        # (asyncio.wait_for) or cancel leaves the others' acknowledgement alone.
        return asyncio.shield(batch.afuture)

    async def flush(self, timeout: float | None = None, *, committed: bool = False) -> bool:
        """See :meth:`Client.flush`."""
        return await asyncio.to_thread(self._client.flush, timeout, committed=committed)

    async def close(self, timeout: float | None = None) -> bool:
        """See :meth:`Client.close`."""
        return await asyncio.to_thread(self._client.close, timeout)

    def stats(self) -> dict[str, int]:
        return self._client.stats()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
