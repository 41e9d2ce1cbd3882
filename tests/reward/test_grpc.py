"""gRPC transport of the reward service, in-process: a grpc.aio server on 127.0.0.1, a free port,
the engine over the deterministic FakeBackend. Synchronised with events, not sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import reward_pb2 as pb
from protos.rlhf.v1 import reward_pb2_grpc as pb_grpc
from services.common.errors import INTERNAL_MESSAGE
from services.reward.engine.service import RewardEngine
from services.reward.settings import RewardSettings
from services.reward.transports.grpc import GrpcServerHandle, create_grpc_server
from services.runtime.backends.fake import FakeBackend, fake_score
from services.runtime.chat import ChatMessage
from services.runtime.items import EncodedItem, RewardInput
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(20)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BlockAfter:
    """A FakeBackend gate: the first ``free`` forward passes run, later ones wait for ``release``."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0
        self.release = threading.Event()
        self.blocked = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.calls += 1
        if self.calls <= self.free:
            return True
        self.blocked.set()
        return self.release.wait(timeout)

    def set(self) -> None:
        self.release.set()


@dataclass
class Client:
    handle: GrpcServerHandle
    engine: RewardEngine
    backend: FakeBackend
    channel: grpc.aio.Channel
    stub: pb_grpc.RewardServiceStub
    health: health_pb2_grpc.HealthStub


def make_settings(**kw: Any) -> RewardSettings:
    return RewardSettings(http_port=0, grpc_port=50051, **kw)


@contextlib.asynccontextmanager
async def serving(
    backend: FakeBackend | None = None,
    *,
    start_engine: bool = True,
    api_key: str | None = None,
    **settings_kw: Any,
) -> AsyncIterator[Client]:
    backend = backend or FakeBackend()
    settings = make_settings(**settings_kw)
    engine = RewardEngine(lambda: backend, settings.engine_config())
    handle = create_grpc_server(engine, settings, api_key=api_key, health_poll_interval=60.0)
    port = await handle.start(port=0)
    assert port > 0 and handle.port == port
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        if start_engine:
            await engine.start()
            handle.refresh()
        yield Client(
            handle, engine, backend, channel, pb_grpc.RewardServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        )
    finally:
        if backend.gate is not None:
            backend.gate.set()
        await channel.close(None)
        await handle.stop(0)
        await engine.stop()


def expected(backend: FakeBackend, items: Sequence[RewardInput]) -> list[EncodedItem]:
    return backend.encode(items)


def text(s: str) -> pb.RewardInput:
    return pb.RewardInput(text=s)


def trailers(err: grpc.aio.AioRpcError) -> dict[str, str]:
    pairs: Any = err.trailing_metadata() or ()
    return {k: v for k, v in pairs if isinstance(v, str)}


# -- Score ---------------------------------------------------------------------------------------


async def test_score_equals_fake_backend() -> None:
    async with serving() as c:
        msgs = [cpb.Message(role="user", content="Hi there"), cpb.Message(role="assistant", content="Hello!")]
        request = pb.ScoreRequest(
            inputs=[
                text("plain text"),
                pb.RewardInput(pair=pb.PromptResponse(prompt_text="What is 2+2?", response="4")),
                pb.RewardInput(
                    pair=pb.PromptResponse(prompt_messages=cpb.Conversation(messages=msgs[:1]), response="Hey")
                ),
                pb.RewardInput(messages=cpb.Conversation(messages=msgs)),
                text("x" * 100),  # past max_length 64: keeps the end, flagged truncated
            ],
            priority=pb.PRIORITY_BATCH,
        )
        response = await c.stub.Score(request)
        want = expected(
            c.backend,
            [
                RewardInput(text="plain text"),
                RewardInput(prompt="What is 2+2?", response="4"),
                RewardInput(prompt=(ChatMessage("user", "Hi there"),), response="Hey"),
                RewardInput(messages=(ChatMessage("user", "Hi there"), ChatMessage("assistant", "Hello!"))),
                RewardInput(text="x" * 100),
            ],
        )
        assert response.model.id == "fake" and response.model.revision == "0" * 16
        assert not response.model.HasField("normalization")
        assert len(response.results) == len(want)
        for got, enc in zip(response.results, want, strict=True):
            assert got.WhichOneof("outcome") == "score"
            assert got.score.score == fake_score(enc.input_ids)  # float32 both ways: exact
            assert got.score.num_tokens == enc.num_tokens
            assert got.score.truncated == enc.truncated
            assert not got.score.HasField("normalized")
            assert list(got.score.scores) == []
        assert response.results[4].score.truncated and response.results[4].score.num_tokens == 64


async def test_score_normalize_and_vector_head() -> None:
    async with serving(FakeBackend(num_labels=2), normalize_mean=1.0, normalize_std=2.0) as c:
        response = await c.stub.Score(pb.ScoreRequest(inputs=[text("abc")], normalize=True))
        raw = [fake_score(b"abc"), fake_score(b"abc") + 1]
        (r,) = response.results
        assert list(r.score.scores) == pytest.approx(raw)
        assert r.score.score == pytest.approx(sum(raw) / 2)
        assert r.score.HasField("normalized")
        assert r.score.normalized == pytest.approx((r.score.score - 1.0) / 2.0, abs=1e-6)
        norm = response.model.normalization
        assert (norm.mean, norm.std, norm.source) == (1.0, 2.0, "static")


async def test_per_item_error_shape() -> None:
    def fails(batch: Sequence[EncodedItem]) -> bool:
        return any(b"BOOM" in bytes(it.input_ids) for it in batch)

    # A 12-token budget puts each 10-token item in a batch of its own: only the bad one fails.
    async with serving(FakeBackend(fail_when=fails), max_batch_tokens=12) as c:
        response = await c.stub.Score(
            pb.ScoreRequest(inputs=[text("good one 1"), text("BOOM BOOM!"), text("good one 2")])
        )
        kinds = [r.WhichOneof("outcome") for r in response.results]
        assert kinds == ["score", "error", "score"]
        err = response.results[1].error
        assert err.code == "INTERNAL" and err.message == INTERNAL_MESSAGE
        assert response.results[0].score.score == fake_score(b"good one 1")


# -- Compare, GetModelInfo -----------------------------------------------------------------------


async def test_compare() -> None:
    async with serving() as c:
        response = await c.stub.Compare(pb.CompareRequest(prompt_text="Q?", responses=["a", "bb", "ccc"]))
        enc = expected(c.backend, [RewardInput(prompt="Q?", response=r) for r in ("a", "bb", "ccc")])
        scores = [fake_score(e.input_ids) for e in enc]
        assert list(response.scores) == scores
        exp = [math.exp(s - max(scores)) for s in scores]
        assert list(response.probabilities) == pytest.approx([e / sum(exp) for e in exp])
        assert list(response.ranking) == sorted(range(3), key=lambda i: (-scores[i], i))
        assert response.model.id == "fake"

        msgs = cpb.Conversation(messages=[cpb.Message(role="user", content="Q?")])
        by_messages = await c.stub.Compare(pb.CompareRequest(prompt_messages=msgs, responses=["a"]))
        assert list(by_messages.probabilities) == [1.0]

        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.stub.Compare(pb.CompareRequest(prompt_text="Q?"))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.stub.Compare(pb.CompareRequest(responses=["a"]))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt" in (exc.value.details() or "")


async def test_get_model_info() -> None:
    async with serving(FakeBackend(num_labels=3), max_text_bytes=1000, max_batch_tokens=512) as c:
        info = await c.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.id, info.revision, info.architecture, info.backend) == ("fake", "0" * 16, "Fake", "fake")
        assert (info.dtype, info.device, info.max_length, info.num_labels) == ("float32", "cpu", 64, 3)
        assert list(info.label_names) == ["LABEL_0", "LABEL_1", "LABEL_2"]
        assert not info.has_chat_template
        assert info.limits.max_text_bytes == 1000 and info.limits.max_batch_tokens == 512
        assert info.limits.max_request_tokens == 4096
        assert info.limits.max_items_per_request == 4096 and info.limits.max_body_bytes == 64 * 2**20


# -- ScoreStream ---------------------------------------------------------------------------------


async def test_score_stream_every_item_exactly_once() -> None:
    async with serving(max_batch_tokens=16) as c:
        requests = [
            pb.ScoreRequest(request_id="a", inputs=[text(f"a-{i}") for i in range(5)]),
            pb.ScoreRequest(request_id="bad", inputs=[text("ok"), pb.RewardInput(text="")]),  # invalid: empty text
            pb.ScoreRequest(request_id="b", inputs=[text(f"item b-{i}") for i in range(7)], priority=pb.PRIORITY_BATCH),
            pb.ScoreRequest(request_id="empty"),
        ]

        async def gen() -> AsyncIterator[pb.ScoreRequest]:
            for r in requests:
                yield r

        got: dict[tuple[str, int], pb.ScoreStreamResponse] = {}
        async for resp in c.stub.ScoreStream(gen()):
            key = (resp.request_id, resp.index)
            assert key not in got, f"duplicate result {key}"
            got[key] = resp

    assert set(got) == (
        {("a", i) for i in range(5)} | {("b", i) for i in range(7)} | {("bad", 0), ("bad", 1), ("empty", 0)}
    )
    for i in range(5):
        assert got["a", i].result.score.score == fake_score(f"a-{i}".encode())
        assert got["a", i].model.id == "fake"
    for i in range(7):
        assert got["b", i].result.score.score == fake_score(f"item b-{i}".encode())
    for key in [("bad", 0), ("bad", 1)]:
        err = got[key].result.error
        assert err.code == "INVALID_ARGUMENT" and "text is empty" in err.message
    assert got["empty", 0].result.error.code == "INVALID_ARGUMENT"


async def test_score_stream_results_arrive_as_batches_finish() -> None:
    gate = BlockAfter(free=2)  # the warm-up batch and the first batch run; the second waits
    backend = FakeBackend(gate=gate)  # type: ignore[arg-type]
    # 40-token items and a 50-token budget: one item per batch.
    async with serving(backend, max_batch_tokens=50) as c:
        items = [text("first " + "x" * 34), text("second" + "y" * 34)]
        requests: asyncio.Queue[pb.ScoreRequest | None] = asyncio.Queue()
        await requests.put(pb.ScoreRequest(request_id="r", inputs=items))

        async def gen() -> AsyncIterator[pb.ScoreRequest]:
            while (r := await requests.get()) is not None:
                yield r

        call = c.stub.ScoreStream(gen())
        first = await call.read()
        assert isinstance(first, pb.ScoreStreamResponse)
        # The first result is here while the second batch is still held at the gate.
        assert not gate.release.is_set()
        assert await asyncio.to_thread(gate.blocked.wait, 5)
        assert first.index == 0 and first.result.score.score == fake_score(("first " + "x" * 34).encode())
        gate.set()
        second = await call.read()
        assert isinstance(second, pb.ScoreStreamResponse)
        assert second.index == 1 and second.result.WhichOneof("outcome") == "score"
        await requests.put(None)
        assert await call.read() is grpc.aio.EOF  # type: ignore[attr-defined]
        assert await call.code() == grpc.StatusCode.OK


async def test_score_stream_undecodable_message_ends_stream() -> None:
    async with serving() as c:
        call = c.channel.stream_stream(
            "/rlhf.v1.RewardService/ScoreStream",
            request_serializer=lambda b: b,
            response_deserializer=pb.ScoreStreamResponse.FromString,
        )(iter([b"\x0a\x03\x0a\x01\xff"]))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in call:
                pass
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- health, reflection --------------------------------------------------------------------------


async def check(c: Client, service: str) -> int:
    return (await c.health.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_follows_engine_state() -> None:
    async with serving(start_engine=False) as c:
        names = ["", "readiness", "rlhf.v1.RewardService"]
        watch = c.health.Watch(health_pb2.HealthCheckRequest(service="readiness"))
        assert (await watch.read()).status == NOT_SERVING
        for name in names:
            assert await check(c, name) == NOT_SERVING
        assert await check(c, "liveness") == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await check(c, "no.such.Service")
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.stub.Score(pb.ScoreRequest(inputs=[text("a")]))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE

        await c.engine.start()
        c.handle.refresh()
        assert (await watch.read()).status == SERVING  # pushed by refresh(), no polling
        for name in names:
            assert await check(c, name) == SERVING

        await c.engine.drain(0)
        c.handle.refresh()
        assert (await watch.read()).status == NOT_SERVING
        for name in names:
            assert await check(c, name) == NOT_SERVING
        assert await check(c, "liveness") == SERVING
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.stub.Score(pb.ScoreRequest(inputs=[text("a")]))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        watch.cancel()

        await c.engine.stop()
        assert await check(c, "liveness") == NOT_SERVING


async def test_reflection_lists_services() -> None:
    async with serving(api_key="secret") as c:  # reflection stays open without a key
        stub = reflection_pb2_grpc.ServerReflectionStub(c.channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = set()
        async for resp in call:
            names |= {s.name for s in resp.list_services_response.service}
        assert {"rlhf.v1.RewardService", "grpc.health.v1.Health"} <= names


# -- auth, request id, metrics -------------------------------------------------------------------


async def test_api_key() -> None:
    async with serving(api_key="secret") as c:
        request = pb.ScoreRequest(inputs=[text("a")])
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.stub.Score(request)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.stub.Score(request, metadata=(("authorization", "Bearer wrong"),))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=(("authorization", "Bearer wrong"),))
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in c.stub.ScoreStream(iter([request])):
                pass
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = await c.stub.Score(request, metadata=(("authorization", "Bearer secret"),))
        assert ok.results[0].WhichOneof("outcome") == "score"
        assert await check(c, "readiness") == SERVING  # health is open
        metric = c.engine.metrics.requests.labels("grpc", "Score", "UNAUTHENTICATED")._value.get()
        assert metric == 1


async def test_request_id_echoed_or_generated_and_metrics() -> None:
    async with serving() as c:
        call = c.stub.Score(pb.ScoreRequest(inputs=[text("a")]), metadata=(("x-request-id", "req-123"),))
        await call
        assert ("x-request-id", "req-123") in list(await call.initial_metadata())

        call = c.stub.Score(pb.ScoreRequest(inputs=[text("a")]))
        await call
        generated = dict(await call.initial_metadata()).get("x-request-id")
        assert isinstance(generated, str) and len(generated) == 32

        with pytest.raises(grpc.aio.AioRpcError):
            await c.stub.Score(pb.ScoreRequest())
        requests = c.engine.metrics.requests
        # The handler counts a call after its answer is sent: the client may look first.
        await wait_until(lambda: requests.labels("grpc", "Score", "INVALID_ARGUMENT")._value.get() == 1)
        assert requests.labels("grpc", "Score", "OK")._value.get() == 2


# -- errors --------------------------------------------------------------------------------------


async def test_invalid_input_is_invalid_argument() -> None:
    async with serving(max_text_bytes=100, max_body_bytes=4096) as c:
        cases: list[tuple[pb.ScoreRequest, str]] = [
            (pb.ScoreRequest(), "inputs is empty"),
            (
                pb.ScoreRequest(
                    inputs=[text("ok"), pb.RewardInput(messages=cpb.Conversation(messages=[cpb.Message(role="robot")]))]
                ),
                "item 1: unknown role 'robot'",
            ),
            (pb.ScoreRequest(inputs=[text("y" * 101)]), "item 0: text of 101 bytes exceeds --max-text-bytes 100"),
            (pb.ScoreRequest(inputs=[pb.RewardInput()]), "item 0: an item is exactly one of"),
            (
                pb.ScoreRequest(inputs=[pb.RewardInput(pair=pb.PromptResponse(response="r"))]),
                "item 0: prompt is not set",
            ),
            (pb.ScoreRequest(inputs=[text("a")], priority=7), "unknown priority 7"),  # type: ignore[arg-type]
        ]
        for request, message in cases:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.stub.Score(request)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            assert message in (exc.value.details() or ""), (message, exc.value.details())
        assert trailers(exc.value).get("error-item") is None
        # Over --max-body-bytes: grpc's own receive limit (= --max-body-bytes) refuses it unread.
        with pytest.raises(grpc.aio.AioRpcError) as big:
            await c.stub.Score(pb.ScoreRequest(inputs=[text("z" * 90)] * 50))
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (big.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.stub.Score(cases[1][0])
        assert trailers(exc.value)["error-item"] == "1"

        raw_score = c.channel.unary_unary(
            "/rlhf.v1.RewardService/Score",
            request_serializer=lambda b: b,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        # inputs[0].text = b"\xff": not UTF-8. grpc's own deserializer failure would be INTERNAL.
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await raw_score(b"\x0a\x03\x0a\x01\xff")
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in (exc.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await raw_score(b"\x0a\xff\xff")  # truncated message
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_overload_answers_resource_exhausted_at_once() -> None:
    gate = BlockAfter(free=1)  # the warm-up runs; every later batch waits
    backend = FakeBackend(gate=gate)  # type: ignore[arg-type]
    async with serving(backend, max_queue_items=4, max_items_per_request=4) as c:
        four = pb.ScoreRequest(inputs=[text(f"item {i}") for i in range(4)])
        first = asyncio.ensure_future(c.stub.Score(four))
        assert await asyncio.to_thread(gate.blocked.wait, 5)  # first batch holds the model thread
        # One more batch may wait for the worker and 4 items fit the queue: of three more
        # requests of 4 items, at least one must be refused, at once.
        calls = [c.stub.Score(four) for _ in range(3)]

        async def timed(call: Any) -> tuple[float, BaseException | None]:
            started = time.perf_counter()
            try:
                await call
            except grpc.aio.AioRpcError as e:
                return time.perf_counter() - started, e
            return time.perf_counter() - started, None

        tasks = [asyncio.ensure_future(timed(call)) for call in calls]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        elapsed, err = next(iter(done)).result()
        assert isinstance(err, grpc.aio.AioRpcError)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert elapsed < 0.5
        meta = trailers(err)
        assert int(meta["retry-delay-ms"]) > 0
        assert float(meta["retry-after"]) == pytest.approx(int(meta["retry-delay-ms"]) / 1000, abs=1e-3)
        gate.set()
        assert len((await first).results) == 4
        await asyncio.gather(*tasks)


async def test_deadline_exceeded() -> None:
    gate = BlockAfter(free=1)
    backend = FakeBackend(gate=gate)  # type: ignore[arg-type]
    async with serving(backend) as c:
        blocker = asyncio.ensure_future(c.stub.Score(pb.ScoreRequest(inputs=[text("hold")])))
        assert await asyncio.to_thread(gate.blocked.wait, 5)
        started = time.perf_counter()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.stub.Score(pb.ScoreRequest(inputs=[text("late")]), timeout=0.3)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.perf_counter() - started < 2
        gate.set()
        await blocker
        # The expired item never reached the model.
        assert all(bytes(it.input_ids) != b"late" for batch in backend.batches for it in batch)


async def test_client_cancel_releases_engine() -> None:
    gate = BlockAfter(free=1)
    backend = FakeBackend(gate=gate)  # type: ignore[arg-type]
    async with serving(backend) as c:
        blocker = asyncio.ensure_future(c.stub.Score(pb.ScoreRequest(inputs=[text("hold")])))
        assert await asyncio.to_thread(gate.blocked.wait, 5)
        call = c.stub.Score(pb.ScoreRequest(inputs=[text("cancel me")]))
        waiting = asyncio.ensure_future(call)
        in_flight = c.engine.metrics.in_flight
        while in_flight._value.get() < 2:  # wait until the engine admitted it (behind the held batch)
            await asyncio.sleep(0.005)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        while in_flight._value.get() > 1:  # the server cancelled the handler, and the engine let go
            await asyncio.sleep(0.005)
        gate.set()
        await blocker
        assert await c.engine.drain(5)  # nothing left in flight
        assert all(bytes(it.input_ids) != b"cancel me" for batch in backend.batches for it in batch)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    backend = FakeBackend()
    settings = make_settings(tls_cert=cert, tls_key=key)
    engine = RewardEngine(lambda: backend, settings.engine_config())
    handle = create_grpc_server(engine, settings, api_key=None)
    port = await handle.start(port=0)
    await engine.start()
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    try:
        async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
            response = await pb_grpc.RewardServiceStub(channel).Score(pb.ScoreRequest(inputs=[text("tls")]))
            assert response.results[0].score.score == fake_score(b"tls")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await pb_grpc.RewardServiceStub(plain).Score(pb.ScoreRequest(inputs=[text("tls")]), timeout=2)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await handle.stop(0)
        await engine.stop()


async def test_stop_reports_not_serving_and_ends_watches() -> None:
    async with serving() as c:
        watch = c.health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        started = time.perf_counter()
        stopping = asyncio.ensure_future(c.handle.stop(5.0))
        assert (await watch.read()).status == NOT_SERVING
        await stopping
        assert time.perf_counter() - started < 2.0  # an open Watch does not hold the grace period
