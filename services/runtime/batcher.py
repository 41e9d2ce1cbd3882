"""Dynamic batcher: token-budget batches, length-sorted, online before batch work, fair
between the requests of one priority.

One future per item. Items of one ``group`` (one prompt, several responses) whose backend
shares their common token prefix travel as one unit: never split across batches (unless
the group alone is over the token budget: then it runs as consecutive chunks that each fit
and each share their own prefix), and priced at what the forward pass really runs: the
prefix once plus every suffix padded. The scheduler forms a batch only when the model worker can take it
(at most one batch waits while another runs), drops cancelled and expired items before the
forward pass, and settles every future it took, also when the backend raises or returns the
wrong number of rows.

Fairness is start-time fair queueing with one flow per :meth:`Batcher.submit` call: each unit
gets a virtual start tag, the request's first unit the priority's virtual time ``V`` and each
next one the previous tag plus the previous unit's token cost, and batches are formed from the
lowest tags. A request submitted while a 2,000-item one runs starts just ahead of that one's
remaining units and goes into the next batch that starts (a batch formed while another
runs is formed again when it starts if a request of its priority or a higher one arrived
meanwhile); two large requests interleave instead of one waiting for the other.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from services.common.errors import ErrorCode, ServiceError
from services.runtime.items import EncodedItem, Priority

log = logging.getLogger(__name__)

ForwardFn = Callable[[Sequence[EncodedItem]], np.ndarray]
# Tokens a group's items share and the backend runs once (0: none); the same rule the
# backend's forward applies, so the budget prices what really runs.
SharedPrefixFn = Callable[[Sequence[EncodedItem]], int]


class BatchObserver(Protocol):
    """Hooks for metrics; the batcher knows nothing about Prometheus."""

    def on_queue_depth(self, items: int) -> None: ...

    def on_batch(
        self,
        *,
        items: int,
        padded_tokens: int,
        real_tokens: int,
        queue_seconds: Sequence[float],
        prefix_tokens_saved: int = 0,
    ) -> None:
        """``padded_tokens``/``real_tokens``: positions the forward runs, with and without padding
        (a shared prefix counts once); ``prefix_tokens_saved``: tokens sharing did not rerun."""

    def on_inference(self, seconds: float) -> None: ...


class _NullObserver:
    def on_queue_depth(self, items: int) -> None:
        pass

    def on_batch(
        self,
        *,
        items: int,
        padded_tokens: int,
        real_tokens: int,
        queue_seconds: Sequence[float],
        prefix_tokens_saved: int = 0,
    ) -> None:
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
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Unit:
    """What batches are made of: one item, or the items of one group sharing ``prefix`` tokens.

    ``width`` is the longest suffix (the whole item when nothing is shared).
    """

    members: list[_Pending]
    prefix: int
    width: int

    @property
    def enqueued(self) -> float:
        return self.members[0].enqueued

    @property
    def cost(self) -> int:
        """Tokens this unit costs as a batch of its own."""
        return self.prefix + len(self.members) * self.width


def _unit(members: list[_Pending], prefix: int) -> _Unit:
    return _Unit(members, prefix, max(1, max(p.item.num_tokens for p in members) - prefix))


class _Cost:
    """Running token cost of a batch as the backend runs it: when some unit shares a prefix,
    one padded pass over the prefixes plus one padded pass over every item's suffix."""

    __slots__ = ("items", "prefix_width", "prefixes", "width")

    def __init__(self) -> None:
        self.items = self.width = self.prefixes = self.prefix_width = 0

    def total(self) -> int:
        return self.prefixes * self.prefix_width + self.items * self.width

    def with_unit(self, u: _Unit) -> int:
        prefixes = self.prefixes + (1 if u.prefix else 0)
        return prefixes * max(self.prefix_width, u.prefix) + (self.items + len(u.members)) * max(self.width, u.width)

    def add(self, u: _Unit) -> None:
        self.items += len(u.members)
        self.width = max(self.width, u.width)
        if u.prefix:
            self.prefixes += 1
            self.prefix_width = max(self.prefix_width, u.prefix)


def _real_tokens(u: _Unit) -> int:
    return sum(p.item.num_tokens for p in u.members) - (len(u.members) - 1) * u.prefix


def _around(window: Sequence[_Unit], anchor: int, limit: int) -> list[int]:
    """Indices of one batch from a length-sorted window: the anchor (the unit with the lowest
    tag), then its neighbours in length order, one at a time from whichever side adds less
    padding, while the batch fits.

    Anchoring on the lowest tag bounds every item's wait (filling from the shortest starves long
    items under a steady stream of short ones, and the p99 latency with them); growing a
    contiguous run of the sorted window keeps padding as low as the window allows.
    """
    cost = _Cost()
    cost.add(window[anchor])
    real = _real_tokens(window[anchor])
    lo = hi = anchor
    while True:
        best: tuple[int, int, int] | None = None  # (padding after, side, cost)
        for side, idx in ((0, lo - 1), (1, hi + 1)):
            if 0 <= idx < len(window):
                total = cost.with_unit(window[idx])
                if total <= limit:
                    pad = total - real - _real_tokens(window[idx])
                    if best is None or pad < best[0]:
                        best = (pad, side, idx)
        if best is None:
            break
        idx = best[2]
        cost.add(window[idx])
        real += _real_tokens(window[idx])
        lo, hi = min(lo, idx), max(hi, idx)
    return list(range(lo, hi + 1))


# (virtual start tag, arrival number, unit). Tuples, so that the queue sorts and bisects in C;
# the arrival number is unique, so two entries never compare their units.
_Entry = tuple[float, int, _Unit]


class _FairQueue:
    """One priority's queued units, sorted by virtual start tag, and its virtual time.

    Tags are in tokens (a unit's :attr:`_Unit.cost`), not items: a request of long items and one
    of short items then share the model's time, which is what a waiting client feels. ``vtime``
    is the highest finish tag (start + cost) of a unit a started batch was anchored on. A new
    request starts at ``vtime - 0.5``; each batch is anchored either on a unit tagged below that
    (finitely many: none is added) or on one that moves ``vtime`` on by at least half a token. So
    a queued unit is overtaken by newer requests a bounded number of times, also under a steady
    stream of small requests: it gets at least an equal share with each request queued beside it.
    """

    __slots__ = ("entries", "vtime")

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.vtime = 0.0

    def add(self, units: Sequence[_Unit], seq: itertools.count[int]) -> None:
        """Queue one request's units, tagged from half a token before ``vtime``.

        The anchor's next unit in its own request is tagged exactly ``vtime``: starting half a
        token earlier puts a new request ahead of it, so the new request anchors the next batch
        that starts, instead of possibly missing it when its length is far from the anchor's.
        """
        tags = itertools.accumulate((u.cost for u in units), initial=self.vtime - 0.5)
        # Not strict: ``seq`` never ends, and ``tags`` has one more; zip stops after the last unit.
        self.merge(list(zip(tags, seq, units, strict=False)))

    def merge(self, new: list[_Entry]) -> None:
        """Insert ``new`` (sorted): only the queued entries between its first and last tag are
        re-sorted with it, and timsort merges those two sorted runs in linear time."""
        if not new:
            return
        q = self.entries
        lo = bisect.bisect_right(q, new[0])
        hi = bisect.bisect_right(q, new[-1], lo)
        if lo == hi:
            q[lo:lo] = new
            return
        span = q[lo:hi]
        span.extend(new)
        span.sort()
        q[lo:hi] = span


@dataclass(eq=False)
class _Formed:
    """A batch formed for the worker: its entries (length-sorted), where they came from, the
    anchor's finish tag (the queue's ``vtime`` once the batch starts) and the arrival count at
    forming (to re-form it when a request arrived meanwhile)."""

    priority: Priority
    entries: list[_Entry]
    finish: float
    arrivals: int

    def units(self) -> list[_Unit]:
        return [e[2] for e in self.entries]


def padded_tokens(lengths: Sequence[int]) -> int:
    """Tokens a batch of unshared items costs once padded to its longest item."""
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
        shared_prefix: SharedPrefixFn | None = None,
    ) -> None:
        self._forward = forward
        self._shared_prefix = shared_prefix
        self.config = config
        self._observer: BatchObserver = observer or _NullObserver()
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="reward-forward")
        self._owns_executor = executor is None
        self._queues: dict[Priority, _FairQueue] = {p: _FairQueue() for p in Priority}
        self._queued = 0
        self._seq = itertools.count()
        self._arrivals = dict.fromkeys(Priority, 0)  # submit() calls so far
        self._wakeup = asyncio.Event()
        # Two slots: one batch running, at most one formed and waiting for the worker.
        self._slots = asyncio.Semaphore(2)
        self._handoff: asyncio.Queue[_Formed] = asyncio.Queue(maxsize=1)
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
        futures: list[asyncio.Future[np.ndarray]] = [loop.create_future() for _ in items]
        now = time.monotonic()
        pending = [_Pending(it, f, deadline, now) for it, f in zip(items, futures, strict=True)]
        units: list[_Unit] = []
        groups: dict[int, list[_Pending]] = {}
        for p in pending:
            if p.item.group is None or self._shared_prefix is None:
                units.append(_Unit([p], 0, max(1, p.item.num_tokens)))
            else:
                groups.setdefault(p.item.group, []).append(p)
        for members in groups.values():
            units.extend(self._group_units(members))
        queue.add(units, self._seq)
        self._arrivals[priority] += 1
        self._queued += len(items)
        self._observer.on_queue_depth(self._queued)
        self._wakeup.set()
        return futures

    def _group_units(self, members: list[_Pending]) -> list[_Unit]:
        """Units of one group: single items when nothing is shared (they then sort by length like
        any other); else the members sorted by length and cut into chunks that share the prefix.

        A member joins the current chunk when that costs fewer padded tokens than starting a new
        chunk (which recomputes the prefix): responses of very different lengths would otherwise
        pad every suffix to the longest and eat the saving. Every chunk fits the budget.
        """
        prefix = self._prefix_of(members)
        if prefix == 0:
            return [_Unit([p], 0, max(1, p.item.num_tokens)) for p in members]
        budget = self.config.max_batch_tokens
        chunks: list[list[_Pending]] = [[]]
        width = 0
        for p in sorted(members, key=lambda m: m.item.num_tokens):
            suffix = max(1, p.item.num_tokens - prefix)
            n = len(chunks[-1])
            if n:
                # A chunk's own prefix is at least the group's, and a longer prefix only lowers
                # the cost, so sizing chunks with the group's prefix keeps each within budget.
                over = prefix + (n + 1) * suffix > budget
                dearer = n * (suffix - width) > prefix  # extra padding vs a recomputed prefix
                if over or dearer:
                    chunks.append([])
            chunks[-1].append(p)
            width = suffix
        return [self._regroup(c) if len(c) > 1 else _Unit(c, 0, max(1, c[0].item.num_tokens)) for c in chunks]

    def _prefix_of(self, members: list[_Pending]) -> int:
        if self._shared_prefix is None or len(members) < 2:
            return 0
        return self._shared_prefix([p.item for p in members])

    def _regroup(self, members: list[_Pending]) -> _Unit:
        return _unit(members, self._prefix_of(members))

    def _prune(self, u: _Unit, now: float) -> _Unit | None:
        """The unit without its cancelled or expired items (repriced), or None when none is left."""
        alive = [p for p in u.members if not _drop_if_dead(p, now)]
        if not alive:
            return None
        if len(alive) == len(u.members):
            return u
        return self._regroup(alive) if u.prefix else _unit(alive, 0)

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
            for u in self._handoff.get_nowait().units():
                for p in u.members:
                    _settle_error(p, err)
        for queue in self._queues.values():
            for _, _, u in queue.entries:
                for p in u.members:
                    _settle_error(p, err)
            queue.entries.clear()
        self._queued = 0
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- scheduling ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            await self._slots.acquire()
            batch: _Formed | None = None
            try:
                while batch is None:
                    while self._queued == 0:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    await self._gather_window()
                    batch = self._form_batch()
                await self._handoff.put(batch)
            except BaseException:
                self._slots.release()
                for u in batch.units() if batch is not None else []:
                    for p in u.members:
                        _settle_error(p, ServiceError(ErrorCode.UNAVAILABLE, "server shutting down"))
                raise

    async def _gather_window(self) -> None:
        """Wait up to max_wait_ms after the first queued unit (the next anchor) arrived for more to
        arrive, unless a batch is full."""
        wait_s = self.config.max_wait_ms / 1000.0
        if wait_s <= 0:
            return
        oldest = min(q.entries[0][2].enqueued for q in self._queues.values() if q.entries)
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
            for _, _, u in queue.entries:
                total += u.cost
                if total >= budget:
                    return True
        return False

    def _form_batch(self) -> _Formed | None:
        """Take a window of the lowest-tag items of the highest priority, sort it by length, and
        build the batch around the lowest-tag unit (see :func:`_around`); the rest stay at the
        front of their queue, in tag order."""
        now = time.monotonic()
        limit = self.config.max_batch_tokens
        for priority in Priority:
            queue = self._queues[priority]
            entries = queue.entries
            window: list[_Entry] = []
            taken = end = 0
            while end < len(entries) and taken < self.config.sort_window_items:
                tag, seq, u = entries[end]
                end += 1
                self._queued -= len(u.members)
                taken += len(u.members)
                live = self._prune(u, now)
                if live is not None:
                    window.append((tag, seq, live))
            if not window:
                del entries[:end]
                continue
            by_width = sorted(window, key=lambda e: e[2].width)
            chosen = _around([e[2] for e in by_width], by_width.index(window[0]), limit)
            batch = [by_width[i] for i in chosen]
            in_batch = {e[1] for e in batch}
            rest = [e for e in window if e[1] not in in_batch]
            entries[:end] = rest
            self._queued += sum(len(e[2].members) for e in rest)
            self._observer.on_queue_depth(self._queued)
            tag, _, anchor = window[0]
            return _Formed(priority, batch, tag + anchor.cost, self._arrivals_up_to(priority))
        self._observer.on_queue_depth(self._queued)
        return None

    def _arrivals_up_to(self, priority: Priority) -> int:
        """Requests submitted so far at ``priority`` or a more urgent one: those that can change
        which batch ``priority`` work forms."""
        total = 0
        for p in Priority:
            total += self._arrivals[p]
            if p is priority:
                return total
        return total

    def _reform(self, formed: _Formed) -> _Formed | None:
        """Put a formed batch back and form it again: a request that arrived while it waited for
        the worker may be tagged ahead of its anchor (or be online work ahead of batch work), and
        without this would wait one more batch."""
        self._queues[formed.priority].merge(sorted(formed.entries))
        self._queued += sum(len(e[2].members) for e in formed.entries)
        return self._form_batch()

    # -- the model worker ---------------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            formed: _Formed | None = await self._handoff.get()
            self._busy += 1
            try:
                if formed is not None and formed.arrivals != self._arrivals_up_to(formed.priority):
                    formed = self._reform(formed)
                    self._wakeup.set()  # what it left queued is the scheduler's next batch
                if formed is None:
                    continue
                # The batch starts: new requests are tagged from its anchor's finish.
                queue = self._queues[formed.priority]
                queue.vtime = max(queue.vtime, formed.finish)
                now = time.monotonic()
                live = [v for v in (self._prune(u, now) for u in formed.units()) if v is not None]
                if live:
                    await self._run(loop, live, now)
            finally:
                self._busy -= 1
                self._slots.release()

    async def _run(self, loop: asyncio.AbstractEventLoop, units: list[_Unit], now: float) -> None:
        live = [p for u in units for p in u.members]
        items = [p.item for p in live]
        cost = _Cost()
        saved = 0
        for u in units:
            cost.add(u)
            saved += (len(u.members) - 1) * u.prefix
        real = sum(it.num_tokens for it in items) - saved
        self._observer.on_batch(
            items=len(items),
            padded_tokens=cost.total() if cost.prefixes else padded_tokens([it.num_tokens for it in items]),
            real_tokens=real,
            queue_seconds=[now - p.enqueued for p in live],
            prefix_tokens_saved=saved,
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
