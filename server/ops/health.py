"""``grpc.health.v1.Health`` whose Watch streams end when the server starts draining.

grpc's own aio ``HealthServicer`` keeps every Watch stream open after
``enter_graceful_shutdown``, so a server with watchers (load balancers, kubelets, grpc
clients with health checking) always waited its whole ``--grace`` to stop. Here a Watch sends
NOT_SERVING and then ends (OK) once the drain begins, and a client's slow reading never holds
up a status change (no lock is held while writing).

Readiness needs a model: with every model unloaded, every service reads NOT_SERVING (as
KServe's ServerReady and ``/v2/health/ready`` do) until one is loaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
WATCH_END_WAIT_S = 1.0  # longest a drain waits for open Watch streams to send their last status


class Health(health_pb2_grpc.HealthServicer):
    """Check, Watch, ``set``, ``enter_graceful_shutdown``; ``serving()`` for the servicers."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": SERVING}  # each service's own: warm-up, drain
        self._models_loaded = True  # False: every service reads NOT_SERVING (not ready)
        self._changed = asyncio.Event()  # replaced by a fresh one after each change
        self._draining = False
        self._watches = 0  # Watch handlers running
        self._no_watches = asyncio.Event()  # set while none runs
        self._no_watches.set()

    def serving(self, service: str = "") -> bool:
        """Whether ``service`` ("" = the server) takes work: warmed up and not draining. A server
        with no model loaded takes calls (they answer NOT_FOUND, saying so) but is not ready."""
        return self._status.get(service) == SERVING

    def ready(self) -> bool:
        """What probes see for the server: SERVING, and at least one model loaded."""
        return self._reported("") == SERVING

    def set_models_loaded(self, loaded: bool) -> None:
        """Whether any model is loaded; without one, every service reads NOT_SERVING, so that
        load balancers stop sending calls that could only fail."""
        if loaded != self._models_loaded:
            self._models_loaded = loaded
            self._notify()

    def _reported(self, service: str) -> int | None:
        status = self._status.get(service)
        if status == SERVING and not self._models_loaded:
            return NOT_SERVING
        return status

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._reported(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        self._watches += 1
        self._no_watches.clear()
        try:
            last: int | None = None
            while True:
                changed = self._changed
                status = self._reported(request.service)
                status = SERVICE_UNKNOWN if status is None else status
                if status != last:
                    await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                if self._draining:
                    return
                await changed.wait()
        finally:
            self._watches -= 1
            if not self._watches:
                self._no_watches.set()

    async def set(self, service: str, status: int) -> None:
        """Set ``service``'s status (ignored once draining: it stays NOT_SERVING)."""
        if not self._draining:
            self._update(service, status)

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; open Watch streams send it and end. Returns
        once they have (at most WATCH_END_WAIT_S), so the server's stop that follows does not
        cut a stream before its last message is out."""
        if self._draining:
            return
        self._draining = True
        for service in list(self._status):
            self._status[service] = NOT_SERVING
        self._notify()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WATCH_END_WAIT_S):
                await self._no_watches.wait()

    def _update(self, service: str, status: int) -> None:
        self._status[service] = status
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
