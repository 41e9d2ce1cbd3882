"""JudgeClient / AsyncJudgeClient (mirrored) over HTTP and gRPC, against a tiny in-test judge.

The fake judge (FastAPI + a grpc.aio JudgeService servicer, one logic for both) mimics the
service's wire shapes from DESIGN.md / protos/rlhf/v1/judge.proto, independent of the judge
service's code: compare → ``{preference, winner, consistent, soft, rationale?, judge, usage,
cached}`` or ``{abstain: {reason}}``; rank → ``{scores, ranking, consistent_rate, judge, usage,
cached}``; grade → ``{score, raw, soft, rationale?, judge, usage, cached}``. Prompts steer it:
``"abstain"`` abstains, ``"invalid"`` is a 400 / INVALID_ARGUMENT, ``"busy"`` is overloaded once
per idempotency key, ``"locked"`` is 401 / UNAUTHENTICATED.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from clients import (
    AsyncJudgeClient,
    AuthenticationError,
    InvalidRequestError,
    JudgeClient,
    JudgeRef,
    Judgment,
    Usage,
)
from protos.rlhf.v1 import judge_pb2 as jpb
from protos.rlhf.v1 import judge_pb2_grpc as jpb_grpc
from tests.support.client_cases import SyncApi
from tests.support.servers import BackgroundLoop, metadata_dict, start_uvicorn, stop_uvicorn

pytestmark = pytest.mark.timeout(30)

JUDGE = {"backend": "fake", "model": "judge-1", "template_hash": "abc123"}
USAGE = {"prompt_tokens": 10, "completion_tokens": 2, "cost_usd": 0.001, "calls": 2}


class Fail(Exception):
    def __init__(self, status: int, code: str, grpc_code: grpc.StatusCode, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.grpc_code, self.message, self.extra = status, code, grpc_code, message, extra


class FakeJudge:
    """The judging logic, shared by the HTTP app and the gRPC servicer; records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.busy_seen: set[str] = set()

    def handle(self, kind: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        self.requests.append((kind, body, headers))
        prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][-1]["content"]
        if prompt == "invalid":
            raise Fail(400, "INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT, "responses[1] is empty", item=1)
        if prompt == "locked":
            raise Fail(401, "UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED, "missing key")
        if prompt == "busy":
            key = headers.get("idempotency-key", "")
            if key not in self.busy_seen:
                self.busy_seen.add(key)
                raise Fail(429, "RESOURCE_EXHAUSTED", grpc.StatusCode.RESOURCE_EXHAUSTED, "rate budget spent")
        if prompt == "abstain":
            return {"abstain": {"reason": "unparseable reply after 3 attempts"}, "judge": JUDGE, "usage": USAGE}
        common = {"judge": JUDGE, "usage": USAGE, "cached": prompt == "cached"}
        if kind == "compare":
            a, b = body["responses"]
            p = (len(a) + 1) / (len(a) + len(b) + 2)
            winner = None if abs(p - 0.5) < 0.05 else (0 if p > 0.5 else 1)
            out = {"preference": p, "winner": winner, "consistent": True, "soft": True, **common}
            if body.get("rubric"):
                out["rationale"] = f"by rubric {body['rubric']}"
            return out
        if kind == "rank":
            scores = [float(len(r)) for r in body["responses"]]
            ranking = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
            return {"scores": scores, "ranking": ranking, "consistent_rate": 1.0, **common}
        lo, hi = body.get("scale") or (1, 5)
        raw = lo + len(body["response"]) % (hi - lo + 1)
        return {"score": (raw - lo) / (hi - lo), "raw": float(raw), "soft": False, **common}

    # -- HTTP --------------------------------------------------------------------------------

    def app(self) -> FastAPI:
        app = FastAPI()

        async def route(kind: str, request: Request) -> Any:
            try:
                return self.handle(kind, await request.json(), dict(request.headers))
            except Fail as f:
                err: dict[str, Any] = {"code": f.code, "message": f.message, **f.extra}
                headers = {"Retry-After": "0.05"} if f.status == 429 else {}
                return JSONResponse({"error": err}, status_code=f.status, headers=headers)

        @app.post("/v1/compare")
        async def compare(request: Request) -> Any:
            return await route("compare", request)

        @app.post("/v1/rank")
        async def rank(request: Request) -> Any:
            return await route("rank", request)

        @app.post("/v1/grade")
        async def grade(request: Request) -> Any:
            return await route("grade", request)

        @app.get("/v1/models")
        async def models() -> Any:
            card = {"id": "judge-1", "object": "model", **JUDGE, "limits": {"max_items_per_request": 32}}
            return {"object": "list", "data": [card]}

        return app

    # -- gRPC --------------------------------------------------------------------------------

    def servicer(self) -> jpb_grpc.JudgeServiceServicer:
        fake = self

        def prompt_of(req: Any) -> Any:
            if req.WhichOneof("prompt") == "prompt_text":
                return req.prompt_text
            return [{"role": m.role, "content": m.content} for m in req.prompt_messages.messages]

        def common(out: dict[str, Any], reply: Any) -> Any:
            if "judge" in out:
                reply.judge.CopyFrom(jpb.JudgeRef(**out["judge"]))
            if "usage" in out:
                reply.usage.CopyFrom(jpb.JudgeUsage(**out["usage"]))
            reply.cached = out.get("cached", False)
            return reply

        async def run(kind: str, body: dict[str, Any], context: grpc.aio.ServicerContext) -> dict[str, Any]:
            md = metadata_dict(context)
            try:
                return fake.handle(kind, body, md)
            except Fail as f:
                trailers: tuple[tuple[str, str], ...] = ()
                if f.status == 429:
                    trailers = (("retry-delay-ms", "50"),)
                if "item" in f.extra:
                    trailers = (("error-item", str(f.extra["item"])),)
                await context.abort(f.grpc_code, f.message, trailing_metadata=trailers)
                raise AssertionError("unreachable") from None

        def base(req: Any) -> dict[str, Any]:
            body: dict[str, Any] = {"prompt": prompt_of(req)}
            for key in ("rubric", "reference"):
                if req.HasField(key):
                    body[key] = getattr(req, key)
            if req.principles:
                body["principles"] = list(req.principles)
            return body

        class Servicer(jpb_grpc.JudgeServiceServicer):
            async def Compare(self, req: Any, context: Any) -> Any:
                protocol = {jpb.PROTOCOL_SINGLE: "single"}.get(req.protocol, "both_orders")
                out = await run(
                    "compare", {**base(req), "responses": list(req.responses), "protocol": protocol}, context
                )
                reply = jpb.JudgeCompareResponse()
                if "abstain" in out:
                    reply.abstain.reason = out["abstain"]["reason"]
                else:
                    c = reply.comparison
                    c.preference, c.consistent, c.soft = out["preference"], out["consistent"], out["soft"]
                    if out["winner"] is not None:
                        c.winner = out["winner"]
                    if "rationale" in out:
                        c.rationale = out["rationale"]
                return common(out, reply)

            async def Rank(self, req: Any, context: Any) -> Any:
                out = await run("rank", {**base(req), "responses": list(req.responses)}, context)
                reply = jpb.JudgeRankResponse()
                if "abstain" in out:
                    reply.abstain.reason = out["abstain"]["reason"]
                else:
                    reply.ranking.CopyFrom(
                        jpb.Ranking(scores=out["scores"], ranking=out["ranking"], consistent_rate=1.0)
                    )
                return common(out, reply)

            async def Grade(self, req: Any, context: Any) -> Any:
                scale = [req.scale.lo, req.scale.hi] if req.HasField("scale") else None
                out = await run("grade", {**base(req), "response": req.response, "scale": scale}, context)
                reply = jpb.JudgeGradeResponse()
                if "abstain" in out:
                    reply.abstain.reason = out["abstain"]["reason"]
                else:
                    reply.grade.CopyFrom(jpb.Grade(score=out["score"], raw=out["raw"], soft=out["soft"]))
                return common(out, reply)

            async def GetModelInfo(self, req: Any, context: Any) -> Any:
                return jpb.JudgeInfo(judge=jpb.JudgeRef(**JUDGE), limits=jpb.JudgeLimits(max_items_per_request=32))

        return Servicer()


class JudgeServers:
    def __init__(self) -> None:
        self.bg = BackgroundLoop()
        self.fake = FakeJudge()

        async def up() -> tuple[Any, Any, int, grpc.aio.Server, int]:
            server, task, http_port = await start_uvicorn(self.fake.app())
            gserver = grpc.aio.server()
            jpb_grpc.add_JudgeServiceServicer_to_server(self.fake.servicer(), gserver)
            grpc_port = gserver.add_insecure_port("127.0.0.1:0")
            await gserver.start()
            return server, task, http_port, gserver, grpc_port

        self._server, self._task, self.http_port, self._gserver, self.grpc_port = self.bg.run(up())

    def url(self, transport: str) -> str:
        return f"http://127.0.0.1:{self.http_port}" if transport == "http" else f"grpc://127.0.0.1:{self.grpc_port}"

    def stop(self) -> None:
        async def down() -> None:
            await self._gserver.stop(0)
            await stop_uvicorn(self._server, self._task)

        self.bg.run(down())
        self.bg.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[JudgeServers]:
    s = JudgeServers()
    yield s
    s.stop()


@pytest_asyncio.fixture(params=["sync", "async"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """``make(url, **kw)``: a judge client of the parametrized twin, with awaitable methods."""
    made: list[Any] = []

    def build(url: Any, **kw: Any) -> Any:
        if request.param == "sync":
            client: Any = JudgeClient(url, **kw)
            made.append(client)
            return SyncApi(client)
        client = AsyncJudgeClient(url, **kw)
        made.append(client)
        return client

    yield build
    for c in made:
        if isinstance(c, JudgeClient):
            c.close()
        else:
            await c.aclose()


TRANSPORTS = pytest.mark.parametrize("transport", ["http", "grpc"])


@TRANSPORTS
async def test_compare_judgment_and_wire_shape(servers: JudgeServers, make: Any, transport: str) -> None:
    judge = make(servers.url(transport), api_key="k")
    servers.fake.requests.clear()
    j = await judge.compare(
        "Which is better?", "a longer answer", "short", rubric="helpfulness", reference="ref", protocol="single"
    )
    assert isinstance(j, Judgment)
    assert j.preference == pytest.approx(16 / 22)
    assert j.winner == 0 and j.consistent is True and j.soft is True
    assert j.rationale == "by rubric helpfulness"
    assert j.judge == JudgeRef("fake", "judge-1", "abc123")
    assert j.usage == Usage(10, 2, 0.001, 2)
    assert j.cached is False and not j.abstained
    assert j.confidence == pytest.approx(abs(2 * 16 / 22 - 1))
    kind, body, headers = servers.fake.requests[-1]
    assert kind == "compare"
    assert body == {
        "prompt": "Which is better?",
        "responses": ["a longer answer", "short"],
        "rubric": "helpfulness",
        "reference": "ref",
        "protocol": "single",
    }
    assert headers.get("authorization") == "Bearer k"
    assert headers.get("idempotency-key") and headers.get("x-request-id")

    tie = await judge.compare([{"role": "user", "content": "cached"}], "abc", "abd")
    assert tie.winner is None and tie.preference == pytest.approx(0.5) and tie.cached is True
    assert servers.fake.requests[-1][1]["protocol"] == "both_orders"


@TRANSPORTS
async def test_abstain_is_a_result_not_an_error(servers: JudgeServers, make: Any, transport: str) -> None:
    judge = make(servers.url(transport))
    j = await judge.compare("abstain", "a", "b")
    assert j.preference is None and j.winner is None and j.abstained
    assert j.abstain_reason == "unparseable reply after 3 attempts"
    assert j.error is None and j.confidence is None
    r = await judge.rank("abstain", ["a", "b"])
    assert r.scores is None and r.abstained and r.abstain_reason
    g = await judge.grade("abstain", "a")
    assert g.score is None and g.abstained and g.abstain_reason


@TRANSPORTS
async def test_rank_and_grade(servers: JudgeServers, make: Any, transport: str) -> None:
    judge = make(servers.url(transport))
    r = await judge.rank("Rank these", ["mid", "longest one", "a"], principles=["be honest"])
    assert r.scores == [3.0, 11.0, 1.0] and r.ranking == [1, 0, 2] and r.consistent_rate == 1.0
    assert r.judge is not None and r.judge.model == "judge-1"
    assert servers.fake.requests[-1][1]["principles"] == ["be honest"]
    g = await judge.grade("Grade it", "abcd", scale=(0, 9), rubric="clarity")
    assert g.raw == 4.0 and g.score == pytest.approx(4 / 9) and g.soft is False
    kind, body, _ = servers.fake.requests[-1]
    assert kind == "grade" and body["scale"] == [0, 9] and body["rubric"] == "clarity"
    default = await judge.grade("Grade it", "ab")
    assert default.raw == 3.0 and servers.fake.requests[-1][1]["scale"] == [1, 5]
    info = await judge.model_info()
    assert info["model"] == "judge-1" and info["template_hash"] == "abc123"
    assert info["limits"]["max_items_per_request"] == 32


@TRANSPORTS
async def test_compare_many_keeps_order_and_isolates_failures(servers: JudgeServers, make: Any, transport: str) -> None:
    judge = make(servers.url(transport))
    items: list[Any] = [("p", "a" * (i + 1), "bb") for i in range(20)]
    items[3] = {"prompt": "invalid", "a": "x", "b": ""}
    items[7] = {"prompt": "abstain", "responses": ["x", "y"]}
    items[11] = {"prompt": "busy", "a": "xyz", "b": "x", "rubric": "r"}
    out = await judge.compare_many(items, concurrency=4)
    assert len(out) == 20
    for i, j in enumerate(out):
        if i == 3:
            assert j.preference is None and j.error is not None and j.error.code == "INVALID_ARGUMENT"
        elif i == 7:
            assert j.preference is None and j.abstain_reason and j.error is None
        elif i == 11:
            assert j.preference == pytest.approx(4 / 6)  # retried after the overload, then judged
        else:
            assert j.preference == pytest.approx((i + 2) / (i + 5)), i
    # Authentication fails the whole batch: every item would fail the same way.
    with pytest.raises(AuthenticationError):
        await judge.compare_many([("p", "a", "b"), ("locked", "a", "b")])


@TRANSPORTS
async def test_retry_and_errors(servers: JudgeServers, make: Any, transport: str) -> None:
    judge = make(servers.url(transport))
    servers.fake.requests.clear()
    t0 = time.monotonic()
    j = await judge.compare("busy", "aa", "b")
    assert j.preference == pytest.approx(3 / 5)
    assert len(servers.fake.requests) == 2 and time.monotonic() - t0 >= 0.05
    keys = {r[2].get("idempotency-key") for r in servers.fake.requests}
    assert len(keys) == 1 and None not in keys  # one key for the retry

    servers.fake.requests.clear()
    with pytest.raises(InvalidRequestError) as info:
        await judge.compare("invalid", "a", "")
    assert info.value.item == 1 and len(servers.fake.requests) == 1  # never retried
    with pytest.raises(AuthenticationError):
        await judge.grade("locked", "a")
    with pytest.raises(InvalidRequestError):
        await judge.compare("p", "a", "b", protocol="sideways")


def test_judge_clients_pickle(servers: JudgeServers) -> None:
    client = JudgeClient(servers.url("grpc"), api_key="k")
    assert client.compare("p", "aa", "b").preference == pytest.approx(3 / 5)
    clone = pickle.loads(pickle.dumps(client))
    assert clone.compare("p", "aa", "b").preference == pytest.approx(3 / 5)
    assert "k" not in repr(clone)
    pickle.loads(pickle.dumps(AsyncJudgeClient(servers.url("http"))))
    client.close()
    clone.close()
