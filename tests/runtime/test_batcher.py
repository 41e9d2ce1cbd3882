"""Engine-level batcher tests, driven by events (no sleeps for synchronisation)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from services.common.errors import ErrorCode, ServiceError
from services.runtime.batcher import Batcher, BatcherConfig
from services.runtime.items import EncodedItem, Priority


def item(n: int, tag: int = 0) -> EncodedItem:
    return EncodedItem(tuple([tag] * n), truncated=False)


class Recorder:
    """A forward function that records batches and can be held at a gate."""

    def __init__(self, fail_tag: int | None = None, wrong_rows: bool = False) -> None:
        self.batches: list[list[EncodedItem]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_tag = fail_tag
        self.wrong_rows = wrong_rows

    def __call__(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(10)
        self.batches.append(list(batch))
        if self.fail_tag is not None and any(it.input_ids[0] == self.fail_tag for it in batch):
            raise RuntimeError("boom")
        rows = len(batch) + (1 if self.wrong_rows else 0)
        return np.asarray([[float(it.num_tokens)] for it in batch] + [[0.0]] * (rows - len(batch)), np.float32)


async def held(rec: Recorder, batcher: Batcher) -> asyncio.Future[np.ndarray]:
    """Occupy the model thread with one item held at the gate; return its future."""
    rec.gate.clear()
    rec.entered.clear()
    (fut,) = batcher.submit([item(1, tag=99)])
    await asyncio.to_thread(rec.entered.wait, 10)
    return fut


async def make(rec: Recorder, **kw: int | float) -> Batcher:
    cfg = BatcherConfig(**{"max_batch_tokens": 64, "max_wait_ms": 0.0, "max_queue_items": 1000, **kw})  # type: ignore[arg-type]
    b = Batcher(rec, cfg)
    await b.start()
    return b


async def test_token_budget_never_exceeded_and_batches_are_length_sorted() -> None:
    rec = Recorder()
    b = await make(rec, max_batch_tokens=64)
    first = await held(rec, b)
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 40, size=200)] + [100]  # one item over the budget
    futs = b.submit([item(n) for n in lengths])
    rec.gate.set()
    results = await asyncio.gather(first, *futs)
    assert [float(r[0]) for r in results[1:]] == [float(n) for n in lengths]
    for batch in rec.batches[1:]:
        padded = max(it.num_tokens for it in batch) * len(batch)
        assert padded <= 64 or len(batch) == 1, [it.num_tokens for it in batch]
    assert any(len(bt) == 1 and bt[0].num_tokens == 100 for bt in rec.batches)
    # Sorting by length keeps padding low: each batch spans a narrow band of lengths.
    real = sum(lengths)
    padded_total = sum(max(it.num_tokens for it in bt) * len(bt) for bt in rec.batches[1:])
    assert padded_total / real < 1.25
    await b.stop()


async def test_online_items_go_before_batch_items() -> None:
    rec = Recorder()
    b = await make(rec, max_batch_tokens=8)
    first = await held(rec, b)
    bulk = b.submit([item(4, tag=2) for _ in range(6)], priority=Priority.BATCH)
    online = b.submit([item(4, tag=1) for _ in range(6)], priority=Priority.ONLINE)
    rec.gate.set()
    await asyncio.gather(first, *bulk, *online)
    order = [it.input_ids[0] for bt in rec.batches[1:] for it in bt]
    assert order == [1] * 6 + [2] * 6
    await b.stop()


async def test_overload_is_answered_at_once_with_a_retry_delay() -> None:
    rec = Recorder()
    b = await make(rec, max_queue_items=10)
    first = await held(rec, b)
    b.submit([item(1)] * 10)
    t0 = time.perf_counter()
    with pytest.raises(ServiceError) as info:
        b.submit([item(1)])
    assert time.perf_counter() - t0 < 0.1
    assert info.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert info.value.retry_after is not None and info.value.retry_after > 0
    rec.gate.set()
    await first
    await b.stop()


async def test_expired_and_cancelled_items_never_reach_the_backend() -> None:
    rec = Recorder()
    b = await make(rec)
    first = await held(rec, b)
    expired = b.submit([item(3, tag=7)], deadline=time.monotonic() - 1)
    cancelled = b.submit([item(3, tag=8)])
    alive = b.submit([item(3, tag=9)], deadline=time.monotonic() + 60)
    cancelled[0].cancel()
    rec.gate.set()
    assert float((await alive[0])[0]) == 3.0
    with pytest.raises(ServiceError) as info:
        await expired[0]
    assert info.value.code is ErrorCode.DEADLINE_EXCEEDED
    await first
    seen = {it.input_ids[0] for bt in rec.batches for it in bt}
    assert 7 not in seen and 8 not in seen and 9 in seen
    await b.stop()


async def test_item_expiring_while_its_batch_waits_is_dropped_before_forward() -> None:
    rec = Recorder()
    b = await make(rec)
    first = await held(rec, b)
    # Formed into the prefetched batch while the gate is closed, then expires before it runs.
    soon = time.monotonic() + 0.05
    (fut,) = b.submit([item(2, tag=5)], deadline=soon)
    while time.monotonic() < soon:
        await asyncio.sleep(0.01)
    rec.gate.set()
    with pytest.raises(ServiceError):
        await fut
    await first
    assert all(it.input_ids[0] != 5 for bt in rec.batches for it in bt)
    await b.stop()


async def test_backend_exception_fails_exactly_the_items_of_its_batch() -> None:
    rec = Recorder(fail_tag=3)
    b = await make(rec, max_batch_tokens=4)  # two 2-token items per batch
    first = await held(rec, b)
    good1 = b.submit([item(2, tag=1), item(2, tag=1)])
    bad = b.submit([item(2, tag=3), item(2, tag=1)], priority=Priority.BATCH)
    rec.gate.set()
    for f in [first, *good1]:
        await f
    for f in bad:
        with pytest.raises(ServiceError) as info:
            await f
        assert info.value.code is ErrorCode.INTERNAL
    failing_batch = next(bt for bt in rec.batches if any(it.input_ids[0] == 3 for it in bt))
    assert len(failing_batch) == 2
    # The batcher keeps serving after a failed batch.
    assert float((await b.submit([item(3, tag=1)])[0])[0]) == 3.0
    await b.stop()


async def test_wrong_row_count_fails_the_batch_instead_of_misassigning_scores() -> None:
    rec = Recorder(wrong_rows=True)
    b = await make(rec)
    futs = b.submit([item(2), item(3)])
    for f in futs:
        with pytest.raises(ServiceError) as info:
            await f
        assert info.value.code is ErrorCode.INTERNAL
    await b.stop()


async def test_at_most_one_batch_waits_while_another_runs() -> None:
    rec = Recorder()
    b = await make(rec, max_batch_tokens=2)
    first = await held(rec, b)
    futs = b.submit([item(2) for _ in range(5)])
    for _ in range(20):
        await asyncio.sleep(0)
    # One batch running (held), one formed and handed off, the other four items still queued.
    assert b.queue_depth == 4
    rec.gate.set()
    await asyncio.gather(first, *futs)
    await b.stop()


async def test_stop_settles_everything_still_queued() -> None:
    rec = Recorder()
    b = await make(rec, max_batch_tokens=2)
    first = await held(rec, b)
    futs = b.submit([item(2) for _ in range(4)])
    stopping = asyncio.create_task(b.stop())
    await asyncio.sleep(0)
    rec.gate.set()
    await stopping
    for f in [first, *futs]:
        assert f.done()


async def test_the_oldest_item_is_never_starved_by_shorter_newcomers() -> None:
    """Each batch holds the lowest-tagged queued item (requests submitted between two batches
    start at the same tag, so here the oldest), so a long item waits for at most one batch formed
    after it was queued, however many short items keep arriving."""
    rec = Recorder()
    batcher = await make(rec, max_batch_tokens=40)
    try:
        gate = await held(rec, batcher)
        long_item = batcher.submit([item(30, tag=9)])[0]
        shorts = [batcher.submit([item(4, tag=1)])[0] for _ in range(20)]
        rec.gate.set()
        await gate
        await long_item
        # The long item was queued first: it runs in the first batch after the held one.
        assert any(it.num_tokens == 30 for it in rec.batches[1])
        await asyncio.gather(*shorts)
    finally:
        await batcher.stop()
