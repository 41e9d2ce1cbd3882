"""Dynamic batcher: token-budget batches, length-sorted, online before batch work.

One future per item. The scheduler forms a batch only when the model worker can take it
(at most one batch waits while another runs), drops cancelled and expired items before the
forward pass, and settles every future it took, also when the backend raises or returns the
wrong number of rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from services.common.errors import ErrorCode, ServiceError

from .items import EncodedItem, Priority

log = logging.getLogger(__name__)

ForwardFn = Callable[[Sequence[EncodedItem]], np.ndarray]


class BatchObserver(Protocol):
    """Hooks for metrics; the batcher knows nothing about Prometheus."""

    def on_queue_depth(self, items: int) -> None: ...

    def on_batch(self, *, items: int, padded_tokens: int, real_tokens: int, queue_seconds: Sequence[float]) -> None: ...

    def on_inference(self, seconds: float) -> None: ...


class _NullObserver:
    def on_queue_depth(self, items: int) -> None:
        pass

    def on_batch(self, *, items: int, padded_tokens: int, real_tokens: int, queue_seconds: Sequence[float]) -> None:
        pass

    def on_inference(self, seconds: float) -> None:
        pass


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_tokens: int = 8192
    max_wait_ms: float = 2.0
    max_queue_items: int = 8192
    sort_window_items: int = 1024


@dataclass(eq=False)
class _Pending:
    item: EncodedItem
    future: asyncio.Future[np.ndarray]
    deadline: float | None
    seq: int
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def cost(self) -> int:
        return max(1, self.item.num_tokens)


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a batch costs once padded to its longest item."""
    return max(lengths) * len(lengths) if lengths else 0


class Batcher:
    """Admits items, forms batches, and runs them through ``forward`` on one worker thread."""

    def __init__(
        self,
        forward: ForwardFn,
        config: BatcherConfig,
        *,
        observer: BatchObserver | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self._forward = forward
        self.config = config
        self._observer: BatchObserver = observer or _NullObserver()
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="reward-forward")
        self._owns_executor = executor is None
        self._queues: dict[Priority, deque[_Pending]] = {p: deque() for p in Priority}
        self._queued = 0
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        # Two slots: one batch running, at most one formed and waiting for the worker.
        self._slots = asyncio.Semaphore(2)
        self._handoff: asyncio.Queue[list[_Pending]] = asyncio.Queue(maxsize=1)
        self._tasks: list[asyncio.Task[None]] = []
        self._busy = 0  # batches taken by the worker and not yet settled
        self._seconds_per_item = 0.05  # running estimate, for Retry-After

    # -- admission ----------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Items admitted and not yet in a batch (the autoscaling signal)."""
        return self._queued

    @property
    def idle(self) -> bool:
        return self._queued == 0 and self._busy == 0 and self._handoff.empty()

    def retry_after(self) -> float:
        """Seconds after which a retry is likely to be admitted."""
        return float(min(30.0, max(0.1, self._queued * self._seconds_per_item)))

    def submit(
        self,
        items: Sequence[EncodedItem],
        *,
        priority: Priority = Priority.ONLINE,
        deadline: float | None = None,
    ) -> list[asyncio.Future[np.ndarray]]:
        """Queue all items or none; raise RESOURCE_EXHAUSTED at once when the queue is full."""
        if not self._tasks:
            raise RuntimeError("batcher not started")
        if self._queued + len(items) > self.config.max_queue_items:
            raise ServiceError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"server overloaded: {self._queued} items queued (limit {self.config.max_queue_items})",
                retry_after=self.retry_after(),
            )
        loop = asyncio.get_running_loop()
        queue = self._queues[priority]
        futures: list[asyncio.Future[np.ndarray]] = []
        for item in items:
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            queue.append(_Pending(item, fut, deadline, next(self._seq)))
            futures.append(fut)
        self._queued += len(items)
        self._observer.on_queue_depth(self._queued)
        self._wakeup.set()
        return futures

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._schedule(), name="batcher-schedule"),
                asyncio.create_task(self._work(), name="batcher-work"),
            ]

    async def stop(self) -> None:
        """Stop the loops and fail whatever is still queued (UNAVAILABLE: retry elsewhere)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        err = ServiceError(ErrorCode.UNAVAILABLE, "server shutting down")
        while not self._handoff.empty():
            for p in self._handoff.get_nowait():
                _settle_error(p, err)
        for queue in self._queues.values():
            while queue:
                _settle_error(queue.popleft(), err)
        self._queued = 0
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- scheduling ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            await self._slots.acquire()
            batch: list[_Pending] = []
            try:
                while not batch:
                    while self._queued == 0:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    await self._gather_window()
                    batch = self._form_batch()
                await self._handoff.put(batch)
            except BaseException:
                self._slots.release()
                for p in batch:
                    _settle_error(p, ServiceError(ErrorCode.UNAVAILABLE, "server shutting down"))
                raise

    async def _gather_window(self) -> None:
        """Wait up to max_wait_ms after the oldest item for more to arrive, unless a batch is full."""
        wait_s = self.config.max_wait_ms / 1000.0
        if wait_s <= 0:
            return
        oldest = min(q[0].enqueued for q in self._queues.values() if q)
        while True:
            remaining = oldest + wait_s - time.monotonic()
            if remaining <= 0 or self._queued_tokens_at_least(self.config.max_batch_tokens):
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                return

    def _queued_tokens_at_least(self, budget: int) -> bool:
        total = 0
        for queue in self._queues.values():
            for p in queue:
                total += p.cost
                if total >= budget:
                    return True
        return False

    def _form_batch(self) -> list[_Pending]:
        """Take a window of the oldest items of the highest priority, sort it by length, and fill
        the token budget from the shortest; the rest go back to the front of their queue."""
        now = time.monotonic()
        for priority in Priority:
            queue = self._queues[priority]
            window: list[_Pending] = []
            while queue and len(window) < self.config.sort_window_items:
                p = queue.popleft()
                self._queued -= 1
                if _drop_if_dead(p, now):
                    continue
                window.append(p)
            if not window:
                continue
            window.sort(key=lambda p: p.cost)
            batch: list[_Pending] = []
            longest = 0
            for p in window:
                longest_if = max(longest, p.cost)
                if batch and longest_if * (len(batch) + 1) > self.config.max_batch_tokens:
                    break
                batch.append(p)
                longest = longest_if
            rest = sorted(window[len(batch) :], key=lambda p: p.seq)
            queue.extendleft(reversed(rest))
            self._queued += len(rest)
            self._observer.on_queue_depth(self._queued)
            return batch
        self._observer.on_queue_depth(self._queued)
        return []

    # -- the model worker ---------------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._handoff.get()
            self._busy += 1
            try:
                now = time.monotonic()
                live = [p for p in batch if not _drop_if_dead(p, now)]
                if live:
                    await self._run(loop, live, now)
            finally:
                self._busy -= 1
                self._slots.release()

    async def _run(self, loop: asyncio.AbstractEventLoop, live: list[_Pending], now: float) -> None:
        items = [p.item for p in live]
        lengths = [it.num_tokens for it in items]
        self._observer.on_batch(
            items=len(items),
            padded_tokens=padded_tokens(lengths),
            real_tokens=sum(lengths),
            queue_seconds=[now - p.enqueued for p in live],
        )
        started = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self._forward, items)
            if len(out) != len(live):
                raise RuntimeError(f"backend returned {len(out)} rows for {len(live)} items")
        except asyncio.CancelledError:
            for p in live:
                _settle_error(p, ServiceError(ErrorCode.UNAVAILABLE, "server shutting down"))
            raise
        except Exception:
            log.exception("forward pass failed for a batch of %d items", len(live))
            for p in live:
                _settle_error(p, ServiceError(ErrorCode.INTERNAL, "the model failed on this batch"))
            return
        elapsed = time.perf_counter() - started
        self._observer.on_inference(elapsed)
        self._seconds_per_item = 0.8 * self._seconds_per_item + 0.2 * (elapsed / len(live))
        for p, row in zip(live, out, strict=True):
            if not p.future.done():
                p.future.set_result(row)


def _settle_error(p: _Pending, err: ServiceError) -> None:
    if not p.future.done():
        p.future.set_exception(err)
        # Mark retrieved: the caller may have gone away, which is not worth a log line.
        p.future.exception()


def _drop_if_dead(p: _Pending, now: float) -> bool:
    """True (and settled) when the item was cancelled or its deadline passed: never run it."""
    if p.future.done():
        return True
    if p.deadline is not None and now >= p.deadline:
        _settle_error(p, ServiceError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the item was scored"))
        return True
    return False
