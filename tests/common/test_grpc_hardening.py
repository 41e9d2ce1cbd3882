"""gRPC hardening every service shares (``services/common/grpc_support.py``): an unauthenticated
call is refused before its message is read, the receive limit is ``--max-body-bytes``, and metric
labels stay bounded whatever method names clients send.

In process: a grpc.aio server from :func:`build_grpc_server` on a free loopback port, with methods of
every shape over the health protos (a string field that can be made as big as a test needs).
Memory: the same server in a subprocess (``python -m tests.common.test_grpc_hardening``), its RSS read
from ``/proc`` while 4 clients send 120 MiB each.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1.health_pb2 import HealthCheckRequest as Req
from grpc_health.v1.health_pb2 import HealthCheckResponse as Resp
from prometheus_client import CollectorRegistry, Counter, generate_latest

from clients.errors import InvalidRequestError, from_grpc
from services.common.grpc_support import UNKNOWN_METHOD, MethodHandlers, build_grpc_server
from services.common.settings import ServiceSettings
from tests.support.memory import proc_status_bytes

pytestmark = pytest.mark.timeout(120)

SERVICE = "test.v1.Hardened"
KEY = "the-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
MIB = 2**20
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Calls:
    """What reached the server's own code: deserializer calls and method bodies."""

    decoded: int = 0
    ran: list[str] = field(default_factory=list)


class PromMetrics:
    """RequestMetrics on a real Prometheus counter, to count the series an exposition shows."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("t_requests", "Requests.", ["transport", "method", "status"], registry=self.registry)

    def on_request(self, transport: str, method: str, status: str) -> None:
        self.requests.labels(transport, method, status).inc()

    def lines(self) -> int:
        return len(generate_latest(self.registry).splitlines())

    def value(self, method: str, status: str) -> float:
        return float(self.requests.labels("grpc", method, status)._value.get())


def handlers(metrics: PromMetrics, max_body: int, calls: Calls) -> dict[str, grpc.RpcMethodHandler]:
    m = MethodHandlers(metrics, max_body)

    def counting(h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        deserialize: Callable[[bytes], Any] = h.request_deserializer  # type: ignore[assignment]

        def count(data: bytes) -> Any:
            calls.decoded += 1
            return deserialize(data)

        return h._replace(request_deserializer=count)  # type: ignore[attr-defined]

    async def check(request: Req, context: Any, request_id: str) -> Resp:
        calls.ran.append("Check")
        return Resp(status=Resp.SERVING)

    async def watch(requests: AsyncIterator[Any], context: Any, request_id: str) -> AsyncIterator[Resp]:
        calls.ran.append("Watch")
        async for _ in requests:
            yield Resp(status=Resp.SERVING)

    return {
        "Check": counting(m.unary("Check", check, Req, Resp)),
        "Watch": counting(m.stream("Watch", watch, Req, Resp)),
    }


@dataclass
class Rig:
    channel: grpc.aio.Channel
    metrics: PromMetrics
    calls: Calls

    def unary(self, method: str = "Check") -> Any:
        return self.channel.unary_unary(
            f"/{SERVICE}/{method}", request_serializer=_raw_or_message, response_deserializer=Resp.FromString
        )

    def stream(self, method: str = "Watch") -> Any:
        return self.channel.stream_stream(
            f"/{SERVICE}/{method}", request_serializer=_raw_or_message, response_deserializer=Resp.FromString
        )


def _raw_or_message(x: bytes | Req) -> bytes:
    return x if isinstance(x, bytes) else x.SerializeToString()


def request_of_size(n: int) -> bytes:
    """A valid HealthCheckRequest of exactly ``n`` bytes (n >= 131: a two-byte length prefix)."""
    payload = n - 3
    assert 128 <= payload < 2**14
    return bytes([0x0A, (payload & 0x7F) | 0x80, payload >> 7]) + b"s" * payload


async def start(max_body: int, api_key: str | None = KEY) -> tuple[Any, int, PromMetrics, Calls]:
    metrics, calls = PromMetrics(), Calls()
    settings = ServiceSettings(max_body_bytes=max_body)
    handle = build_grpc_server(
        SERVICE,
        handlers(metrics, max_body, calls),
        settings,
        api_key=api_key,
        metrics=metrics,
        live=lambda: True,
        ready=lambda: True,
    )
    port = await handle.start(port=0)
    return handle, port, metrics, calls


async def rig_of(max_body: int = 4096, api_key: str | None = KEY) -> tuple[Any, Rig]:
    handle, port, metrics, calls = await start(max_body, api_key)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return handle, Rig(channel, metrics, calls)


async def stop(handle: Any, rig: Rig) -> None:
    await rig.channel.close(None)
    await handle.stop(grace=0.5)


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        result = await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    del result
    return grpc.StatusCode.OK, ""


async def drain_stream(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


# -- auth before the message is read --------------------------------------------------------------


async def test_unauthenticated_calls_are_refused_without_decoding_their_message() -> None:
    handle, rig = await rig_of()
    try:
        body = Req(service="s" * 1000)
        for metadata, code, message in (
            (None, grpc.StatusCode.UNAUTHENTICATED, "missing 'Authorization: Bearer <key>' header"),
            ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED, "API key not accepted"),
        ):
            assert await code_of(rig.unary()(body, metadata=metadata)) == (code, message)
            # No messages on the stream: a grpc.aio client still writing when the status comes
            # back sometimes reports INTERNAL "Internal error from Core" instead (a client-side
            # race, ~5% on a busy machine, with or without this change).
            assert await drain_stream(rig.stream()(iter(()), metadata=metadata)) == (code, message)
        assert rig.calls == Calls(decoded=0, ran=[])
        assert rig.metrics.value("Check", "UNAUTHENTICATED") == 1
        assert rig.metrics.value("Watch", "PERMISSION_DENIED") == 1

        # With the key, the same calls are read and served.
        assert await code_of(rig.unary()(body, metadata=AUTH)) == (grpc.StatusCode.OK, "")
        assert await drain_stream(rig.stream()(iter([body, body]), metadata=AUTH)) == (grpc.StatusCode.OK, "")
        assert rig.calls == Calls(decoded=3, ran=["Check", "Watch"])
    finally:
        await stop(handle, rig)


async def test_health_stays_open_without_a_key() -> None:
    handle, rig = await rig_of()
    try:
        check = rig.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=Req.SerializeToString,
            response_deserializer=Resp.FromString,
        )
        assert (await check(Req(service=SERVICE))).status == Resp.SERVING
    finally:
        await stop(handle, rig)


# -- receive limit --------------------------------------------------------------------------------


async def test_receive_limit_is_max_body_bytes() -> None:
    handle, rig = await rig_of(max_body=4096)
    try:
        assert await code_of(rig.unary()(request_of_size(4096), metadata=AUTH)) == (grpc.StatusCode.OK, "")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rig.unary()(request_of_size(4097), metadata=AUTH)
        # grpc's own limit answers before any of our code runs: RESOURCE_EXHAUSTED, which the
        # error table lists for the transport limit, and which the clients read as a bad request.
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max (4097 vs. 4096)" in (info.value.details() or "")
        assert isinstance(from_grpc(info.value, request_id=None), InvalidRequestError)
        assert rig.calls.ran == ["Check"]
    finally:
        await stop(handle, rig)


# -- metric labels --------------------------------------------------------------------------------


async def test_made_up_method_names_add_no_metric_series() -> None:
    handle, rig = await rig_of()
    try:
        # The first unknown name of each outcome makes its one "unknown" series...
        assert (await code_of(rig.unary("Nope")(b"")))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert (await code_of(rig.unary("Nope")(b"", metadata=AUTH)))[0] == grpc.StatusCode.UNIMPLEMENTED
        before = rig.metrics.lines()
        # ...and no later one adds any: 300 made-up names with no key, 300 with the key.
        for i in range(300):
            method = rig.channel.unary_unary(f"/made.up{i}.Svc/M{i}", None, None)
            assert (await code_of(method(b"")))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert (await code_of(method(b"", metadata=AUTH)))[0] == grpc.StatusCode.UNIMPLEMENTED
        assert rig.metrics.lines() == before
        assert rig.metrics.value(UNKNOWN_METHOD, "UNAUTHENTICATED") == 301
        assert rig.metrics.value(UNKNOWN_METHOD, "UNIMPLEMENTED") == 301
        assert b"made.up" not in generate_latest(rig.metrics.registry)
    finally:
        await stop(handle, rig)


# -- memory under attack (subprocess) --------------------------------------------------------------


def _serve_forever(max_body: int) -> None:
    """The server process: print the port, serve until stdin closes."""

    async def main() -> None:
        handle, port, _, _ = await start(max_body)
        print(port, flush=True)
        await asyncio.to_thread(sys.stdin.read)
        await handle.stop(grace=0)

    asyncio.run(main())


def _rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    return proc_status_bytes(pid, "VmRSS") / MIB, proc_status_bytes(pid, "VmHWM") / MIB


@pytest.fixture
def server_process() -> Iterator[Callable[[int], tuple[subprocess.Popen[str], int]]]:
    procs: list[subprocess.Popen[str]] = []

    def launch(max_body: int) -> tuple[subprocess.Popen[str], int]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.common.test_grpc_hardening", str(max_body)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        procs.append(proc)
        assert proc.stdout is not None
        return proc, int(proc.stdout.readline())

    yield launch
    for proc in procs:
        proc.kill()
        proc.wait(10)


async def _attack(port: int, pid: int, metadata: Any) -> tuple[list[grpc.StatusCode], float]:
    """4 concurrent 120 MiB calls; their codes and the server's RSS growth in MiB."""
    options = [("grpc.max_send_message_length", 2**31 - 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Check", _raw_or_message, None)
        await code_of(call(Req(service="warm-up"), metadata=AUTH))
        base_rss, base_hwm = _rss_mib(pid)
        peak = base_rss
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_mib(pid)[0])
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        big = Req(service="x" * (120 * MIB)).SerializeToString()
        try:
            results = await asyncio.gather(*(code_of(call(big, metadata=metadata, timeout=60)) for _ in range(4)))
        finally:
            done.set()
            sampler.join()
        hwm = _rss_mib(pid)[1]
        if hwm > base_hwm:  # the peak since start-up moved: it is this attack's
            peak = max(peak, hwm)
        return [code for code, _ in results], peak - base_rss


@pytest.mark.slow
async def test_unauthenticated_120_mib_messages_cost_no_memory(server_process: Any) -> None:
    # The receive limit is above the messages: only the auth check keeps them out of memory.
    proc, port = server_process(128 * MIB)
    codes, growth = await _attack(port, proc.pid, None)
    assert (codes, growth < 100) == ([grpc.StatusCode.UNAUTHENTICATED] * 4, True), f"RSS +{growth:.0f} MiB"


@pytest.mark.slow
async def test_oversized_authenticated_messages_are_refused_before_buffering(server_process: Any) -> None:
    proc, port = server_process(64 * MIB)
    codes, growth = await _attack(port, proc.pid, AUTH)
    assert (codes, growth < 100) == ([grpc.StatusCode.RESOURCE_EXHAUSTED] * 4, True), f"RSS +{growth:.0f} MiB"


if __name__ == "__main__":
    _serve_forever(int(sys.argv[1]))
