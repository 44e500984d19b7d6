"""ClickHouse's HTTP interface on the buffer: existing ClickHouse clients write through it by
changing a URL (``--clickhouse-http-listen``).

An ``INSERT INTO [db.]table [(columns)] [SETTINGS …] FORMAT name`` goes the way a gRPC write goes:
the same checks, bounds, write-ahead log, flusher and deduplication tokens. The statement may be in
the ``query`` parameter, at the head of the body, or split between them, as ClickHouse takes it; its
head is read by ``buffer.chsql``'s tokenizer, and the table and columns are checked against the
catalog. Rows are batched by table, column list, format and the settings that change how
ClickHouse parses them (``buffer.shape``), so inserts that differ in any of them never share an
insert.

What a 200 means: DURABLE (on this buffer's disk) when the log is on, else BUFFERED;
``wait_for_async_insert=1`` makes it COMMITTED (in ClickHouse), ``wait_for_async_insert=0``
BUFFERED. A full buffer or a draining one answers 503 with ``Retry-After``. Every refusal is in
ClickHouse's own form (``Code: N. DB::Exception: …`` and ``X-ClickHouse-Exception-Code``), so client
libraries raise their usual exceptions with this buffer's message.

Read queries (``SELECT``, ``SHOW``, ``DESCRIBE``…; what clients ask when they connect) run in the
serving process's engine when it is the embedded one, read-only, and are forwarded to ClickHouse
with the client's own credentials otherwise. Other statements are refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, web

from buffer import __version__
from buffer.api import FORMATS
from buffer.api import ingest_pb2 as pb
from buffer.catalog import TableCatalog
from buffer.chsql import WORKING, SqlError, first_word, one_read, parse_insert, tokens
from buffer.client import ACK_NAMES, varint
from buffer.config import read_users
from buffer.errors import code_in
from buffer.lifecycle import Lifecycle
from buffer.native import NativeError, count_row_binary, count_rows
from buffer.refusals import (
    BufferClosed,
    BufferFull,
    CommitFailed,
    InvalidRequest,
    LogUnavailable,
    Refusal,
    UnknownTable,
)
from buffer.routines import Routine
from buffer.service import IngestService, ShapedWrite
from buffer.shape import shape

log = logging.getLogger(__name__)

# ClickHouse's names for the formats buffered here (case does not matter, as in ClickHouse).
HTTP_FORMATS: dict[str, int] = {
    "jsoneachrow": pb.FORMAT_JSON_EACH_ROW, "jsonlines": pb.FORMAT_JSON_EACH_ROW, "ndjson": pb.FORMAT_JSON_EACH_ROW,
    "jsoncompacteachrow": pb.FORMAT_JSON_COMPACT_EACH_ROW, "csv": pb.FORMAT_CSV,
    "tabseparated": pb.FORMAT_TSV, "tsv": pb.FORMAT_TSV, "native": pb.FORMAT_NATIVE,
    "rowbinary": pb.FORMAT_ROW_BINARY,
}
READS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN"})
# URL parameters that are the HTTP transport's, not settings of the insert.
TRANSPORT = frozenset({
    "query", "database", "default_format", "query_id", "session_id", "session_timeout", "session_check",
    "compress", "decompress", "enable_http_compression", "wait_end_of_query", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "client_protocol_version", "user", "password", "quota_key",
    "buffer_size", "http_response_buffer_size", "cancel_http_readonly_queries_on_client_close",
    "http_wait_end_of_query", "max_result_rows", "max_result_bytes", "result_overflow_mode", "readonly",
    "async_insert", "wait_for_async_insert", "insert_deduplication_token",
})
# Settings that change how ClickHouse reads the rows: kept with them, applied when they are inserted.
PARSING_PREFIXES = ("input_format_", "format_", "date_time_", "cast_", "schema_inference_", "errors_")
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HEADER_SAFE = re.compile(r"[\x20-\x7e]{1,256}")
MAX_SETTING_VALUE = 4096
MAX_SHAPE = 60_000  # the log keeps a shape in 64 KiB
_DEFAULT_FORMAT = "TabSeparated"
SHUTDOWN_GRACE = 5.0


@dataclass(frozen=True)
class Failure(Exception):
    """An answer in ClickHouse's error form."""

    status: int
    code: int
    name: str
    message: str
    retry_after: float | None = None

    def response(self, query_id: str) -> web.Response:
        body = (f"Code: {self.code}. DB::Exception: {self.message}. ({self.name}) "
                f"(version ingest-buffer {__version__})\n")
        headers = {"X-ClickHouse-Exception-Code": str(self.code), "X-ClickHouse-Query-Id": query_id,
                   "X-ClickHouse-Server-Display-Name": "ingest-buffer"}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return web.Response(status=self.status, text=body, headers=headers)


_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")


def _refused(refusal: Refusal) -> Failure:
    """A write the buffer refused, as ClickHouse would say it."""
    message = refusal.message
    if isinstance(refusal, BufferFull):
        return Failure(503, 745, "SERVER_OVERLOADED", message, refusal.retry_after)
    if isinstance(refusal, BufferClosed | LogUnavailable):
        return Failure(503, 745, "SERVER_OVERLOADED", message + ": send to another replica, or retry", 1.0)
    if isinstance(refusal, UnknownTable):
        return Failure(404, 60, "UNKNOWN_TABLE", message)
    if isinstance(refusal, CommitFailed):  # ClickHouse's own error for the rows, when the message names one
        return _from_clickhouse(message, 500, whole=True)
    if isinstance(refusal, InvalidRequest):
        if refusal.reason == "too_large":
            return Failure(413, 290, "LIMIT_EXCEEDED", message)
        if refusal.reason == "empty":
            return Failure(400, 108, "NO_DATA_TO_INSERT", message)
        return Failure(400, 27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED", message)
    return Failure(501, 48, "NOT_IMPLEMENTED", message)


def _from_clickhouse(message: str, status: int | None = None, whole: bool = False) -> Failure:
    """ClickHouse's error (``Code: N. DB::Exception: … (NAME)``) as this listener answers it: its code,
    name and status (ClickHouse's for the code, unless given), and its text (``whole``: the message
    as it is, else only what follows ``DB::Exception:``)."""
    code = code_in(message)
    name = _NAME.search(message)
    text = message if whole or code is None else message.split("DB::Exception: ", 1)[-1].rsplit(" (", 1)[0]
    number = code or 1002
    return Failure(status or _STATUS.get(number, 500), number, name.group(1) if name else "UNKNOWN_EXCEPTION",
                   text[:4000])


def _sql_failure(exc: SqlError) -> Failure:
    return Failure({62: 400, 48: 501}.get(exc.code, 400), exc.code, exc.name, exc.message)


class _Deadline:
    def time_remaining(self) -> float | None:
        return None  # an HTTP client's own timeout is not known here; --block-timeout bounds the wait


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding``, at most ``limit`` bytes (more raises)."""
    encoding = encoding.strip().lower()
    whole = True  # the compressed stream ended where the body did (else it was cut short)
    try:
        if encoding in ("", "identity", "none"):
            out = body
        elif encoding in ("gzip", "x-gzip", "deflate", "zstd", "lz4"):
            out, whole = _members(body, encoding, limit)
        elif encoding in ("br", "brotli"):
            import brotli  # type: ignore[import-untyped]

            b = brotli.Decompressor()
            out = b.process(body, output_buffer_limit=limit + 1)
            whole = b.is_finished()
        else:
            raise Failure(400, 89, "UNKNOWN_COMPRESSION_METHOD",
                          f"Content-Encoding {encoding!r} is not one this buffer reads: use gzip, deflate, zstd, lz4 "
                          "or br")
    except Failure:
        raise
    except Exception as exc:
        raise Failure(400, 271, "CANNOT_DECOMPRESS",
                      f"the body could not be decompressed as {encoding}: {exc}") from None
    if len(out) > limit:
        raise Failure(413, 290, "LIMIT_EXCEEDED", f"the body is over {limit:,} bytes once decompressed "
                      "(--max-request-bytes): split the insert")
    if not whole:
        raise Failure(400, 271, "CANNOT_DECOMPRESS", f"the {encoding} body ends before its compressed stream does: "
                      "it was cut short")
    return out


@dataclass(frozen=True)
class Login:
    user: str
    password: str


def login_of(request: web.Request) -> Login:
    """The credentials as ClickHouse takes them: Basic auth, the X-ClickHouse-User and -Key headers,
    or the user and password parameters; ClickHouse's ``default`` user with no password otherwise."""
    auth = request.headers.get("Authorization", "")
    if auth[:6].lower() == "basic ":
        try:
            user, _, password = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, ValueError):  # ValueError: non-ASCII base64, or a password that is not UTF-8
            raise Failure(400, 516, "AUTHENTICATION_FAILED", "the Authorization header is not valid Basic "
                          "credentials (base64 of user:password)") from None
        if not (_HEADER_SAFE.fullmatch(user or "default") and (not password or _HEADER_SAFE.fullmatch(password))):
            raise Failure(400, 516, "AUTHENTICATION_FAILED", "the user or password holds control characters")
        return Login(user or "default", password)
    user = request.headers.get("X-ClickHouse-User") or request.query.get("user") or "default"
    password = request.headers.get("X-ClickHouse-Key") or request.query.get("password") or ""
    if not (_HEADER_SAFE.fullmatch(user) and (not password or _HEADER_SAFE.fullmatch(password))):
        raise Failure(400, 516, "AUTHENTICATION_FAILED", "the user or password holds control characters")
    return Login(user, password)


def _refused_login(login: Login, why: str) -> Failure:
    return Failure(403, 516, "AUTHENTICATION_FAILED", f"{login.user}: {why}")


class UsersFile:
    """Users from a file (a mounted Secret): ``user:password`` or ``user:sha256:HEX`` per line."""

    def __init__(self, path: str) -> None:
        self.digests = read_users(path)  # checked when the settings were

    async def check(self, login: Login) -> None:
        want = self.digests.get(login.user)
        got = hashlib.sha256(login.password.encode()).digest()
        if want is None or not hmac.compare_digest(want, got):
            raise _refused_login(login, "not a user of this buffer, or the wrong password "
                                        "(--clickhouse-http-users-file)")


class ClickHouseLogins:
    """The client's own ClickHouse user and password, checked by a ``SELECT 1`` with them. A login
    ClickHouse took is remembered for ``FRESH`` seconds, and while ClickHouse does not answer for up
    to ``STALE``: an outage is when the buffer is needed most."""

    FRESH = 60.0
    STALE = 3600.0
    MAX_REMEMBERED = 4096

    def __init__(self, url: str, session: Callable[[], ClientSession]) -> None:
        self.url = url
        self.session = session
        self._took: dict[tuple[str, bytes], float] = {}

    async def check(self, login: Login) -> None:
        key = (login.user, hashlib.sha256(login.password.encode()).digest())
        now = time.monotonic()
        took = self._took.get(key)
        if took is not None and now - took < self.FRESH:
            return
        try:
            headers = {"X-ClickHouse-User": login.user, "X-ClickHouse-Key": login.password}
            async with self.session().post(self.url, data=b"SELECT 1", headers=headers,
                                           timeout=ClientTimeout(total=5)) as answer:
                status = answer.status
                await answer.read()
        except (ClientError, TimeoutError):
            status = 0
        if status == 200:
            if len(self._took) >= self.MAX_REMEMBERED:
                self._took.clear()
            self._took[key] = now
            return
        if status in (401, 403):
            self._took.pop(key, None)
            raise _refused_login(login, "ClickHouse refused this user and password")
        if took is not None and now - took < self.STALE:
            return  # ClickHouse does not answer: a login it took within the hour still counts
        raise Failure(503, 745, "SERVER_OVERLOADED", f"the credentials of {login.user} cannot be checked: ClickHouse "
                      f"does not answer ({status or 'no connection'}); retry", 2.0)


def _members(body: bytes, encoding: str, limit: int) -> tuple[bytes, bool]:
    """gzip, deflate, zstd or lz4: every member (frame) one after the other, as ClickHouse reads
    them, at most ``limit + 1`` bytes in all; and whether the last one ended."""
    pieces: list[bytes] = []
    size = 0
    rest = body
    while rest and size <= limit:
        room = limit + 1 - size  # at least 1 (0 would mean no bound to zlib)
        if encoding == "zstd":
            import zstandard

            z = zstandard.ZstdDecompressor().decompressobj()
            at = 0
            # In small steps: a few bytes of zstd may stand for megabytes, so the bound is checked as it grows.
            while at < len(rest) and size <= limit and not z.eof:
                piece = z.decompress(rest[at:at + 256])
                at += 256
                pieces.append(piece)
                size += len(piece)
            ended, rest = z.eof, z.unused_data + rest[at:]
        else:
            if encoding == "lz4":
                import lz4.frame

                d: Any = lz4.frame.LZ4FrameDecompressor()
                piece = d.decompress(rest, max_length=room)
            else:
                d = zlib.decompressobj(wbits=47)  # a gzip or a zlib header, as ClickHouse clients send them
                piece = d.decompress(rest, room)
            pieces.append(piece)
            size += len(piece)
            ended, rest = d.eof, d.unused_data
        if not ended:
            return b"".join(pieces), size > limit  # past the bound (413), or cut short (400)
    return b"".join(pieces), True


class ClickHouseHttp(Routine):
    """The listener: a routine beside the gRPC server, on the same event loop."""

    name = "clickhouse-http"

    def __init__(self, host: str, port: int, service: IngestService, catalog: TableCatalog, lifecycle: Lifecycle, *,
                 database: str, max_request_bytes: int, logged: bool, run_read: Callable[..., bytes] | None,
                 forward_to: str | None, auth: str = "none", users_file: str = "", forward_reads: bool = True,
                 server_info: Callable[[], tuple[Any, ...]] | None = None) -> None:
        self.host, self.port = host, port
        self.service = service
        self.catalog = catalog
        self.lifecycle = lifecycle
        self.database = database
        self.max_request_bytes = max_request_bytes
        self.default_ack = pb.ACK_LEVEL_DURABLE if logged else pb.ACK_LEVEL_BUFFERED
        self.run_read = run_read  # the embedded engine: (sql, settings) -> bytes, in a thread
        self.forward_to = forward_to  # a ClickHouse server's HTTP URL, for read queries (and login checks)
        self.forward_reads = forward_reads
        self.server_info = server_info  # (version, timezone) of ClickHouse, asked with the buffer's own login
        self._server_info: tuple[str, str] | None = None
        self.logins: UsersFile | ClickHouseLogins | None = None
        if auth == "users-file":
            self.logins = UsersFile(users_file)
        elif auth == "clickhouse":
            assert forward_to is not None
            self.logins = ClickHouseLogins(forward_to, self._client)
        self.bound = ""
        self._runner: web.AppRunner | None = None
        self._session: ClientSession | None = None
        self._stopped = asyncio.Event()

    def stop_budget(self) -> float | None:
        return self.lifecycle.remaining() + 2.0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/ping", self._ping)
        app.router.add_route("GET", "/", self._handle)
        app.router.add_route("POST", "/", self._handle)
        # The body is decompressed here (lz4 and ClickHouse's spellings included), bounded.
        # At stop, requests in progress (a COMMITTED insert waiting for ClickHouse) get SHUTDOWN_GRACE.
        runner = web.AppRunner(app, auto_decompress=False, access_log=None, handle_signals=False,
                               shutdown_timeout=SHUTDOWN_GRACE)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise RuntimeError(f"cannot listen for ClickHouse HTTP on {self.host}:{self.port}: {exc}") from None
        self._runner = runner
        sockets = [s.getsockname() for s in getattr(site._server, "sockets", ())]
        port = sockets[0][1] if sockets else self.port
        self.bound = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        log.info("ClickHouse HTTP interface listening on %s", self.bound, extra={"clickhouse_http_listen": self.bound})

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        try:
            self.lifecycle.shutdown()  # as the gRPC listener does: refuses now, unless a drain is under way
            await self.lifecycle.refusing.wait()  # inserts are taken until the buffer refuses (then 503)
            if self._runner is not None:
                await self._runner.shutdown()
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()
        finally:
            self._stopped.set()

    # ----- requests -----------------------------------------------------------------------

    def _client(self) -> ClientSession:
        """The HTTP client to ClickHouse (forwarded reads, login checks), made on first use."""
        if self._session is None:
            self._session = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10), auto_decompress=False)
        return self._session

    async def _ping(self, request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query_id = request.query.get("query_id") or str(uuid.uuid4())
        if not _HEADER_SAFE.fullmatch(query_id):  # it is echoed in a header
            return Failure(400, 36, "BAD_ARGUMENTS", "query_id must be at most 256 printable characters (it comes "
                           "back in X-ClickHouse-Query-Id)").response(str(uuid.uuid4()))
        try:
            if self.logins is not None:
                await self.logins.check(login_of(request))
            query = request.query.get("query", "")
            body = await self._body(request) if request.method == "POST" else b""
            if not query and not body:
                return web.Response(text="Ok.\n")  # what ClickHouse answers a bare GET /
            text = (query.encode() + b"\n" + body) if query else body
            word = first_word(text)
            if word == "INSERT":
                return await self._insert(request, text, query_id)
            if word in READS:
                return await self._read(request, text, query, body, query_id)
            raise Failure(501, 48, "NOT_IMPLEMENTED",
                          f"{word or 'this statement'} is not taken by ingest-buffer, which buffers INSERT … FORMAT "
                          f"{WORKING} and answers read queries: run it against ClickHouse")
        except Failure as failure:
            return failure.response(query_id)
        except SqlError as exc:
            return _sql_failure(exc).response(query_id)

    async def _body(self, request: web.Request) -> bytes:
        limit = self.max_request_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise Failure(413, 290, "LIMIT_EXCEEDED", f"the body is over {limit:,} bytes (--max-request-bytes): "
                              "split the insert")
            chunks.append(chunk)
        body = b"".join(chunks)
        return decompress(body, request.headers.get("Content-Encoding", ""), limit)

    def _settings(self, request: web.Request, clause: tuple[tuple[str, str], ...]) -> dict[str, str]:
        settings = {k: v for k, v in request.query.items() if not k.startswith("param_")}
        settings.update(clause)
        for name, value in settings.items():
            if not _SETTING_NAME.fullmatch(name):
                raise Failure(400, 115, "UNKNOWN_SETTING", f"{name[:100]!r} is not a setting's name")
            if len(value) > MAX_SETTING_VALUE and name not in TRANSPORT:
                raise Failure(400, 36, "BAD_ARGUMENTS", f"the setting {name} is {len(value):,} characters long; at "
                              f"most {MAX_SETTING_VALUE:,}")
        return settings

    async def _insert(self, request: web.Request, text: bytes, query_id: str) -> web.Response:
        insert = parse_insert(text)
        database = insert.database or request.query.get("database") or request.headers.get("X-ClickHouse-Database")
        if database and database != self.database:
            raise Failure(404, 81, "UNKNOWN_DATABASE", f"this buffer writes to the database {self.database!r}, "
                          f"not {database!r}: insert into {self.database}.{insert.table}, or send to a buffer for "
                          f"{database}")
        fmt = HTTP_FORMATS.get(insert.format.lower())
        if fmt is None:
            raise Failure(501, 48, "NOT_IMPLEMENTED",
                          f"FORMAT {insert.format} is not buffered: send the rows as {WORKING}")
        settings = self._settings(request, insert.settings)
        columns = insert.columns or ()
        if columns:
            columns = self._check_columns(insert.table, columns)
        parsing = tuple(sorted((k, v) for k, v in settings.items()
                               if k not in TRANSPORT and k.startswith(PARSING_PREFIXES)))
        for name, value in parsing:
            if name.endswith("_skip_first_lines") and value.strip() not in ("", "0"):
                raise Failure(400, 36, "BAD_ARGUMENTS", f"{name} is not taken: the rows of many inserts are joined "
                              "into one, where only the first lines of the first would be skipped. Send the rows "
                              "without the lines to skip")
            if self.catalog.settings and name not in self.catalog.settings:
                raise Failure(400, 115, "UNKNOWN_SETTING", f"{name} is not a setting of this ClickHouse")
        key_shape = shape(FORMATS[fmt][0], columns, parsing)
        if len(key_shape.encode()) > MAX_SHAPE:
            raise Failure(400, 36, "BAD_ARGUMENTS", f"the column list and settings are {len(key_shape):,} bytes; at "
                          f"most {MAX_SHAPE:,}")
        wait = settings.get("wait_for_async_insert")
        ack = pb.ACK_LEVEL_COMMITTED if wait in ("1", "true") else (
            pb.ACK_LEVEL_BUFFERED if wait in ("0", "false") else self.default_ack)
        rows = text[insert.data_start:]
        if FORMATS[fmt][1] and rows and not rows.endswith(b"\n"):
            rows += b"\n"  # HTTP says where the body ends: its last row is whole, newline or not (as in ClickHouse)
        write = ShapedWrite(insert.table, fmt, rows, key_shape, ack,
                          header_columns=frozenset(c.encode() for c in insert.columns) if insert.columns else None)
        if fmt in (pb.FORMAT_NATIVE, pb.FORMAT_ROW_BINARY):  # they do not say how many rows they hold
            try:
                write.row_count = count_rows(write.rows) if fmt == pb.FORMAT_NATIVE else count_row_binary(
                    write.rows, self._types(insert.table, insert.columns))
            except NativeError as exc:
                raise Failure(501, 48, "NOT_IMPLEMENTED", exc.message) if exc.unsupported else Failure(
                    400, 27, "CANNOT_PARSE_INPUT_ASSERTION_FAILED", exc.message) from None
        token = settings.get("insert_deduplication_token")
        if token:  # a retry with the same token is answered as the first, and adds nothing
            write.producer = "http:" + hashlib.sha256(f"{insert.table}\0{token}".encode()).hexdigest()[:48]
        try:
            reply = await self.service.http_write(write, _Deadline())
        except Refusal as refusal:
            raise _refused(refusal) from None
        summary = {"read_rows": str(reply.rows), "read_bytes": str(reply.bytes), "written_rows": str(reply.rows),
                   "written_bytes": str(reply.bytes), "total_rows_to_read": "0", "result_rows": "0",
                   "result_bytes": "0"}
        headers = {"X-ClickHouse-Summary": orjson.dumps(summary).decode(), "X-ClickHouse-Query-Id": query_id,
                   "X-ClickHouse-Server-Display-Name": "ingest-buffer",
                   "X-Ingest-Buffer-Ack": ACK_NAMES.get(reply.ack_level, "buffered")}
        if reply.duplicate:
            headers["X-Ingest-Buffer-Duplicate"] = "1"
        return web.Response(text="", headers=headers)

    def _types(self, table: str, columns: tuple[str, ...] | None) -> list[str]:
        """The types of the columns a RowBinary body holds, in order ([] when they are not known)."""
        if not columns:
            return [t for _, t in self.catalog.inserted(table) or ()]
        types = self.catalog.column_types(table)
        return [types[c] for c in columns] if all(c in types for c in columns) else []

    def _check_columns(self, table: str, columns: tuple[str, ...]) -> tuple[str, ...]:
        """The column list as the key keeps it: () when it is the table's own, in order."""
        twice = [c for i, c in enumerate(columns) if c in columns[:i]]
        if twice:
            raise Failure(400, 15, "DUPLICATE_COLUMN", f"the column {twice[0]!r} is named twice in the column list")
        known = self.catalog.column_order(table)
        if known is None:
            return columns  # not known yet: ClickHouse checks them at insert (the flusher holds the rows)
        missing = [c for c in columns if c not in known]
        if missing:
            raise Failure(400, 16, "NO_SUCH_COLUMN_IN_TABLE", f"no column {missing[0]!r} in the table "
                          f"{self.database}.{table} (its columns: {', '.join(known)[:500]})")
        return () if columns == known else columns

    async def _read(self, request: web.Request, text: bytes, query: str, body: bytes,
                    query_id: str) -> web.StreamResponse:
        if self.run_read is not None:
            return await self._read_here(request, text, query_id)
        if self.forward_to is not None and self.forward_reads:
            return await self._forward(request, query, body, query_id)
        answer = await self._probe(text, request.query.get("default_format") or _DEFAULT_FORMAT, query_id)
        if answer is not None:
            return answer
        raise Failure(501, 48, "NOT_IMPLEMENTED", "read queries are not forwarded by this buffer "
                      "(--clickhouse-http-reads off): query ClickHouse itself; inserts are taken here")

    async def _probe(self, text: bytes, default_format: str, query_id: str) -> web.Response | None:
        """What a client asks when it connects, answered here when reads are not forwarded: SELECT 1,
        version() and timezone() (ClickHouse's, asked once with the buffer's own login), and the
        settings query (no rows)."""
        try:
            words = [t.value.upper() if t.kind == "word" else t.value for t in tokens(text[:4096]) if t.kind != "end"]
        except SqlError:
            return None
        fmt = default_format
        if len(words) >= 2 and words[-2] == "FORMAT":
            fmt, words = words[-1], words[:-2]
        columns: list[tuple[str, str, list[Any]]]
        if words[:3] == ["SELECT", "NAME", ","] and "SYSTEM" in words and "SETTINGS" in words:
            columns = [("name", "String", []), ("value", "String", []), ("readonly", "UInt8", [])]
        elif words in (["SELECT", "1"], ["SELECT", "1", "AS", "CHECK"]):
            columns = [("check" if len(words) > 2 else "1", "UInt8", [1])]
        elif words in (["SELECT", "VERSION", "(", ")", ",", "TIMEZONE", "(", ")"], ["SELECT", "VERSION", "(", ")"],
                       ["SELECT", "TIMEZONE", "(", ")"]):
            version, zone = await self._server()
            columns = [(f"{name.lower()}()", "String", [version if name == "VERSION" else zone])
                       for name in ("VERSION", "TIMEZONE") if name in words]
        else:
            return None
        body = _encode(columns, fmt.upper())
        if body is None:
            return None
        return web.Response(body=body, headers={"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Format": fmt,
                                                "X-ClickHouse-Server-Display-Name": "ingest-buffer"})

    async def _server(self) -> tuple[str, str]:
        if self._server_info is None:
            info: tuple[Any, ...] = ("", "UTC")
            if self.server_info is not None:
                try:
                    info = await asyncio.to_thread(self.server_info)
                except Exception:  # ClickHouse does not answer: the client learns the version later
                    return "", "UTC"
            self._server_info = (str(info[0]), str(info[1]))
        return self._server_info

    async def _read_here(self, request: web.Request, text: bytes, query_id: str) -> web.Response:
        """On the embedded engine, read-only (readonly=1), one statement, nothing written to a file."""
        refused = one_read(text)
        if refused is not None:
            raise Failure(403, 164, "READONLY", f"this read query is not run on the buffer's engine: {refused}")
        params = {k[6:]: v for k, v in request.query.items() if k.startswith("param_")}
        own = _output_format(text)  # the statement's FORMAT clause, which the engine follows
        fmt = own or request.query.get("default_format") or _DEFAULT_FORMAT
        sql = text.decode("utf-8", "replace")
        run_read = self.run_read
        assert run_read is not None
        try:
            data = await asyncio.to_thread(run_read, sql, params, None if own else fmt)
        except Exception as exc:
            raise _from_clickhouse(str(exc)) from None
        headers = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": "UTC",
                   "X-ClickHouse-Server-Display-Name": "ingest-buffer"}
        if _HEADER_SAFE.fullmatch(fmt):
            headers["X-ClickHouse-Format"] = fmt
        return web.Response(body=data, headers=headers)

    async def _forward(self, request: web.Request, query: str, body: bytes, query_id: str) -> web.StreamResponse:
        """To ClickHouse, with the client's credentials and nothing of this buffer's: its grants decide."""
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in _FORWARDED_HEADERS or k.lower().startswith("x-clickhouse-")}
        params = [(k, v) for k, v in request.query.items()]
        assert self.forward_to is not None
        response: web.StreamResponse | None = None
        try:
            async with self._client().post(self.forward_to, params=params, data=body, headers=headers) as upstream:
                response = web.StreamResponse(status=upstream.status, headers={
                    **{k: v for k, v in upstream.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection", "keep-alive")},
                    "X-Ingest-Buffer-Forwarded": "1"})  # ClickHouse's own answer, status included
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (ClientError, TimeoutError, ValueError) as exc:  # ValueError: a header aiohttp will not send
            if response is not None and response.prepared:
                raise  # the answer had begun: the client sees it cut short
            raise Failure(503, 210, "NETWORK_ERROR", f"the read query could not be forwarded to ClickHouse: {exc}; "
                          "retry", 2.0) from None


# The body goes on decompressed (it was read here), so without its Content-Encoding.
_FORWARDED_HEADERS = frozenset({"authorization", "content-type", "accept-encoding"})
_STATUS = {60: 404, 81: 404, 16: 404, 47: 404, 46: 404, 62: 400, 6: 400, 27: 400, 36: 400, 164: 403, 497: 403,
           516: 403, 48: 501}


def _encode(columns: list[tuple[str, str, list[Any]]], fmt: str) -> bytes | None:
    """A probe's answer in the format asked (Native, TabSeparated or JSONEachRow), None for another."""
    rows = list(zip(*(values for _, _, values in columns), strict=True))
    if fmt in ("TABSEPARATED", "TSV"):
        return b"".join(("\t".join(str(v) for v in row) + "\n").encode() for row in rows)
    if fmt == "JSONEACHROW":
        return b"".join(orjson.dumps(dict(zip((c[0] for c in columns), row, strict=True))) + b"\n" for row in rows)
    if fmt != "NATIVE":
        return None
    def string(s: str) -> bytes:
        raw = s.encode()
        return varint(len(raw)) + raw
    out = bytearray(varint(len(columns)) + varint(len(rows)))
    for name, type_, values in columns:
        out += string(name) + string(type_)
        for value in values:
            out += bytes([value]) if type_ == "UInt8" else string(str(value))
    return bytes(out)


def _output_format(text: bytes) -> str | None:
    """The statement's own FORMAT clause, if it has one: FORMAT and a name that end the statement."""
    try:
        last = [t for t in tokens(text[:256 * 1024]) if t.kind != "end"]
    except SqlError:
        return None
    if last and last[-1].kind == "punct" and last[-1].value == ";":
        last.pop()
    if len(last) >= 2 and last[-2].keyword("FORMAT") and last[-1].kind == "word":
        return last[-1].value
    return None


__all__ = ["ClickHouseHttp", "Failure", "decompress"]
