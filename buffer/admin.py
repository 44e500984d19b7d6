"""The HTTP admin listener: probes, the drain entry point, and Prometheus metrics.

A deliberately small HTTP/1.1 server on asyncio streams: four routes, tiny requests, one response
per connection (``Connection: close``), each request bounded in size and time so a stuck client
cannot hold the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from buffer.routines import Routine

log = logging.getLogger(__name__)

Handler = Callable[[], Awaitable[tuple[int, str, bytes]]]

_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}
_READ_TIMEOUT = 5.0
_MAX_HEADER_BYTES = 16 * 1024


def json_body(status: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", (json.dumps(body) + "\n").encode()


class AdminServer(Routine):
    name = "admin-http"

    def stop_budget(self) -> float | None:
        return 3.0

    def __init__(self, host: str, port: int, routes: dict[tuple[str, str], Handler],
                 local_only: frozenset[tuple[str, str]] = frozenset()) -> None:
        self.host = host
        self.port = port
        self.routes = routes
        # Routes that change state answer only callers on this host: the listener is on the pod IP
        # for the kubelet's probes, but a drain must come from the pod's own preStop.
        self.local_only = local_only
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self.port = sock[1]
        log.info("admin HTTP listening on %s:%d", self.host, self.port)

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # Requests in progress (a /drain that is waiting) get a moment to answer.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._stopped.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            peer = writer.get_extra_info("peername")
            status, ctype, body = await self._respond(reader, peer[0] if isinstance(peer, tuple) else "")
            head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode() + body)
            await writer.drain()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)

    async def _respond(self, reader: asyncio.StreamReader, peer: str) -> tuple[int, str, bytes]:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            return 400, "text/plain", b"request header too large\n"
        if len(raw) > _MAX_HEADER_BYTES:
            return 400, "text/plain", b"request header too large\n"
        parts = raw.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3:
            return 400, "text/plain", b"malformed request line\n"
        method, target, _ = parts
        path = target.split("?", 1)[0]
        handler = self.routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in self.routes):
                return 405, "text/plain", f"{method} not allowed on {path}\n".encode()
            known = ", ".join(f"{m} {p}" for m, p in self.routes)
            return 404, "text/plain", f"no route {path}; routes: {known}\n".encode()
        if (method, path) in self.local_only and peer and not ipaddress.ip_address(peer).is_loopback:
            return 403, "text/plain", f"{method} {path} is accepted only from the pod itself (loopback)\n".encode()
        try:
            return await handler()
        except Exception as exc:
            log.exception("admin handler %s %s failed", method, path)
            return 500, "text/plain", f"{exc}\n".encode()
