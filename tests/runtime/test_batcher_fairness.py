"""Fair scheduling between the requests of one priority, counted in batches, not wall time.

The fake model records which request (the first token id of each item) every batch held, and
can run a "client" on the event loop while a chosen batch is inside the forward pass, which is
when a real client's request arrives. Latency is then the number of batches between a
request's arrival and the batch that ran it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import numpy as np

from services.runtime.batcher import Batcher, BatcherConfig
from services.runtime.items import EncodedItem, Priority


def item(n: int, req: int) -> EncodedItem:
    """``n`` tokens; the first says which request it belongs to."""
    return EncodedItem((req,) + (0,) * (n - 1), truncated=False)


class Model:
    """A forward function that records batches and runs ``clients`` at the start of batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.batches: list[list[EncodedItem]] = []
        self.clients: list[Callable[[int], None]] = []

    def __call__(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        index = len(self.batches)
        self.batches.append(list(batch))
        if self.clients:
            done = threading.Event()

            def arrive() -> None:
                try:
                    for client in self.clients:
                        client(index)
                finally:
                    done.set()

            self.loop.call_soon_threadsafe(arrive)
            assert done.wait(10)
        return np.asarray([[float(it.input_ids[0])] for it in batch], np.float32)

    def first_batch(self, req: int) -> int:
        return next(i for i, b in enumerate(self.batches) if any(it.input_ids[0] == req for it in b))

    def last_batch(self, req: int) -> int:
        return max(i for i, b in enumerate(self.batches) if any(it.input_ids[0] == req for it in b))

    def served(self, req: int, upto: int) -> tuple[int, int]:
        """(items, tokens) of request ``req`` in the first ``upto`` batches."""
        items = [it for b in self.batches[:upto] for it in b if it.input_ids[0] == req]
        return len(items), sum(it.num_tokens for it in items)


async def drain(futures: list[asyncio.Future[np.ndarray]]) -> None:
    """Await ``futures``, including those clients append while it waits."""
    while not all(f.done() for f in futures):
        await asyncio.gather(*futures)


async def start(tokens: int = 64, **kw: object) -> tuple[Model, Batcher]:
    model = Model(asyncio.get_running_loop())
    cfg = BatcherConfig(max_batch_tokens=tokens, max_wait_ms=0.0, max_queue_items=20_000)
    batcher = Batcher(model, cfg, **kw)  # type: ignore[arg-type]
    await batcher.start()
    return model, batcher


def lengths(n: int, seed: int, lo: int = 2, hi: int = 16) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(lo, hi + 1, size=n)]


async def test_a_one_item_request_runs_in_the_next_batch_while_2000_items_are_scored() -> None:
    model, b = await start()
    try:
        big = b.submit([item(n, 1) for n in lengths(2000, 0)])
        small: list[asyncio.Future[np.ndarray]] = []
        arrived: list[int] = []

        def client(index: int) -> None:
            if index == 5:  # batch 5 runs and batch 6 is already formed: it must be re-formed
                arrived.append(index)
                small.extend(b.submit([item(40, 2)]))  # far longer than any item of the big one

        model.clients.append(client)
        await asyncio.gather(*big)
        assert float((await small[0])[0]) == 2.0
        assert model.first_batch(2) == arrived[0] + 1
        # The big request was not starved by the small one: one extra batch in ~190.
        assert model.last_batch(1) == len(model.batches) - 1
    finally:
        await b.stop()


async def test_a_one_item_request_submitted_with_a_large_one_runs_within_two_batches() -> None:
    model, b = await start()
    try:
        big = b.submit([item(n, 1) for n in lengths(2000, 1)])
        (small,) = b.submit([item(3, 2)])
        await asyncio.gather(small, *big)
        assert model.first_batch(2) <= 1
    finally:
        await b.stop()


async def test_while_one_client_sends_2000_items_back_to_back_the_other_waits_one_batch() -> None:
    """The Done-when scenario of issue 12, in batches: every 1-item request of the second client
    runs in the batch that starts after it arrived (its latency is at most the rest of the running
    batch plus its own), however the large requests' lengths fall."""
    model, b = await start()
    try:
        arrivals: dict[int, int] = {}
        futures: list[asyncio.Future[np.ndarray]] = []
        rounds, done = 2, list[int]()

        def client(index: int) -> None:
            if index % 7 == 3 and len(done) < rounds:
                req = 100 + len(arrivals)
                arrivals[req] = index
                futures.extend(b.submit([item(1 + index % 40, req)]))

        model.clients.append(client)
        for round_ in range(rounds):
            await asyncio.gather(*b.submit([item(n, 1 + round_) for n in lengths(2000, 10 + round_)]))
            done.append(round_)
        await drain(futures)
        assert len(arrivals) > 30
        waits = [model.first_batch(req) - at for req, at in arrivals.items()]
        assert max(waits) == 1, waits
    finally:
        await b.stop()


async def test_online_still_beats_batch_priority() -> None:
    model, b = await start()
    try:
        bulk = b.submit([item(n, 1) for n in lengths(600, 2)], priority=Priority.BATCH)
        late: dict[int, list[asyncio.Future[np.ndarray]]] = {}

        def client(index: int) -> None:
            if index == 3:
                late[2] = b.submit([item(30, 2)], priority=Priority.ONLINE)
                late[3] = b.submit([item(30, 3)], priority=Priority.BATCH)
                late[4] = b.submit([item(n, 4) for n in lengths(300, 3)], priority=Priority.ONLINE)

        model.clients.append(client)
        await asyncio.gather(*bulk)
        await asyncio.gather(*(f for fs in late.values() for f in fs))
        # Online work that arrives during batch 3 runs from batch 4 on, the single item first (it is
        # tagged ahead of the 300-item request), and no batch work runs until all of it has.
        assert model.first_batch(2) == 4
        online_done = max(model.last_batch(2), model.last_batch(4))
        assert all(it.input_ids[0] in (2, 4) for bt in model.batches[4 : online_done + 1] for it in bt)
        assert model.first_batch(3) > online_done
        # Among batch work the late single item is fair-queued too: it does not wait for the bulk.
        assert model.first_batch(3) == online_done + 1
        assert model.last_batch(1) > model.first_batch(3)
    finally:
        await b.stop()


async def test_two_large_requests_interleave_and_share_tokens_not_items() -> None:
    model, b = await start()
    try:
        long_items = b.submit([item(16, 1) for _ in range(400)])  # 4 per batch alone
        short_items = b.submit([item(2, 2) for _ in range(1600)])  # 32 per batch alone
        await asyncio.gather(*long_items, *short_items)
        assert model.first_batch(2) <= 1
        assert model.last_batch(1) > model.first_batch(2) and model.last_batch(2) > model.first_batch(1)
        # Both total 6,400 tokens; while both are queued each gets half the model's tokens.
        half = min(model.last_batch(1), model.last_batch(2)) // 2
        (_, long_tokens), (_, short_tokens) = model.served(1, half), model.served(2, half)
        assert 0.8 < long_tokens / short_tokens < 1.25, (long_tokens, short_tokens)
    finally:
        await b.stop()


async def stream(per_batch: int, batches: int, big_items: int) -> tuple[Model, list[int]]:
    """A 4-token-item request of ``big_items``, then ``per_batch`` 1-item requests arriving during
    each of the first ``batches`` batches (16 items fill a batch); the model, and how many batches
    each small request waited after the one it arrived in."""
    model, b = await start()
    try:
        big = b.submit([item(4, 1) for _ in range(big_items)])
        small: list[asyncio.Future[np.ndarray]] = []
        arrivals: dict[int, int] = {}

        def client(index: int) -> None:
            if index < batches and not all(f.done() for f in big):
                for _ in range(per_batch):
                    req = 1000 + len(arrivals)
                    arrivals[req] = index
                    small.extend(b.submit([item(4, req)]))

        model.clients.append(client)
        await asyncio.gather(*big)
        await drain(small)
        assert len(small) > per_batch
        return model, [model.first_batch(r) - at for r, at in arrivals.items()]
    finally:
        await b.stop()


async def test_a_steady_stream_of_small_requests_does_not_starve_a_large_one() -> None:
    """Below the model's capacity, every small request still runs in the next batch and the large
    one gets at least the capacity they leave (FIFO would give it all and make them wait)."""
    for per_batch in (8, 12, 15):
        model, waits = await stream(per_batch, 10_000, 200)
        assert max(waits) == 1
        assert model.last_batch(1) <= 200 // (16 - per_batch) + 1, (per_batch, model.last_batch(1))


async def test_under_overload_a_large_request_keeps_its_fair_share() -> None:
    """Small requests arriving as fast as the model serves them, so they queue up: each queued
    request, the large one included, gets an equal share (1/(k+1) with k small ones queued). Its
    share shrinks as they pile up (admission bounds k), but it is never overtaken for good."""
    model, _ = await stream(16, 200, 400)
    per_50 = [
        sum(1 for bt in model.batches[i : i + 50] for it in bt if it.input_ids[0] == 1) for i in range(0, 200, 50)
    ]
    assert all(n >= 5 for n in per_50), per_50


def common_prefix(items: Sequence[EncodedItem]) -> int:
    first = items[0].input_ids
    n = min(it.num_tokens for it in items)
    for k in range(n):
        if any(it.input_ids[k] != first[k] for it in items):
            return k
    return n


async def test_groups_stay_in_one_batch_and_a_newcomer_still_goes_next() -> None:
    model, b = await start(tokens=96, shared_prefix=common_prefix)
    try:
        grouped: list[EncodedItem] = []
        for g in range(150):  # four responses to one 12-token prompt
            prompt = (1, g % 250 + 1, *range(10))
            for r in range(4):
                ids = prompt + (200 + r,) * (2 + (g + r) % 5)
                grouped.append(EncodedItem(ids, truncated=False, group=g))
        big = b.submit(grouped)
        small: list[asyncio.Future[np.ndarray]] = []
        arrived: list[int] = []

        def client(index: int) -> None:
            if index == 10:
                arrived.append(index)
                small.extend(b.submit([item(50, 2)]))

        model.clients.append(client)
        await asyncio.gather(*big)
        await small[0]
        assert model.first_batch(2) == arrived[0] + 1
        where: dict[int, set[int]] = {}
        for i, bt in enumerate(model.batches):
            for it in bt:
                if it.group is not None:
                    where.setdefault(it.group, set()).add(i)
        assert len(where) == 150 and all(len(s) == 1 for s in where.values())
    finally:
        await b.stop()
