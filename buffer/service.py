"""The gRPC ingest service: checks each request, puts it in the ring, answers at its ack level.

Validation, the catalog and the ring raise :mod:`buffer.refusals`; ``STATUS`` below is the one
place that turns them into gRPC status codes and trailing metadata.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

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
from buffer.ring import Entry, EntryFailed, Ring, State
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
_COMMITTED = pb.ACK_LEVEL_COMMITTED
_DURABLE = pb.ACK_LEVEL_DURABLE
# What _accept hands back: rows, bytes, the entry a COMMITTED ack waits on, the fsync a DURABLE one waits
# on, and the entry itself.
Accepted = tuple[int, int, "Entry | None", "asyncio.Future[None] | None", "Entry | None"]


def _parse(message_type: Any, raw: bytes) -> Any:
    """Decodes a request here rather than in gRPC, whose failure would be a bare INTERNAL."""
    try:
        return message_type.FromString(raw)
    except Exception as exc:  # protobuf raises DecodeError, and on some inputs others
        raise InvalidRequest(f"the request is not a valid {message_type.DESCRIPTOR.full_name} message ({exc}): "
                             "build it with stubs generated from ingestbuffer/v1/ingest.proto",
                             "malformed_message") from None


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
        self.replayed: asyncio.Event | None = None  # set once the log's rows are all back in the ring
        self.ledger: Ledger = ring.ledger
        self.catalog = catalog
        self.max_request_bytes = max_request_bytes
        self.block_timeout = block_timeout
        self.on_barrier = on_barrier  # called when a Flush starts, to wake the flusher
        self.dead_letters = dead_letters  # where refused rows go, for error messages

    # ----- shared path ----------------------------------------------------------------------

    async def _accept(self, req: Any, ack: pb.AckLevel, context: aio.ServicerContext[Any, Any]) -> Accepted:
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
        if fmt in ("CSV", "TabSeparated"):
            columns = self.catalog.columns(table)
            if columns:
                refuse_header(fmt, payload, columns)
        key = (table, fmt)
        committed = ack == _COMMITTED
        wal = self.wal
        lsn = self._log_room(wal, len(payload)) if wal is not None else 0
        # The common cases, with room: joined to the newest entry of its table (small writes
        # in a row), or a new entry; no waiting to set up.
        if ack == pb.ACK_LEVEL_BUFFERED and lines and self.ring.try_append(key, payload, rows, lsn):
            if wal is not None:
                wal.put_rows(key, lsn, rows, payload, False)
            return rows, len(payload), None, None, None
        entry = Entry(key, payload, rows, lsn=lsn, syncing=ack == _DURABLE)
        if committed:
            entry.waiter = asyncio.get_running_loop().create_future()
        if not self.ring.try_admit(entry):
            timeout = self.block_timeout
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = min(timeout, max(0.0, remaining - 0.05))
            try:
                await self.ring.put(entry, timeout)
            except asyncio.CancelledError:
                if wal is not None and entry.seq and entry.state is State.PENDING:
                    # Admitted just as the caller went away: the rows are accepted, so they are logged.
                    entry.syncing = False
                    wal.put_rows(key, lsn, rows, payload, False)
                raise
        synced = wal.put_rows(key, lsn, rows, payload, ack == _DURABLE) if wal is not None else None
        if synced is not None:
            synced.add_done_callback(functools.partial(self._synced, entry))
        return entry.rows, entry.size, entry if committed else None, synced, entry

    def _synced(self, entry: Entry, fut: asyncio.Future[None]) -> None:
        """A DURABLE request's fsync is done: the flusher may take it now — or, when it failed, the
        request is taken back whole (the client hears it failed, so it must not land)."""
        entry.syncing = False
        if fut.cancelled() or fut.exception() is None:
            self.ring.arrived.set()
        elif self.ring.withdraw(entry) and self.wal is not None:
            self.wal.settle(entry.lsns())  # should its record be on disk after all, it never replays

    def _log_room(self, wal: WriteAheadLog, size: int) -> int:
        if wal.error is not None:
            raise LogUnavailable(f"{wal.error.strerror}; rows cannot be made safe there: retry, or send to another "
                                 "replica")
        if wal.disk_bytes + size > wal.max_bytes:
            raise BufferFull(f"the write-ahead log in {wal.directory} is full: {wal.disk_bytes}/{wal.max_bytes} "
                             "bytes (--wal-max-bytes) while ClickHouse catches up", 1.0)
        return wal.reserve()

    async def _durable(self, waits: list[tuple[asyncio.Future[None], Entry]]) -> int:
        """Waits for the fsyncs; returns how many requests, from the first, are on disk. A failed one
        was taken back already (_synced); those after it are refused with it, so they are taken back
        too: a row is never both refused and kept."""
        for i, (fut, _) in enumerate(waits):
            try:
                await fut
            except LogFailed:
                for later, entry in waits[i + 1:]:  # on disk or not, they are refused with the rest
                    if later.done() and later.exception() is None and self.ring.withdraw(entry) and self.wal:
                        self.wal.settle(entry.lsns())
                return i
        return len(waits)

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
            trailers += ((RETRY_AFTER_KEY, str(int(refusal.retry_after * 1000))),)
        if trailers:
            context.set_trailing_metadata(trailers)
        await context.abort(STATUS[type(refusal)], refusal.message)

    # ----- RPCs -----------------------------------------------------------------------------

    async def Write(self, raw: bytes, context: aio.ServicerContext[Any, Any]) -> pb.WriteResponse:
        try:
            request = _parse(pb.WriteRequest, raw)
            ack = _ack_level(request.ack_level, self.wal is not None)
            rows, size, waiter, synced, entry = await self._accept(request, ack, context)
            if synced is not None and entry is not None and not await self._durable([(synced, entry)]):
                raise self._unsynced()
            if waiter is not None:
                await self._committed([waiter])
            return pb.WriteResponse(rows=rows, bytes=size, ack_level=ack)
        except Refusal as refusal:
            if not isinstance(refusal, CommitFailed):  # accepted rows that failed later are no refusal
                self.ledger.refuse(refusal.reason, len(raw))
            await self._refuse(context, refusal)
            return pb.WriteResponse()

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
            return pb.WriteStreamResponse(messages=messages, rows=rows, bytes=size, ack_level=ack)
        except Refusal as refusal:
            await self._refuse(context, refusal, ((ACCEPTED_MESSAGES_KEY, str(messages)),))
            return pb.WriteStreamResponse()

    def _unsynced(self) -> LogUnavailable:
        error = self.wal.error if self.wal is not None else None
        return LogUnavailable(f"{error.strerror if error else 'the write-ahead log failed'}: the rows are not on disk "
                              "and were not kept; retry, or send to another replica")

    async def Flush(self, request: Any, context: aio.ServicerContext[Any, Any]) -> pb.FlushResponse:
        if self.replayed is not None:
            await self.replayed.wait()  # rows still coming back from the log were accepted before this call
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
            "Flush": grpc.unary_unary_rpc_method_handler(
                self.Flush, request_deserializer=pb.FlushRequest.FromString,
                response_serializer=pb.FlushResponse.SerializeToString),
        }
