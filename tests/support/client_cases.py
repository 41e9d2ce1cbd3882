"""Cases shared by the mirrored sync/async reward-client suites, and the servers they run against.

Every case is an ``async def case(env)`` that drives a client through ``env.client(url, **kw)``:
for the async suite that is an :class:`~clients.AsyncRewardClient` awaited in the test's loop; for
the sync suite a :class:`~clients.RewardClient` whose blocking methods run in a worker thread (as
a training loop would call them), wrapped so that the same case code awaits them.

Servers run in a background thread with their own event loop (:class:`~tests.support.servers.BackgroundLoop`),
so a sync client blocking the test's thread cannot starve them: the real reward service
(:func:`~tests.support.servers.start_reward_server`), and :class:`Scripted`, a tiny fake reward
server (FastAPI + grpc.aio) that answers a script of failures before scoring and records every
call's headers/metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from clients import (
    AuthenticationError,
    Conversation,
    DeadlineExceededError,
    InvalidRequestError,
    ItemError,
    Pair,
    RlhfFeedbackError,
    ScoreResults,
    Text,
    UnavailableError,
)
from protos.rlhf.v1 import reward_pb2 as pb
from protos.rlhf.v1 import reward_pb2_grpc as pb_grpc
from tests.support.servers import (
    BOOM,
    BackgroundLoop,
    RewardServer,
    free_port,
    metadata_dict,
    start_reward_server,
    start_uvicorn,
    stop_uvicorn,
)
from tests.support.waiting import wait_until

# -- a scripted fake reward server ----------------------------------------------------------------


@dataclass
class Call:
    at: float
    idempotency_key: str | None
    request_id: str | None
    authorization: str | None
    timeout: str | None
    n: int


# What the fake answers instead of a score: (HTTP status, headers, JSON body or None, gRPC code, trailers)
FAILS: dict[str, tuple[int, dict[str, str], Any, grpc.StatusCode, tuple[tuple[str, str], ...]]] = {
    "overloaded": (
        429,
        {"Retry-After": "0.05"},
        {"error": {"code": "RESOURCE_EXHAUSTED", "message": "queue full"}},
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        (("retry-delay-ms", "50"), ("retry-after", "0.05")),
    ),
    "unavailable": (
        503,
        {},
        {"error": {"code": "UNAVAILABLE", "message": "draining"}},
        grpc.StatusCode.UNAVAILABLE,
        (),
    ),
    "bad_gateway": (502, {}, None, grpc.StatusCode.UNAVAILABLE, ()),
    "invalid": (
        400,
        {},
        {"error": {"code": "INVALID_ARGUMENT", "message": "inputs[1].text is empty", "item": 1}},
        grpc.StatusCode.INVALID_ARGUMENT,
        (("error-item", "1"),),
    ),
    "unauthenticated": (
        401,
        {},
        {"error": {"code": "UNAUTHENTICATED", "message": "missing key"}},
        grpc.StatusCode.UNAUTHENTICATED,
        (),
    ),
}


def scripted_score(text: str) -> float:
    return float(len(text)) + 0.5


@dataclass
class Scripted:
    """Answers ``script`` (names from :data:`FAILS`, one per call, then scores) on HTTP and gRPC."""

    bg: BackgroundLoop
    script: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    http_port: int = 0
    grpc_port: int = 0
    _stop: Callable[[], Coroutine[Any, Any, None]] | None = None

    def url(self, transport: str) -> str:
        return f"http://127.0.0.1:{self.http_port}" if transport == "http" else f"grpc://127.0.0.1:{self.grpc_port}"

    def _next(self) -> str | None:
        return self.script.pop(0) if self.script else None

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/score")
        async def score(request: Request) -> Any:
            body = await request.json()
            h = request.headers
            self.calls.append(
                Call(
                    time.monotonic(),
                    h.get("idempotency-key"),
                    h.get("x-request-id"),
                    h.get("authorization"),
                    h.get("x-request-timeout"),
                    len(body["inputs"]),
                )
            )
            fail = self._next()
            if fail is not None:
                status, headers, err, _, _ = FAILS[fail]
                if err is None:
                    return _plain(status)
                return JSONResponse(err, status_code=status, headers=headers)
            results = [
                {"score": scripted_score(x["text"]), "num_tokens": 1, "truncated": False} for x in body["inputs"]
            ]
            return {"model": {"id": "scripted", "revision": "r1"}, "results": results}

        return app

    def _servicer(self) -> Any:
        outer = self

        class Servicer(pb_grpc.RewardServiceServicer):
            async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
                md = metadata_dict(context)
                remaining = context.time_remaining()
                outer.calls.append(
                    Call(
                        time.monotonic(),
                        md.get("idempotency-key"),
                        md.get("x-request-id"),
                        md.get("authorization"),
                        None if remaining is None else f"{remaining:.3f}",
                        len(request.inputs),
                    )
                )
                fail = outer._next()
                if fail is not None:
                    _, _, err, code, trailers = FAILS[fail]
                    message = err["error"]["message"] if err else "no healthy upstream"
                    await context.abort(code, message, trailing_metadata=trailers)
                return pb.ScoreResponse(
                    model=pb.ModelRef(id="scripted", revision="r1"),
                    results=[
                        pb.ItemResult(score=pb.Score(score=scripted_score(x.text), num_tokens=1))
                        for x in request.inputs
                    ],
                )

        return Servicer()

    def start(self) -> Scripted:
        async def up() -> None:
            server, task, self.http_port = await start_uvicorn(self._app())
            gserver = grpc.aio.server()
            pb_grpc.add_RewardServiceServicer_to_server(self._servicer(), gserver)
            self.grpc_port = gserver.add_insecure_port("127.0.0.1:0")
            await gserver.start()

            async def down() -> None:
                await gserver.stop(0)
                await stop_uvicorn(server, task)

            self._stop = down

        self.bg.run(up())
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.bg.run(self._stop())


def _plain(status: int) -> Any:
    from fastapi.responses import PlainTextResponse

    return PlainTextResponse("<html>bad gateway</html>", status_code=status)


# -- the environment a case runs in ---------------------------------------------------------------


@dataclass
class Env:
    transport: str
    bg: BackgroundLoop
    main: RewardServer  # max_items_per_request 64, fails on BOOM
    shed: RewardServer  # max_queue_items 32, max_items_per_request 16, a gate
    client: Callable[..., Any]  # (url, **kw) -> a client whose methods are awaited


def texts(n: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}-{i}-{'x' * (i % 7)}" for i in range(n)]


# -- the cases ------------------------------------------------------------------------------------


async def case_scores_equal_server(env: Env) -> None:
    c = env.client(env.main.url(env.transport))
    items: list[Any] = [
        {"text": "already rendered"},
        {"prompt": "What is 2+2?", "response": "4"},
        {"prompt": [{"role": "user", "content": "Hi"}], "response": "Hello!"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
        Text("typed text"),
        Pair("typed prompt", "typed response"),
        Conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
        {"text": "x" * 200},  # past max_length 64: truncated
    ]
    res = await c.score(items)
    assert isinstance(res, ScoreResults)  # a list[float | None]
    assert list(res) == [env.main.expected(x) for x in items]
    assert res.errors == {} and res.ok
    assert res.model is not None and res.model.id == "fake"
    assert res.truncated == [False] * 7 + [True]
    assert res.num_tokens[0] == len(b"already rendered") and res.num_tokens[-1] == 64

    prompts = ["p1", [{"role": "user", "content": "p2"}]]
    pairs = await c.score_pairs(prompts, ["r1", "r2"])
    assert list(pairs) == [
        env.main.expected({"prompt": p, "response": r}) for p, r in zip(prompts, ["r1", "r2"], strict=True)
    ]
    tx = await c.score_texts(["a", "bb", "ccc"])
    assert list(tx) == [env.main.expected({"text": t}) for t in ["a", "bb", "ccc"]]
    assert list(await c.score([])) == []

    normalized = await c.score_texts(["a", "bb"], normalize=True)
    assert normalized.normalized is not None and len(normalized.normalized) == 2
    assert list(normalized) == list(tx)[:2]  # raw scores stay raw

    cmp = await c.compare("Say hi", ["Hi!", "Go away.", "Hello there"])
    want = [env.main.expected({"prompt": "Say hi", "response": r}) for r in ["Hi!", "Go away.", "Hello there"]]
    assert cmp.scores == pytest.approx(want, abs=1e-6)
    assert sum(cmp.probabilities) == pytest.approx(1.0)
    assert cmp.ranking == sorted(range(3), key=lambda i: (-want[i], i))

    info = await c.model_info()
    assert info.id == "fake" and info.limits.max_items_per_request == 64


async def case_item_errors_are_none_with_reason(env: Env) -> None:
    # One item per request, one request at a time: BOOM's batch fails alone, its neighbours score.
    c = env.client(env.main.url(env.transport), chunk_size=1, max_concurrency=1)
    items = ["fine-1", BOOM, "fine-2"]
    res = await c.score_texts(items)
    assert res[0] == env.main.expected({"text": "fine-1"}) and res[2] == env.main.expected({"text": "fine-2"})
    assert res[1] is None  # never a zero
    assert set(res.errors) == {1}
    assert isinstance(res.errors[1], ItemError) and res.errors[1].code == "INTERNAL"
    assert res.num_tokens[1] is None and res.failure_rate == pytest.approx(1 / 3)


async def case_chunks_reassemble_in_order(env: Env) -> None:
    c = env.client(env.main.url(env.transport), chunk_size=37, max_concurrency=4)
    before = env.main.requests(env.transport)
    items = texts(2000)
    res = await c.score_texts(items)
    assert len(res) == 2000 and res.ok
    assert list(res) == [env.main.expected({"text": t}) for t in items]
    await wait_until(lambda: env.main.requests(env.transport) - before >= math.ceil(2000 / 37))  # counted after send
    assert env.main.requests(env.transport) - before == math.ceil(2000 / 37)


async def case_default_chunk_size_from_model_info(env: Env) -> None:
    c = env.client(env.main.url(env.transport))
    before = env.main.requests(env.transport)
    items = texts(300, "auto")
    res = await c.score_texts(items)
    assert list(res) == [env.main.expected({"text": t}) for t in items]
    expected_requests = math.ceil(300 / 64)  # the server's limit
    # The HTTP server counts a request after its response is sent: wait for the count to land.
    await wait_until(lambda: env.main.requests(env.transport) - before >= expected_requests)
    assert env.main.requests(env.transport) - before == expected_requests


async def case_shedding_server_scores_each_item_once(env: Env) -> None:
    srv = env.shed
    c = env.client(srv.url(env.transport), chunk_size=16, max_concurrency=8)
    shed_status = "429" if env.transport == "http" else "RESOURCE_EXHAUSTED"
    shed_before = srv.requests(env.transport, shed_status)
    items = texts(2000, "shed")
    srv.gate.clear()  # hold the model: the queue fills and the server sheds
    try:
        task = asyncio.ensure_future(c.score_texts(items))
        await wait_until(lambda: srv.requests(env.transport, shed_status) > shed_before)
        srv.gate.set()
        res = await asyncio.wait_for(task, 60)
    finally:
        srv.gate.set()
    assert len(res) == 2000 and res.ok, res.errors
    assert list(res) == [srv.expected({"text": t}) for t in items]
    assert srv.requests(env.transport, shed_status) > shed_before


async def case_retry_honours_server_delay_and_reuses_keys(env: Env) -> None:
    fake = Scripted(env.bg, script=["overloaded"]).start()
    try:
        c = env.client(fake.url(env.transport), chunk_size=100, api_key="sekrit")
        t0 = time.monotonic()
        res = await c.score_texts(["a", "bbb"])
        assert list(res) == [scripted_score("a"), scripted_score("bbb")]
        assert len(fake.calls) == 2
        first, second = fake.calls
        assert second.at - first.at >= 0.05  # waited the server's delay
        assert time.monotonic() - t0 < 5
        assert first.idempotency_key and first.idempotency_key == second.idempotency_key
        assert first.request_id and first.request_id == second.request_id
        assert first.authorization == "Bearer sekrit"

        # Each logical request (chunk) has its own key.
        fake.calls.clear()
        await c.score_texts(["a", "b", "c"])
        await c.score_texts(["a"])
        assert len({call.idempotency_key for call in fake.calls}) == 2
    finally:
        fake.stop()


async def case_unavailable_and_proxy_errors_are_retried(env: Env) -> None:
    fake = Scripted(env.bg, script=["unavailable", "bad_gateway", "unavailable"]).start()
    try:
        c = env.client(fake.url(env.transport), chunk_size=100)
        res = await c.score_texts(["abc"])
        assert list(res) == [scripted_score("abc")]
        assert len(fake.calls) == 4
        assert len({call.idempotency_key for call in fake.calls}) == 1
    finally:
        fake.stop()


async def case_invalid_argument_raised_at_once(env: Env) -> None:
    fake = Scripted(env.bg, script=["invalid", "invalid", "invalid"]).start()
    try:
        c = env.client(fake.url(env.transport), chunk_size=100)
        with pytest.raises(InvalidRequestError) as info:
            await c.score_texts(["a", "b"])
        assert info.value.item == 1
        assert len(fake.calls) == 1  # never retried

        fake.calls.clear()
        fake.script[:] = ["unauthenticated", "unauthenticated"]
        with pytest.raises(AuthenticationError):
            await c.score_texts(["a"])
        assert len(fake.calls) == 1
    finally:
        fake.stop()

    # Against the real service: the index is the caller's, whatever chunk carried the bad item.
    c = env.client(env.main.url(env.transport), chunk_size=2)
    items: list[Any] = [{"text": f"ok {i}"} for i in range(8)]
    items[5] = {"text": ""}
    with pytest.raises(InvalidRequestError) as bad:
        await c.score(items)
    assert bad.value.item == 5
    # Malformed items never leave the client.
    with pytest.raises(InvalidRequestError) as local:
        await c.score([{"text": "ok"}, {"txt": "typo"}])
    assert local.value.item == 1


async def case_deadline(env: Env) -> None:
    srv = env.shed
    c = env.client(srv.url(env.transport), chunk_size=16)
    srv.gate.clear()  # the model holds: no answer can come in time
    try:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await c.score_texts(["slow 1", "slow 2"], deadline_s=0.3)
        assert time.monotonic() - t0 < 2.0
    finally:
        srv.gate.set()

    # A server that keeps failing: retries stop at the deadline, not after max_retries.
    fake = Scripted(env.bg, script=["unavailable"] * 1000).start()
    try:
        c = env.client(fake.url(env.transport), chunk_size=100, max_retries=1000)
        t0 = time.monotonic()
        with pytest.raises(RlhfFeedbackError) as info:
            await c.score_texts(["a"], deadline_s=0.6)
        assert isinstance(info.value, UnavailableError | DeadlineExceededError)
        assert time.monotonic() - t0 < 2.0
        assert len(fake.calls) > 1
        assert fake.calls[0].timeout is not None and 0 < float(fake.calls[0].timeout) <= 0.9
    finally:
        fake.stop()


async def case_several_endpoints_one_dead(env: Env) -> None:
    dead = free_port()  # nothing listens: connection refused
    dead_url = f"http://127.0.0.1:{dead}" if env.transport == "http" else f"grpc://127.0.0.1:{dead}"
    live = env.main.url(env.transport)
    for urls in ([dead_url, live], [live, dead_url]):
        c = env.client(urls, chunk_size=10, max_concurrency=4)
        items = texts(120, "spread")
        t0 = time.monotonic()
        res = await c.score_texts(items)
        assert res.ok and list(res) == [env.main.expected({"text": t}) for t in items]
        assert time.monotonic() - t0 < 10
    # Every endpoint dead: the request fails with a connection error, not a hang.
    c = env.client([dead_url, dead_url], chunk_size=10, max_retries=2)
    with pytest.raises(RlhfFeedbackError) as info:
        await c.score_texts(["a"])
    assert info.value.retryable


async def case_dns_round_robin(env: Env) -> None:
    if env.transport != "grpc":
        pytest.skip("dns:/// is a gRPC target")
    c = env.client(f"dns:///localhost:{env.main.grpc_port}")
    items = texts(50, "dns")
    res = await c.score_texts(items)
    assert list(res) == [env.main.expected({"text": t}) for t in items]


CASES: dict[str, Callable[[Env], Awaitable[None]]] = {
    "scores_equal_server": case_scores_equal_server,
    "item_errors_are_none_with_reason": case_item_errors_are_none_with_reason,
    "chunks_reassemble_in_order": case_chunks_reassemble_in_order,
    "default_chunk_size_from_model_info": case_default_chunk_size_from_model_info,
    "shedding_server_scores_each_item_once": case_shedding_server_scores_each_item_once,
    "retry_honours_server_delay_and_reuses_keys": case_retry_honours_server_delay_and_reuses_keys,
    "unavailable_and_proxy_errors_are_retried": case_unavailable_and_proxy_errors_are_retried,
    "invalid_argument_raised_at_once": case_invalid_argument_raised_at_once,
    "deadline": case_deadline,
    "several_endpoints_one_dead": case_several_endpoints_one_dead,
    "dns_round_robin": case_dns_round_robin,
}
# Cases that take a second or more (a load run; deadlines waited out): only in `make test`.
SLOW_CASES = frozenset({"shedding_server_scores_each_item_once", "deadline"})


def case_params() -> list[Any]:
    """Every case name as a parameter, the slow ones marked ``slow``."""
    return [pytest.param(name, marks=pytest.mark.slow if name in SLOW_CASES else ()) for name in CASES]


# -- shared fixtures' bodies ------------------------------------------------------------------------


@dataclass
class Servers:
    bg: BackgroundLoop
    main: RewardServer
    shed: RewardServer

    @classmethod
    def start(cls) -> Servers:
        bg = BackgroundLoop()
        main = start_reward_server(bg, fail_on_boom=True, max_items_per_request=64)
        shed = start_reward_server(bg, max_items_per_request=16, max_queue_items=32)
        return cls(bg, main, shed)

    def stop(self) -> None:
        for s in (self.main, self.shed):
            with contextlib.suppress(Exception):
                s.stop()
        self.bg.close()


class SyncApi:
    """A sync client seen through awaitable methods: each blocking call runs in a worker thread."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call
