"""Service state shared by every engine: starting → ready → draining → stopped, admission, drain.

Readiness is true only in ``READY``. While draining, new work is refused with UNAVAILABLE (a
load balancer retries it elsewhere) and admitted work finishes; ``drain`` waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from services.common.errors import ErrorCode, ServiceError

log = logging.getLogger(__name__)


class EngineState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class Lifecycle:
    """State plus an in-flight counter; ``on_change(ready, in_flight)`` feeds metrics."""

    def __init__(self, on_change: Callable[[bool, int], None] | None = None) -> None:
        self.state = EngineState.STARTING
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_change = on_change or (lambda ready, in_flight: None)

    @property
    def live(self) -> bool:
        return self.state not in (EngineState.FAILED, EngineState.STOPPED)

    @property
    def ready(self) -> bool:
        return self.state is EngineState.READY

    def set(self, state: EngineState) -> None:
        self.state = state
        self._on_change(self.ready, self.in_flight)

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Count a request in flight, or refuse it with UNAVAILABLE when not ready."""
        if self.state is EngineState.DRAINING:
            raise ServiceError(ErrorCode.UNAVAILABLE, "server is draining; retry on another replica")
        if self.state is not EngineState.READY:
            raise ServiceError(ErrorCode.UNAVAILABLE, "model is not ready yet")
        self.in_flight += 1
        self._idle.clear()
        self._on_change(self.ready, self.in_flight)
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
            self._on_change(self.ready, self.in_flight)

    async def drain(self, seconds: float) -> bool:
        """Refuse new work, let admitted work finish for up to ``seconds``; True if all finished."""
        if self.state is EngineState.READY:
            self.set(EngineState.DRAINING)
        if self.in_flight == 0:
            return True  # wait_for(..., 0) would cancel the wait before it looks (--drain-seconds 0)
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
            return True
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            log.warning("drain: %d requests still running after %.1fs", self.in_flight, seconds)
            return False


class _Gauge(Protocol):
    def set(self, value: float) -> None: ...


class StateGauges(Protocol):
    """The readiness and in-flight gauges an engine's metrics expose."""

    @property
    def ready(self) -> _Gauge: ...

    @property
    def in_flight(self) -> _Gauge: ...


class LifecycleOwner:
    """What an engine that owns a :class:`Lifecycle` answers about its state (the probes, the
    transports and the server read these), with the readiness and in-flight gauges kept current."""

    lifecycle: Lifecycle

    def _own_lifecycle(self, gauges: StateGauges) -> None:
        def report(ready: bool, in_flight: int) -> None:
            gauges.ready.set(1 if ready else 0)
            gauges.in_flight.set(in_flight)

        self.lifecycle = Lifecycle(report)

    @property
    def state(self) -> EngineState:
        return self.lifecycle.state

    @property
    def live(self) -> bool:
        return self.lifecycle.live

    @property
    def ready(self) -> bool:
        return self.lifecycle.ready

    async def drain(self, seconds: float) -> bool:
        """Refuse new work, let admitted work finish for up to ``seconds``; True if all finished."""
        return await self.lifecycle.drain(seconds)
