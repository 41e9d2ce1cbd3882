"""The SQLite verdict cache: what is stored (successes only), keys, and two processes sharing a file."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from services.judge.backends.scripted import Failures, ScriptedBackend
from services.judge.engine import FakeClock, JudgeCache, JudgeEngine, JudgeEngineConfig, SystemClock
from services.judge.types import Abstain, CompareInput, CompareResult, GradeInput, GradeResult, Usage, VerdictReply

GOOD, BAD = "[good] yes", "[bad] no"


def test_roundtrip_first_write_wins_and_only_verdicts(tmp_path: Path) -> None:
    cache = JudgeCache(tmp_path / "c.sqlite")
    reply = VerdictReply("A", {"A": 0.75, "B": 0.25}, True, "A", "because", Usage(10, 1, 0.5, 1))
    assert cache.get("k") is None
    cache.put("k", reply)
    cache.put("k", VerdictReply("B", None, False, "B"))  # a racing writer: the first reply stays
    assert cache.get("k") == reply and len(cache) == 1
    with pytest.raises(TypeError):
        cache.put("x", Abstain("upstream: 500"))  # type: ignore[arg-type]
    mode = sqlite3.connect(tmp_path / "c.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    cache.close()


async def test_engine_hits_cache_and_never_stores_failures(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "judge.sqlite"
    failing = ScriptedBackend(clock=clock, failures=Failures(unparseable=1.0))
    engine = JudgeEngine(lambda: failing, JudgeEngineConfig(max_parse_retries=1), cache=JudgeCache(path), clock=clock)
    await engine.start()
    assert isinstance(await engine.compare(CompareInput("Q?", (GOOD, BAD))), Abstain)
    assert isinstance(await engine.grade(GradeInput("Q?", GOOD)), Abstain)
    probe = JudgeCache(path)
    assert len(probe) == 0  # abstentions are never cached
    probe.close()
    await engine.stop()

    backend = ScriptedBackend(clock=clock)  # same sampling key as `failing`: same cache keys
    engine = JudgeEngine(lambda: backend, JudgeEngineConfig(), cache=JudgeCache(path), clock=clock)
    await engine.start()
    first = await engine.compare(CompareInput("Q?", (GOOD, BAD)))
    assert isinstance(first, CompareResult) and not first.cached and backend.call_count == 2
    again = await engine.compare(CompareInput("Q?", (BAD, GOOD)))  # same pair reversed: same two calls
    assert isinstance(again, CompareResult) and again.cached and again.usage == Usage()
    assert again.preference == pytest.approx(1 - first.preference) and backend.call_count == 2
    g1, g2 = await engine.grade(GradeInput("Q?", GOOD)), await engine.grade(GradeInput("Q?", GOOD))
    assert isinstance(g1, GradeResult) and isinstance(g2, GradeResult) and not g1.cached and g2.cached
    assert g1.score == g2.score and backend.call_count == 3
    reg = engine.metrics.registry
    assert reg.get_sample_value("rlhf_judge_cache_total", {"result": "hit"}) == 3
    await engine.stop()


async def test_key_covers_model_sampling_template_and_rubric(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "judge.sqlite"

    async def calls_for(backend: ScriptedBackend, req: CompareInput) -> int:
        engine = JudgeEngine(lambda: backend, JudgeEngineConfig(), cache=JudgeCache(path), clock=clock)
        await engine.start()
        await engine.compare(req)
        await engine.stop()
        return backend.call_count

    base = CompareInput("Q?", (GOOD, BAD))
    assert await calls_for(ScriptedBackend(clock=clock), base) == 2
    assert await calls_for(ScriptedBackend(clock=clock), base) == 0
    assert await calls_for(ScriptedBackend(clock=clock, model="other"), base) == 2
    assert await calls_for(ScriptedBackend(clock=clock, temperature=2.0), base) == 2
    assert await calls_for(ScriptedBackend(clock=clock), CompareInput("Q?", (GOOD, BAD), rubric="brevity")) == 2
    assert await calls_for(ScriptedBackend(clock=clock), CompareInput("Q?", (GOOD, BAD), protocol="single")) == 0


# -- two processes sharing one cache file --------------------------------------------------------

N_ITEMS = 30


def _worker(path: str, order: int, start: Any, out: Any) -> None:
    """One judge process: judge every item concurrently (in its own order), then all again."""

    async def main() -> dict[str, Any]:
        clock = SystemClock()
        backend = ScriptedBackend(clock=clock, latency=0.02)
        engine = JudgeEngine(lambda: backend, JudgeEngineConfig(max_concurrency=8), cache=JudgeCache(path),
                             clock=clock)  # fmt: skip
        await engine.start()
        keys_of: dict[str, str] = {}
        real_key = engine.verdicts.key

        def key(b: Any, query: Any, meta: Any) -> str:
            k = real_key(b, query, meta)
            keys_of[query.messages[1].content] = k
            return k

        engine.verdicts.key = key  # type: ignore[method-assign,assignment]
        items = list(range(N_ITEMS)) if order == 0 else list(range(N_ITEMS))[::-1]
        sem = asyncio.Semaphore(6)

        async def one(k: int) -> float | None:
            async with sem:
                r = await engine.compare(CompareInput(f"Question {k}?", (f"[good] {k}", f"[bad] {k}")))
            return r.preference if isinstance(r, CompareResult) else None

        start.wait()
        prefs = await asyncio.gather(*(one(k) for k in items))
        first_pass = backend.call_count
        again = await asyncio.gather(*(one(k) for k in items))
        calls = [(keys_of[c.query.messages[1].content], c.time) for c in backend.calls]
        await engine.stop()
        return {
            "prefs": dict(zip(items, prefs, strict=True)),
            "again": dict(zip(items, again, strict=True)),
            "first_pass": first_pass,
            "second_pass": backend.call_count - first_pass,
            "calls": calls,
            "clock_offset": time.time() - time.monotonic(),
        }

    out.put(json.dumps(asyncio.run(main())))


@pytest.mark.slow  # two spawned interpreters
def test_two_processes_share_one_cache_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    JudgeCache(path).close()  # create the file once, as a server would at start
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, order, start, out)) for order in (0, 1)]
    for p in procs:
        p.start()
    start.set()
    results = [json.loads(out.get(timeout=60)) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = conn.execute("SELECT key, reply, created FROM verdicts").fetchall()
    assert len(rows) == 2 * N_ITEMS  # both orders of every item, once each
    for _, reply, _ in rows:
        json.loads(reply)  # every row decodes
    stored_at = {k: created for k, _, created in rows}
    # no label lost and both processes agree
    for r in results:
        assert all(v is not None for v in r["prefs"].values())
        assert r["prefs"] == r["again"] and r["second_pass"] == 0
    assert results[0]["prefs"] == results[1]["prefs"]
    # no upstream call for a key once it was stored (wall-clock times; 50 ms for commit/scheduling)
    for r in results:
        for key, t in r["calls"]:
            assert t + r["clock_offset"] <= stored_at[key] + 0.05
    total = sum(r["first_pass"] for r in results)
    assert 2 * N_ITEMS <= total < 4 * N_ITEMS  # some overlap is allowed only while both were calling
