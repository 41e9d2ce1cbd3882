"""The openai / openai-compatible backends through the real ``openai`` SDK against a fake server."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.judge.backends._common import parse_choice, retry_after_from_headers
from services.judge.backends.base import UnparseableReply, UpstreamError
from services.judge.backends.factory import BackendConfigError, build_backend
from services.judge.backends.openai_backend import (
    OpenAIBackend,
    choice_probs,
    first_verdict_probs,
    reply_from_completion,
    structured_verdict_probs,
)
from services.judge.types import VerdictQuery
from services.runtime.chat import ChatMessage
from tests.support.fakes import (
    FakeOpenAI,
    HttpError,
    RateLimit,
    Reply,
    Sleep,
    always_better,
    always_first,
    fixed,
    random_faults,
)

AB = ("A", "B")


def q(text: str = "Which is better?", *, rationale: bool = False, choices: tuple[str, ...] = AB) -> VerdictQuery:
    return VerdictQuery(
        messages=(ChatMessage("system", "You judge."), ChatMessage("user", text)),
        choices=choices,
        rationale=rationale,
        max_tokens=256 if rationale else 4,
    )


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(policy=fixed({"A": 0.7, "B": 0.3})) as srv:
        yield srv


def make(srv: FakeOpenAI, **kw: object) -> OpenAIBackend:
    kw.setdefault("timeout_s", 2.0)
    return OpenAIBackend("gpt-fake-1", base_url=srv.base_url, api_key="sk-test", **kw)  # type: ignore[arg-type]


# -- soft labels ----------------------------------------------------------------------------------


async def test_both_letters_in_top_logprobs_give_the_policy_distribution(fake: FakeOpenAI) -> None:
    backend = make(fake)
    reply = await backend.verdict(q())
    await backend.aclose()
    assert reply.soft and reply.choice == "A" and reply.raw == "A"
    assert reply.probs is not None
    assert reply.probs["A"] == pytest.approx(0.7, abs=1e-6)
    assert reply.probs["B"] == pytest.approx(0.3, abs=1e-6)
    assert reply.usage.calls == 1 and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens == 1
    body = fake.calls[0].body
    assert body["model"] == "gpt-fake-1"  # passed through as is
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["temperature"] == 0.0
    assert body["max_tokens"] == 4  # openai-compatible sends max_tokens
    assert "response_format" not in body


async def test_one_letter_shown_bounds_the_other_by_the_smallest_logprob() -> None:
    with FakeOpenAI(policy=always_first, logprobs="one", confidence=0.9) as srv:
        backend = make(srv, top_logprobs=5)
        reply = await backend.verdict(q())
        await backend.aclose()
    assert reply.soft and reply.choice == "A" and reply.probs is not None
    # The fake shows "A" (0.882) and four fillers halving below it; "B" gets the smallest.
    assert 0.9 < reply.probs["A"] < 1.0
    assert reply.probs["A"] + reply.probs["B"] == pytest.approx(1.0)


def test_no_letter_in_top_logprobs_falls_back_to_the_parsed_hard_label() -> None:
    # The verdict token merged with a parenthesis: no position shows a bare choice.
    top = [SimpleNamespace(token="(B", logprob=-0.1), SimpleNamespace(token="(A", logprob=-2.4)]
    position = SimpleNamespace(token="(B", logprob=-0.1, top_logprobs=top)
    completion = SimpleNamespace(
        choices=[
            SimpleNamespace(
                message=SimpleNamespace(content="(B)", refusal=None), logprobs=SimpleNamespace(content=[position])
            )
        ],
        usage=None,
    )
    reply = reply_from_completion(completion, q())
    assert not reply.soft and reply.probs is None and reply.choice == "B"
    assert reply.usage.calls == 1


async def test_no_logprobs_at_all_parses_the_text() -> None:
    with FakeOpenAI(policy=always_first, logprobs="none") as srv:
        backend = make(srv)
        reply = await backend.verdict(q())
        await backend.aclose()
    assert not reply.soft and reply.probs is None and reply.choice == "A"


async def test_always_better_policy_follows_the_marker() -> None:
    with FakeOpenAI(policy=always_better()) as srv:
        backend = make(srv)
        first = await backend.verdict(q("A: [GOOD] yes\nB: [BAD] no"))
        second = await backend.verdict(q("A: [BAD] no\nB: [GOOD] yes"))
        await backend.aclose()
    assert first.choice == "A" and second.choice == "B"
    assert first.probs is not None and first.probs["A"] == pytest.approx(0.9, abs=1e-6)


async def test_structured_rationale_reads_the_verdict_token(fake: FakeOpenAI) -> None:
    backend = make(fake)
    reply = await backend.verdict(q(rationale=True))
    await backend.aclose()
    assert reply.soft and reply.choice == "A" and reply.rationale and "A" in reply.rationale
    assert reply.probs is not None and reply.probs["A"] == pytest.approx(0.7, abs=1e-6)
    fmt = fake.calls[0].body["response_format"]
    assert fmt["type"] == "json_schema"
    schema = fmt["json_schema"]["schema"]
    assert list(schema["properties"]) == ["rationale", "verdict"]
    assert schema["properties"]["verdict"]["enum"] == ["A", "B"]


async def test_structured_rationale_without_logprobs_is_hard() -> None:
    with FakeOpenAI(policy=always_first, logprobs="none") as srv:
        backend = make(srv)
        reply = await backend.verdict(q(rationale=True))
        await backend.aclose()
    assert not reply.soft and reply.probs is None and reply.choice == "A" and reply.rationale


def test_logprob_rules_directly() -> None:
    # duplicates summed, whitespace stripped
    probs = choice_probs([("A", math.log(0.4)), (" A", math.log(0.2)), ("B", math.log(0.2))], AB)
    assert probs == pytest.approx({"A": 0.75, "B": 0.25})
    # one shown: the other bounded by the smallest shown logprob
    probs = choice_probs([("A", math.log(0.6)), ("The", math.log(0.1)), ("**", math.log(0.05))], AB)
    assert probs == pytest.approx({"A": 0.6 / 0.65, "B": 0.05 / 0.65})
    assert choice_probs([("The", -1.0)], AB) is None
    # a JSON quote merged into the verdict token
    probs = choice_probs([('"A', math.log(0.5)), ('"B', math.log(0.5))], AB, prefix='"')
    assert probs == pytest.approx({"A": 0.5, "B": 0.5})

    def pos(token: str, *alts: tuple[str, float]) -> SimpleNamespace:
        return SimpleNamespace(
            token=token,
            logprob=alts[0][1] if alts else 0.0,
            top_logprobs=[SimpleNamespace(token=t, logprob=lp) for t, lp in alts],
        )

    content = [pos("**"), pos("B", ("B", math.log(0.8)), ("A", math.log(0.2))), pos("**")]
    assert first_verdict_probs(content, AB) == pytest.approx({"A": 0.2, "B": 0.8})
    content = [
        pos('{"'),
        pos("verdict"),
        pos('":'),
        pos(' "B', (' "B', math.log(0.6)), (' "A', math.log(0.3))),
        pos('"}'),
    ]
    assert structured_verdict_probs(content, AB) == pytest.approx({"A": 1 / 3, "B": 2 / 3})


def test_parse_choice() -> None:
    assert parse_choice("A", AB) == "A"
    assert parse_choice(" **B**\n", AB) == "B"
    assert parse_choice("(A).", AB) == "A"
    assert parse_choice("B. Because it is right.", AB) == "B"
    assert parse_choice("After thinking, my verdict: B", AB) == "B"
    assert parse_choice("Final answer: **A**", AB) == "A"
    assert parse_choice("A good answer would mention Paris.", AB) is None
    assert parse_choice("I cannot decide.", AB) is None
    assert parse_choice("4", ("1", "2", "3", "4", "5")) == "4"


# -- errors -----------------------------------------------------------------------------------------


async def test_429_is_retryable_with_retry_after() -> None:
    with FakeOpenAI(script=[RateLimit(retry_after=1.5), RateLimit(retry_after=None, retry_after_ms=250)]) as srv:
        backend = make(srv)
        with pytest.raises(UpstreamError) as first:
            await backend.verdict(q())
        with pytest.raises(UpstreamError) as second:
            await backend.verdict(q())
        ok = await backend.verdict(q())  # the script is spent: answers again
        await backend.aclose()
        assert [c.status for c in srv.calls] == [429, 429, 200]  # no SDK retries
    for err in (first.value, second.value):
        assert err.retryable and err.rate_limited and err.status == 429
    assert first.value.retry_after == pytest.approx(1.5)
    assert second.value.retry_after == pytest.approx(0.25)
    assert ok.choice == "A"


async def test_429_with_only_rate_limit_reset_headers() -> None:
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s",
               "x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "20ms"}  # fmt: skip
    with FakeOpenAI(script=[RateLimit(retry_after=None, headers=headers)]) as srv:
        backend = make(srv)
        with pytest.raises(UpstreamError) as info:
            await backend.verdict(q())
        await backend.aclose()
    assert info.value.rate_limited and info.value.retry_after == pytest.approx(360.0)


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (408, True), (409, True),
                                                   (400, False), (401, False), (403, False), (404, False)])  # fmt: skip
async def test_http_errors_map_to_retryable_or_not(status: int, retryable: bool) -> None:
    with FakeOpenAI(script=[HttpError(status)]) as srv:
        backend = make(srv)
        with pytest.raises(UpstreamError) as info:
            await backend.verdict(q())
        await backend.aclose()
        assert len(srv.calls) == 1
    assert info.value.status == status and info.value.retryable is retryable and not info.value.rate_limited


async def test_timeout_is_retryable() -> None:
    with FakeOpenAI(script=[Sleep(5.0)]) as srv:
        backend = make(srv, timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(UpstreamError) as info:
            await backend.verdict(q())
        assert time.monotonic() - started < 2.0
        await backend.aclose()
    assert info.value.retryable and info.value.status is None


async def test_slow_reply_within_the_timeout_succeeds() -> None:
    with FakeOpenAI(script=[Sleep(0.3)]) as srv:
        backend = make(srv, timeout_s=3.0)
        reply = await backend.verdict(q())
        await backend.aclose()
    assert reply.choice == "A"


async def test_connection_refused_is_retryable() -> None:
    with FakeOpenAI() as srv:
        url = srv.base_url
    backend = OpenAIBackend("m", base_url=url, api_key="k", timeout_s=1.0)
    with pytest.raises(UpstreamError) as info:
        await backend.verdict(q())
    await backend.aclose()
    assert info.value.retryable


@pytest.mark.parametrize("text", ["I refuse to choose.", "", "lorem ipsum dolor"])
async def test_garbage_is_unparseable(text: str) -> None:
    with FakeOpenAI(script=[Reply(text)]) as srv:
        backend = make(srv)
        with pytest.raises(UnparseableReply) as info:
            await backend.verdict(q())
        await backend.aclose()
    assert info.value.raw == text


@pytest.mark.parametrize("text", ['{"rationale": "x", "verdict": ', '{"rationale": "x", "verdict": "C"}', "A"])
async def test_invalid_structured_reply_is_unparseable(text: str) -> None:
    with FakeOpenAI(script=[Reply(text)]) as srv:
        backend = make(srv)
        with pytest.raises(UnparseableReply):
            await backend.verdict(q(rationale=True))
        await backend.aclose()


# -- configuration ------------------------------------------------------------------------------------


def test_retry_after_header_forms() -> None:
    assert retry_after_from_headers({"Retry-After": "2"}) == 2.0
    assert retry_after_from_headers({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_from_headers({"x-ratelimit-reset-tokens": "1m30s"}) == 90.0
    assert retry_after_from_headers({}) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < (retry_after_from_headers({"retry-after": date}) or 0) <= 30


def test_names_keys_and_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    compat = build_backend("openai-compatible", model="llama-3-8b", base_url="http://127.0.0.1:1/v1")
    assert compat.info.backend == "openai-compatible" and compat.info.model == "llama-3-8b"
    key = compat.sampling_key()
    assert key["model"] == "llama-3-8b" and key["temperature"] == 0.0 and key["top_logprobs"] == 20
    with pytest.raises(BackendConfigError, match="API key"):
        build_backend("openai", model="gpt-4o-mini")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    official = build_backend("openai", model="gpt-4o-mini")
    assert official.info.backend == "openai" and isinstance(official, OpenAIBackend)
    assert official.max_tokens_param == "max_completion_tokens"
    with pytest.raises(BackendConfigError, match="--model"):
        build_backend("openai")
    with pytest.raises(BackendConfigError, match="--base-url"):
        build_backend("openai-compatible", model="m")
    with pytest.raises(BackendConfigError, match="unknown"):
        build_backend("gemini", model="m")


async def test_official_backend_sends_max_completion_tokens() -> None:
    with FakeOpenAI() as srv:
        backend = OpenAIBackend("gpt-x", base_url=srv.base_url, api_key="k", name="openai", seed=7)
        assert backend.info.backend == "openai"
        await backend.verdict(q())
        await backend.aclose()
        body = srv.calls[0].body
    assert body["max_completion_tokens"] == 4 and "max_tokens" not in body and body["seed"] == 7


async def test_fake_random_faults_and_call_log() -> None:
    with FakeOpenAI(script=random_faults(0.5, [HttpError(500), RateLimit(retry_after=0.1)], seed=1)) as srv:
        backend = make(srv)
        outcomes: list[str | int | None] = []
        for _ in range(12):
            try:
                outcomes.append((await backend.verdict(q())).choice)
            except UpstreamError as err:
                assert err.retryable
                outcomes.append(err.status)
        await backend.aclose()
        calls = srv.calls
        srv.clear()
        assert srv.calls == []
    assert [c.status for c in calls] == [200 if o == "A" else o for o in outcomes]
    assert {200, 500, 429} <= {c.status for c in calls}
    assert all(a.t <= b.t for a, b in itertools.pairwise(calls))
    assert [c.index for c in calls] == list(range(12))


def test_local_factory_errors(tmp_path: Path) -> None:
    with pytest.raises(BackendConfigError, match="cannot load"):
        build_backend("local", model=str(tmp_path))
    with pytest.raises(BackendConfigError, match="base-url"):
        build_backend("local", base_url="http://x")
