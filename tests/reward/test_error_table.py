"""Every row of the error table, through HTTP and gRPC, and the two transports agree.

Each case sets up a situation, sends the same request over both transports, and checks the
HTTP status, the gRPC code and the body's ``error.code`` against ``ERROR_TABLE``: first for the
reward service's routes, then for the judge service's (whose "upstream judge failure after
retries" row is a per-item abstain: HTTP 200 and an OK call on both transports).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import judge_pb2 as judge_pb
from protos.rlhf.v1 import judge_pb2_grpc as judge_pb_grpc
from protos.rlhf.v1 import reward_pb2 as pb
from protos.rlhf.v1 import reward_pb2_grpc as pb_grpc
from services.common.errors import ERROR_TABLE, INTERNAL_MESSAGE, ErrorCode
from services.judge.backends.scripted import Failures, ScriptedBackend
from services.judge.engine.service import JudgeEngine
from services.judge.transports.grpc import create_grpc_server as create_judge_grpc_server
from services.judge.transports.http import create_http_app as create_judge_http_app
from services.reward.engine.service import RewardEngine
from services.reward.settings import RewardSettings
from services.reward.transports.grpc import create_grpc_server
from services.reward.transports.http import create_http_app
from services.runtime.backends.fake import FakeBackend
from tests.support.judge import judge_engine, judge_settings

pytestmark = pytest.mark.timeout(30)
KEY = "s3cret"


@dataclass
class Both:
    engine: RewardEngine
    backend: FakeBackend
    http: httpx.AsyncClient
    stub: pb_grpc.RewardServiceStub
    channel: grpc.aio.Channel


async def _both(backend: FakeBackend, *, start: bool = True, **kw: Any) -> AsyncIterator[Both]:
    settings = RewardSettings(max_wait_ms=0, **kw)
    engine = RewardEngine(lambda: backend, settings.engine_config())
    handle = create_grpc_server(engine, settings, api_key=KEY)
    port = await handle.start(port=0)
    if start:
        await engine.start()
        handle.refresh()
    app = create_http_app(engine, settings, api_key=KEY)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield Both(engine, backend, http, pb_grpc.RewardServiceStub(channel), channel)
        if backend.gate is not None:
            backend.gate.set()
    await handle.stop(0)
    await engine.stop()


def hold(b: Both, gate: threading.Event) -> None:
    """From now on the model thread waits at ``gate`` (set after start-up: warm-up must pass)."""
    b.backend.entered.clear()
    b.backend.gate = gate


AUTH = {"Authorization": f"Bearer {KEY}"}
GRPC_AUTH = (("authorization", f"Bearer {KEY}"),)


async def both_fail(
    b: Both,
    body: dict[str, Any],
    request: pb.ScoreRequest,
    *,
    headers: dict[str, str] | None = None,
    metadata: tuple[tuple[str, str], ...] | None = None,
    timeout: float | None = None,
) -> tuple[httpx.Response, grpc.aio.AioRpcError]:
    resp = await b.http.post("/v1/score", json=body, headers=AUTH if headers is None else headers)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await b.stub.Score(request, metadata=GRPC_AUTH if metadata is None else metadata, timeout=timeout)
    return resp, info.value


def agree(code: ErrorCode, resp: httpx.Response, err: grpc.aio.AioRpcError, *, http_status: int | None = None) -> None:
    spec = ERROR_TABLE[code]
    assert resp.status_code == (http_status or spec.http_status), resp.text
    assert resp.json()["error"]["code"] == code.value
    assert err.code() == spec.grpc_code, err
    assert resp.json()["error"]["message"] and err.details()


ONE = {"inputs": [{"text": "hello"}]}
ONE_PB = pb.ScoreRequest(inputs=[pb.RewardInput(text="hello")])


async def test_invalid_input() -> None:
    async for b in _both(FakeBackend()):
        body = {"inputs": [{"text": "ok"}, {"messages": [{"role": "wizard", "content": "x"}]}]}
        req = pb.ScoreRequest(
            inputs=[
                pb.RewardInput(text="ok"),
                pb.RewardInput(messages=cpb.Conversation(messages=[cpb.Message(role="wizard", content="x")])),
            ]
        )
        resp, err = await both_fail(b, body, req)
        agree(ErrorCode.INVALID_ARGUMENT, resp, err)
        assert resp.json()["error"]["item"] == 1
        resp, err = await both_fail(b, {"inputs": []}, pb.ScoreRequest())
        agree(ErrorCode.INVALID_ARGUMENT, resp, err)
        # Schema violations are 422 over HTTP, still INVALID_ARGUMENT.
        resp = await b.http.post("/v1/score", json={"inputs": [{"text": 5}]}, headers=AUTH)
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "INVALID_ARGUMENT"
        assert not ERROR_TABLE[ErrorCode.INVALID_ARGUMENT].retryable


async def test_unauthenticated_and_forbidden() -> None:
    async for b in _both(FakeBackend()):
        resp, err = await both_fail(b, ONE, ONE_PB, headers={}, metadata=())
        agree(ErrorCode.UNAUTHENTICATED, resp, err)
        wrong = "Bearer nope"
        resp, err = await both_fail(
            b, ONE, ONE_PB, headers={"Authorization": wrong}, metadata=(("authorization", wrong),)
        )
        agree(ErrorCode.PERMISSION_DENIED, resp, err)


async def test_overloaded_with_retry_delay() -> None:
    gate = threading.Event()
    async for b in _both(FakeBackend(), max_queue_items=8, max_items_per_request=8, max_batch_tokens=8):
        hold(b, gate)
        # Hold the model thread and fill the queue, then both transports must refuse at once.
        first = b.http.post("/v1/score", json={"inputs": [{"text": "abcdefgh"}]}, headers=AUTH)
        fill = b.http.post("/v1/score", json={"inputs": [{"text": "abcdefgh"}] * 8}, headers=AUTH)
        t1 = asyncio.ensure_future(first)
        await asyncio.to_thread(b.backend.entered.wait, 5)
        t2 = asyncio.ensure_future(fill)
        # One of the 8 is formed into the prefetched batch; 7 wait in the queue.
        while b.engine.queue_depth < 7:
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        two = pb.ScoreRequest(inputs=[pb.RewardInput(text="a"), pb.RewardInput(text="b")])
        resp, err = await both_fail(b, {"inputs": [{"text": "a"}, {"text": "b"}]}, two)
        assert time.perf_counter() - t0 < 1.0
        agree(ErrorCode.RESOURCE_EXHAUSTED, resp, err)
        assert float(resp.headers["Retry-After"]) >= 1
        trailing: dict[str, Any] = dict(err.trailing_metadata() or ())  # type: ignore[arg-type]
        assert int(trailing["retry-delay-ms"]) > 0
        gate.set()
        assert (await t1).status_code == 200 and (await t2).status_code == 200


async def test_deadline_exceeded() -> None:
    gate = threading.Event()
    async for b in _both(FakeBackend()):
        hold(b, gate)

        held = asyncio.ensure_future(b.http.post("/v1/score", json=ONE, headers=AUTH))
        await asyncio.to_thread(b.backend.entered.wait, 5)
        resp = await b.http.post("/v1/score", json=ONE, headers={**AUTH, "X-Request-Timeout": "0.2"})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await b.stub.Score(ONE_PB, metadata=GRPC_AUTH, timeout=0.2)
        agree(ErrorCode.DEADLINE_EXCEEDED, resp, info.value)
        gate.set()
        assert (await held).status_code == 200


async def test_not_ready_and_draining() -> None:
    async for b in _both(FakeBackend(), start=False):
        resp, err = await both_fail(b, ONE, ONE_PB)
        agree(ErrorCode.UNAVAILABLE, resp, err)
    async for b in _both(FakeBackend()):
        await b.engine.drain(0)
        resp, err = await both_fail(b, ONE, ONE_PB)
        agree(ErrorCode.UNAVAILABLE, resp, err)
        assert ERROR_TABLE[ErrorCode.UNAVAILABLE].retryable


async def test_bug_is_generic_with_details_only_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    async for b in _both(FakeBackend(bug_text="boom")):
        body = {"inputs": [{"text": "boom"}]}
        resp, err = await both_fail(b, body, pb.ScoreRequest(inputs=[pb.RewardInput(text="boom")]))
        agree(ErrorCode.INTERNAL, resp, err)
        assert resp.json()["error"]["message"] == INTERNAL_MESSAGE
        assert err.details() == INTERNAL_MESSAGE
        assert "secret" not in resp.text and "secret" not in (err.details() or "")
        assert "secret internal detail" in caplog.text


async def test_one_failed_batch_fails_only_its_items_on_both_transports() -> None:
    backend = FakeBackend(fail_when=lambda batch: any(it.input_ids == tuple(b"bad") for it in batch))
    async for b in _both(backend, max_batch_tokens=3):
        body = {"inputs": [{"text": "bad"}, {"text": "good"}]}
        resp = await b.http.post("/v1/score", json=body, headers=AUTH)
        results = resp.json()["results"]
        assert resp.status_code == 200
        assert results[0]["error"]["code"] == "INTERNAL" and "score" in results[1]
        reply = await b.stub.Score(
            pb.ScoreRequest(inputs=[pb.RewardInput(text="bad"), pb.RewardInput(text="good")]), metadata=GRPC_AUTH
        )
        assert reply.results[0].error.code == "INTERNAL" and reply.results[1].HasField("score")


async def test_unknown_route_or_method() -> None:
    async for b in _both(FakeBackend()):
        resp = await b.http.get("/v1/nope", headers=AUTH)
        nope = b.channel.unary_unary("/rlhf.v1.RewardService/Nope", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await nope(b"", metadata=GRPC_AUTH)
        agree(ErrorCode.NOT_FOUND, resp, info.value)
        r = await b.http.get("/v1/score", headers=AUTH)
        assert (r.status_code, r.json()["error"]["code"], r.headers["allow"]) == (405, "NOT_FOUND", "POST")


def test_every_row_is_walked() -> None:
    walked: set[ErrorCode] = {
        ErrorCode.INVALID_ARGUMENT, ErrorCode.UNAUTHENTICATED, ErrorCode.PERMISSION_DENIED,
        ErrorCode.RESOURCE_EXHAUSTED, ErrorCode.DEADLINE_EXCEEDED, ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL,
        ErrorCode.NOT_FOUND,
    }  # fmt: skip
    assert walked == set(ERROR_TABLE)


# -- the judge service's routes ------------------------------------------------------------------
#
# The same table through /v1/compare, /v1/rank, /v1/grade and rlhf.v1.JudgeService; the row
# "upstream judge failure after retries" is a per-item abstain: HTTP 200 and an OK call.


@dataclass
class JudgeBoth:
    engine: JudgeEngine
    backend: ScriptedBackend
    http: httpx.AsyncClient
    stub: judge_pb_grpc.JudgeServiceStub


async def _judge_both(backend: ScriptedBackend, *, start: bool = True, **kw: Any) -> AsyncIterator[JudgeBoth]:
    settings = judge_settings(max_text_bytes=1024, **kw)
    engine = judge_engine(backend, settings)
    handle = create_judge_grpc_server(engine, settings, api_key=KEY)
    port = await handle.start(port=0)
    if start:
        await engine.start()
        handle.refresh()
    app = create_judge_http_app(engine, settings, api_key=KEY)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield JudgeBoth(engine, backend, http, judge_pb_grpc.JudgeServiceStub(channel))
    await handle.stop(0)
    await engine.stop()


JUDGE_ROUTES: dict[str, tuple[str, dict[str, Any], Any]] = {
    "Compare": (
        "/v1/compare",
        {"prompt": "p", "responses": ["a", "b"], "protocol": "single"},
        judge_pb.JudgeCompareRequest(prompt_text="p", responses=["a", "b"], protocol=judge_pb.PROTOCOL_SINGLE),
    ),
    "Rank": (
        "/v1/rank",
        {"prompt": "p", "responses": ["a", "b"]},
        judge_pb.JudgeRankRequest(prompt_text="p", responses=["a", "b"]),
    ),
    "Grade": ("/v1/grade", {"prompt": "p", "response": "r"}, judge_pb.JudgeGradeRequest(prompt_text="p", response="r")),
}


async def judge_fail(
    b: JudgeBoth,
    method: str,
    body: dict[str, Any],
    request: Any,
    *,
    headers: dict[str, str] | None = None,
    metadata: tuple[tuple[str, str], ...] | None = None,
    timeout: float | None = None,
) -> tuple[httpx.Response, grpc.aio.AioRpcError]:
    path = JUDGE_ROUTES[method][0]
    h = AUTH if headers is None else headers
    if timeout is not None:
        h = {**h, "X-Request-Timeout": str(timeout)}
    resp = await b.http.post(path, json=body, headers=h)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(b.stub, method)(request, metadata=GRPC_AUTH if metadata is None else metadata, timeout=timeout)
    return resp, info.value


@pytest.mark.parametrize("method", list(JUDGE_ROUTES))
async def test_judge_invalid_input(method: str) -> None:
    async for b in _judge_both(ScriptedBackend()):
        path, body, request = JUDGE_ROUTES[method]
        wizard = [{"role": "wizard", "content": "x"}]
        conv = cpb.Conversation(messages=[cpb.Message(role="wizard", content="x")])
        bad_request = type(request)()
        bad_request.CopyFrom(request)
        bad_request.prompt_messages.CopyFrom(conv)
        resp, err = await judge_fail(b, method, {**body, "prompt": wizard}, bad_request)
        agree(ErrorCode.INVALID_ARGUMENT, resp, err)
        # Schema violations are 422 over HTTP, INVALID_ARGUMENT over gRPC, with the item index.
        if method != "Grade":
            long = ["a", "x" * 2000]
            bad_request.ClearField("responses")
            bad_request.responses.extend(long)
            resp, err = await judge_fail(b, method, {**body, "responses": long}, bad_request)
            agree(ErrorCode.INVALID_ARGUMENT, resp, err)
            assert resp.json()["error"]["item"] == 1 and trailing(err)["error-item"] == "1"
            resp = await b.http.post(path, json={**body, "responses": ["a", 5]}, headers=AUTH)
            assert resp.status_code == 422
            assert resp.json()["error"]["code"] == "INVALID_ARGUMENT" and resp.json()["error"]["item"] == 1
        else:
            bad_scale = judge_pb.JudgeGradeRequest(prompt_text="p", response="r", scale=judge_pb.Scale(lo=3, hi=2))
            resp, err = await judge_fail(b, method, {**body, "scale": [3, 2]}, bad_scale)
            agree(ErrorCode.INVALID_ARGUMENT, resp, err, http_status=422)
        assert b.backend.call_count == 0


def trailing(err: grpc.aio.AioRpcError) -> dict[str, Any]:
    return dict(err.trailing_metadata() or ())  # type: ignore[arg-type]


async def test_judge_unauthenticated_and_forbidden() -> None:
    async for b in _judge_both(ScriptedBackend()):
        for method, (_, body, request) in JUDGE_ROUTES.items():
            resp, err = await judge_fail(b, method, body, request, headers={}, metadata=())
            agree(ErrorCode.UNAUTHENTICATED, resp, err)
            wrong = "Bearer nope"
            resp, err = await judge_fail(
                b, method, body, request, headers={"Authorization": wrong}, metadata=(("authorization", wrong),)
            )
            agree(ErrorCode.PERMISSION_DENIED, resp, err)


async def test_judge_overloaded_queue_full_with_retry_delay() -> None:
    async for b in _judge_both(ScriptedBackend(latency=30.0), max_queue_items=2):
        _, body, request = JUDGE_ROUTES["Compare"]
        held = asyncio.ensure_future(
            b.http.post("/v1/compare", json={"prompt": "p", "responses": ["x", "y"]}, headers=AUTH)
        )
        while b.engine.queue_depth < 2:  # both orders of the held comparison
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        resp, err = await judge_fail(b, "Compare", body, request)
        assert time.perf_counter() - t0 < 1.0  # at once, never a slow timeout
        agree(ErrorCode.RESOURCE_EXHAUSTED, resp, err)
        assert float(resp.headers["Retry-After"]) >= 1
        assert ERROR_TABLE[ErrorCode.RESOURCE_EXHAUSTED].retryable
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)


async def test_judge_overloaded_token_budget_spent() -> None:
    async for b in _judge_both(ScriptedBackend(), max_tokens_total=1):
        body = JUDGE_ROUTES["Compare"][1]
        first = await b.http.post("/v1/compare", json=body, headers=AUTH)
        assert first.status_code == 200 and "preference" in first.json()
        for method, (_, body, request) in JUDGE_ROUTES.items():
            resp, err = await judge_fail(b, method, body, request)
            agree(ErrorCode.RESOURCE_EXHAUSTED, resp, err)
            assert "budget" in resp.json()["error"]["message"]


async def test_judge_deadline_exceeded_before_any_work() -> None:
    # rpm 6: one call per 10 s window; the first request takes it, the next cannot start in time.
    async for b in _judge_both(ScriptedBackend(), rpm=6.0):
        body = JUDGE_ROUTES["Compare"][1]
        assert (await b.http.post("/v1/compare", json=body, headers=AUTH)).status_code == 200
        other = {**body, "responses": ["c", "d"]}
        other_pb = judge_pb.JudgeCompareRequest(
            prompt_text="p", responses=["e", "f"], protocol=judge_pb.PROTOCOL_SINGLE
        )
        resp, err = await judge_fail(b, "Compare", other, other_pb, timeout=0.3)
        agree(ErrorCode.DEADLINE_EXCEEDED, resp, err)


async def test_judge_not_ready_and_draining() -> None:
    async for b in _judge_both(ScriptedBackend(), start=False):
        for method, (_, body, request) in JUDGE_ROUTES.items():
            resp, err = await judge_fail(b, method, body, request)
            agree(ErrorCode.UNAVAILABLE, resp, err)
    async for b in _judge_both(ScriptedBackend()):
        await b.engine.drain(0)
        for method, (_, body, request) in JUDGE_ROUTES.items():
            resp, err = await judge_fail(b, method, body, request)
            agree(ErrorCode.UNAVAILABLE, resp, err)


async def test_judge_bug_is_generic_with_details_only_in_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    async for b in _judge_both(ScriptedBackend()):
        for method, (_, body, request) in JUDGE_ROUTES.items():
            monkeypatch.setattr(b.engine, method.lower(), broken)
            resp, err = await judge_fail(b, method, body, request)
            agree(ErrorCode.INTERNAL, resp, err)
            assert resp.json()["error"]["message"] == INTERNAL_MESSAGE and err.details() == INTERNAL_MESSAGE
            assert "secret" not in resp.text
        assert "secret internal detail" in caplog.text


@pytest.mark.slow  # the judge's jittered retry backoff: up to ~1 s
@pytest.mark.parametrize("method", list(JUDGE_ROUTES))
async def test_judge_upstream_failure_is_an_abstain_on_both_transports(method: str) -> None:
    backend = ScriptedBackend(failures=Failures(server_error=1.0))
    async for b in _judge_both(backend, max_retries=1):
        path, body, request = JUDGE_ROUTES[method]
        resp = await b.http.post(path, json=body, headers=AUTH)
        assert resp.status_code == 200, resp.text
        assert resp.json()["abstain"]["reason"].startswith("upstream")
        reply = await getattr(b.stub, method)(request, metadata=GRPC_AUTH)
        assert reply.WhichOneof("outcome") == "abstain"
        assert reply.abstain.reason == resp.json()["abstain"]["reason"]
