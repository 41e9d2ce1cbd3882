"""Time for the judge service: one injectable clock, so rate-limit tests run in virtual time.

Deadlines handed to the engine are read on the engine's clock; :class:`SystemClock` uses
``time.monotonic`` (what the transports use to turn ``X-Request-Timeout`` into a deadline).
A low layer of the judge: the engine (limiter, verdict caller) and the backends (the scripted
fake's latency) both read it, and it imports nothing of the judge.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (the scale deadlines are given on)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """Virtual time for tests: a sleep ends as soon as every other task is waiting too.

    Time advances to the earliest pending sleep only when the event loop has nothing else
    ready to run and no work it handed to a thread (``run_in_executor``, ``asyncio.to_thread``:
    the SQLite cache) is still running, so rate-limit and retry schedules are exact and tests
    take no wall time. (Jumping while a cache thread ran let a call granted at one time reach the
    backend at a later one, and a 10 s window then saw more calls than the limiter granted in it.)
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._t = start
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._driver: asyncio.Task[None] | None = None
        self._threads = 0  # executor jobs started on the driven loop and not finished
        self._tracked: set[int] = set()  # loops whose run_in_executor reports to this clock

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        """Move time forward by hand (wakes due sleepers)."""
        self._t += seconds
        self._wake_due()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._heap, (self._t + seconds, next(self._seq), fut))
        if self._driver is None or self._driver.done():
            self._track_threads(loop)
            self._driver = loop.create_task(self._drive())
        await fut

    def _track_threads(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count the loop's executor jobs (``asyncio.to_thread`` goes through ``run_in_executor``)."""
        if id(loop) in self._tracked:
            return
        self._tracked.add(id(loop))
        original = loop.run_in_executor

        def tracked(executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            fut = original(executor, func, *args)
            self._threads += 1
            fut.add_done_callback(self._thread_done)
            return fut

        loop.run_in_executor = tracked  # type: ignore[method-assign,assignment]

    def _thread_done(self, _: object) -> None:
        self._threads -= 1

    def _wake_due(self) -> None:
        while self._heap and (self._heap[0][2].done() or self._heap[0][0] <= self._t):
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        idle_rounds = 0
        while self._heap:
            await asyncio.sleep(0)
            # Only this task was ready: everything else waits (on us, on I/O or on a thread).
            if len(getattr(loop, "_ready", ())) == 0:
                idle_rounds += 1
                if idle_rounds < 3:
                    continue
                # Threads (the SQLite cache) finish in real time before time may jump.
                await asyncio.sleep(0.0005)
                if len(getattr(loop, "_ready", ())) != 0 or self._threads:
                    idle_rounds = 0
                    continue
                while self._heap and self._heap[0][2].done():
                    heapq.heappop(self._heap)
                if self._heap:
                    self._t = max(self._t, self._heap[0][0])
                    self._wake_due()
            idle_rounds = 0


async def with_deadline(clock: Clock, aw: Awaitable[T], deadline: float | None) -> T:
    """Await ``aw`` until ``deadline`` on ``clock``; raise :class:`TimeoutError` past it (``aw`` cancelled)."""
    if deadline is None:
        return await aw
    task = asyncio.ensure_future(aw)
    remaining = deadline - clock.now()
    if remaining <= 0:
        task.cancel()
        raise TimeoutError
    timer = asyncio.ensure_future(clock.sleep(remaining))
    try:
        done, _ = await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        timer.cancel()
        raise
    timer.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise TimeoutError
