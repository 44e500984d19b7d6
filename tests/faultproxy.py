"""A TCP proxy that injects network faults, controlled by the test that owns it.

Runs its own event loop in a thread, listening on 127.0.0.1, forwarding to one upstream. Modes:

* ``pass`` — forward both ways;
* ``refuse`` — stop listening: connections are refused;
* ``reset`` — accept, then close at once;
* ``delay`` — forward, holding each chunk ``delay`` seconds first;
* ``cut`` — forward the first ``cut_after`` bytes of each request, then close both sides
  (a request cut mid-body);
* ``blackhole`` — accept and read, never forward, never answer;
* ``drop_responses`` — forward requests (the server does the work: an insert commits), but never
  deliver the answers: the client times out after the fact;
* ``mute`` — the same for connections already open too (set it with ``close_open=False``): a
  long-lived HTTP/2 connection, its handshake done, whose answers stop arriving.

Connections opened under a mode keep that mode; ``set()`` also closes the open ones when asked,
as a real outage would.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

MODES = ("pass", "refuse", "reset", "delay", "cut", "blackhole", "drop_responses", "mute")


@dataclass
class Counters:
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    dropped_responses: int = 0
    cut_requests: int = 0


@dataclass
class FaultProxy:
    upstream_host: str
    upstream_port: int
    mode: str = "pass"
    delay: float = 0.0
    cut_after: int = 0
    port: int = 0
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    # ----- control (from the test's thread) -------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def set(self, mode: str, *, delay: float = 0.0, cut_after: int = 0, close_open: bool = True) -> None:
        assert mode in MODES, mode
        self.delay, self.cut_after = delay, cut_after
        self._call(self._switch(mode, close_open))

    def stop(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)  # type: ignore[arg-type]

    # ----- the proxy (on its loop) -----------------------------------------------------------

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _switch(self, mode: str, close_open: bool) -> None:
        old, self.mode = self.mode, mode
        if close_open:
            for w in list(self._conns):
                w.close()
        if mode == "refuse" and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif old == "refuse" and mode != "refuse":
            await self._listen()

    async def _shutdown(self) -> None:
        for w in list(self._conns):
            w.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode = self.mode
        self.counters.connections += 1
        self._conns.add(writer)
        try:
            if mode == "reset":
                return
            if mode == "blackhole":
                while await reader.read(65536):
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            self._conns.add(up_writer)
            try:
                await asyncio.gather(self._pump(reader, up_writer, mode, upstream=True),
                                     self._pump(up_reader, writer, mode, upstream=False))
            finally:
                up_writer.close()
                self._conns.discard(up_writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self._conns.discard(writer)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: str,
                    upstream: bool) -> None:
        sent = 0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if mode == "delay" and self.delay:
                    await asyncio.sleep(self.delay)
                if upstream and mode == "cut":
                    room = self.cut_after - sent
                    if room <= len(data):
                        writer.write(data[:max(room, 0)])
                        with contextlib.suppress(ConnectionError):
                            await writer.drain()
                        self.counters.cut_requests += 1
                        writer.close()
                        raise ConnectionResetError("cut")
                if not upstream and (mode == "drop_responses" or self.mode == "mute"):
                    self.counters.dropped_responses += 1
                    continue  # swallow the answer; the client hears nothing
                writer.write(data)
                await writer.drain()
                sent += len(data)
                if upstream:
                    self.counters.bytes_up += len(data)
                else:
                    self.counters.bytes_down += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()
