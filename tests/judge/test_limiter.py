"""The provider limiter (rpm windows, bursts, tpm, AIMD, pauses, deadlines) and the engine under
20% upstream failures, all in virtual time."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path

import pytest

from services.judge.backends.scripted import Failures, ScriptedBackend
from services.judge.engine import FakeClock, JudgeCache, JudgeEngine, JudgeEngineConfig
from services.judge.engine.limiter import Limiter, LimiterTimeout
from services.judge.types import CompareResult


def max_in_window(times: list[float], window: float = 10.0) -> int:
    """The most calls that started in any half-open window [t, t + window) (the densest window
    starts at a call, so checking those is checking every window)."""
    return max((sum(1 for u in times if t <= u < t + window) for t in times), default=0)


async def run_calls(limiter: Limiter, clock: FakeClock, n: int, est: int = 1) -> list[float]:
    times: list[float] = []

    async def one() -> None:
        permit = await limiter.acquire(est, None)
        times.append(clock.now())
        limiter.release(permit, "ok", tokens=est)

    await asyncio.gather(*(one() for _ in range(n)))
    return times


async def test_rpm_window_and_burst() -> None:
    clock = FakeClock()
    # rpm 600: at most 100 calls in any 10 s window, bursts of at most 10
    limiter = Limiter(max_concurrency=64, rpm=600, tpm=None, clock=clock)
    start = clock.now()
    times = await run_calls(limiter, clock, 300)
    assert max_in_window(times) <= 100
    assert sum(1 for t in times if t == start) == 10  # the burst
    assert max_in_window(times, 1.0) <= 10 + 10  # burst + one second of refill
    assert clock.now() - start == pytest.approx(29.0, abs=1.0)  # 300 calls: 100 per 10 s, the last at 29 s

    # rpm 3 (below 6): one call at a time, 20 s apart (the bucket refills 0.05 per s)
    clock = FakeClock()
    limiter = Limiter(max_concurrency=4, rpm=3, tpm=None, clock=clock)
    times = await run_calls(limiter, clock, 4)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g == pytest.approx(20.0, abs=1e-3) for g in gaps)


async def test_tpm_bucket_and_usage_correction() -> None:
    clock = FakeClock()
    # tpm 6000: bucket of 1000 tokens refilled at 100 per s
    limiter = Limiter(max_concurrency=8, rpm=None, tpm=6000, clock=clock)
    start = clock.now()
    p1 = await limiter.acquire(600, None)
    limiter.release(p1, "ok", tokens=900)  # used more than estimated: bucket 1000 - 900 = 100
    p2 = await limiter.acquire(400, None)  # needs 400: waits 3 s
    assert clock.now() - start == pytest.approx(3.0, abs=1e-3)
    limiter.release(p2, "ok", tokens=400)
    # a call larger than the bucket waits for a full bucket, then goes (bucket goes negative)
    p3 = await limiter.acquire(5000, None)
    assert clock.now() - start == pytest.approx(13.0, abs=1e-3)
    limiter.release(p3, "ok", tokens=5000)


async def test_aimd_and_retry_after_pause() -> None:
    clock = FakeClock()
    limiter = Limiter(max_concurrency=16, rpm=None, tpm=None, clock=clock)
    permit = await limiter.acquire(1, None)
    limiter.release(permit, "rate_limited", retry_after=5.0)
    assert limiter.limit == 8 and limiter.paused_until == pytest.approx(clock.now() + 5)
    t0 = clock.now()
    permit = await limiter.acquire(1, None)  # every new call waits out the pause
    assert clock.now() == pytest.approx(t0 + 5)
    limiter.release(permit, "rate_limited")
    for _ in range(3):
        permit = await limiter.acquire(1, None)
        limiter.release(permit, "rate_limited")
    assert limiter.limit == 1  # halved down to the floor of 1
    permit = await limiter.acquire(1, None)
    limiter.release(permit, "ok")
    assert limiter.limit == 2  # +1/limit per success: slow growth
    for _ in range(10):
        permit = await limiter.acquire(1, None)
        limiter.release(permit, "ok")
    assert 4 < limiter.limit < 6


async def test_concurrency_limit_is_enforced() -> None:
    clock = FakeClock()
    limiter = Limiter(max_concurrency=3, rpm=None, tpm=None, clock=clock)
    running = peak = 0

    async def one() -> None:
        nonlocal running, peak
        permit = await limiter.acquire(1, None)
        running += 1
        peak = max(peak, running)
        await clock.sleep(1.0)
        running -= 1
        limiter.release(permit, "ok")

    start = clock.now()
    await asyncio.gather(*(one() for _ in range(9)))
    assert peak == 3 and clock.now() - start == pytest.approx(3.0)


async def test_deadline_gives_up_without_waiting() -> None:
    clock = FakeClock()
    limiter = Limiter(max_concurrency=1, rpm=6, tpm=None, clock=clock)  # 1 call per 10 s
    permit = await limiter.acquire(1, None)
    limiter.release(permit, "ok")
    t0 = clock.now()
    with pytest.raises(LimiterTimeout):
        await limiter.acquire(1, t0 + 5)
    assert clock.now() == t0
    # waiting for a concurrency slot also stops at the deadline, and gives nothing away
    permit = await limiter.acquire(1, None)
    with pytest.raises(LimiterTimeout):
        await limiter.acquire(1, clock.now() + 2)
    limiter.release(permit, "ok")
    assert limiter.in_use == 0


async def test_twenty_percent_failures_no_label_lost_none_wrong_rate_kept(tmp_path: Path) -> None:
    clock = FakeClock()
    rpm = 120  # at most 20 calls in any 10 s window
    backend = ScriptedBackend(
        clock=clock,
        failures=Failures(rate_limit=0.07, server_error=0.07, timeout=0.06, retry_after=3.0),
        seed=7,
    )
    cache = JudgeCache(tmp_path / "judge.sqlite")
    engine = JudgeEngine(
        lambda: backend,
        JudgeEngineConfig(rpm=rpm, max_concurrency=8, max_retries=6, seed=1),
        cache=cache,
        clock=clock,
    )
    await engine.start()
    items = []
    for k in range(40):
        good, bad = f"[good] answer number {k}", f"[bad] answer number {k}"
        items.append(((good, bad), 0) if k % 2 else ((bad, good), 1))
    from services.judge.types import CompareInput

    results = await asyncio.gather(*(engine.compare(CompareInput(f"Question {k}?", r)) for k, (r, _) in
                                     enumerate(items)))  # fmt: skip
    outcomes = Counter(c.outcome for c in backend.calls)
    failed = sum(v for k, v in outcomes.items() if k != "ok")
    assert 0.12 < failed / len(backend.calls) < 0.3, outcomes  # about 20% of attempts failed
    assert outcomes["rate_limited"] and outcomes["server_error"] and outcomes["timeout"]
    # no label lost, none wrong
    assert all(isinstance(r, CompareResult) for r in results)
    assert [r.winner for r in results if isinstance(r, CompareResult)] == [w for _, w in items]
    assert all(r.consistent for r in results if isinstance(r, CompareResult))
    # the provider never saw more than rpm/6 calls (attempts, failed ones included) in any 10 s
    assert max_in_window([c.time for c in backend.calls]) <= rpm // 6
    # no failure cached: exactly the successful calls are stored
    assert len(cache) == outcomes["ok"] == 80
    assert engine.metrics.registry.get_sample_value("rlhf_judge_rate_limited_total") == outcomes["rate_limited"]
    # all again: every verdict from the cache, no provider call
    n_calls = backend.call_count
    again = await asyncio.gather(*(engine.compare(CompareInput(f"Question {k}?", r)) for k, (r, _) in
                                   enumerate(items)))  # fmt: skip
    assert backend.call_count == n_calls
    assert all(isinstance(r, CompareResult) and r.cached and r.usage.calls == 0 for r in again)
    await engine.stop()
