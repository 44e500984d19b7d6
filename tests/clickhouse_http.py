"""A ClickHouse HTTP endpoint backed by the real ClickHouse engine (chDB), in its own process.

Test infrastructure, not product. It speaks enough of ClickHouse's HTTP interface for
clickhouse-connect's clients: queries and inserts, the statement in the ``query`` parameter or at
the head of the body, settings and ``param_*`` query parameters in the URL, gzip/deflate/zstd/lz4
request bodies, plain or chunked bodies, keep-alive, ``/ping``, Basic or ``X-ClickHouse-User``
authentication, ClickHouse-style errors (``Code: N. DB::Exception: …`` with
``X-ClickHouse-Exception-Code``) and the summary headers. Several processes can share one
ClickHouse through it, which the embedded engine alone cannot do.

Faults a test asks for (``POST /__faults?code=252&count=2[&after=1]``): the next ``count``
inserts fail with that ClickHouse error code, before (default) or after (``after=1``: the rows are
committed, then the error is returned) running. ``POST /__faults?clear=1`` forgets them.
``GET /__stats`` returns JSON counters of the inserts seen.

    python -m tests.clickhouse_http --path DIR --port N [--user NAME:PASSWORD]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import re
import sys
import tempfile
import threading
import uuid
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# URL parameters that are transport, not ClickHouse settings.
TRANSPORT = {
    "query", "database", "default_format", "query_id", "session_id", "session_timeout", "session_check",
    "compress", "decompress", "enable_http_compression", "wait_end_of_query", "send_progress_in_http_headers",
    "http_headers_progress_interval_ms", "client_protocol_version", "user", "password", "quota_key",
    "buffer_size", "http_response_buffer_size", "output_format_binary_write_json_as_string",
}
ERROR_NAMES = {
    60: "UNKNOWN_TABLE", 81: "UNKNOWN_DATABASE", 62: "SYNTAX_ERROR", 252: "TOO_MANY_PARTS",
    241: "MEMORY_LIMIT_EXCEEDED", 202: "TOO_MANY_SIMULTANEOUS_QUERIES", 159: "TIMEOUT_EXCEEDED",
    164: "READONLY", 242: "TABLE_IS_READ_ONLY", 516: "AUTHENTICATION_FAILED", 27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
}
_INSERT_RE = re.compile(
    r"^\s*INSERT\s+INTO\s+(?P<target>.+?)\s+(?:SETTINGS\s+(?P<settings>.+?)\s+)?FORMAT\s+(?P<fmt>[A-Za-z0-9_]+)\s*",
    re.IGNORECASE | re.DOTALL)
_CODE_RE = re.compile(r"Code:\s*(\d+)")


class ClickHouseError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def http_status(code: int) -> int:
    if code in (516, 192, 194, 195):
        return 403
    if code in (60, 81):
        return 404
    if code in (62, 27, 26, 6, 53, 16, 117):
        return 400
    return 500


def decompress(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    if encoding == "lz4":
        import lz4.frame

        data: bytes = lz4.frame.decompress(body)
        return data
    raise ClickHouseError(36, f"Code: 36. DB::Exception: Unknown Content-Encoding {encoding!r}. (BAD_ARGUMENTS)")


class Engine:
    """One chDB session; queries run one at a time, as the engine does."""

    def __init__(self, path: str) -> None:
        from chdb import session

        self.session = session.Session(path)
        self.lock = threading.Lock()
        self.faults: list[tuple[int, bool]] = []
        self.stats: dict[str, Any] = {"inserts": 0, "inserted_rows": 0, "failed_inserts": 0, "queries": 0,
                                      "encodings": {}}

    def run(self, sql: str, fmt: str, params: dict[str, str] | None = None) -> Any:
        try:
            return self.session.query(sql, fmt, params=params or None)
        except Exception as exc:
            text = str(exc)
            m = _CODE_RE.search(text)
            code = int(m.group(1)) if m else 1000
            raise ClickHouseError(code, text if m else f"Code: 1000. DB::Exception: {text}") from None

    def insert(self, target: str, fmt: str, settings: dict[str, str], inline: str | None, data: bytes,
               database: str) -> dict[str, Any]:
        with self.lock:
            fault = self.faults.pop(0) if self.faults else None
            if fault is not None and not fault[1]:
                self.stats["failed_inserts"] += 1
                raise injected(fault[0])
            fd, path = tempfile.mkstemp(suffix=".data")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                clauses = [f"{k} = {quote(v)}" for k, v in settings.items()]
                if inline:
                    clauses.insert(0, inline)
                sql = f"INSERT INTO {qualify(target, database)} FROM INFILE {quote(path)}"
                if clauses:
                    sql += " SETTINGS " + ", ".join(clauses)
                sql += f" FORMAT {fmt}"
                before = self._written()
                self.run(sql, "TabSeparated")
                written = self._written() - before
            finally:
                os.unlink(path)
            self.stats["inserts"] += 1
            self.stats["inserted_rows"] += max(written, 0)
            if fault is not None:
                self.stats["failed_inserts"] += 1
                raise injected(fault[0])
            return {"read_rows": str(written), "read_bytes": str(len(data)), "written_rows": str(written),
                    "written_bytes": str(len(data)), "total_rows_to_read": "0", "result_rows": "0",
                    "result_bytes": "0", "elapsed_ns": "0"}

    def _written(self) -> int:
        # chDB reports no per-query summary through this API; count inserted rows from the parts log
        # would need system tables that may be off, so read ProfileEvents' total instead.
        res = self.run("SELECT value FROM system.events WHERE event = 'InsertedRows'", "TabSeparated")
        text = res.bytes().decode().strip()
        return int(text) if text else 0

    def query(self, sql: str, fmt: str, params: dict[str, str], database: str) -> tuple[bytes, str]:
        with self.lock:
            self.stats["queries"] += 1
            if database:
                self.run(f"USE {ident(database)}", "TabSeparated")
            try:
                res = self.run(sql, fmt, params)
            finally:
                if database:
                    self.run("USE default", "TabSeparated")
            m = re.search(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", sql, re.IGNORECASE)
            return res.bytes(), m.group(1) if m else fmt


def injected(code: int) -> ClickHouseError:
    name = ERROR_NAMES.get(code, f"CODE_{code}")
    return ClickHouseError(code, f"Code: {code}. DB::Exception: injected by the test endpoint. ({name})")


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def ident(name: str) -> str:
    return "`" + name.replace("`", "\\`") + "`"


def qualify(target: str, database: str) -> str:
    """Adds the request's database to an unqualified table name."""
    head = target.split("(", 1)[0].strip()
    if "." in head.replace("`.`", ".") or not database:
        return target
    return f"{ident(database)}.{target}"


def split_body(body: bytes) -> tuple[str, bytes]:
    """An INSERT statement at the head of the body: returns (statement, data after it)."""
    m = _INSERT_RE.match(body[:65536].decode("utf-8", "replace"))
    if not m:
        return body.decode("utf-8", "replace"), b""
    head_len = len(m.group(0).encode())
    return body[:head_len].decode(), body[head_len:]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ClickHouse-chDB-test"
    engine: Engine
    credentials: tuple[str, str] | None = None

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                line = self.rfile.readline()
                if not line:
                    raise ConnectionResetError("chunked body cut")
                size = int(line.strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            raw = b"".join(parts)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if len(raw) < length:
                # The connection broke mid-body: like ClickHouse, run nothing.
                raise ConnectionResetError(f"body cut after {len(raw)} of {length} bytes")
        encoding = self.headers.get("Content-Encoding", "") or "identity"
        with self.engine.lock:
            seen = self.engine.stats["encodings"]
            seen[encoding] = seen.get(encoding, 0) + 1
        return decompress(raw, encoding)

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self, params: dict[str, str]) -> bool:
        if self.credentials is None:
            return True
        user = self.headers.get("X-ClickHouse-User") or params.get("user")
        password = self.headers.get("X-ClickHouse-Key") or params.get("password", "")
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        return (user or "default", password or "") == self.credentials

    def do_GET(self) -> None:
        self._handle(post=False)

    def do_POST(self) -> None:
        self._handle(post=True)

    def _handle(self, post: bool) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        query_id = params.get("query_id") or str(uuid.uuid4())
        try:
            body = self._body() if post else b""
            if url.path == "/ping" or (url.path == "/" and not post and "query" not in params):
                self._send(200, b"Ok.\n")
                return
            if url.path == "/__faults":
                self._faults(params)
                return
            if url.path == "/__stats":
                self._send(200, json.dumps(self.engine.stats).encode(), {"Content-Type": "application/json"})
                return
            if not self._authorized(params):
                raise ClickHouseError(516, "Code: 516. DB::Exception: default: Authentication failed: password is "
                                      "incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)")
            self._execute(params, body, query_id)
        except ClickHouseError as exc:
            text = str(exc)
            if not text.startswith("Code:"):
                text = f"Code: {exc.code}. DB::Exception: {text}"
            self._send(http_status(exc.code), (text.rstrip() + "\n").encode(), {
                "X-ClickHouse-Exception-Code": str(exc.code), "X-ClickHouse-Query-Id": query_id,
                "Content-Type": "text/plain; charset=UTF-8"})
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _faults(self, params: dict[str, str]) -> None:
        with self.engine.lock:
            if params.get("clear"):
                self.engine.faults.clear()
            else:
                after = params.get("after") == "1"
                self.engine.faults.extend([(int(params["code"]), after)] * int(params.get("count", "1")))
        self._send(200, b"Ok.\n")

    def _execute(self, params: dict[str, str], body: bytes, query_id: str) -> None:
        database = params.get("database", "")
        statement = params.get("query")
        data = body
        if statement is None:
            statement, data = split_body(body)
        elif statement and body and not _INSERT_RE.match(statement):
            statement, data = statement + " " + body.decode("utf-8", "replace"), b""
        settings = {k: v for k, v in params.items() if k not in TRANSPORT and not k.startswith("param_")}
        common = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": "UTC",
                  "X-ClickHouse-Server-Display-Name": "chdb-test"}
        m = _INSERT_RE.match(statement)
        if m:
            tail = statement[m.end():].strip()
            if tail:  # data in the query text itself
                data = tail.encode() + (b"\n" + data if data else b"")
            summary = self.engine.insert(m.group("target"), m.group("fmt"), settings, m.group("settings"), data,
                                         database)
            self._send(200, b"", {**common, "X-ClickHouse-Summary": json.dumps(summary)})
            return
        fmt = params.get("default_format", "TabSeparated")
        query_params = {k[len("param_"):]: v for k, v in params.items() if k.startswith("param_")}
        out, out_fmt = self.engine.query(statement, fmt, query_params, database)
        self._send(200, out, {**common, "X-ClickHouse-Format": out_fmt,
                              "X-ClickHouse-Summary": json.dumps({"read_rows": "0", "written_rows": "0"}),
                              "Content-Type": "application/octet-stream"})


def serve(path: str, host: str, port: int, credentials: tuple[str, str] | None,
          ready: Callable[[int], None] | None = None, tls: tuple[str, str] | None = None) -> None:
    handler = type("BoundHandler", (Handler,), {"engine": Engine(path), "credentials": credentials})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    if tls is not None:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    if ready is not None:
        ready(server.server_address[1])
    try:
        server.serve_forever(poll_interval=0.1)
    finally:
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--user", default=None, help="NAME:PASSWORD required from clients")
    parser.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", default=None, help="and this key (PEM)")
    args = parser.parse_args()
    creds = tuple(args.user.split(":", 1)) if args.user else None

    def ready(port: int) -> None:
        print(json.dumps({"listening": port}), flush=True)

    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    serve(args.path, args.host, args.port, creds, ready, tls)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
