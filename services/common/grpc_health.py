"""``grpc.health.v1.Health`` for grpc.aio servers, answering from live state instead of a table.

The stock ``grpc_health`` servicer keeps a table that someone has to update; here each health
service name maps to a callable (``engine.ready``, ``engine.live``) that ``Check`` reads on
every call, so a probe can never see stale state. ``Watch`` streams the status at once and then
every change, noticed when the server wiring calls :meth:`CallableHealthServicer.refresh` (after
start-up, when draining starts) or, as a fallback, by polling every ``poll_interval`` seconds.

Shared by the reward and judge services::

    health = CallableHealthServicer({
        "": lambda: engine.ready, "readiness": lambda: engine.ready,
        "rlhf.v1.RewardService": lambda: engine.ready, "liveness": lambda: engine.live,
    })
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class CallableHealthServicer(health_pb2_grpc.HealthServicer):
    """Health whose statuses come from ``checks``: service name → ``() -> bool`` (True = SERVING)."""

    def __init__(self, checks: Mapping[str, Callable[[], bool]], *, poll_interval: float = 1.0) -> None:
        self._checks = dict(checks)
        self._poll_interval = poll_interval
        self._shutting_down = False
        self._changed: asyncio.Event | None = None  # created lazily on the server's loop

    def status(self, service: str) -> int:
        """The current status of ``service`` (SERVICE_UNKNOWN when it is not registered)."""
        check = self._checks.get(service)
        if check is None:
            return SERVICE_UNKNOWN
        if self._shutting_down:
            return NOT_SERVING
        try:
            return SERVING if check() else NOT_SERVING
        except Exception:  # a failing check is a failing service, never a failing probe
            return NOT_SERVING

    def refresh(self) -> None:
        """Wake every ``Watch`` to re-read its status; call it on each state change. Loop-thread only."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def enter_graceful_shutdown(self) -> None:
        """Report NOT_SERVING for every service from now on and end the ``Watch`` streams."""
        self._shutting_down = True
        self.refresh()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self.status(request.service)
        if status == SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last: int | None = None
        while True:
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self._shutting_down:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), self._poll_interval)
