"""The gRPC ingest service: checks each request, puts it in the ring, answers at its ack level.

Validation, the catalog and the ring raise :mod:`buffer.refusals`; ``STATUS`` below is the one
place that turns them into gRPC status codes and trailing metadata.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc import aio

from buffer.api import ACCEPTED_MESSAGES_KEY, RETRY_AFTER_KEY
from buffer.api import ingest_pb2 as pb
from buffer.catalog import TableCatalog
from buffer.framing import check_request, refuse_header
from buffer.ledger import Fate, Ledger
from buffer.refusals import (
    BufferClosed,
    BufferFull,
    CommitFailed,
    InvalidRequest,
    LogUnavailable,
    NeedsLog,
    Refusal,
    UnknownTable,
    Unsupported,
)
from buffer.replay import Replay, Spill
from buffer.ring import CLOSED, Entry, EntryFailed, Key, Ring, WhenFull
from buffer.wal import LogFailed, WriteAheadLog

log = logging.getLogger(__name__)

STATUS: dict[type[Refusal], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownTable: grpc.StatusCode.NOT_FOUND,
    BufferFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BufferClosed: grpc.StatusCode.UNAVAILABLE,
    Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    NeedsLog: grpc.StatusCode.FAILED_PRECONDITION,
    LogUnavailable: grpc.StatusCode.UNAVAILABLE,
    CommitFailed: grpc.StatusCode.ABORTED,
}
# With the log on: the most payload that may wait for the writer (beyond it, the disk is not keeping
# up and writes are refused as if full), and how often a write waiting for room looks again.
BACKLOG_BYTES = 32 << 20
ROOM_POLL = 0.05
# Writes keyed by (producer, sequence) remembered for resends: at most this many (about 1 KiB each),
# the oldest answered ones forgotten first; one still being handled is never forgotten. A client
# resends within seconds; at 1,000 keyed batches/s this covers 16 s.
REMEMBERED_WRITES = 16_384
MAX_PRODUCER = 64
_COMMITTED = pb.ACK_LEVEL_COMMITTED
_DURABLE = pb.ACK_LEVEL_DURABLE
# What _accept hands back: rows, bytes, the entry a COMMITTED ack waits on, the fsync a DURABLE one waits
# on, and the entry itself.
Accepted = tuple[int, int, "Entry | None", "asyncio.Future[None] | None", "Entry | None"]


@dataclass
class ShapedWrite:
    """A write with a WriteRequest's fields, from another way in than gRPC (ClickHouse's HTTP
    interface): it also carries its key's shape (buffer.shape), and the column names a CSV/TSV header
    would repeat when it names its own columns."""

    table: str
    format: int
    rows: bytes
    shape: str
    ack_level: int
    producer: str = ""
    sequence: int = 0
    row_count: int = 0
    header_columns: frozenset[bytes] | None = None


class Deadline(Protocol):
    """What the write path needs of a call: how long it may still wait (a gRPC call has this)."""

    def time_remaining(self) -> float | None: ...


def _parse(message_type: Any, raw: bytes) -> Any:
    """Decodes a request here rather than in gRPC, whose failure would be a bare INTERNAL."""
    try:
        return message_type.FromString(raw)
    except Exception as exc:  # protobuf raises DecodeError, and on some inputs others
        raise InvalidRequest(f"the request is not a valid {message_type.DESCRIPTOR.full_name} message ({exc}): "
                             "build it with stubs generated from ingestbuffer/v1/ingest.proto",
                             "malformed_message") from None


def _retry_after_ms(refusal: BufferFull) -> int:
    return int(refusal.retry_after * 1000)


def _ack_level(raw: int, logged: bool) -> pb.AckLevel:
    if raw in (pb.ACK_LEVEL_UNSPECIFIED, pb.ACK_LEVEL_BUFFERED):
        return pb.ACK_LEVEL_BUFFERED
    if raw == pb.ACK_LEVEL_COMMITTED:
        return pb.ACK_LEVEL_COMMITTED
    if raw == pb.ACK_LEVEL_DURABLE:
        if not logged:
            raise NeedsLog("ack_level DURABLE needs the write-ahead log, which this buffer runs without: start it "
                           "with --wal-dir (INGEST_BUFFER_WAL_DIR), or use ACK_LEVEL_BUFFERED or ACK_LEVEL_COMMITTED",
                           "no_log")
        return pb.ACK_LEVEL_DURABLE
    raise InvalidRequest(f"ack_level {raw} is unknown: use ACK_LEVEL_BUFFERED, ACK_LEVEL_DURABLE or "
                         "ACK_LEVEL_COMMITTED", "bad_ack_level")


class IngestService:
    def __init__(self, ring: Ring, catalog: TableCatalog, *, max_request_bytes: int,
                 block_timeout: float, on_barrier: Any = None, dead_letters: str = "",
                 wal: WriteAheadLog | None = None) -> None:
        self.ring = ring
        self.wal = wal
        self.replay: Replay | None = None  # reads back what is in the log and not in memory
        self.spill = Spill(ring)  # requests accepted onto disk only
        self.ledger: Ledger = ring.ledger
        self.catalog = catalog
        self.max_request_bytes = max_request_bytes
        self.block_timeout = block_timeout
        self.on_barrier = on_barrier  # called when a Flush starts, to wake the flusher
        self.dead_letters = dead_letters  # where refused rows go, for error messages
        # Keyed Writes, oldest first: each one's handling, whose outcome a resend of it gets.
        self._keyed: dict[tuple[str, int], asyncio.Task[pb.WriteResponse]] = {}

    # ----- shared path ----------------------------------------------------------------------

    async def _accept(self, req: Any, ack: pb.AckLevel, context: Deadline) -> Accepted:
        """Checks and buffers one request (in the log too, when there is one); raises a Refusal for
        anything the client must fix. The request is in the ring before it is in the log: a refusal
        for want of room leaves nothing in the log."""
        payload: bytes = req.rows
        table: str = req.table
        ledger = self.ledger
        ledger.received_requests += 1
        ledger.received_bytes += len(payload)
        fmt, rows, lines = check_request(table, req.format, payload, req.row_count, self.max_request_bytes,
                                         self.ring.max_rows)
        ledger.received_rows += rows
        if not self.catalog.allows(table):
            await self.catalog.check(table)
        shaped = req.__class__ is ShapedWrite  # from ClickHouse's HTTP interface: a shape of its own
        if fmt in ("CSV", "TabSeparated"):
            # The insert's own column list when it names one, else the table's.
            columns = (shaped and req.header_columns) or self.catalog.columns(table)
            if columns:
                refuse_header(fmt, payload, columns)
        key = (table, req.shape if shaped else fmt)
        if self.wal is not None:
            return await self._accept_logged(self.wal, key, payload, rows, lines, ack, context)
        # The common cases, with room: joined to the newest entry of its table (small writes
        # in a row), or a new entry; no waiting to set up.
        if ack == pb.ACK_LEVEL_BUFFERED and lines and self.ring.try_append(key, payload, rows):
            return rows, len(payload), None, None, None
        entry = Entry(key, payload, rows)
        committed = ack == _COMMITTED
        if committed:
            entry.waiter = asyncio.get_running_loop().create_future()
        if not self.ring.try_admit(entry):
            timeout = self.block_timeout
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = min(timeout, max(0.0, remaining - 0.05))
            await self.ring.put(entry, timeout)
        return entry.rows, entry.size, entry if committed else None, None, entry

    async def _accept_logged(self, wal: WriteAheadLog, key: Key, payload: bytes, rows: int, lines: bool,
                             ack: pb.AckLevel, context: Deadline) -> Accepted:
        """With the log: into memory and the log when memory has room and nothing waits on disk
        only; otherwise onto disk only (the spill), read back in order as room frees. Every refusal
        comes before the request takes its lsn, so a run of spilled requests has no gaps."""
        size = len(payload)
        ring = self.ring
        await self._log_room(wal, size, context)
        if ring.closed:
            raise BufferClosed(CLOSED)
        lsn = wal.reserve()
        committed = ack == _COMMITTED
        durable = ack == _DURABLE
        spill = self.spill
        replay = self.replay
        # Rows left in the log by the last run go first: until they are all back in memory, new
        # requests queue behind them, on disk.
        if not spill.active and (replay is None or replay.done.is_set()):
            if ack == pb.ACK_LEVEL_BUFFERED and lines and ring.try_append(key, payload, rows, lsn):
                wal.put_rows(key, lsn, rows, payload, False)
                return rows, size, None, None, None
            entry = Entry(key, payload, rows, lsn=lsn, syncing=durable)
            if committed:
                entry.waiter = asyncio.get_running_loop().create_future()
            if ring.try_admit(entry):
                synced = wal.put_rows(key, lsn, rows, payload, durable)
                if synced is not None:
                    synced.add_done_callback(functools.partial(self._synced, entry))
                return rows, size, entry if committed else None, synced, entry
        # Memory is full, or requests wait on disk already: onto disk only. An entry (without its
        # payload) is kept only for a writer that waits: COMMITTED, or DURABLE until its reply.
        spilled: Entry | None = None
        if committed or durable:
            spilled = Entry(key, b"", rows, lsn=lsn)
            spilled.size = size
            if committed:
                spilled.waiter = asyncio.get_running_loop().create_future()
        position = wal.writer.position
        synced = wal.put_rows(key, lsn, rows, payload, durable)
        spill.add(lsn, rows, size, position, spilled)
        if synced is not None and spilled is not None:
            synced.add_done_callback(functools.partial(self._synced, spilled))
        return rows, size, spilled if committed else None, synced, spilled

    def _synced(self, entry: Entry, fut: asyncio.Future[None]) -> None:
        """A DURABLE request's fsync is done: the flusher may take it now — or, when it failed, the
        request is taken back whole (the client hears it failed, so it must not land)."""
        entry.syncing = False
        if fut.cancelled() or fut.exception() is None:
            self.ring.arrived.set()
        else:
            self._withdraw(entry)

    def _withdraw(self, entry: Entry) -> None:
        """Takes a refused request back, from memory or from disk; should its record be on disk after
        all, it never replays."""
        if self.spill.withdraw(entry) and self.wal is not None:
            self.wal.settle(entry.lsns())

    async def _log_room(self, wal: WriteAheadLog, size: int, context: Deadline) -> None:
        """Refuses when the log cannot take the request: a failing disk, a full one (``--when-full
        block`` waits for room, up to ``--block-timeout``), or a writer that is not keeping up."""
        if wal.error is not None:
            raise LogUnavailable(f"{wal.error.strerror}; rows cannot be made safe there: retry, or send to another "
                                 "replica")
        if wal.disk_bytes + size <= wal.max_bytes and wal.backlog <= BACKLOG_BYTES:
            return
        waited = 0.0
        if self.ring.when_full is WhenFull.BLOCK:
            timeout = self.block_timeout
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = min(timeout, max(0.0, remaining - 0.05))
            while waited < timeout and (wal.disk_bytes + size > wal.max_bytes or wal.backlog > BACKLOG_BYTES):
                await asyncio.sleep(ROOM_POLL)
                waited += ROOM_POLL
            if wal.error is None and wal.disk_bytes + size <= wal.max_bytes and wal.backlog <= BACKLOG_BYTES:
                return
        after = f"; waited {waited:g}s" if waited else ""
        if wal.disk_bytes + size > wal.max_bytes:
            raise BufferFull(f"the write-ahead log in {wal.directory} is full: {wal.disk_bytes}/{wal.max_bytes} "
                             f"bytes (--wal-max-bytes) while ClickHouse catches up{after}", 1.0)
        raise BufferFull(f"the disk under the write-ahead log in {wal.directory} is not keeping up: {wal.backlog} "
                         f"bytes wait to be written{after}", 0.5)

    async def _durable(self, waits: list[tuple[asyncio.Future[None], Entry]]) -> int:
        """Waits for the fsyncs; returns how many requests, from the first, are on disk. A failed one
        was taken back already (_synced); those after it are refused with it, so they are taken back
        too: a row is never both refused and kept."""
        try:
            for i, (fut, _) in enumerate(waits):
                try:
                    await fut
                except LogFailed:
                    for later, entry in waits[i + 1:]:  # on disk or not, they are refused with the rest
                        if not later.done():
                            later.add_done_callback(functools.partial(self._refused_anyway, entry))
                        elif later.exception() is None:
                            self._withdraw(entry)
                    return i
            return len(waits)
        finally:
            for fut, entry in waits:
                # A spilled one needs no entry until it is read back, once its fsync is over (a failed
                # one is withdrawn through its entry: _synced runs before this callback).
                if fut.done():
                    self.spill.forget(entry)
                else:
                    fut.add_done_callback(functools.partial(self._forget, entry))

    def _forget(self, entry: Entry, _: asyncio.Future[None]) -> None:
        self.spill.forget(entry)

    def _refused_anyway(self, entry: Entry, fut: asyncio.Future[None]) -> None:
        """A DURABLE request the client was told was refused (one before it in its stream failed)
        reached the disk after all: taken back, so that it does not land."""
        if not fut.cancelled() and fut.exception() is None:
            self._withdraw(entry)

    async def _committed(self, entries: list[Entry]) -> None:
        """Waits until ClickHouse took every entry; raises CommitFailed if any failed."""
        failed: list[str] = []
        kept = False
        for entry in entries:
            assert entry.waiter is not None
            try:
                await entry.waiter
            except EntryFailed as exc:
                failed.append(str(exc))
                kept = kept or (entry.outcome is not None and entry.outcome.fate is Fate.KEPT)
        if failed:
            more = f" (and {len(failed) - 3} more requests)" if len(failed) > 3 else ""
            where = f". Dead-lettered rows, with ClickHouse's error, are in {self.dead_letters}" if kept else ""
            raise CommitFailed("rows were accepted but did not all reach ClickHouse: " + "; ".join(failed[:3]) + more
                               + where, "commit_failed")

    async def _refuse(self, context: aio.ServicerContext[Any, Any], refusal: Refusal,
                      trailers: tuple[tuple[str, str], ...] = ()) -> None:
        """Ends the call with the refusal's status. The caller returns an empty reply after it: gRPC
        sends the status, not the reply, whether or not ``abort`` raises."""
        if isinstance(refusal, BufferFull):
            trailers += ((RETRY_AFTER_KEY, str(_retry_after_ms(refusal))),)
        if trailers:
            context.set_trailing_metadata(trailers)
        await context.abort(STATUS[type(refusal)], refusal.message)

    # ----- RPCs -----------------------------------------------------------------------------

    async def Write(self, raw: bytes, context: aio.ServicerContext[Any, Any]) -> pb.WriteResponse:
        try:
            return await self._one_write(_parse(pb.WriteRequest, raw), context)
        except Refusal as refusal:
            self._count_refusal(refusal, len(raw))
            await self._refuse(context, refusal)
            return pb.WriteResponse()

    async def _one_write(self, request: Any, context: Deadline, protocol: str = "grpc") -> pb.WriteResponse:
        """A Write, one request of WriteBatches, or an HTTP insert: keyed (a resend is answered) or not."""
        ack = _ack_level(request.ack_level, self.wal is not None)
        if request.producer:
            reply = await self._keyed_write(request, ack, context)
        else:
            reply = await self._write(request, ack, context)
        self.ledger.answered(protocol, 1, reply.rows)
        return reply

    async def http_write(self, request: Any, context: Deadline) -> pb.WriteResponse:
        """A write from ClickHouse's HTTP interface (buffer.chhttp): the path of a Write. ``request``
        has a Write's fields and the key's ``shape``."""
        try:
            return await self._one_write(request, context, "clickhouse_http")
        except Refusal as refusal:
            self._count_refusal(refusal, len(request.rows), "clickhouse_http")
            raise

    def _count_refusal(self, refusal: Refusal, size: int, protocol: str = "grpc") -> None:
        self.ledger.protocols[protocol][2] += 1
        if not isinstance(refusal, CommitFailed):  # accepted rows that failed later are no refusal
            self.ledger.refuse(refusal.reason, size)

    async def _write(self, request: Any, ack: pb.AckLevel, context: Deadline) -> pb.WriteResponse:
        rows, size, waiter, synced, entry = await self._accept(request, ack, context)
        if synced is not None and entry is not None and not await self._durable([(synced, entry)]):
            raise self._unsynced()
        if waiter is not None:
            await self._committed([waiter])
        return pb.WriteResponse(rows=rows, bytes=size, ack_level=ack)

    async def _keyed_write(self, request: Any, ack: pb.AckLevel,
                           context: Deadline) -> pb.WriteResponse:
        """A Write the client may resend: the same (producer, sequence) again gets the first one's
        reply and adds nothing. The first is handled in a task of its own, so a client that goes
        away mid-call (the reason it resends) cannot cut it short between taking rows and saying so."""
        producer: str = request.producer
        if len(producer) > MAX_PRODUCER:
            raise InvalidRequest(f"producer is {len(producer)} characters long; at most {MAX_PRODUCER} (an id such "
                                 "as 32 hex digits)", "bad_producer")
        key = (producer, request.sequence)
        while (first := self._keyed.get(key)) is not None:
            try:
                reply = await asyncio.shield(first)
            except Refusal as refusal:
                if isinstance(refusal, CommitFailed):  # its rows were taken: the resend hears the same
                    raise CommitFailed(refusal.message, refusal.reason) from None
                continue  # refused, so it took nothing (and left the window): this one is handled afresh
            self.ledger.duplicate_requests += 1
            return pb.WriteResponse(rows=reply.rows, bytes=reply.bytes, ack_level=reply.ack_level, duplicate=True)
        task = asyncio.ensure_future(self._write(request, ack, context))
        self._keyed[key] = task
        task.add_done_callback(functools.partial(self._keyed_done, key))
        return await asyncio.shield(task)

    def _keyed_done(self, key: tuple[str, int], task: asyncio.Task[pb.WriteResponse]) -> None:
        exc = None if task.cancelled() else task.exception()
        if task.cancelled() or (exc is not None and not isinstance(exc, CommitFailed)):
            if self._keyed.get(key) is task:  # nothing was taken: a resend is a new request
                del self._keyed[key]
            return
        keyed = self._keyed
        excess = len(keyed) - REMEMBERED_WRITES
        if excess > 0:  # forget the oldest answered ones; one still being handled (a long COMMITTED wait) stays
            forget = []
            for old, handling in keyed.items():
                if handling.done():
                    forget.append(old)
                    if len(forget) == excess:
                        break
            for old in forget:
                del keyed[old]

    async def WriteStream(self, request_iterator: AsyncIterator[bytes],
                          context: aio.ServicerContext[Any, Any]) -> pb.WriteStreamResponse:
        messages = rows = size = 0
        ack: pb.AckLevel = pb.ACK_LEVEL_BUFFERED
        waiting: list[Entry] = []
        syncs: list[tuple[asyncio.Future[None], Entry]] = []
        try:
            async for raw in request_iterator:
                try:
                    request = _parse(pb.WriteStreamRequest, raw)
                    if messages == 0:
                        ack = _ack_level(request.ack_level, self.wal is not None)
                    n, nbytes, waiter, synced, entry = await self._accept(request, ack, context)
                except Refusal as refusal:
                    self.ledger.refuse(refusal.reason, len(raw))
                    self.ledger.protocols["grpc"][2] += 1
                    refusal.message = (f"message {messages + 1} of the stream: {refusal.message} "
                                       f"(the {messages} messages before it, {rows} rows, were accepted)")
                    raise
                messages += 1
                rows += n
                size += nbytes
                if waiter is not None:
                    waiting.append(waiter)
                if synced is not None and entry is not None:
                    syncs.append((synced, entry))
            if syncs and (on_disk := await self._durable(syncs)) < len(syncs):
                messages = on_disk  # every message before the first that did not reach the disk
                raise self._unsynced()
            if waiting:
                await self._committed(waiting)
            self.ledger.answered("grpc", messages, rows)
            return pb.WriteStreamResponse(messages=messages, rows=rows, bytes=size, ack_level=ack)
        except Refusal as refusal:
            self.ledger.answered("grpc", messages, rows)  # the messages before the refused one were taken
            await self._refuse(context, refusal, ((ACCEPTED_MESSAGES_KEY, str(messages)),))
            return pb.WriteStreamResponse()

    async def WriteBatches(self, request_iterator: AsyncIterator[bytes],
                           context: aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.WriteBatchesResponse]:
        """Each request handled as a Write of its own, concurrently, answered as soon as it is done."""
        answers: asyncio.Queue[pb.WriteBatchesResponse | None] = asyncio.Queue()

        async def one(raw: bytes) -> None:
            sequence = 0
            try:
                request = _parse(pb.WriteBatchesRequest, raw)
                sequence = request.sequence
                answers.put_nowait(pb.WriteBatchesResponse(sequence=sequence,
                                                           ok=await self._one_write(request, context)))
            except Refusal as refusal:
                self._count_refusal(refusal, len(raw))
                after = _retry_after_ms(refusal) if isinstance(refusal, BufferFull) else 0
                answers.put_nowait(pb.WriteBatchesResponse(sequence=sequence, code=STATUS[type(refusal)].value[0],
                                                           message=refusal.message, retry_after_ms=after))

        async def read() -> None:
            handling: set[asyncio.Task[None]] = set()
            try:
                async for raw in request_iterator:
                    task = asyncio.ensure_future(one(raw))
                    handling.add(task)
                    task.add_done_callback(handling.discard)
            finally:
                if handling:
                    await asyncio.gather(*handling, return_exceptions=True)
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # (raises what reading raised)
        finally:
            reader.cancel()  # the client went away: a keyed write goes on in its own task regardless

    def _unsynced(self) -> LogUnavailable:
        error = self.wal.error if self.wal is not None else None
        return LogUnavailable(f"{error.strerror if error else 'the write-ahead log failed'}: the rows are not on disk "
                              "and were not kept; retry, or send to another replica")

    async def Flush(self, request: Any, context: aio.ServicerContext[Any, Any]) -> pb.FlushResponse:
        if self.replay is not None:
            await self.replay.caught_up()  # rows still coming back from the log were accepted before this call
        barrier = self.ring.barrier()
        if self.on_barrier is not None:
            self.on_barrier()
        await asyncio.shield(barrier.done)
        ok, failed = barrier.outcome()
        return pb.FlushResponse(rows_committed=ok, rows_failed=failed)

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The service's method handlers; Write and WriteStream take raw bytes (see _parse)."""
        return {
            "Write": grpc.unary_unary_rpc_method_handler(
                self.Write, request_deserializer=None, response_serializer=pb.WriteResponse.SerializeToString),
            "WriteStream": grpc.stream_unary_rpc_method_handler(
                self.WriteStream, request_deserializer=None,
                response_serializer=pb.WriteStreamResponse.SerializeToString),
            "WriteBatches": grpc.stream_stream_rpc_method_handler(
                self.WriteBatches, request_deserializer=None,
                response_serializer=pb.WriteBatchesResponse.SerializeToString),
            "Flush": grpc.unary_unary_rpc_method_handler(
                self.Flush, request_deserializer=pb.FlushRequest.FromString,
                response_serializer=pb.FlushResponse.SerializeToString),
        }
