"""HTTP transport of the judge service, in process (httpx ASGITransport) over the scripted fake judge."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest
import pytest_asyncio

from clients.process import ServerProcess
from protos.rlhf.v1 import judge_pb2 as judge_pb
from protos.rlhf.v1 import judge_pb2_grpc as judge_pb_grpc
from services.judge.backends.scripted import Failures, ScriptedBackend
from services.judge.engine.service import JudgeEngine
from services.judge.transports.http import create_http_app
from tests.support.errors import assert_error
from tests.support.fakes import FakeOpenAI, always_better
from tests.support.judge import BAD, GOOD, judge_engine, judge_settings, sample

pytestmark = pytest.mark.timeout(30)

MAX_BODY = 64 * 2**10
MAX_TEXT = 4 * 2**10
MAX_ITEMS = 6


@dataclass
class Svc:
    engine: JudgeEngine
    backend: ScriptedBackend
    client: httpx.AsyncClient
    app: Any

    def sample(self, name: str, **labels: str) -> float | None:
        return sample(self.engine, name, **labels)


Factory = Callable[..., Awaitable[Svc]]


@pytest_asyncio.fixture
async def make_svc() -> AsyncIterator[Factory]:
    made: list[Svc] = []

    async def make(
        backend: ScriptedBackend | None = None, *, api_key: str | None = None, start: bool = True, **kw: Any
    ) -> Svc:
        backend = backend or ScriptedBackend()
        settings = judge_settings(
            max_body_bytes=MAX_BODY, max_text_bytes=MAX_TEXT, max_items_per_request=MAX_ITEMS, **kw
        )
        engine = judge_engine(backend, settings)
        app = create_http_app(engine, settings, api_key=api_key)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://judge.test")
        svc = Svc(engine, backend, client, app)
        made.append(svc)
        if start:
            await engine.start()
        return svc

    yield make
    for svc in made:
        await svc.client.aclose()
        await svc.engine.stop()


@pytest_asyncio.fixture
async def svc(make_svc: Factory) -> Svc:
    return await make_svc()


def assert_judged(body: dict[str, Any], backend: str = "scripted") -> None:
    assert body["judge"]["backend"] == backend and body["judge"]["model"] == "scripted-judge"
    assert isinstance(body["judge"]["template_hash"], str) and body["judge"]["template_hash"]
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "cost_usd", "calls"}
    assert isinstance(body["cached"], bool)


# -- compare ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["What is the capital of France?", [{"role": "user", "content": "Capital?"}]])
async def test_compare_shape_and_verdict(svc: Svc, prompt: Any) -> None:
    r = await svc.client.post("/v1/compare", json={"prompt": prompt, "responses": [BAD, GOOD]})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"preference", "winner", "consistent", "soft", "judge", "usage", "cached"}
    assert body["preference"] < 0.5 and body["winner"] == 1 and body["consistent"] is True
    assert body["soft"] is True and body["cached"] is False
    assert_judged(body)
    assert body["usage"]["calls"] == 2  # both orders


async def test_position_biased_judge_gives_a_tie_with_null_winner(make_svc: Factory) -> None:
    svc = await make_svc(ScriptedBackend(policy="always_first"))
    r = await svc.client.post("/v1/compare", json={"prompt": "p", "responses": [GOOD, BAD]})
    body = r.json()
    assert body["preference"] == pytest.approx(0.5)
    assert body["winner"] is None  # null inside the tie margin, not omitted
    assert body["consistent"] is False


async def test_single_protocol_judges_one_order(svc: Svc) -> None:
    r = await svc.client.post("/v1/compare", json={"prompt": "p", "responses": [GOOD, BAD], "protocol": "single"})
    body = r.json()
    assert body["winner"] == 0 and body["usage"]["calls"] == 1


async def test_rationale_is_returned_when_enabled(make_svc: Factory) -> None:
    svc = await make_svc(rationale=True)
    body = (await svc.client.post("/v1/compare", json={"prompt": "p", "responses": [GOOD, BAD]})).json()
    assert "scripted rationale" in body["rationale"]
    assert 0.05 <= body["preference"] <= 0.95  # clamped


async def test_upstream_failure_is_an_abstain_with_200(make_svc: Factory) -> None:
    svc = await make_svc(ScriptedBackend(failures=Failures(server_error=1.0)))
    r = await svc.client.post("/v1/compare", json={"prompt": "p", "responses": [GOOD, BAD]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"abstain", "judge", "usage"}
    assert "upstream" in body["abstain"]["reason"]
    assert body["usage"]["calls"] >= 1
    assert svc.sample("rlhf_judge_abstentions_total", reason="upstream") == 1


async def test_unparseable_replies_are_an_abstain(make_svc: Factory) -> None:
    svc = await make_svc(ScriptedBackend(failures=Failures(unparseable=1.0)))
    body = (await svc.client.post("/v1/compare", json={"prompt": "p", "responses": [GOOD, BAD]})).json()
    assert body["abstain"]["reason"].startswith("unparseable")


# -- rank and grade ----------------------------------------------------------------------------------


async def test_rank_shape(svc: Svc) -> None:
    responses = [BAD, GOOD + " [good]", "meh", GOOD]
    r = await svc.client.post("/v1/rank", json={"prompt": "p", "responses": responses})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"scores", "ranking", "consistent_rate", "judge", "usage", "cached"}
    assert len(body["scores"]) == 4 and sorted(body["ranking"]) == [0, 1, 2, 3]
    assert body["ranking"][0] == 1 and body["ranking"][-1] == 0
    assert_judged(body)


async def test_grade_shape_and_scale(svc: Svc) -> None:
    r = await svc.client.post("/v1/grade", json={"prompt": "p", "response": GOOD, "scale": [1, 9], "rubric": "r"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"score", "raw", "soft", "judge", "usage", "cached"}
    assert 0.0 <= body["score"] <= 1.0 and 1 <= body["raw"] <= 9
    assert body["score"] == pytest.approx((body["raw"] - 1) / 8)
    low = (await svc.client.post("/v1/grade", json={"prompt": "p", "response": BAD})).json()
    assert low["score"] < body["score"]
    assert_judged(low)


# -- validation ----------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("/v1/compare", {"prompt": "p", "responses": ["only one"]}, 422, None),
    ("/v1/compare", {"prompt": "p", "responses": ["a", "b", "c"]}, 422, None),
    ("/v1/compare", {"prompt": "p", "responses": ["a", 5]}, 422, 1),
    ("/v1/compare", {"prompt": "p", "responses": ["a", "b"], "protocol": "triple"}, 422, None),
    ("/v1/compare", {"prompt": 5, "responses": ["a", "b"]}, 422, None),
    ("/v1/compare", {"responses": ["a", "b"]}, 422, None),
    ("/v1/compare", {"prompt": "p", "responses": ["a", "b"], "temperature": 1}, 422, None),
    ("/v1/compare", {"prompt": "p", "responses": ["a", "b"], "principles": "be nice"}, 422, None),
    ("/v1/compare", {"prompt": [{"role": "user"}], "responses": ["a", "b"]}, 422, None),
    ("/v1/rank", {"prompt": "p", "responses": ["a"]}, 422, None),
    ("/v1/rank", {"prompt": "p", "responses": ["a", "b", None]}, 422, 2),
    ("/v1/grade", {"prompt": "p", "response": "r", "scale": [5, 1]}, 422, None),
    ("/v1/grade", {"prompt": "p", "response": "r", "scale": [1, 100]}, 422, None),
    ("/v1/grade", {"prompt": "p", "response": "r", "scale": [1.5, 5]}, 422, None),
    ("/v1/grade", {"prompt": "p", "response": "r", "scale": [1, 2, 3]}, 422, None),
    ("/v1/grade", {"prompt": "p", "responses": ["r"]}, 422, None),
    # schema-valid, but the engine or the limits refuse: 400
    ("/v1/compare", {"prompt": "", "responses": ["a", "b"]}, 400, None),
    ("/v1/compare", {"prompt": [{"role": "wizard", "content": "x"}], "responses": ["a", "b"]}, 400, None),
    ("/v1/rank", {"prompt": "p", "responses": ["r"] * (MAX_ITEMS + 1)}, 400, None),
    ("/v1/compare", {"prompt": "p", "responses": ["a", "x" * (MAX_TEXT + 1)]}, 400, 1),
    ("/v1/grade", {"prompt": "p" * (MAX_TEXT + 1), "response": "r"}, 400, None),
]


@pytest.mark.parametrize(("path", "body", "status", "item"), BAD_REQUESTS)
async def test_bad_requests_are_rejected_whole(
    svc: Svc, path: str, body: dict[str, Any], status: int, item: int | None
) -> None:
    r = await svc.client.post(path, json=body)
    assert_error(r, status, "INVALID_ARGUMENT", item)
    assert svc.backend.call_count == 0


async def test_schema_error_names_the_field(svc: Svc) -> None:
    r = await svc.client.post("/v1/compare", json={"prompt": "p", "responses": ["a", 5]})
    assert assert_error(r, 422, "INVALID_ARGUMENT", 1)["message"].startswith("responses[1]:")
    r = await svc.client.post("/v1/grade", json={"prompt": "p", "response": "r", "scale": [5, 1]})
    assert "lo < hi" in assert_error(r, 422, "INVALID_ARGUMENT")["message"]


async def test_invalid_json_utf8_and_size(svc: Svc) -> None:
    assert_error(await svc.client.post("/v1/compare", content=b"{nope"), 400, "INVALID_ARGUMENT")
    bad_utf8 = b'{"prompt": "\xff", "responses": ["a", "b"]}'
    r = await svc.client.post("/v1/compare", content=bad_utf8)
    assert "UTF-8" in assert_error(r, 400, "INVALID_ARGUMENT")["message"]
    big = orjson.dumps({"prompt": "p", "responses": ["a" * MAX_BODY, "b"]})
    assert_error(await svc.client.post("/v1/compare", content=big), 413, "INVALID_ARGUMENT")


# -- edge: auth, request id, deadlines, health, metrics, models -------------------------------------


async def test_auth_bearer_key(make_svc: Factory) -> None:
    svc = await make_svc(api_key="k3y")
    body = {"prompt": "p", "responses": ["a", "b"]}
    r = await svc.client.post("/v1/compare", json=body)
    assert_error(r, 401, "UNAUTHENTICATED")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_error(
        await svc.client.post("/v1/rank", json=body, headers={"Authorization": "Bearer no"}), 403, "PERMISSION_DENIED"
    )
    assert (await svc.client.post("/v1/compare", json=body, headers={"Authorization": "Bearer k3y"})).status_code == 200
    assert_error(await svc.client.get("/v1/models"), 401, "UNAUTHENTICATED")
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert (await svc.client.get(path)).status_code == 200, path


async def test_request_id_is_echoed_or_made(svc: Svc) -> None:
    r = await svc.client.post(
        "/v1/compare", json={"prompt": "p", "responses": ["a", "b"]}, headers={"x-request-id": "job-7/item-3"}
    )
    assert r.headers["x-request-id"] == "job-7/item-3"
    r = await svc.client.get("/health/live", headers={"x-request-id": "bad id with spaces"})
    assert len(r.headers["x-request-id"]) == 32


async def test_deadline_header(make_svc: Factory) -> None:
    svc = await make_svc(ScriptedBackend(latency=30.0))
    body = {"prompt": "p", "responses": ["a", "b"]}
    assert_error(
        await svc.client.post("/v1/compare", json=body, headers={"X-Request-Timeout": "soon"}), 400, "INVALID_ARGUMENT"
    )
    assert_error(
        await svc.client.post("/v1/compare", json=body, headers={"X-Request-Timeout": "-1"}), 400, "INVALID_ARGUMENT"
    )
    started = time.monotonic()
    r = await svc.client.post("/v1/compare", json=body, headers={"X-Request-Timeout": "0.2"})
    assert time.monotonic() - started < 5.0
    # The deadline passed during the provider calls: a result (abstain with the reason), not a 504
    # (504 is for a deadline that passes before any work; see tests/reward/test_error_table.py).
    assert r.status_code == 200, r.text
    assert r.json()["abstain"]["reason"].startswith("deadline")


async def test_health_follows_the_engine_state(make_svc: Factory) -> None:
    svc = await make_svc(start=False)
    assert (await svc.client.get("/health/live")).status_code == 200
    assert_error(await svc.client.get("/health/ready"), 503, "UNAVAILABLE")
    assert_error(
        await svc.client.post("/v1/compare", json={"prompt": "p", "responses": ["a", "b"]}), 503, "UNAVAILABLE"
    )
    await svc.engine.start()
    assert (await svc.client.get("/health/ready")).json() == {"status": "ready", "state": "ready"}
    await svc.engine.drain(0)
    assert_error(await svc.client.get("/health/ready"), 503, "UNAVAILABLE")
    assert (await svc.client.get("/health/live")).status_code == 200
    assert_error(await svc.client.post("/v1/grade", json={"prompt": "p", "response": "r"}), 503, "UNAVAILABLE")


async def test_metrics_names(svc: Svc) -> None:
    await svc.client.post("/v1/compare", json={"prompt": "p", "responses": [GOOD, BAD]})
    await svc.client.post("/v1/rank", json={"prompt": "p", "responses": ["a"]})
    await svc.client.get("/nope")
    r = await svc.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "rlhf_judge_requests_total",
        "rlhf_judge_upstream_requests_total",
        "rlhf_judge_tokens_total",
        "rlhf_judge_position_consistency_total",
        "rlhf_judge_ready",
    ):
        assert name in text, name
    assert svc.sample("rlhf_judge_requests_total", transport="http", method="compare", status="200") == 1
    assert svc.sample("rlhf_judge_requests_total", transport="http", method="rank", status="422") == 1
    assert svc.sample("rlhf_judge_requests_total", transport="http", method="other", status="404") == 1
    assert svc.sample("rlhf_judge_upstream_requests_total", status="ok") == 2


async def test_models_reports_the_judge_and_limits(svc: Svc) -> None:
    r = await svc.client.get("/v1/models")
    assert r.status_code == 200
    (card,) = r.json()["data"]
    assert card["backend"] == "scripted" and card["model"] == "scripted-judge" and card["id"] == "scripted-judge"
    compare = (await svc.client.post("/v1/compare", json={"prompt": "p", "responses": ["a", "b"]})).json()
    assert card["template_hash"] == compare["judge"]["template_hash"]
    limits = card["limits"]
    assert limits["max_items_per_request"] == MAX_ITEMS and limits["max_body_bytes"] == MAX_BODY
    assert limits["max_text_bytes"] == MAX_TEXT and limits["max_queue_items"] == 10_000
    assert limits["rpm"] is None and limits["grade_scale_bounds"] == [0, 9]


async def test_unknown_route_and_method_use_the_error_shape(svc: Svc) -> None:
    assert_error(await svc.client.get("/nope"), 404, "NOT_FOUND")
    r = await svc.client.get("/v1/compare")
    assert_error(r, 405, "NOT_FOUND")


async def test_client_disconnect_cancels_the_judgment(make_svc: Factory) -> None:
    svc = await make_svc(ScriptedBackend(latency=30.0))
    body = orjson.dumps({"prompt": "p", "responses": ["a", "b"]})
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/compare",
        "raw_path": b"/v1/compare",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("judge.test", 80),
    }
    task = asyncio.create_task(svc.app(scope, receive, send))
    deadline = time.monotonic() + 5
    while svc.backend.call_count < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    gone.set()
    await asyncio.wait_for(task, 2.0)  # returns while the provider is still "thinking": cancelled
    assert svc.engine.queue_depth == 0 and svc.engine.lifecycle.in_flight == 0
    assert svc.sample("rlhf_judge_requests_total", transport="http", method="compare", status="499") == 1


async def test_openapi_schema_renders(svc: Svc) -> None:
    r = await svc.client.get("/openapi.json")
    assert r.status_code == 200
    assert {"/v1/compare", "/v1/rank", "/v1/grade", "/v1/models", "/health/ready"} <= set(r.json()["paths"])


# -- a real process ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_serve_judge_against_a_fake_openai_compatible_server(tmp_path: Path) -> None:
    """``rlhf-feedback serve judge --backend openai-compatible`` through the real openai SDK, both
    transports, then SIGTERM drains and exits 0."""
    with (
        FakeOpenAI(policy=always_better()) as provider,
        ServerProcess.judge(
            ["--backend", "openai-compatible", "--base-url", provider.base_url, "--model", "m", "--cache", "off"],
            log_path=tmp_path / "judge.log",
            env={"OPENAI_API_KEY": "sk-test"},
        ) as server,
    ):
        server.wait_ready(60)
        async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
            (card,) = (await client.get("/v1/models")).json()["data"]
            assert card["backend"] == "openai-compatible" and card["model"] == "m"
            r = await client.post(
                "/v1/compare", json={"prompt": "Capital?", "responses": ["Lyon [BAD]", "Paris [GOOD]"]}
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["winner"] == 1 and body["preference"] < 0.5 and body["consistent"] is True
            assert body["judge"]["backend"] == "openai-compatible" and body["usage"]["calls"] == 2
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            reply = await judge_pb_grpc.JudgeServiceStub(channel).Compare(
                judge_pb.JudgeCompareRequest(prompt_text="Capital?", responses=["Paris [GOOD]", "Lyon [BAD]"])
            )
            assert reply.comparison.winner == 0 and reply.judge.model == "m"
        assert len(provider.calls) == 4
        assert server.terminate() == 0, server.log_tail()
