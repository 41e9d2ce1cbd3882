"""The judge end to end, through the real code paths: JudgeEngine + the real backend classes + the
official ``openai`` / ``anthropic`` SDKs + the fake provider servers on loopback, in real time.

Closes these "Done when" items of issue 3:

- position bias: a provider that always picks the first slot gives ``both_orders`` preference 0.5
  and ``consistent: false``; one that always picks the better answer gives the right preference
  (whichever slot it is sent in) and ``consistent: true`` (OpenAI with logprobs; Anthropic
  verbalised and k samples);
- faults: with 20% of upstream calls failing (429 with ``retry-after``, 500, timeouts longer than
  the backend timeout) no label is lost, none is wrong, no failure is cached, and the upstream
  request rate (every attempt, failed ones included, as the provider saw them) never exceeds
  ``--rpm``;
- two ``serve judge`` processes sharing one cache file under concurrent load: no corruption, and
  no duplicate upstream call for a key once it is stored.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.process import ServerProcess
from services.judge.backends.anthropic_backend import AnthropicBackend
from services.judge.backends.base import JudgeBackend
from services.judge.backends.factory import build_backend
from services.judge.backends.openai_backend import OpenAIBackend
from services.judge.engine import JudgeEngine, JudgeEngineConfig
from services.judge.engine.cache import JudgeCache, reply_from_json
from services.judge.types import CompareInput, CompareResult, VerdictQuery, VerdictReply
from tests.support.fakes import (
    Call,
    FakeAnthropic,
    FakeOpenAI,
    HttpError,
    Ok,
    RateLimit,
    Sleep,
    always_better,
    always_first,
    random_faults,
)
from tests.support.fakes import FakeProvider as _FakeProvider

GOOD_MARK, BAD_MARK = "[GOOD]", "[BAD]"
CONFIDENCE = 0.9  # the fakes' default: the chosen letter gets 0.9, the other 0.1


def item(i: int) -> tuple[str, str, str]:
    """(prompt, good response, bad response) number ``i``; every text distinct (distinct cache keys)."""
    return (
        f"Question {i}: what is {i} + {i}?",
        f"{GOOD_MARK} {i} + {i} = {2 * i}.",
        f"{BAD_MARK} {i} + {i} = {2 * i + 1}, I am quite sure.",
    )


def body_key(call: Call) -> str:
    """What identifies one verdict query on the wire (retries of a query send the same messages)."""
    return json.dumps(call.body.get("messages"), sort_keys=True)


def good_first(call: Call) -> bool:
    text = json.dumps(call.body.get("messages"))
    return text.find(GOOD_MARK) < text.find(BAD_MARK)


async def engine_over(backend: JudgeBackend, cache: JudgeCache | None = None, **cfg: Any) -> JudgeEngine:
    engine = JudgeEngine(lambda: backend, JudgeEngineConfig(**cfg), cache=cache)
    await engine.start()
    return engine


# -- 1. position bias through the real SDKs ---------------------------------------------------------

# (name, fake server class, fake kwargs, backend factory, provider calls per verdict, P(chosen))
PROVIDERS: list[tuple[str, type[_FakeProvider], dict[str, Any], Any, int, float]] = [
    (
        "openai-logprobs",
        FakeOpenAI,
        {"logprobs": "soft"},
        lambda srv: OpenAIBackend("gpt-fake", base_url=srv.base_url, api_key="sk-test", timeout_s=10.0),
        1,
        CONFIDENCE,
    ),
    (
        "anthropic-verbalised",
        FakeAnthropic,
        {},
        lambda srv: AnthropicBackend("claude-fake", base_url=srv.base_url, api_key="sk-ant-test", timeout_s=10.0),
        1,
        CONFIDENCE,
    ),
    (
        # k samples at the API's default temperature 1.0; a certain fake (confidence 1.0) so the vote
        # shares are exact
        "anthropic-3-samples",
        FakeAnthropic,
        {"confidence": 1.0},
        lambda srv: AnthropicBackend(
            "claude-fake", base_url=srv.base_url, api_key="sk-ant-test", timeout_s=10.0, mode="samples", samples=3
        ),
        3,
        1.0,
    ),
]


@pytest.mark.parametrize(("name", "fake_cls", "fake_kw", "make_backend", "per_verdict", "p_chosen"), PROVIDERS,
                         ids=[p[0] for p in PROVIDERS])  # fmt: skip
async def test_position_bias_and_true_preference_through_the_real_sdks(
    name: str, fake_cls: type[_FakeProvider], fake_kw: dict[str, Any], make_backend: Any, per_verdict: int,
    p_chosen: float,
) -> None:  # fmt: skip
    prompt, good, bad = item(1)
    # A provider that always picks the first position: both_orders cancels it exactly.
    with fake_cls(policy=always_first, **fake_kw) as srv:
        backend = make_backend(srv)
        assert backend.client.max_retries == 0  # the SDK never retries on its own: the engine does
        engine = await engine_over(backend)
        try:
            for responses in ((good, bad), (bad, good)):
                r = await engine.compare(CompareInput(prompt, responses))
                assert isinstance(r, CompareResult), r
                assert r.preference == pytest.approx(0.5, abs=1e-6)
                assert r.consistent is False and r.winner is None and r.soft is True
        finally:
            await engine.stop()
        assert len(srv.calls) == 2 * 2 * per_verdict  # two compares, two orders each
    # A provider that always picks the better answer: the right preference from either slot.
    with fake_cls(policy=always_better(GOOD_MARK, BAD_MARK), **fake_kw) as srv:
        engine = await engine_over(make_backend(srv))
        try:
            for responses, good_index in (((good, bad), 0), ((bad, good), 1)):
                srv.clear()
                r = await engine.compare(CompareInput(prompt, responses))
                assert isinstance(r, CompareResult), r
                p_good = r.preference if good_index == 0 else 1 - r.preference
                assert p_good == pytest.approx(p_chosen, abs=1e-6) and p_good > 0.5
                assert r.winner == good_index and r.consistent is True and r.soft is True
                # the better answer really was sent in both slots
                assert sorted(good_first(c) for c in srv.calls) == [False] * per_verdict + [True] * per_verdict
        finally:
            await engine.stop()


# -- 2. 20% upstream faults under --rpm -------------------------------------------------------------

N_COMPARES = 32  # 64 verdicts, about 80 upstream attempts
RPM = 360.0  # at most 60 calls in any 10 s, bursts of 6: the run takes ~15 s and saturates the window
BACKEND_TIMEOUT_S = 2.0
FAULTS = (RateLimit(retry_after=0.5), HttpError(500), Sleep(BACKEND_TIMEOUT_S + 1.0))
# Server arrival times lag the limiter's grant by the loopback request's latency (measured below,
# typically a few ms); rate checks on them allow this much.
LATENCY_TOLERANCE_S = 0.25


class RecordingBackend:
    """The real backend, with the time each attempt left the engine (for the latency allowance)."""

    def __init__(self, inner: OpenAIBackend) -> None:
        self.inner = inner
        self.info = inner.info
        self.calls_per_verdict = inner.calls_per_verdict
        self.started: list[tuple[str, float]] = []  # (messages json, time.monotonic())

    def sampling_key(self) -> dict[str, object]:
        return self.inner.sampling_key()

    async def verdict(self, query: VerdictQuery) -> VerdictReply:
        messages = [{"role": m.role, "content": m.content} for m in query.messages]
        self.started.append((json.dumps(messages, sort_keys=True), time.monotonic()))
        return await self.inner.verdict(query)

    async def aclose(self) -> None:
        await self.inner.aclose()


def max_in_window(times: Sequence[float], window: float) -> int:
    """The most calls in any half-open window [t, t + window) (one starting at each call suffices)."""
    ts = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(ts):
        while j < len(ts) and ts[j] < t + window:
            j += 1
        best = max(best, j - i)
    return best


def worst_burst_excess(times: Sequence[float], burst: float, per_s: float, slack_s: float) -> float:
    """max over i <= j of (calls in [t_i, t_j]) - (burst + (t_j - t_i + slack_s) * per_s): <= 0 when a
    token bucket of ``burst`` refilled at ``per_s`` could have let them through."""
    ts = sorted(times)
    worst = -float("inf")
    for i in range(len(ts)):
        for j in range(i, len(ts)):
            worst = max(worst, (j - i + 1) - (burst + (ts[j] - ts[i] + slack_s) * per_s))
    return worst


@pytest.mark.slow
async def test_twenty_percent_faults_no_label_lost_none_wrong_none_cached_rpm_kept(tmp_path: Path) -> None:
    """Measured here (2 shared cores): 86 attempts for 64 verdicts, 22 failed (8 x 429, 6 x 500,
    8 timeouts), 15.0 s. Busiest 10 s window (server arrivals, less the 0.25 s latency allowance):
    60 of the 60 allowed; on the client side (attempt start times, exact windows less 50 ms) 60.
    Worst loopback latency (client start -> server arrival) 52-55 ms. Without the allowance the
    server-side log shows 62 calls in some exact 10 s window and a bucket excess of 0.24-0.31
    calls: arrival jitter, not the limiter (its own grants never exceed 60). Rerun: 0 calls."""
    rng = random.Random(7)
    items = [item(i) for i in range(N_COMPARES)]
    orders = [rng.random() < 0.5 for _ in items]  # good answer first?
    requests = [CompareInput(p, (g, b) if gf else (b, g)) for (p, g, b), gf in zip(items, orders, strict=True)]
    path = tmp_path / "judge-cache.sqlite"
    config = {"rpm": RPM, "max_retries": 8, "backoff_base_s": 0.1, "backoff_max_s": 1.0, "seed": 3}

    def backend(srv: FakeOpenAI) -> OpenAIBackend:
        return OpenAIBackend("gpt-fake", base_url=srv.base_url, api_key="sk-test", timeout_s=BACKEND_TIMEOUT_S)

    with FakeOpenAI(policy=always_better(GOOD_MARK, BAD_MARK), script=random_faults(0.2, FAULTS, seed=11)) as srv:
        recording = RecordingBackend(backend(srv))
        engine = await engine_over(recording, JudgeCache(path), **config)
        t0 = time.monotonic()
        try:
            results = await asyncio.gather(*(engine.compare(r) for r in requests))
        finally:
            await engine.stop()
        elapsed = time.monotonic() - t0
        calls = srv.calls

        # no label lost, none wrong
        for r, gf in zip(results, orders, strict=True):
            assert isinstance(r, CompareResult), r  # never an Abstain
            assert r.winner == (0 if gf else 1) and r.consistent is True and r.soft is True
            p_good = r.preference if gf else 1 - r.preference
            assert p_good == pytest.approx(CONFIDENCE, abs=1e-6)
            assert r.cached is False
        # the faults really happened, at about the intended rate, of every kind
        kinds = Counter(type(c.behaviour).__name__ + (f"_{c.behaviour.status}" if isinstance(c.behaviour, HttpError)
                                                      else "") for c in calls)  # fmt: skip
        failed = len(calls) - kinds["Ok"]
        assert kinds["HttpError_429"] >= 1 and kinds["HttpError_500"] >= 1 and kinds["Sleep"] >= 1, kinds
        assert 0.1 <= failed / len(calls) <= 0.3, kinds
        # every verdict query got exactly one successful answer, after its failures: retried, never duplicated
        by_query: dict[str, list[Call]] = defaultdict(list)
        for c in sorted(calls, key=lambda c: c.t):
            by_query[body_key(c)].append(c)
        assert len(by_query) == 2 * N_COMPARES
        for seq in by_query.values():
            assert [isinstance(c.behaviour, Ok) for c in seq] == [False] * (len(seq) - 1) + [True]
        # every attempt went through the SDK once (max_retries=0) and reached the provider
        assert len(recording.started) == len(calls)

        # no failure cached: exactly one stored reply per verdict query, each a real verdict
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            rows = conn.execute("SELECT reply FROM verdicts").fetchall()
        finally:
            conn.close()
        assert len(rows) == 2 * N_COMPARES == kinds["Ok"]
        for (text,) in rows:
            reply = reply_from_json(text)
            assert reply.choice in ("A", "B") and reply.soft and reply.probs is not None
            assert max(reply.probs.values()) == pytest.approx(CONFIDENCE, abs=1e-6)

        # the upstream rate never exceeded --rpm: every attempt, as the provider saw it
        latencies = _latencies(recording.started, calls)
        assert max(latencies) < LATENCY_TOLERANCE_S, max(latencies)
        times = [c.t for c in calls]
        window_cap = int(RPM // 6)
        busiest = max_in_window(times, 10.0 - LATENCY_TOLERANCE_S)
        assert busiest <= window_cap, (busiest, window_cap)
        assert busiest >= 0.75 * window_cap, busiest  # the run did push against the limit
        burst = max(1.0, RPM / 60)
        assert worst_burst_excess(times, burst, RPM / 60, LATENCY_TOLERANCE_S) <= 0
        # on the client side (the time each attempt left the engine), with only scheduling slack
        client_times = [t for _, t in recording.started]
        assert max_in_window(client_times, 10.0 - 0.05) <= window_cap
        assert worst_burst_excess(client_times, burst, RPM / 60, 0.05) <= 0
        assert elapsed < 40, elapsed

        # rerun on a fresh engine over the same cache file: all cached, not one upstream call
        srv.clear()
        engine = await engine_over(backend(srv), JudgeCache(path), **config)
        try:
            again = await asyncio.gather(*(engine.compare(r) for r in requests))
        finally:
            await engine.stop()
        assert srv.calls == []
        for r, first in zip(again, results, strict=True):
            assert isinstance(r, CompareResult) and isinstance(first, CompareResult)
            assert r.cached is True and r.usage.calls == 0
            assert (r.preference, r.winner, r.consistent) == (first.preference, first.winner, first.consistent)


def _latencies(started: Sequence[tuple[str, float]], calls: Sequence[Call]) -> list[float]:
    """Server arrival minus client start, pairing the k-th attempt of each query on both sides
    (attempts of one query are sequential, so the pairing is exact)."""
    client: dict[str, list[float]] = defaultdict(list)
    for key, t in started:
        client[key].append(t)
    server: dict[str, list[float]] = defaultdict(list)
    for c in calls:
        server[body_key(c)].append(c.t)
    out: list[float] = []
    for key, ts in server.items():
        cs = sorted(client[key])
        assert len(cs) == len(ts)
        out.extend(s - c for s, c in zip(sorted(ts), cs, strict=True))
    return out


# -- 3. two judge processes, one cache file ---------------------------------------------------------

N_SHARED = 40


def _serve(srv: FakeOpenAI, cache: Path, log: Path) -> ServerProcess:
    return ServerProcess.judge(
        ["--backend", "openai-compatible", "--base-url", srv.base_url, "--model", "m", "--cache", str(cache),
         "--drain-seconds", "2", "--log-level", "warning"],
        log_path=log,
    )  # fmt: skip


async def _compare_all(jobs: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=60.0) as client:

        async def one(url: str, body: dict[str, Any]) -> dict[str, Any]:
            r = await client.post(url + "/v1/compare", json=body)
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            return out

        return await asyncio.gather(*(one(url, body) for url, body in jobs))


def _check_results(results: Sequence[dict[str, Any]], good_index: Sequence[int], *, cached: bool | None) -> None:
    for r, gi in zip(results, good_index, strict=True):
        assert "abstain" not in r, r
        assert r["winner"] == gi and r["consistent"] is True, r
        if cached is not None:
            assert r["cached"] is cached, r


@pytest.mark.slow
async def test_two_judge_processes_share_one_cache_file(tmp_path: Path) -> None:
    """Measured here: 5-8 s. Pass 1: 80 upstream calls for 40 compares (one per order), pass 2 on the
    other process: 0 calls, all cached. Overlap pass: 18-20 of the 20 queries called by both
    processes (the race before either stored it), never more than twice; the latest call after its
    key was stored came 34 ms after the store (its cache lookup had missed just before). Replay of
    all 50 compares on both processes: 0 calls."""
    cache = tmp_path / "shared-cache.sqlite"
    rng = random.Random(5)
    items = [item(100 + i) for i in range(N_SHARED)]
    flips = [rng.random() < 0.5 for _ in items]
    bodies = [{"prompt": p, "responses": [b, g] if f else [g, b]} for (p, g, b), f in zip(items, flips, strict=True)]
    good_index = [1 if f else 0 for f in flips]
    # a small delay on every reply so both processes really overlap
    with FakeOpenAI(policy=always_better(GOOD_MARK, BAD_MARK), default=Sleep(0.05)) as srv:
        servers = [_serve(srv, cache, tmp_path / f"judge{k}.log") for k in range(2)]
        try:
            for s in servers:
                s.wait_ready(120)
            urls = [s.http_url for s in servers]

            # pass 1: the 40 compares split over both processes, all at once
            first = await _compare_all([(urls[i % 2], b) for i, b in enumerate(bodies)])
            _check_results(first, good_index, cached=False)
            assert len(srv.calls) == 2 * N_SHARED  # one call per order per compare
            _integrity(cache, expect_rows=2 * N_SHARED)  # checked while both servers hold it open

            # pass 2: the same 40 on the other process: every verdict from the shared cache
            srv.clear()
            second = await _compare_all([(urls[(i + 1) % 2], b) for i, b in enumerate(bodies)])
            _check_results(second, good_index, cached=True)
            assert srv.calls == []
            assert [r["preference"] for r in second] == [r["preference"] for r in first]

            # overlap: 10 new compares sent to BOTH processes at the same moment. Each process makes
            # at most one call per key (single flight inside a process), and no call for a key arrives
            # after the key was stored by either process.
            srv.clear()
            new = [item(200 + i) for i in range(10)]
            overlap_bodies = [{"prompt": p, "responses": [g, b]} for p, g, b in new]
            offset = time.time() - time.monotonic()  # the fake logs monotonic time; the cache stores wall time
            both = await _compare_all([(u, b) for b in overlap_bodies for u in urls])
            _check_results(both, [0] * len(both), cached=None)
            overlap_calls = srv.calls
            per_query = Counter(body_key(c) for c in overlap_calls)
            assert len(per_query) == 2 * len(new) and max(per_query.values()) <= 2, per_query
            srv.clear()
            keys = await _cache_keys(srv, cache, [(p, (g, b)) for p, g, b in new])
            assert srv.calls == []  # the probe's keys are the servers' keys: all of them were hits
            stored_at = _stored_at(cache)
            for c in overlap_calls:
                prompt = next(p for p, _, _ in new if p in json.dumps(c.body.get("messages")))
                key = keys[prompt][0 if good_first(c) else 1]  # order (a, b) shows the good answer first
                # A call can follow the store only by the time between its own cache lookup (a miss,
                # just before the store) and its arrival here: allow the loopback latency allowance.
                assert c.t + offset <= stored_at[key] + LATENCY_TOLERANCE_S, c.t + offset - stored_at[key]

            # replay everything on both processes: nothing new upstream
            srv.clear()
            replay = await _compare_all([(u, b) for b in [*bodies, *overlap_bodies] for u in urls])
            assert all(r["cached"] is True for r in replay) and srv.calls == []
        finally:
            codes = [s.terminate(30) for s in servers]
            for s in servers:
                s.__exit__(None, None, None)
        assert codes == [0, 0], [s.log_tail() for s in servers]
    _integrity(cache, expect_rows=2 * N_SHARED + 2 * 10)


def _integrity(cache: Path, *, expect_rows: int) -> None:
    conn = sqlite3.connect(cache, timeout=30)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT key, reply, version FROM verdicts").fetchall()
    finally:
        conn.close()
    assert len(rows) == expect_rows == len({k for k, _, _ in rows})
    for _, text, version in rows:
        assert version == 1
        reply = reply_from_json(text)  # every row decodes into a real verdict
        assert reply.choice in ("A", "B") and reply.probs is not None and reply.soft


def _stored_at(cache: Path) -> dict[str, float]:
    """cache key -> when its verdict was stored (wall clock)."""
    conn = sqlite3.connect(cache, timeout=30)
    try:
        return {k: float(t) for k, t in conn.execute("SELECT key, created FROM verdicts")}
    finally:
        conn.close()


class _KeyLog(JudgeCache):
    """The real cache, noting the keys the engine looks up (in the order it looks them up)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.keys: list[str] = []

    async def aget(self, key: str) -> VerdictReply | None:
        self.keys.append(key)
        return await super().aget(key)


async def _cache_keys(
    srv: FakeOpenAI, cache: Path, compares: Sequence[tuple[str, tuple[str, str]]]
) -> dict[str, tuple[str, str]]:
    """prompt -> (key of order (a, b), key of order (b, a)), from an engine built as ``serve judge``
    builds it (the factory's defaults), looking each compare up in the shared cache."""
    probe = _KeyLog(cache)
    engine = await engine_over(build_backend("openai-compatible", model="m", base_url=srv.base_url), probe)
    out: dict[str, tuple[str, str]] = {}
    try:
        for prompt, responses in compares:
            probe.keys.clear()
            r = await engine.compare(CompareInput(prompt, responses))
            assert isinstance(r, CompareResult) and r.cached, r
            ab, ba = probe.keys  # both_orders looks up order (a, b) first, then (b, a)
            out[prompt] = (ab, ba)
    finally:
        await engine.stop()
    return out
