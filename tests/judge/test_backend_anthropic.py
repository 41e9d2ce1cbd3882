"""The anthropic backend through the real ``anthropic`` SDK against a fake Messages server."""

from __future__ import annotations

import time

import pytest

from services.judge.backends.anthropic_backend import AnthropicBackend, verbalised_probs
from services.judge.backends.base import UnparseableReply, UpstreamError
from services.judge.backends.factory import BackendConfigError, build_backend
from services.judge.types import VerdictQuery
from services.runtime.chat import ChatMessage
from tests.support.fakes import FakeAnthropic, HttpError, RateLimit, Reply, Sleep, always_better, fixed

AB = ("A", "B")


def q(text: str = "Which is better?", *, rationale: bool = False, choices: tuple[str, ...] = AB) -> VerdictQuery:
    return VerdictQuery(
        messages=(ChatMessage("system", "You judge."), ChatMessage("user", text)),
        choices=choices,
        rationale=rationale,
        max_tokens=256 if rationale else 4,
    )


def make(srv: FakeAnthropic, **kw: object) -> AnthropicBackend:
    kw.setdefault("timeout_s", 2.0)
    return AnthropicBackend("claude-fake", base_url=srv.base_url, api_key="sk-ant-test", **kw)  # type: ignore[arg-type]


@pytest.mark.slow  # ~1 s
async def test_verbalised_probability() -> None:
    with FakeAnthropic(policy=fixed({"A": 0.2, "B": 0.8})) as srv:
        backend = make(srv)
        reply = await backend.verdict(q())
        await backend.aclose()
        body = srv.calls[0].body
    assert reply.soft and reply.choice == "B"
    assert reply.probs == pytest.approx({"A": 0.2, "B": 0.8})
    assert reply.usage.calls == 1 and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    assert body["model"] == "claude-fake" and body["system"] == "You judge."
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert '"probability"' in body["messages"][-1]["content"] and body["max_tokens"] >= 64
    assert "temperature" not in body  # provider default unless set
    assert backend.sampling_key()["soft_labels"] == "verbalised probability"


@pytest.mark.slow  # 1-1.5 s
async def test_verbalised_with_rationale() -> None:
    with FakeAnthropic(policy=always_better()) as srv:
        backend = make(srv)
        reply = await backend.verdict(q("A: [BAD]\nB: [GOOD]", rationale=True))
        await backend.aclose()
    assert reply.choice == "B" and reply.rationale and reply.soft
    assert reply.probs == pytest.approx({"A": 0.1, "B": 0.9})


@pytest.mark.parametrize(
    ("text", "soft", "probs"),
    [
        ('{"verdict": "A", "probability": 0.7}', True, {"A": 0.7, "B": 0.3}),
        ('```json\n{"verdict": "B", "probability": "85%"}\n```', True, {"A": 0.15, "B": 0.85}),
        ('Sure. {"verdict": "A", "probability": 80}', True, {"A": 0.8, "B": 0.2}),
        ('{"verdict": "A"}', False, None),
        ('{"verdict": "A", "probability": "very"}', False, None),
    ],
)
async def test_verbalised_reply_forms(text: str, soft: bool, probs: dict[str, float] | None) -> None:
    with FakeAnthropic(script=[Reply(text)]) as srv:
        backend = make(srv)
        reply = await backend.verdict(q())
        await backend.aclose()
    assert reply.soft is soft and reply.raw == text
    if probs is None:
        assert reply.probs is None and reply.choice == "A"
    else:
        assert reply.probs == pytest.approx(probs)


@pytest.mark.parametrize("text", ["garbage", '{"verdict": "C", "probability": 0.9}', '{"verdict": '])
async def test_unparseable_verbalised_reply(text: str) -> None:
    with FakeAnthropic(script=[Reply(text)]) as srv:
        backend = make(srv)
        with pytest.raises(UnparseableReply):
            await backend.verdict(q())
        await backend.aclose()


def test_verbalised_probs_three_choices() -> None:
    assert verbalised_probs("2", 0.6, ("1", "2", "3")) == pytest.approx({"1": 0.2, "2": 0.6, "3": 0.2})


async def test_k_samples_vote_shares() -> None:
    with FakeAnthropic(policy=fixed({"A": 0.7, "B": 0.3}), seed=3) as srv:
        backend = make(srv, mode="samples", samples=40, temperature=1.0)
        reply = await backend.verdict(q())
        await backend.aclose()
        calls = srv.calls
    assert len(calls) == 40 and all(c.body["temperature"] == 1.0 for c in calls)
    assert all('"probability"' not in c.body["messages"][-1]["content"] for c in calls)  # the template's own question
    assert reply.soft and reply.probs is not None
    assert sum(reply.probs.values()) == pytest.approx(1.0)
    assert all(round(p * 40) == pytest.approx(p * 40) for p in reply.probs.values())  # vote shares
    assert 0.5 < reply.probs["A"] < 0.9 and reply.choice == "A"
    assert reply.usage.calls == 40
    assert backend.calls_per_verdict == 40
    key = backend.sampling_key()
    assert key["mode"] == "samples" and key["samples"] == 40 and key["soft_labels"] == "k samples"


async def test_k_samples_with_rationale() -> None:
    with FakeAnthropic(policy=always_better()) as srv:
        backend = make(srv, mode="samples", samples=3)
        reply = await backend.verdict(q("A: [GOOD]\nB: [BAD]", rationale=True))
        await backend.aclose()
    assert reply.probs == {"A": 1.0, "B": 0.0} and reply.rationale  # JSON verdicts are the argmax


async def test_k_samples_mostly_unparseable() -> None:
    with FakeAnthropic(script=[Reply("hmm"), Reply("no idea"), Reply("A")]) as srv:
        backend = make(srv, mode="samples", samples=3)
        with pytest.raises(UnparseableReply, match="1 of 3"):
            await backend.verdict(q())
        await backend.aclose()


async def test_k_samples_one_failure_fails_the_verdict() -> None:
    with FakeAnthropic(script=[Sleep(0.2, then=HttpError(529))]) as srv:
        backend = make(srv, mode="samples", samples=3)
        with pytest.raises(UpstreamError) as info:
            await backend.verdict(q())
        await backend.aclose()
    assert info.value.retryable and info.value.status == 529


async def test_rate_limit_with_retry_after() -> None:
    with FakeAnthropic(script=[RateLimit(retry_after=2.5)]) as srv:
        backend = make(srv)
        with pytest.raises(UpstreamError) as info:
            await backend.verdict(q())
        ok = await backend.verdict(q())
        await backend.aclose()
        assert [c.status for c in srv.calls] == [429, 200]  # the SDK did not retry
    assert info.value.rate_limited and info.value.retryable and info.value.retry_after == pytest.approx(2.5)
    assert ok.choice == "A"


async def test_rate_limit_reset_header_only() -> None:
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 20))
    headers = {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": reset}
    with FakeAnthropic(script=[RateLimit(retry_after=None, headers=headers)]) as srv:
        backend = make(srv)
        with pytest.raises(UpstreamError) as info:
            await backend.verdict(q())
        await backend.aclose()
    assert info.value.retry_after is not None and 15 < info.value.retry_after <= 20


@pytest.mark.parametrize(("status", "retryable"), [(529, True), (500, True), (503, True), (408, True),
                                                   (400, False), (401, False), (403, False), (404, False)])  # fmt: skip
async def test_status_mapping(status: int, retryable: bool) -> None:
    with FakeAnthropic(script=[HttpError(status)]) as srv:
        backend = make(srv)
        with pytest.raises(UpstreamError) as info:
            await backend.verdict(q())
        await backend.aclose()
        assert len(srv.calls) == 1
    assert info.value.status == status and info.value.retryable is retryable


async def test_timeout_is_retryable() -> None:
    with FakeAnthropic(script=[Sleep(5.0)]) as srv:
        backend = make(srv, timeout_s=0.3)
        with pytest.raises(UpstreamError) as info:
            await backend.verdict(q())
        await backend.aclose()
    assert info.value.retryable and info.value.status is None


def test_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-env")
    backend = build_backend("anthropic", model="claude-x", soft_mode="samples", samples=7)
    assert isinstance(backend, AnthropicBackend)
    assert backend.info.backend == "anthropic" and backend.mode == "samples" and backend.samples == 7
    with pytest.raises(BackendConfigError, match="--model"):
        build_backend("anthropic")
    with pytest.raises(ValueError, match="mode"):
        AnthropicBackend("m", api_key="k", mode="telepathy")  # type: ignore[arg-type]
