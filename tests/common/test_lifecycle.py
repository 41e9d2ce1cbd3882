"""``Lifecycle``: the state every engine shares (starting → ready → draining → stopped / failed).

Readiness only in READY; liveness until FAILED or STOPPED; ``admitted()`` counts requests in
flight and refuses new ones with UNAVAILABLE unless READY (a distinct message while draining);
``drain`` refuses new work and waits for admitted work up to its timeout; every change reaches the
``on_change(ready, in_flight)`` callback. Driven by ``asyncio.Event``, no sleeps.
"""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import ErrorCode, ServiceError
from services.common.lifecycle import EngineState, Lifecycle


class Calls:
    def __init__(self) -> None:
        self.seen: list[tuple[bool, int]] = []

    def __call__(self, ready: bool, in_flight: int) -> None:
        self.seen.append((ready, in_flight))


async def hold(lc: Lifecycle, entered: asyncio.Event, release: asyncio.Event) -> str:
    async with lc.admitted():
        entered.set()
        await release.wait()
    return "done"


async def refusal(lc: Lifecycle) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        async with lc.admitted():
            raise AssertionError("admitted while it should be refused")
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert info.value.http_status == 503
    return info.value


@pytest.mark.parametrize(
    ("state", "live", "ready"),
    [
        (EngineState.STARTING, True, False),
        (EngineState.READY, True, True),
        (EngineState.DRAINING, True, False),
        (EngineState.STOPPED, False, False),
        (EngineState.FAILED, False, False),
    ],
)
def test_live_and_ready_per_state(state: EngineState, live: bool, ready: bool) -> None:
    lc = Lifecycle()
    lc.set(state)
    assert (lc.state, lc.live, lc.ready) == (state, live, ready)


def test_starts_in_starting_with_nothing_in_flight() -> None:
    lc = Lifecycle()
    assert lc.state is EngineState.STARTING
    assert lc.in_flight == 0
    assert lc.live and not lc.ready


def test_state_values_are_the_reported_names() -> None:
    assert [s.value for s in EngineState] == ["starting", "ready", "draining", "stopped", "failed"]


async def test_admitted_counts_requests_in_flight_and_reports_each_change() -> None:
    calls = Calls()
    lc = Lifecycle(calls)
    lc.set(EngineState.READY)
    entered = [asyncio.Event(), asyncio.Event()]
    release = asyncio.Event()
    tasks = [asyncio.create_task(hold(lc, e, release)) for e in entered]
    for e in entered:
        await e.wait()
    assert lc.in_flight == 2
    release.set()
    assert await asyncio.gather(*tasks) == ["done", "done"]
    assert lc.in_flight == 0
    assert calls.seen == [(True, 0), (True, 1), (True, 2), (True, 1), (True, 0)]


async def test_in_flight_is_released_when_the_work_raises() -> None:
    lc = Lifecycle()
    lc.set(EngineState.READY)
    with pytest.raises(RuntimeError, match="work failed"):
        async with lc.admitted():
            assert lc.in_flight == 1
            raise RuntimeError("work failed")
    assert lc.in_flight == 0
    assert await lc.drain(60.0) is True  # idle again: returns at once


@pytest.mark.parametrize("state", [EngineState.STARTING, EngineState.STOPPED, EngineState.FAILED])
async def test_refused_unless_ready(state: EngineState) -> None:
    calls = Calls()
    lc = Lifecycle(calls)
    lc.set(state)
    err = await refusal(lc)
    assert err.message == "model is not ready yet"
    assert lc.in_flight == 0
    assert calls.seen == [(False, 0)]  # the set() only: a refusal counts nothing


async def test_refused_while_draining_with_its_own_message() -> None:
    lc = Lifecycle()
    lc.set(EngineState.DRAINING)
    err = await refusal(lc)
    assert err.message == "server is draining; retry on another replica"


async def test_drain_when_idle_returns_true_at_once() -> None:
    calls = Calls()
    lc = Lifecycle(calls)
    lc.set(EngineState.READY)
    assert await lc.drain(60.0) is True  # nothing in flight: no wait at all
    assert lc.state is EngineState.DRAINING and not lc.ready and lc.live
    assert calls.seen[-1] == (False, 0)


async def test_drain_with_zero_seconds_when_idle_returns_true() -> None:
    lc = Lifecycle()
    lc.set(EngineState.READY)
    assert await lc.drain(0.0) is True


async def test_drain_refuses_new_work_and_waits_for_admitted_work() -> None:
    calls = Calls()
    lc = Lifecycle(calls)
    lc.set(EngineState.READY)
    entered, release = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(hold(lc, entered, release))
    await entered.wait()
    draining = asyncio.create_task(lc.drain(60.0))
    await asyncio.sleep(0)  # let drain() switch the state
    assert lc.state is EngineState.DRAINING
    assert not draining.done()
    err = await refusal(lc)
    assert err.message.startswith("server is draining")
    assert lc.in_flight == 1  # the refused request was never counted
    release.set()
    assert await draining is True
    assert await running == "done"
    assert lc.in_flight == 0
    assert calls.seen == [(True, 0), (True, 1), (False, 1), (False, 0)]


async def test_drain_gives_up_after_its_timeout_and_leaves_the_work_running() -> None:
    lc = Lifecycle()
    lc.set(EngineState.READY)
    entered, release = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(hold(lc, entered, release))
    await entered.wait()
    assert await lc.drain(0.01) is False
    assert lc.state is EngineState.DRAINING and lc.in_flight == 1
    assert not running.done()  # drain never cancels admitted work
    release.set()
    assert await running == "done"
    assert await lc.drain(60.0) is True


@pytest.mark.parametrize("state", [EngineState.STARTING, EngineState.STOPPED, EngineState.FAILED])
async def test_drain_keeps_a_state_other_than_ready(state: EngineState) -> None:
    lc = Lifecycle()
    lc.set(state)
    assert await lc.drain(60.0) is True
    assert lc.state is state


async def test_stopped_after_draining_is_neither_live_nor_ready() -> None:
    lc = Lifecycle()
    lc.set(EngineState.READY)
    await lc.drain(60.0)
    lc.set(EngineState.STOPPED)
    assert (lc.live, lc.ready) == (False, False)
    err = await refusal(lc)
    assert err.message == "model is not ready yet"
