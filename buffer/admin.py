"""The HTTP admin listener: probes, the drain entry point, Prometheus metrics, and (on the embedded
engine) SQL from the host itself.

On aiohttp, the same HTTP stack as the ClickHouse HTTP interface (``buffer.chhttp``). Requests are
small and bounded (``MAX_BODY``); routes that change state answer only callers on this host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from buffer.routines import Routine

log = logging.getLogger(__name__)

# A route's handler: given the request's body, its status, content type and body.
Handler = Callable[[bytes], Awaitable[tuple[int, str, bytes]]]
MAX_BODY = 1 << 20


def json_body(status: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", (json.dumps(body) + "\n").encode()


def local_caller(peer: str | None) -> bool:
    """True for a caller on this host (loopback), the only one a state-changing route answers."""
    if not peer:
        return True  # a Unix socket: only this host can reach it
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # 127.0.0.1 as seen by a listener on [::]
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


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
        self._runner: web.AppRunner | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{path:.*}", self._handle)
        # Requests in progress (a /drain that is waiting) get a moment to answer at stop.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("admin HTTP listening on %s:%d", self.host, self.port)

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        try:
            if self._runner is not None:
                await self._runner.cleanup()
        finally:
            self._stopped.set()

    async def respond(self, method: str, path: str, peer: str | None, body: bytes) -> tuple[int, str, bytes]:
        handler = self.routes.get((method, path))
        if handler is None:
            if any(p == path for _, p in self.routes):
                return 405, "text/plain", f"{method} not allowed on {path}\n".encode()
            known = ", ".join(f"{m} {p}" for m, p in self.routes)
            return 404, "text/plain", f"no route {path}; routes: {known}\n".encode()
        if (method, path) in self.local_only and not local_caller(peer):
            return 403, "text/plain", f"{method} {path} is accepted only from the pod itself (loopback)\n".encode()
        try:
            return await handler(body)
        except Exception as exc:
            log.exception("admin handler %s %s failed", method, path)
            return 500, "text/plain", f"{exc}\n".encode()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read() if request.can_read_body else b""
        status, ctype, data = await self.respond(request.method, request.path, request.remote, body)
        return web.Response(status=status, body=data, headers={"Content-Type": ctype})
