"""``POST /get_reward``'s opt-ins: the rule hook (labels), ``?scores=sigmoid``, and their errors."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.common.errors import INTERNAL_MESSAGE
from services.reward.engine.service import RewardEngine
from services.reward.settings import RewardSettings
from services.reward.transports.http import create_http_app
from services.reward.transports.openrlhf import load_rule, response_of
from services.runtime.backends.fake import FakeBackend, fake_score
from tests.support.errors import assert_error

seen_calls: list[dict[str, Any]] = []


def recording_rule(*, query: str, prompt: Any, label: Any, response: str) -> float:
    seen_calls.append({"query": query, "prompt": prompt, "label": label, "response": response})
    return float(len(response)) if label == "len" else 0.0


def raising_rule(**_: Any) -> float:
    raise ZeroDivisionError("boom")


def nan_rule(**_: Any) -> float:
    return math.nan


async def client_for(**settings: Any) -> tuple[httpx.AsyncClient, RewardEngine, FakeBackend]:
    backend = FakeBackend(max_length=64)
    cfg = RewardSettings.model_validate({"max_wait_ms": 1.0, **settings})
    engine = RewardEngine(lambda: backend, cfg.engine_config())
    await engine.start()
    app = create_http_app(engine, cfg, api_key=None)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rm"), engine, backend


@pytest.fixture
async def ruled() -> AsyncIterator[tuple[httpx.AsyncClient, FakeBackend]]:
    client, engine, backend = await client_for(openrlhf_rule=f"{__name__}:recording_rule", openrlhf_rm_weight=2.0)
    yield client, backend
    await client.aclose()
    await engine.stop()


def rm(backend: FakeBackend, text: str) -> float:
    from services.runtime.items import RewardInput

    return fake_score(backend.encode([RewardInput(text=text)])[0].input_ids)


async def test_rule_sees_each_sample_and_mixes_into_the_reward(ruled: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, backend = ruled
    seen_calls.clear()
    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "other prompt"]
    queries = [prompts[0] + "hello<|im_end|>", "does not start with its prompt"]
    r = await client.post("/get_reward", json={"query": queries, "prompts": prompts, "labels": ["len", 7]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert seen_calls == [
        {"query": queries[0], "prompt": prompts[0], "label": "len", "response": "hello<|im_end|>"},
        {"query": queries[1], "prompt": prompts[1], "label": 7, "response": queries[1]},
    ]
    want_rm = [rm(backend, q) for q in queries]
    assert body["extra_logs"]["rm_score"] == want_rm
    assert body["extra_logs"]["rule_reward"] == [15.0, 0.0]
    assert body["rewards"] == [2.0 * want_rm[0] + 15.0, 2.0 * want_rm[1]]
    assert body["scores"] == body["rewards"]


async def test_scores_query_parameter(ruled: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, _ = ruled
    payload = {"query": ["a b c"], "labels": [None]}
    raw = (await client.post("/get_reward?scores=raw", json=payload)).json()
    sig = (await client.post("/get_reward?scores=sigmoid", json=payload)).json()
    assert sig["rewards"] == raw["rewards"]  # rewards always raw
    assert sig["scores"] == pytest.approx([1 / (1 + math.exp(-raw["rewards"][0]))], abs=1e-12)
    assert 0.0 < sig["scores"][0] < 1.0
    bad = await client.post("/get_reward?scores=tanh", json=payload)
    assert_error(bad, 400, "INVALID_ARGUMENT")
    assert "raw, sigmoid" in bad.json()["error"]["message"]


async def test_server_wide_sigmoid_and_huge_rewards() -> None:
    client, engine, _ = await client_for(openrlhf_scores="sigmoid", openrlhf_rule=f"{__name__}:recording_rule")
    try:
        body = (await client.post("/get_reward", json={"query": ["x" * 60], "labels": ["len"]})).json()
        assert body["rewards"][0] > 50 and body["scores"] == [1.0]  # no overflow for a big reward
        raw = (await client.post("/get_reward?scores=raw", json={"query": ["x"], "labels": [None]})).json()
        assert raw["scores"] == raw["rewards"]
    finally:
        await client.aclose()
        await engine.stop()


async def test_labels_must_line_up_with_queries_when_a_rule_needs_them(
    ruled: tuple[httpx.AsyncClient, FakeBackend],
) -> None:
    client, _ = ruled
    r = await client.post("/get_reward", json={"query": ["a", "b"], "labels": ["x"]})
    assert_error(r, 400, "INVALID_ARGUMENT")
    assert "labels has 1 entries but query has 2" in r.json()["error"]["message"]
    ok = await client.post("/get_reward", json={"query": ["a", "b"]})  # no labels at all: the rule sees None
    assert ok.status_code == 200


@pytest.mark.parametrize(("rule", "what"), [("raising_rule", "raised ZeroDivisionError: boom"), ("nan_rule", "nan")])
async def test_a_broken_rule_fails_the_request_never_a_guess(
    rule: str, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, engine, _ = await client_for(openrlhf_rule=f"{__name__}:{rule}")
    try:
        r = await client.post("/get_reward", json={"query": ["a"], "labels": ["x"]})
        err = assert_error(r, 500, "INTERNAL", item=0)  # 5xx: OpenRLHF retries, then logs "no reward"
        assert err["message"] == INTERNAL_MESSAGE  # the details are for the operator's log
        assert f"the rule {__name__}:{rule}" in caplog.text and what in caplog.text
    finally:
        await client.aclose()
        await engine.stop()


def test_a_bad_rule_spec_fails_at_start_up() -> None:
    with pytest.raises(ValueError, match="module:function"):
        load_rule("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_rule("no.such.module_here:f")
    with pytest.raises(ValueError, match="has no function"):
        load_rule(f"{__name__}:missing")
    assert load_rule("clients.integrations.rules:exact_match").__name__ == "exact_match"


def test_response_of() -> None:
    assert response_of("PROMPTanswer", "PROMPT") == "answer"
    assert response_of("answer", None) == "answer"
    assert response_of("answer", "") == "answer"
