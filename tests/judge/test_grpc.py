"""gRPC transport of the judge service, in process: a grpc.aio server on 127.0.0.1, a free port, the
real JudgeEngine over the scripted fake judge."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import judge_pb2 as pb
from protos.rlhf.v1 import judge_pb2_grpc as pb_grpc
from services.common.grpc_support import GrpcServerHandle
from services.judge.backends.scripted import Failures, ScriptedBackend
from services.judge.engine.service import JudgeEngine
from services.judge.transports.grpc import create_grpc_server
from tests.support.judge import BAD, GOOD, judge_engine, judge_settings, sample

pytestmark = pytest.mark.timeout(30)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MAX_TEXT = 4 * 2**10
MAX_ITEMS = 6


@dataclass
class Client:
    handle: GrpcServerHandle
    engine: JudgeEngine
    backend: ScriptedBackend
    channel: grpc.aio.Channel
    stub: pb_grpc.JudgeServiceStub
    health: health_pb2_grpc.HealthStub


@contextlib.asynccontextmanager
async def serving(
    backend: ScriptedBackend | None = None, *, start: bool = True, api_key: str | None = None, **kw: Any
) -> AsyncIterator[Client]:
    backend = backend or ScriptedBackend()
    settings = judge_settings(max_text_bytes=MAX_TEXT, max_items_per_request=MAX_ITEMS, **kw)
    engine = judge_engine(backend, settings)
    handle = create_grpc_server(engine, settings, api_key=api_key, health_poll_interval=60.0)
    port = await handle.start(port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        if start:
            await engine.start()
            handle.refresh()
        yield Client(
            handle, engine, backend, channel, pb_grpc.JudgeServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        )
    finally:
        await channel.close(None)
        await handle.stop(0)
        await engine.stop()


def trailers(err: grpc.aio.AioRpcError) -> dict[str, str]:
    pairs: Any = err.trailing_metadata() or ()
    return {k: v for k, v in pairs if isinstance(v, str)}


def compare_req(a: str = GOOD, b: str = BAD, **kw: Any) -> pb.JudgeCompareRequest:
    return pb.JudgeCompareRequest(prompt_text=kw.pop("prompt", "Capital of France?"), responses=[a, b], **kw)


# -- the methods ---------------------------------------------------------------------------------------


async def test_compare_shape_and_verdict() -> None:
    async with serving() as c:
        reply = await c.stub.Compare(compare_req(BAD, GOOD))
        assert reply.WhichOneof("outcome") == "comparison"
        cmp = reply.comparison
        assert cmp.preference < 0.5 and cmp.HasField("winner") and cmp.winner == 1
        assert cmp.consistent and cmp.soft and not cmp.HasField("rationale")
        assert reply.judge.backend == "scripted" and reply.judge.model == "scripted-judge" and reply.judge.template_hash
        assert reply.usage.calls == 2 and reply.usage.prompt_tokens > 0 and not reply.cached


async def test_compare_with_messages_prompt_and_single_protocol() -> None:
    async with serving() as c:
        conv = cpb.Conversation(messages=[cpb.Message(role="user", content="Capital?")])
        req = pb.JudgeCompareRequest(prompt_messages=conv, responses=[GOOD, BAD], protocol=pb.PROTOCOL_SINGLE)
        reply = await c.stub.Compare(req)
        assert reply.comparison.winner == 0 and reply.usage.calls == 1


async def test_tie_has_no_winner() -> None:
    async with serving(ScriptedBackend(policy="always_first")) as c:
        reply = await c.stub.Compare(compare_req())
        assert reply.comparison.preference == pytest.approx(0.5)
        assert not reply.comparison.HasField("winner") and not reply.comparison.consistent


async def test_abstain_is_a_result_not_a_status() -> None:
    async with serving(ScriptedBackend(failures=Failures(server_error=1.0))) as c:
        for reply in (
            await c.stub.Compare(compare_req()),
            await c.stub.Rank(pb.JudgeRankRequest(prompt_text="p", responses=["a", "b", "c"])),
            await c.stub.Grade(pb.JudgeGradeRequest(prompt_text="p", response="r")),
        ):
            assert reply.WhichOneof("outcome") == "abstain", reply
            assert reply.abstain.reason.startswith("upstream")
            assert reply.judge.backend == "scripted" and reply.usage.calls >= 1


async def test_rank_and_grade() -> None:
    async with serving() as c:
        ranked = await c.stub.Rank(pb.JudgeRankRequest(prompt_text="p", responses=[BAD, "meh", GOOD]))
        assert list(ranked.ranking.ranking) == [2, 1, 0] and len(ranked.ranking.scores) == 3
        assert 0 <= ranked.ranking.consistent_rate <= 1
        graded = await c.stub.Grade(
            pb.JudgeGradeRequest(prompt_text="p", response=GOOD, scale=pb.Scale(lo=0, hi=9), reference="Paris")
        )
        assert graded.WhichOneof("outcome") == "grade"
        assert 0 <= graded.grade.score <= 1 and 0 <= graded.grade.raw <= 9
        assert graded.grade.score == pytest.approx(graded.grade.raw / 9)


async def test_get_model_info() -> None:
    async with serving(rpm=600.0, max_tokens_total=10**6) as c:
        info = await c.stub.GetModelInfo(pb.GetJudgeInfoRequest())
        assert info.judge.backend == "scripted" and info.judge.template_hash
        lim = info.limits
        assert lim.max_items_per_request == MAX_ITEMS and lim.max_text_bytes == MAX_TEXT
        assert lim.max_queue_items == 10_000 and lim.rpm == 600.0 and not lim.HasField("tpm")
        assert lim.max_tokens_total == 10**6
        assert (lim.grade_scale_bounds.lo, lim.grade_scale_bounds.hi) == (0, 9)


# -- CompareStream ----------------------------------------------------------------------------------------


async def test_compare_stream_answers_each_request_tagged() -> None:
    async with serving() as c:
        requests = [
            compare_req(GOOD, BAD, request_id="r0"),
            compare_req(BAD, GOOD, request_id="r1"),
            pb.JudgeCompareRequest(prompt_text="p", responses=["only one"], request_id="bad"),
            compare_req(GOOD, BAD, request_id="r3", protocol=pb.PROTOCOL_SINGLE),
        ]
        call = c.stub.CompareStream(iter(requests))
        got = {r.request_id: r async for r in call}
        assert set(got) == {"r0", "r1", "bad", "r3"}
        assert got["r0"].response.comparison.winner == 0
        assert got["r1"].response.comparison.winner == 1
        assert got["r3"].response.comparison.winner == 0
        assert got["bad"].WhichOneof("result") == "error"
        assert got["bad"].error.code == "INVALID_ARGUMENT" and got["bad"].error.message
        assert await call.code() == grpc.StatusCode.OK


async def test_compare_stream_results_come_as_they_finish() -> None:
    async with serving(ScriptedBackend(latency=0.3)) as c:
        queue: asyncio.Queue[pb.JudgeCompareRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.JudgeCompareRequest]:
            while (req := await queue.get()) is not None:
                yield req

        call = c.stub.CompareStream(requests())
        await queue.put(compare_req(request_id="first"))
        first = await call.read()
        assert first.request_id == "first" and first.response.comparison.winner == 0  # before the stream ends
        await queue.put(compare_req(BAD, GOOD, request_id="second"))
        await queue.put(None)
        second = await call.read()
        assert second.request_id == "second" and second.response.comparison.winner == 1
        assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]


async def test_compare_stream_abstain_and_draining() -> None:
    async with serving(ScriptedBackend(failures=Failures(unparseable=1.0))) as c:
        got = [r async for r in c.stub.CompareStream(iter([compare_req(request_id="x")]))]
        assert got[0].response.abstain.reason.startswith("unparseable")
        await c.engine.drain(0)
        got = [r async for r in c.stub.CompareStream(iter([compare_req(request_id="y")]))]
        assert got[0].request_id == "y" and got[0].error.code == "UNAVAILABLE"


# -- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "message", "item"),
    [
        ("Compare", pb.JudgeCompareRequest(prompt_text="p", responses=["a"]), None),
        ("Compare", pb.JudgeCompareRequest(prompt_text="p", responses=["a", "b", "c"]), None),
        ("Compare", pb.JudgeCompareRequest(responses=["a", "b"]), None),
        ("Compare", pb.JudgeCompareRequest(prompt_text="p", responses=["a", "b"], protocol=7), None),  # type: ignore[arg-type]
        ("Compare", pb.JudgeCompareRequest(prompt_text="", responses=["a", "b"]), None),
        ("Compare", pb.JudgeCompareRequest(prompt_text="p", responses=["a", "x" * (MAX_TEXT + 1)]), 1),
        ("Rank", pb.JudgeRankRequest(prompt_text="p", responses=["a"]), None),
        ("Rank", pb.JudgeRankRequest(prompt_text="p", responses=["a"] * (MAX_ITEMS + 1)), None),
        ("Grade", pb.JudgeGradeRequest(prompt_text="p", response="r", scale=pb.Scale(lo=5, hi=1)), None),
        ("Grade", pb.JudgeGradeRequest(prompt_text="p", response="r", scale=pb.Scale(lo=1, hi=10)), None),
    ],
)
async def test_invalid_requests(method: str, message: Any, item: int | None) -> None:
    async with serving() as c:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(c.stub, method)(message)
        err = info.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert err.details()
        if item is None:
            assert "error-item" not in trailers(err)
        else:
            assert trailers(err)["error-item"] == str(item)
            assert (err.details() or "").startswith(f"item {item}: ")
        assert c.backend.call_count == 0


# -- health, reflection, auth, request id, metrics -------------------------------------------------------


async def test_health_follows_the_engine() -> None:
    async with serving(start=False) as c:
        names = ("", "readiness", "rlhf.v1.JudgeService")

        async def status(name: str) -> int:
            return (await c.health.Check(health_pb2.HealthCheckRequest(service=name))).status

        assert [await status(n) for n in names] == [NOT_SERVING] * 3
        assert await status("liveness") == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.stub.Compare(compare_req())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await c.engine.start()
        c.handle.refresh()
        assert [await status(n) for n in names] == [SERVING] * 3
        await c.engine.drain(0)
        c.handle.refresh()
        assert [await status(n) for n in names] == [NOT_SERVING] * 3
        assert await status("liveness") == SERVING


async def test_reflection_lists_the_judge_service() -> None:
    async with serving(api_key="secret") as c:  # reflection stays open without a key
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = set()
        async for resp in call:
            names |= {s.name for s in resp.list_services_response.service}
        assert {"rlhf.v1.JudgeService", "grpc.health.v1.Health"} <= names


async def test_api_key_and_request_id() -> None:
    async with serving(api_key="k3y") as c:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.stub.Compare(compare_req())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.stub.Grade(
                pb.JudgeGradeRequest(prompt_text="p", response="r"), metadata=(("authorization", "Bearer nope"),)
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        health = await c.health.Check(health_pb2.HealthCheckRequest(service="liveness"))  # open without a key
        assert health.status == SERVING
        call = c.stub.Compare(compare_req(), metadata=(("authorization", "Bearer k3y"), ("x-request-id", "req-9")))
        assert (await call).WhichOneof("outcome") == "comparison"
        assert ("x-request-id", "req-9") in list(await call.initial_metadata())
        assert sample(c.engine, "rlhf_judge_requests_total", transport="grpc", method="Compare", status="OK") == 1
        assert (
            sample(c.engine, "rlhf_judge_requests_total", transport="grpc", method="Compare", status="UNAUTHENTICATED")
            == 1
        )


async def test_malformed_message_is_invalid_argument() -> None:
    async with serving() as c:
        method = c.channel.unary_unary(
            "/rlhf.v1.JudgeService/Compare",
            request_serializer=lambda b: b,
            response_deserializer=pb.JudgeCompareResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await method(b"\x0a\x02\xff\xfe")  # field 1 (prompt_text) with invalid UTF-8
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
