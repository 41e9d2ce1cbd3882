"""HTTP transport of the reward service, in process (httpx ASGITransport) over the fake backend."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio

from services.common.errors import INTERNAL_MESSAGE
from services.reward.engine.results import Limits
from services.reward.engine.service import EngineConfig, RewardEngine
from services.reward.settings import RewardSettings
from services.reward.transports.http import create_http_app
from services.runtime.backends.fake import FakeBackend, fake_score
from services.runtime.batcher import BatcherConfig
from services.runtime.chat import ChatMessage
from services.runtime.items import RewardInput
from tests.support.errors import assert_error
from tests.support.waiting import wait_until

MAX_BODY = 2 * 2**20
MAX_ITEMS = 8
MAX_TEXT = 256 * 2**10


@dataclass
class Svc:
    engine: RewardEngine
    backend: FakeBackend
    gate: threading.Event
    client: httpx.AsyncClient
    app: Any

    def expected(self, item: RewardInput) -> float:
        return fake_score(self.backend.encode([item])[0].input_ids)

    def sample(self, name: str, **labels: str) -> float | None:
        return self.engine.metrics.registry.get_sample_value(name, labels)


Factory = Callable[..., Awaitable[Svc]]


@pytest_asyncio.fixture
async def make_svc() -> AsyncIterator[Factory]:
    made: list[Svc] = []

    async def make(
        *,
        api_key: str | None = None,
        num_labels: int = 1,
        max_queue_items: int = 64,
        max_batch_tokens: int = 4096,
        fail_when: Any = None,
        max_wait_ms: float = 1.0,
        start: bool = True,
    ) -> Svc:
        gate = threading.Event()
        gate.set()
        backend = FakeBackend(max_length=64, num_labels=num_labels, gate=gate, fail_when=fail_when)
        config = EngineConfig(
            batcher=BatcherConfig(
                max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, max_queue_items=max_queue_items
            ),
            limits=Limits(
                max_items_per_request=MAX_ITEMS,
                max_body_bytes=MAX_BODY,
                max_text_bytes=MAX_TEXT,
                max_batch_tokens=max_batch_tokens,
            ),
        )
        engine = RewardEngine(lambda: backend, config)
        settings = RewardSettings.model_validate(
            {
                "max_body_bytes": MAX_BODY,
                "max_items_per_request": MAX_ITEMS,
                "max_text_bytes": MAX_TEXT,
                "max_queue_items": max(max_queue_items, MAX_ITEMS),
                "max_batch_tokens": max_batch_tokens,
            }
        )
        app = create_http_app(engine, settings, api_key=api_key)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://reward.test")
        svc = Svc(engine, backend, gate, client, app)
        made.append(svc)
        if start:
            await engine.start()
        return svc

    yield make
    for svc in made:
        svc.gate.set()
        await svc.client.aclose()
        await svc.engine.stop()


@pytest_asyncio.fixture
async def svc(make_svc: Factory) -> Svc:
    return await make_svc()


# -- scoring -------------------------------------------------------------------------------------


async def test_score_equals_fake_model_for_every_item_form(svc: Svc) -> None:
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]
    wire = [
        {"text": "<|im_start|>user\nhi<|im_end|>\n"},
        {"prompt": "What is 2+2?", "response": " 4"},
        {"prompt": msgs, "response": "hello!"},
        {"messages": [*msgs, {"role": "assistant", "content": "hello!"}]},
    ]
    engine_items = [
        RewardInput(text="<|im_start|>user\nhi<|im_end|>\n"),
        RewardInput(prompt="What is 2+2?", response=" 4"),
        RewardInput(prompt=(ChatMessage("system", "be nice"), ChatMessage("user", "hi")), response="hello!"),
        RewardInput(
            messages=(ChatMessage("system", "be nice"), ChatMessage("user", "hi"), ChatMessage("assistant", "hello!"))
        ),
    ]
    r = await svc.client.post("/v1/score", json={"inputs": wire})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["model"] == {"id": "fake", "revision": "0" * 16}
    assert len(body["results"]) == 4
    for res, item in zip(body["results"], engine_items, strict=True):
        assert set(res) == {"score", "num_tokens", "truncated"}  # absent optionals omitted, not null
        assert res["score"] == svc.expected(item)
        assert res["num_tokens"] == svc.backend.encode([item])[0].num_tokens
        assert res["truncated"] is False


async def test_long_item_is_truncated_and_flagged(svc: Svc) -> None:
    r = await svc.client.post("/v1/score", json={"inputs": [{"prompt": "p" * 100, "response": "r" * 10}]})
    (res,) = r.json()["results"]
    assert res["truncated"] is True
    assert res["num_tokens"] == 64
    assert res["score"] == svc.expected(RewardInput(prompt="p" * 100, response="r" * 10))


async def test_vector_head_reports_every_output(make_svc: Factory) -> None:
    svc = await make_svc(num_labels=3)
    r = await svc.client.post("/v1/score", json={"inputs": [{"text": "abc"}], "priority": "batch"})
    (res,) = r.json()["results"]
    base = svc.expected(RewardInput(text="abc"))
    assert res["scores"] == pytest.approx([base, base + 1, base + 2], abs=1e-5)
    assert res["score"] == pytest.approx(base + 1, abs=1e-5)


async def test_normalize_adds_normalized_and_labels_the_model(svc: Svc) -> None:
    r = await svc.client.post("/v1/score", json={"inputs": [{"text": "a"}, {"text": "bb"}], "normalize": True})
    body = r.json()
    norm = body["model"]["normalization"]
    assert set(norm) == {"mean", "std", "source"} and norm["source"] == "running"
    for res, text in zip(body["results"], ["a", "bb"], strict=True):
        assert res["score"] == svc.expected(RewardInput(text=text))  # raw stays raw
        assert res["normalized"] == pytest.approx((res["score"] - norm["mean"]) / norm["std"])


async def test_runtime_failure_is_a_per_item_error(make_svc: Factory) -> None:
    svc = await make_svc(
        max_batch_tokens=40, fail_when=lambda batch: any(bytes(it.input_ids).startswith(b"FAIL") for it in batch)
    )
    items = [{"text": "FAIL" + "x" * 26}, {"text": "fine" + "y" * 26}]  # 30 tokens each: one per batch
    r = await svc.client.post("/v1/score", json={"inputs": items})
    assert r.status_code == 200, r.text
    bad, good = r.json()["results"]
    assert bad == {"error": {"code": "INTERNAL", "message": INTERNAL_MESSAGE}}
    assert good["score"] == svc.expected(RewardInput(text="fine" + "y" * 26))
    assert "fake backend failure" not in r.text


# -- compare -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["Tell me a joke.", [{"role": "user", "content": "Tell me a joke."}]])
async def test_compare_is_softmax_of_scores(svc: Svc, prompt: Any) -> None:
    responses = ["No.", "Why did the chicken cross the road?", "Knock knock."]
    r = await svc.client.post("/v1/compare", json={"prompt": prompt, "responses": responses})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "scores", "probabilities", "ranking"}
    engine_prompt = prompt if isinstance(prompt, str) else (ChatMessage("user", "Tell me a joke."),)
    expected = [svc.expected(RewardInput(prompt=engine_prompt, response=x)) for x in responses]
    assert body["scores"] == expected
    assert math.fsum(body["probabilities"]) == pytest.approx(1.0)
    top = max(expected)
    z = math.fsum(math.exp(s - top) for s in expected)
    assert body["probabilities"] == pytest.approx([math.exp(s - top) / z for s in expected])
    assert body["ranking"] == sorted(range(3), key=lambda i: -expected[i])


# -- OpenRLHF ------------------------------------------------------------------------------------


async def test_get_reward_speaks_openrlhf(svc: Svc) -> None:
    # What OpenRLHF's experience maker sends: batch_decode(..., skip_special_tokens=False) of
    # prompt + response, plus the prompts and labels (labels may be None).
    prompts = [
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n",
        "<|im_start|>user\n  Say hi <|im_end|>\n<|im_start|>assistant\n",
    ]
    queries = [prompts[0] + "4<|im_end|>\n", prompts[1] + " hi! <|im_end|>\n"]
    payload = {"query": queries, "prompts": prompts, "labels": ["4", None], "metas": [{}, {}]}
    r = await svc.client.post("/get_reward", json=payload, headers={"Content-Type": "application/json"})
    r.raise_for_status()
    body = r.json()
    assert set(body) == {"rewards", "scores", "extra_logs"}
    expected = [svc.expected(RewardInput(text=q)) for q in queries]  # verbatim, never stripped
    assert body["rewards"] == expected
    assert body["scores"] == expected
    assert expected[1] != svc.expected(RewardInput(text=queries[1].strip()))
    # OpenRLHF concatenates every extra log across chunks: numbers, one per query.
    assert body["extra_logs"], "extra_logs must be a non-empty dict"
    for values in body["extra_logs"].values():
        assert len(values) == len(queries) and all(isinstance(v, float) for v in values)
    assert body["extra_logs"]["rm_num_tokens"] == [float(min(64, len(q.encode()))) for q in queries]
    assert body["extra_logs"]["rm_truncated"] == [float(len(q.encode()) > 64) for q in queries]


async def test_get_reward_rejects_bad_queries(svc: Svc) -> None:
    r = await svc.client.post("/get_reward", json={"query": ["ok", 5]})
    assert_error(r, 422, "INVALID_ARGUMENT", item=1)
    r = await svc.client.post("/get_reward", json={"query": []})  # OpenRLHF 0.11.0's empty shards: 200
    assert r.status_code == 200 and r.json()["rewards"] == []
    r = await svc.client.post("/get_reward", json={"prompts": ["x"]})
    assert_error(r, 422, "INVALID_ARGUMENT")


async def test_get_reward_fails_whole_request_rather_than_zero_rewards(make_svc: Factory) -> None:
    svc = await make_svc(max_batch_tokens=40, fail_when=lambda b: any(bytes(i.input_ids).startswith(b"X") for i in b))
    r = await svc.client.post("/get_reward", json={"query": ["X" * 30, "y" * 30]})
    err = assert_error(r, 500, "INTERNAL", item=0)
    assert INTERNAL_MESSAGE in err["message"]


# -- models, health, metrics ---------------------------------------------------------------------


async def test_models_reports_model_and_limits(make_svc: Factory) -> None:
    svc = await make_svc(num_labels=2, start=False)
    assert_error(await svc.client.get("/v1/models"), 503, "UNAVAILABLE")
    await svc.engine.start()
    r = await svc.client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == "fake" and card["object"] == "model"
    for key, value in {
        "revision": "0" * 16,
        "architecture": "Fake",
        "backend": "fake",
        "dtype": "float32",
        "device": "cpu",
        "max_length": 64,
        "num_labels": 2,
        "label_names": ["LABEL_0", "LABEL_1"],
        "has_chat_template": False,
    }.items():
        assert card[key] == value, key
    assert card["limits"] == {
        "max_items_per_request": MAX_ITEMS,
        "max_body_bytes": MAX_BODY,
        "max_text_bytes": MAX_TEXT,
        "max_batch_tokens": 4096,
        "max_request_tokens": 4096,
    }


async def test_health_follows_the_engine_state(make_svc: Factory) -> None:
    svc = await make_svc(start=False)
    assert (await svc.client.get("/health/live")).status_code == 200
    assert_error(await svc.client.get("/health/ready"), 503, "UNAVAILABLE")
    assert_error(await svc.client.post("/v1/score", json={"inputs": [{"text": "a"}]}), 503, "UNAVAILABLE")
    await svc.engine.start()
    assert (await svc.client.get("/health/ready")).json()["status"] == "ready"
    assert (await svc.client.get("/health/live")).status_code == 200
    assert await svc.engine.drain(1.0)
    assert_error(await svc.client.get("/health/ready"), 503, "UNAVAILABLE")
    assert (await svc.client.get("/health/live")).status_code == 200
    assert_error(await svc.client.post("/v1/score", json={"inputs": [{"text": "a"}]}), 503, "UNAVAILABLE")
    await svc.engine.stop()
    assert_error(await svc.client.get("/health/live"), 503, "UNAVAILABLE")


async def test_metrics_exports_queue_depth_and_requests(svc: Svc) -> None:
    await svc.client.post("/v1/score", json={"inputs": [{"text": "a"}]})
    await svc.client.post("/v1/score", json={"inputs": []})
    r = await svc.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "rlhf_reward_queue_depth" in r.text
    assert "rlhf_reward_requests_total" in r.text
    assert svc.sample("rlhf_reward_requests_total", transport="http", method="score", status="200") == 1
    assert svc.sample("rlhf_reward_requests_total", transport="http", method="score", status="400") == 1


# -- auth and headers ----------------------------------------------------------------------------


async def test_auth_bearer_key(make_svc: Factory) -> None:
    svc = await make_svc(api_key="s3cret")
    body = {"inputs": [{"text": "a"}]}
    r = await svc.client.post("/v1/score", json=body)
    assert_error(r, 401, "UNAUTHENTICATED")
    assert r.headers["www-authenticate"] == "Bearer"
    assert "x-request-id" in r.headers
    assert_error(
        await svc.client.post("/v1/score", json=body, headers={"Authorization": "Basic abc"}), 401, "UNAUTHENTICATED"
    )
    assert_error(
        await svc.client.post("/v1/score", json=body, headers={"Authorization": "Bearer nope"}),
        403,
        "PERMISSION_DENIED",
    )
    assert_error(await svc.client.get("/v1/models"), 401, "UNAUTHENTICATED")
    ok = await svc.client.post("/v1/score", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert (await svc.client.get(path)).status_code == 200, path


async def test_request_id_is_echoed_or_made(svc: Svc) -> None:
    r = await svc.client.post("/v1/score", json={"inputs": [{"text": "a"}]}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await svc.client.post("/v1/score", json={"inputs": [{"text": 1}]}, headers={"X-Request-Id": "req.7"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "req.7"
    r = await svc.client.get("/health/live")
    made = r.headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0


# -- every bad input: exact status and code, never a 500 -----------------------------------------

_BAD: list[tuple[str, str, Any, dict[str, str], int, int | None]] = [
    # id, path, body (bytes = raw), headers, status, item
    ("empty inputs", "/v1/score", {"inputs": []}, {}, 400, None),
    ("too many items", "/v1/score", {"inputs": [{"text": "a"}] * (MAX_ITEMS + 1)}, {}, 400, None),
    ("text is a number", "/v1/score", {"inputs": [{"text": "a"}, {"text": 5}]}, {}, 422, 1),
    (
        "unknown role",
        "/v1/score",
        {"inputs": [{"text": "a"}, {"messages": [{"role": "wizard", "content": "x"}]}]},
        {},
        400,
        1,
    ),
    ("text over max_text_bytes", "/v1/score", {"inputs": [{"text": "x" * 2**20}]}, {}, 400, 0),
    ("empty text", "/v1/score", {"inputs": [{"text": ""}]}, {}, 400, 0),
    ("empty messages", "/v1/score", {"inputs": [{"messages": []}]}, {}, 400, 0),
    ("unknown key in item", "/v1/score", {"inputs": [{"text": "a", "foo": 1}]}, {}, 422, 0),
    ("two forms in one item", "/v1/score", {"inputs": [{"text": "a", "messages": []}]}, {}, 422, 0),
    ("item of no form", "/v1/score", {"inputs": [{"foo": "a"}]}, {}, 422, 0),
    ("item not an object", "/v1/score", {"inputs": ["a"]}, {}, 422, 0),
    ("prompt without response", "/v1/score", {"inputs": [{"prompt": "p"}]}, {}, 422, 0),
    ("prompt a number", "/v1/score", {"inputs": [{"prompt": 3, "response": "r"}]}, {}, 422, 0),
    (
        "content a number",
        "/v1/score",
        {"inputs": [{"prompt": [{"role": "user", "content": 3}], "response": "r"}]},
        {},
        422,
        0,
    ),
    ("unknown top-level key", "/v1/score", {"inputs": [{"text": "a"}], "model": "x"}, {}, 422, None),
    ("bad priority", "/v1/score", {"inputs": [{"text": "a"}], "priority": "urgent"}, {}, 422, None),
    ("normalize a string", "/v1/score", {"inputs": [{"text": "a"}], "normalize": "yes"}, {}, 422, None),
    ("body not an object", "/v1/score", [], {}, 422, None),
    ("inputs missing", "/v1/score", {}, {}, 422, None),
    ("invalid JSON", "/v1/score", b'{"inputs": [', {}, 400, None),
    ("empty body", "/v1/score", b"", {}, 400, None),
    ("invalid UTF-8", "/v1/score", b'{"inputs": [{"text": "\xff\xfe"}]}', {}, 400, None),
    ("lone surrogate", "/v1/score", b'{"inputs": [{"text": "\\ud800"}]}', {}, 400, None),
    ("body over max_body_bytes", "/v1/score", b"x" * (MAX_BODY + 1), {}, 413, None),
    ("timeout garbage", "/v1/score", {"inputs": [{"text": "a"}]}, {"X-Request-Timeout": "soon"}, 400, None),
    ("timeout negative", "/v1/score", {"inputs": [{"text": "a"}]}, {"X-Request-Timeout": "-1"}, 400, None),
    ("timeout nan", "/v1/score", {"inputs": [{"text": "a"}]}, {"X-Request-Timeout": "nan"}, 400, None),
    ("compare no responses", "/v1/compare", {"prompt": "p", "responses": []}, {}, 400, None),
    ("compare response a number", "/v1/compare", {"prompt": "p", "responses": ["a", 1]}, {}, 422, 1),
    ("compare bad prompt", "/v1/compare", {"prompt": {"role": "user"}, "responses": ["a"]}, {}, 422, None),
]


@pytest.mark.parametrize(("path", "body", "headers", "status", "item"), [b[1:] for b in _BAD], ids=[b[0] for b in _BAD])
async def test_bad_input_gets_exact_status(
    svc: Svc, path: str, body: Any, headers: dict[str, str], status: int, item: int | None
) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    r = await svc.client.post(path, content=content, headers={"Content-Type": "application/json", **headers})
    err = assert_error(r, status, "INVALID_ARGUMENT", item)
    assert "Traceback" not in err["message"]


async def test_schema_error_names_the_field(svc: Svc) -> None:
    r = await svc.client.post(
        "/v1/score", json={"inputs": [{"text": "a"}, {"prompt": [{"role": "user", "content": 3}], "response": "r"}]}
    )
    err = assert_error(r, 422, "INVALID_ARGUMENT", item=1)
    assert err["message"].startswith("inputs[1].prompt[0].content:")


async def test_chunked_body_over_the_limit_is_413(svc: Svc) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"inputs": [{"text": "'
        for _ in range(MAX_BODY // 2**16 + 2):
            yield b"a" * 2**16
        yield b'"}]}'

    r = await svc.client.post("/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "INVALID_ARGUMENT")


async def test_chunked_body_within_the_limit_is_scored(svc: Svc) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"inputs": [{"te'
        yield b'xt": "hello"}]}'

    r = await svc.client.post("/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["score"] == svc.expected(RewardInput(text="hello"))


# -- overload, deadlines, disconnects, bugs ------------------------------------------------------


async def test_overload_is_429_with_retry_after_at_once(make_svc: Factory) -> None:
    # A 50 ms batching window makes each step observable: items sit in the queue that long.
    svc = await make_svc(max_queue_items=2, max_wait_ms=50.0)
    svc.gate.clear()
    svc.backend.entered.clear()
    two = {"inputs": [{"text": "aa"}, {"text": "bb"}]}
    running = asyncio.create_task(svc.client.post("/v1/score", json=two))  # held in the forward pass
    await asyncio.to_thread(svc.backend.entered.wait, 5)
    waiting = asyncio.create_task(svc.client.post("/v1/score", json=two))  # the one prefetched batch
    await wait_until(lambda: svc.engine.queue_depth == 2)
    await wait_until(lambda: svc.engine.queue_depth == 0)
    queued = asyncio.create_task(svc.client.post("/v1/score", json=two))  # fills the queue
    await wait_until(lambda: svc.engine.queue_depth == 2)

    started = time.monotonic()
    r = await svc.client.post("/v1/score", json={"inputs": [{"text": "c"}]})
    elapsed = time.monotonic() - started
    assert_error(r, 429, "RESOURCE_EXHAUSTED")
    assert int(r.headers["retry-after"]) >= 1
    assert elapsed < 0.5

    svc.gate.set()
    for task in (running, waiting, queued):
        assert (await task).status_code == 200


async def test_deadline_passing_is_504(svc: Svc) -> None:
    svc.gate.clear()
    started = time.monotonic()
    r = await svc.client.post("/v1/score", json={"inputs": [{"text": "a"}]}, headers={"X-Request-Timeout": "0.2"})
    assert_error(r, 504, "DEADLINE_EXCEEDED")
    assert time.monotonic() - started < 2.0


async def test_client_disconnect_cancels_the_work(svc: Svc) -> None:
    svc.gate.clear()
    svc.backend.entered.clear()
    first = asyncio.create_task(svc.client.post("/v1/score", json={"inputs": [{"text": "first"}]}))
    await asyncio.to_thread(svc.backend.entered.wait, 5)

    body = orjson.dumps({"inputs": [{"text": "second-request"}]})
    body_sent = False
    gone = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/score",
        "raw_path": b"/v1/score",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("reward.test", 80),
    }
    second = asyncio.create_task(svc.app(scope, receive, send))
    await wait_until(lambda: svc.sample("rlhf_reward_requests_in_flight") == 2)
    gone.set()
    await asyncio.wait_for(second, 2.0)  # returns while the model is still held: the work was cancelled
    assert svc.sample("rlhf_reward_requests_in_flight") == 1
    assert svc.sample("rlhf_reward_requests_total", transport="http", method="score", status="499") == 1

    svc.gate.set()
    assert (await first).status_code == 200
    await wait_until(lambda: svc.engine.queue_depth == 0)
    assert svc.engine.state.value == "ready"
    scored = [bytes(it.input_ids) for batch in svc.backend.batches for it in batch]
    assert b"first" in scored
    assert b"second-request" not in scored  # dropped before the forward pass


async def test_unexpected_exception_is_a_generic_500(
    svc: Svc, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail: /etc/passwd")

    monkeypatch.setattr(svc.engine, "score", broken)
    with caplog.at_level(logging.ERROR):
        r = await svc.client.post("/v1/score", json={"inputs": [{"text": "a"}]}, headers={"x-request-id": "bug-1"})
    err = assert_error(r, 500, "INTERNAL")
    assert err["message"] == INTERNAL_MESSAGE
    assert "secret" not in r.text
    assert r.headers["x-request-id"] == "bug-1"
    assert any("bug-1" in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert svc.sample("rlhf_reward_requests_total", transport="http", method="score", status="500") == 1


async def test_unknown_route_and_method_use_the_error_shape(svc: Svc) -> None:
    assert_error(await svc.client.get("/nope"), 404, "NOT_FOUND")
    r = await svc.client.get("/v1/score")
    assert_error(r, 405, "NOT_FOUND")
    assert r.headers["allow"] == "POST"


async def test_disconnect_mid_body_is_not_a_500(svc: Svc, caplog: pytest.LogCaptureFixture) -> None:
    messages: Iterator[dict[str, Any]] = iter(
        [
            {"type": "http.request", "body": b'{"inputs": [{"text": "', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/score",
        "raw_path": b"/v1/score",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("reward.test", 80),
    }
    with caplog.at_level(logging.ERROR):
        await svc.app(scope, receive, send)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert svc.sample("rlhf_reward_requests_total", transport="http", method="score", status="499") == 1


async def test_large_body_is_parsed_off_the_loop_and_scored(svc: Svc) -> None:
    texts = ["x" * 40_000 + str(i) for i in range(MAX_ITEMS)]  # ~320 KB body
    r = await svc.client.post("/v1/score", json={"inputs": [{"text": t} for t in texts]})
    assert r.status_code == 200, r.text
    assert [x["score"] for x in r.json()["results"]] == [svc.expected(RewardInput(text=t)) for t in texts]


async def test_openapi_schema_renders(svc: Svc) -> None:
    r = await svc.client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert {"/v1/score", "/v1/compare", "/get_reward", "/v1/models", "/health/ready"} <= set(paths)
