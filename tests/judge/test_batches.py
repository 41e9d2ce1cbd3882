"""Batch jobs of the judge (``POST /v1/batches``): the real ``openai`` / ``anthropic`` SDKs against the
batch stand-ins (:mod:`tests.support.fakes.batches`), the engine and its HTTP routes in process.

What a job must do: judge exactly the queries the interactive routes would make, through the
provider's batch endpoint, into the verdict cache, at half the price; resubmit only failed and
expired requests; never create a provider batch twice (idempotency keys, restarts, a crash between
creating a batch and recording it).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.judge.backends.base import JudgeBackend
from services.judge.backends.factory import build_backend
from services.judge.backends.scripted import ScriptedBackend
from services.judge.engine.batches import BatchManager
from services.judge.engine.cache import JudgeCache
from services.judge.engine.service import JudgeEngine
from services.judge.metrics import JudgeMetrics
from services.judge.settings import JudgeSettings
from services.judge.transports.http import create_http_app
from tests.support.fakes import FakeAnthropic, FakeOpenAI, PolicyInput
from tests.support.fakes.batches import BatchScript, FakeAnthropicBatches, FakeOpenAIBatches

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku-latest"}


def hashed_policy(req: PolicyInput) -> dict[str, float]:
    """A soft, content-dependent belief: P(A) from a hash of what the judge reads (never 0.5 exactly)."""
    h = int(hashlib.sha256(req.text.encode()).hexdigest()[:6], 16) / 0xFFFFFF
    p = 0.05 + 0.9 * h
    return {req.choices[0]: p, **{c: (1 - p) / (len(req.choices) - 1) for c in req.choices[1:]}}


def fake_for(provider: str, script: BatchScript | None = None) -> Any:
    if provider == "openai":
        return FakeOpenAIBatches(policy=hashed_policy, batch_script=script)
    return FakeAnthropicBatches(policy=hashed_policy, batch_script=script)


def plain_fake(provider: str) -> Any:
    return FakeOpenAI(policy=hashed_policy) if provider == "openai" else FakeAnthropic(policy=hashed_policy)


def settings_for(provider: str, fake: Any, cache: Path | str, **kw: Any) -> JudgeSettings:
    base: dict[str, Any] = {
        "backend": provider, "model": MODELS[provider], "base_url": fake.base_url, "cache": str(cache),
        "max_retries": 0, "max_parse_retries": 0, "batch_poll_s": 0.02,
    }  # fmt: skip
    return JudgeSettings.model_validate({**base, **kw})


def backend_for(settings: JudgeSettings) -> JudgeBackend:
    return build_backend(settings.backend, api_key="sk-test", **settings.backend_options())


@asynccontextmanager
async def judge_app(
    settings: JudgeSettings, backend: Callable[[], JudgeBackend] | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, JudgeEngine]]:
    path = settings.cache_path()
    cache = JudgeCache(path) if path is not None else None
    engine = JudgeEngine(backend or (lambda: backend_for(settings)), settings.engine_config(), cache=cache,
                         metrics=JudgeMetrics())  # fmt: skip
    app = create_http_app(engine, settings, api_key=None)
    await engine.start()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://judge.test", timeout=30)
    try:
        yield client, engine
    finally:
        await client.aclose()
        manager: BatchManager | None = app.state.batches
        if manager is not None:
            await manager.aclose()
        await engine.stop()


def pairs(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"Question {i}: what is {i} + {i}?", "responses": [f"It is {2 * i}.", f"Maybe {2 * i + 1}."]}
            for i in range(n)]  # fmt: skip


async def wait_job(client: httpx.AsyncClient, job: str, timeout: float = 60) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await client.get(f"/v1/batches/{job}")
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] == "completed":
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.02)


async def interactive(client: httpx.AsyncClient, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for body in requests:
        r = await client.post("/v1/compare", json=body)
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def label_fields(results: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["preference"], r["winner"], r["consistent"], r["soft"]) for r in results]


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_batch_fills_the_cache_with_the_interactive_verdicts_at_half_price(provider: str, tmp_path: Path) -> None:
    """60 pairs (120 verdict queries, both orders) in provider batches of at most 50 requests; the
    second batch expires with half its requests done and 5% of requests fail once. Every query ends
    in the cache, only failed or expired requests are submitted again, no batch is created twice,
    and the interactive answers afterwards are cached, call no provider and equal those of a plain
    interactive judge (same replies) at twice the cost."""
    reqs = pairs(60)
    script = BatchScript(expire={1}, fail_rate=0.05)
    with plain_fake(provider) as ref_fake:
        async with judge_app(settings_for(provider, ref_fake, tmp_path / "ref.sqlite")) as (client, _):
            want = await interactive(client, reqs)
        assert len(ref_fake.calls) == 120
    with fake_for(provider, script) as fake:
        settings = settings_for(provider, fake, tmp_path / "cache.sqlite", batch_max_requests=50)
        async with judge_app(settings) as (client, engine):
            r = await client.post(
                "/v1/batches", json={"idempotency_key": "k1", "requests": [{"compare": b} for b in reqs]}
            )
            assert r.status_code == 200, r.text
            job = await wait_job(client, r.json()["id"])
            assert job["queries"] == {"total": 120, "cached": 0, "pending": 0, "submitted": 0, "done": 120, "failed": 0}
            assert engine.cache is not None and len(engine.cache) == 120
            # Every batch created once; a request went again only after it failed or expired.
            assert len(set(fake.creates)) == len(fake.creates) == len(job["provider_batches"])
            resubmitted = {cid: n for cid, n in fake.batch_requests.items() if n > 1}
            # (an expired request can fail once more when resubmitted: three submissions, within the 3 allowed)
            assert 25 <= len(resubmitted) < 120 and set(resubmitted.values()) <= {2, 3}
            expired_then = sum(1 for r in fake._batches[fake.creates[1]].results if r.get("expired"))
            assert expired_then == 25  # half of the second batch of 50
            assert job["usage"]["requests_submitted"] == sum(fake.batch_requests.values())
            # Same key again: the same job, nothing new at the provider.
            creates = len(fake.creates)
            again = await client.post("/v1/batches", json={"idempotency_key": "k1", "requests": [{"compare": reqs[0]}]})
            assert again.json()["id"] == job["id"] and len(fake.creates) == creates

            got = await interactive(client, reqs)
            assert fake.calls == []  # no interactive provider call
            assert all(g["cached"] for g in got)
            assert label_fields(got) == label_fields(want)
            # Half the interactive price, for the same tokens.
            want_cost = sum(w["usage"]["cost_usd"] for w in want)
            assert want_cost > 0
            assert job["usage"]["interactive_cost_usd"] == pytest.approx(want_cost, rel=1e-9)
            assert job["usage"]["cost_usd"] == pytest.approx(want_cost / 2, rel=1e-9)
            # A second job over the same requests finds everything cached: no batch at all.
            r2 = await client.post(
                "/v1/batches", json={"idempotency_key": "k2", "requests": [{"compare": b} for b in reqs]}
            )
            assert r2.json()["status"] == "completed" and r2.json()["queries"]["cached"] == 120
            assert len(fake.creates) == creates


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "body", "queries", "choices"), [
    ("rank", {"prompt": "Name a colour.", "responses": ["red", "car", "blue"]}, 6, None),
    ("grade", {"prompt": "Name a colour.", "response": "red", "scale": [1, 5]}, 1, ("1", "2", "3", "4", "5")),
])  # fmt: skip
async def test_rank_and_grade_requests_are_collected_like_the_routes(
    kind: str, body: dict[str, Any], queries: int, choices: Any, tmp_path: Path
) -> None:
    """A rank of 3 responses is 3 pairs x 2 orders, a grade one query; afterwards the route is answered
    from the cache, with no provider call."""
    with FakeOpenAIBatches(policy=hashed_policy, choices=choices) as fake:
        async with judge_app(settings_for("openai", fake, tmp_path / "c.sqlite")) as (client, _):
            r = await client.post("/v1/batches", json={"idempotency_key": kind, "requests": [{kind: body}]})
            job = await wait_job(client, r.json()["id"])
            assert job["queries"]["done"] == queries == job["queries"]["total"]
            answer = (await client.post(f"/v1/{kind}", json=body)).json()
            assert answer["cached"] and fake.calls == []


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_restarted_service_polls_the_batches_it_created(provider: str, tmp_path: Path) -> None:
    """The service stops while its batches are in progress; the next one (same cache and store) polls
    them to the end and creates none."""
    script = BatchScript()
    script.hold.set()
    with fake_for(provider, script) as fake:
        settings = settings_for(provider, fake, tmp_path / "c.sqlite", batch_max_requests=10)
        async with judge_app(settings) as (client, _):
            r = await client.post(
                "/v1/batches", json={"idempotency_key": "x", "requests": [{"compare": b} for b in pairs(20)]}
            )
            job = r.json()["id"]
            while len(fake.creates) < 4:
                await asyncio.sleep(0.01)
        assert len(fake.creates) == 4
        script.hold.clear()
        async with judge_app(settings) as (client, engine):
            done = await wait_job(client, job)
            assert done["queries"]["done"] == 40 and len(fake.creates) == 4
            assert engine.cache is not None and len(engine.cache) == 40


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_batch_created_just_before_a_crash_is_found_not_created_again(
    provider: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The create answered but the service died before recording the batch id: on restart the intent
    is reconciled with the provider's list (OpenAI: our chunk id in metadata; Anthropic: the one new
    batch with that many requests)."""
    from services.judge.engine.batch_store import BatchStore

    class Crash(Exception):
        pass

    def crash(self: BatchStore, chunk: str, batch_id: str) -> None:
        raise Crash(batch_id)

    script = BatchScript()
    script.hold.set()
    with fake_for(provider, script) as fake:
        settings = settings_for(provider, fake, tmp_path / "c.sqlite")
        with monkeypatch.context() as m:
            m.setattr(BatchStore, "set_submitted", crash)
            async with judge_app(settings) as (client, _):
                r = await client.post(
                    "/v1/batches", json={"idempotency_key": "y", "requests": [{"compare": b} for b in pairs(5)]}
                )
                job = r.json()["id"]
                while not fake.creates:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)
        assert len(fake.creates) == 1
        script.hold.clear()
        async with judge_app(settings) as (client, _):
            done = await wait_job(client, job)
            assert done["queries"]["done"] == 10
            assert len(fake.creates) == 1 and done["provider_batches"][0]["id"] == fake.creates[0]


@pytest.mark.slow
async def test_requests_that_keep_failing_are_reported_with_their_reason(tmp_path: Path) -> None:
    """--batch-max-attempts 1: the 5% that fail once are failed, with the provider's reason; the rest are done."""
    with FakeOpenAIBatches(policy=hashed_policy, batch_script=BatchScript(fail_rate=0.05)) as fake:
        settings = settings_for("openai", fake, tmp_path / "c.sqlite", batch_max_attempts=1)
        async with judge_app(settings) as (client, _):
            r = await client.post(
                "/v1/batches", json={"idempotency_key": "f", "requests": [{"compare": b} for b in pairs(100)]}
            )
            job = await wait_job(client, r.json()["id"])
            q = job["queries"]
            assert q["failed"] > 0 and q["done"] + q["failed"] == 200
            assert job["failures"] == [{"reason": "openai batch: HTTP 500: fake server error (after 1 submissions)",
                                        "count": q["failed"]}]  # fmt: skip


async def test_no_batch_api_without_a_cache_or_for_other_backends(tmp_path: Path) -> None:
    settings = JudgeSettings.model_validate({"cache": "off", "max_retries": 0})
    async with judge_app(settings, lambda: ScriptedBackend()) as (client, _):
        r = await client.post("/v1/batches", json={"idempotency_key": "a", "requests": [{"compare": pairs(1)[0]}]})
        assert r.status_code == 400 and "--cache off" in r.json()["error"]["message"]
    settings = JudgeSettings.model_validate({"cache": str(tmp_path / "c.sqlite"), "max_retries": 0})
    async with judge_app(settings, lambda: ScriptedBackend()) as (client, _):
        r = await client.post("/v1/batches", json={"idempotency_key": "a", "requests": [{"compare": pairs(1)[0]}]})
        assert r.status_code == 400, r.text
        assert r.json()["error"] == {
            "code": "INVALID_ARGUMENT",
            "message": "no batch API: the scripted backend has no provider batch API (openai and anthropic have)",
        }
        r = await client.get("/v1/batches/batch_nope")
        assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"
        r = await client.post("/v1/batches", json={"idempotency_key": "a", "requests": [{"compare": pairs(1)[0],
                                                                                       "grade": {}}]})  # fmt: skip
        assert r.status_code == 422 and r.json()["error"]["item"] == 0
