"""The gRPC listener as a routine: ingest service, standard health service, server reflection.

It follows the lifecycle: once bound it turns the enabled flag on, at the first drain signal health
goes NOT_SERVING for good, and its stop waits for the refusal point (the linger, the propagation
delay), then lets calls in progress finish within part of what is left of the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from buffer.api import SERVICE_NAME
from buffer.config import parse_listen
from buffer.lifecycle import Lifecycle
from buffer.routines import Routine
from buffer.service import IngestService

log = logging.getLogger(__name__)


# The largest message protobuf can hold.
MAX_MESSAGE_BYTES = 2**31 - 1


class GrpcServer(Routine):
    name = "grpc"

    def __init__(self, address: str, service: IngestService, lifecycle: Lifecycle) -> None:
        self.address = address
        self.service = service
        self.lifecycle = lifecycle
        self.health = health_aio.HealthServicer()
        self.bound = ""
        self._server: aio.Server | None = None
        self._stopped = asyncio.Event()

    def stop_budget(self) -> float | None:
        return self.lifecycle.remaining() + 2.0

    def grace(self) -> float:
        """Seconds calls in progress (a COMMITTED write waiting for its flush) get at stop."""
        return min(5.0, self.lifecycle.remaining() / 2)

    async def start(self) -> None:
        server = aio.server(options=[
            # gRPC's own limit would answer RESOURCE_EXHAUSTED, which clients retry; every message
            # reaches the checks instead, which refuse one over --max-request-bytes as INVALID_ARGUMENT.
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", 4 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ])
        # Registered (not generic) handlers: gRPC matches their paths in C, a few percent per call.
        server.add_registered_method_handlers(SERVICE_NAME, self.service.method_handlers())
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        target = parse_listen(self.address, allow_unix=True)
        if isinstance(target, str):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(target).st_mode):
                    os.unlink(target)  # a stale socket left by a previous run
            bind = f"unix:{target}"
        else:
            host, port = target
            bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            port = server.add_insecure_port(bind)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen for gRPC on {self.address}: {exc} (is the port in use?)") from None
        if isinstance(target, str):
            self.bound = f"unix:{target}"
        else:
            self.bound = bind.rsplit(":", 1)[0] + f":{port}"
        await server.start()
        self._server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("gRPC listening on %s", self.bound, extra={"grpc_listen": self.bound})
        self.lifecycle.serve()

    async def run(self) -> None:
        stopped = asyncio.ensure_future(self._stopped.wait())
        draining = asyncio.ensure_future(self.lifecycle.draining.wait())
        try:
            await asyncio.wait((stopped, draining), return_when=asyncio.FIRST_COMPLETED)
            if draining.done():
                await self.health.enter_graceful_shutdown()  # NOT_SERVING from now on
            await stopped
        finally:
            draining.cancel()
            stopped.cancel()

    async def stop(self) -> None:
        try:
            self.lifecycle.shutdown()  # refuses now, unless a linger or delay is already under way
            await self.lifecycle.refusing.wait()
            if self._server is not None:
                await self._server.stop(self.grace())
        finally:
            self._stopped.set()
