"""Slow and idle HTTP clients against a real uvicorn (``services/common/serving.py``) on loopback.

The server is the embedded uvicorn of every service (:func:`uvicorn_server`) with short limits,
serving an edge app (:func:`create_edge_app`) whose route reads its body as the services' routes
do (:meth:`BodyParser.read`); clients are raw sockets, so that they can be exactly as slow as a
test needs. Bounds on time are loose on purpose (``timeout × 3 + 2 s``): a busy machine makes a
server late, never early; "not too early" is checked against the timeout itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import Request

from services.common.http_guard import HttpLimits
from services.common.http_support import PROBE_ROUTE_NAMES, BodyParser, create_edge_app
from services.common.serving import uvicorn_server
from services.common.settings import ServiceSettings
from services.common.wire import StrictModel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

KEY = "k3y"
LIMIT = 1 << 20


class Body(StrictModel):
    text: str


@dataclass
class Recorder:
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def on_request(self, transport: str, method: str, status: str) -> None:
        self.calls.append((transport, method, status))


@dataclass
class Server:
    port: int
    limits: HttpLimits
    metrics: Recorder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bound(self, timeout: float) -> float:
        """How long a cut-off may take at most on a busy machine."""
        return timeout * 3 + 2


Start = Callable[..., Awaitable[Server]]


def limits(**kw: Any) -> HttpLimits:
    base: dict[str, Any] = {
        "header_timeout_s": 1.0,
        "body_timeout_s": 1.0,
        "body_min_rate": 1000,
        "keep_alive_s": 1,
        "max_connections": 1000,
    }
    return HttpLimits(**{**base, **kw})


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Start]:
    started: list[tuple[Any, asyncio.Task[None]]] = []

    async def start(lim: HttpLimits, *, api_key: str | None = None) -> Server:
        metrics = Recorder()
        parser = BodyParser()
        routes = {**PROBE_ROUTE_NAMES, "/v1/echo": "echo"}
        app = create_edge_app(title="t", api_key=api_key, metrics=metrics, route_names=routes, parser=parser)

        @app.post("/v1/echo")
        async def echo(request: Request) -> dict[str, int]:
            return {"length": len((await parser.read(request, Body, LIMIT)).text)}

        @app.get("/health/live")
        async def live() -> dict[str, str]:
            return {"status": "live"}

        server = uvicorn_server(app, host="127.0.0.1", port=0, log_level="warning", ssl=None, limits=lim)
        task = asyncio.create_task(server.serve())
        while not server.started:
            assert not task.done(), task
            await asyncio.sleep(0.01)
        started.append((server, task))
        return Server(int(server.servers[0].sockets[0].getsockname()[1]), lim, metrics)

    yield start
    for server, task in started:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)


async def connect(s: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", s.port)


async def until_closed(reader: asyncio.StreamReader, bound: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started = time.monotonic()
    chunks: list[bytes] = []

    async def read_all() -> None:
        # Chunk by chunk: StreamReader.read() would drop what came before a reset.
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                chunks.append(chunk)

    await asyncio.wait_for(read_all(), bound)
    return b"".join(chunks), time.monotonic() - started


def parse(raw: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, json.loads(body) if body else {}


def post_head(length: int, *, key: str | None = None) -> bytes:
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST /v1/echo HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n{auth}content-length: {length}\r\n\r\n"
    ).encode()


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """Send ``data`` one byte per ``every`` seconds until it is sent or the server hangs up."""
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(every)


def test_flags_have_help_and_defaults() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    ServiceSettings.add_arguments(parser)
    text = parser.format_help()
    for flag in (
        "--http-header-timeout-s",
        "--http-body-timeout-s",
        "--http-body-min-rate",
        "--http-keep-alive-s",
        "--http-max-connections",
    ):
        assert flag in text
    got = HttpLimits.from_settings(ServiceSettings())
    assert got == HttpLimits(
        header_timeout_s=10.0, body_timeout_s=30.0, body_min_rate=1024, keep_alive_s=65, max_connections=1024
    )
    flags = {"http_body_timeout_s": "5", "http_max_connections": "7"}
    s = ServiceSettings.from_sources(flags, environ={"RLHF_FEEDBACK_HTTP_BODY_MIN_RATE": "0"})
    assert (s.http_body_timeout_s, s.http_max_connections, s.http_body_min_rate) == (5.0, 7, 0)


async def test_idle_new_connection_is_closed_after_the_header_timeout(serve: Start) -> None:
    s = await serve(limits())
    reader, _ = await connect(s)
    data, took = await until_closed(reader, s.bound(1.0))
    assert data == b""  # nothing came, nothing to explain
    assert took >= 0.9


async def test_slow_headers_get_408_and_the_connection_closed(serve: Start) -> None:
    s = await serve(limits())
    reader, writer = await connect(s)
    # A byte every 0.2 s: each byte is "activity", but the headers as a whole are late.
    sender = asyncio.create_task(trickle(writer, b"GET /health/live HTTP/1.1\r\nhost: t\r\nx-slow: " + b"a" * 100, 0.2))
    data, took = await until_closed(reader, s.bound(1.0))
    sender.cancel()
    status, headers, body = parse(data)
    assert status == 408 and headers["connection"] == "close"
    assert body["error"] == {
        "code": "DEADLINE_EXCEEDED",
        "message": "request headers took longer than --http-header-timeout-s 1 s",
    }
    assert took >= 0.9


async def test_headers_of_a_later_request_are_timed_from_its_first_byte(serve: Start) -> None:
    s = await serve(limits(header_timeout_s=1.0, keep_alive_s=30))
    reader, writer = await connect(s)
    writer.write(b"GET /health/live HTTP/1.1\r\nhost: t\r\n\r\n")
    await writer.drain()
    first = await asyncio.wait_for(reader.readuntil(b'{"status":"live"}'), 5)
    assert first.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(1.5)  # idle on keep-alive, longer than the header timeout: still open
    writer.write(b"GET /health/live HTTP/1.1\r\nhost: t\r\n")  # ...then half a request
    await writer.drain()
    data, took = await until_closed(reader, s.bound(1.0))
    assert parse(data)[0] == 408
    assert took >= 0.9


async def test_idle_keep_alive_connection_is_closed_after_keep_alive(serve: Start) -> None:
    s = await serve(limits(header_timeout_s=30.0, keep_alive_s=1))
    reader, writer = await connect(s)
    writer.write(b"GET /health/live HTTP/1.1\r\nhost: t\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b'{"status":"live"}'), 5)
    data, _ = await until_closed(reader, s.bound(1.0))
    assert data == b""


async def test_stalled_body_gets_408_with_the_error_body_and_close(serve: Start) -> None:
    s = await serve(limits(body_timeout_s=1.0, body_min_rate=0))
    reader, writer = await connect(s)
    writer.write(post_head(1000) + b'{"text": "')
    await writer.drain()
    data, took = await until_closed(reader, s.bound(1.0))
    status, headers, body = parse(data)
    assert status == 408 and headers["connection"] == "close"
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "DEADLINE_EXCEEDED"
    assert re.fullmatch(
        r"request body arrived too slowly \(10 bytes in \d+\.\d s\): it paused for over --http-body-timeout-s 1 s",
        error["message"],
    ), error
    assert took >= 0.9
    assert s.metrics.calls == [("http", "echo", "408")]


async def test_trickled_body_is_cut_off_by_the_minimum_rate(serve: Start) -> None:
    # No pause reaches the 1 s limit, but 5 bytes/s is far under 1000 bytes/s.
    s = await serve(limits(body_timeout_s=1.0, body_min_rate=1000))
    reader, writer = await connect(s)
    writer.write(post_head(1000))
    sender = asyncio.create_task(trickle(writer, b'{"text": "' + b"x" * 900, 0.2))
    data, took = await until_closed(reader, s.bound(1.0))
    sender.cancel()
    status, headers, body = parse(data)
    assert status == 408 and headers["connection"] == "close"
    assert "averaged under --http-body-min-rate 1000 bytes/s" in str(body["error"])
    assert took >= 0.9


async def test_body_slower_than_the_pause_limit_in_total_but_steady_is_served(serve: Start) -> None:
    # 4 s in all for a body under a 1 s pause limit: chunks of 1 KiB every 0.25 s (4 KiB/s).
    s = await serve(limits(body_timeout_s=1.0, body_min_rate=1000))
    payload = json.dumps({"text": "y" * 16000}).encode()
    reader, writer = await connect(s)
    writer.write(post_head(len(payload)))
    for i in range(0, len(payload), 1024):
        writer.write(payload[i : i + 1024])
        await writer.drain()
        await asyncio.sleep(0.25)
    head = await asyncio.wait_for(reader.readuntil(b"}"), 10)
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b'{"length":16000}')
    writer.close()


async def test_unread_body_after_an_early_answer_is_drained_under_the_body_rules(serve: Start) -> None:
    s = await serve(limits(body_timeout_s=1.0, body_min_rate=1000, keep_alive_s=30), api_key=KEY)
    # Without a key the answer (401) comes before the body is read; the trickled rest is cut off.
    reader, writer = await connect(s)
    writer.write(post_head(1000) + b"{")
    await writer.drain()
    sender = asyncio.create_task(trickle(writer, b"x" * 999, 0.2))
    data, took = await until_closed(reader, s.bound(1.0))
    sender.cancel()
    assert parse(data)[0] == 401
    assert took >= 0.9

    # A client that sends its whole body at once reads its 401 and keeps its connection.
    reader, writer = await connect(s)
    payload = json.dumps({"text": "z" * 50000}).encode()
    for _ in range(2):
        writer.write(post_head(len(payload)) + payload)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"}}"), 5)
        assert answer.startswith(b"HTTP/1.1 401")
    writer.close()


async def test_100_slow_bodies_are_closed_while_a_normal_client_is_served(serve: Start) -> None:
    s = await serve(limits(header_timeout_s=5.0, body_timeout_s=1.0, body_min_rate=1000))
    conns = [await connect(s) for _ in range(100)]
    for _, writer in conns:
        writer.write(post_head(100_000) + b'{"text": "')
    senders = [asyncio.create_task(trickle(w, b"x" * 1000, 0.3)) for _, w in conns]
    started = time.monotonic()
    closing = asyncio.gather(*(until_closed(r, 60) for r, _ in conns))
    async with httpx.AsyncClient(base_url=s.url) as client:
        latencies = []
        while not closing.done():
            t0 = time.monotonic()
            r = await client.post("/v1/echo", json={"text": "hello"}, timeout=10)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200 and r.json() == {"length": 5}
            await asyncio.sleep(0.1)
    results = await closing
    elapsed = time.monotonic() - started
    for task in senders:
        task.cancel()
    assert [parse(data)[0] for data, _ in results] == [408] * 100
    assert elapsed < s.bound(1.0) + 5  # all 100 at about the body timeout, not one after another
    assert max(latencies) < 5, latencies
    assert s.metrics.calls.count(("http", "echo", "408")) == 100


async def test_connections_beyond_the_cap_are_answered_503_and_closed(serve: Start) -> None:
    s = await serve(limits(header_timeout_s=30.0, max_connections=3))
    held = [await connect(s) for _ in range(3)]
    await asyncio.sleep(0.2)
    reader, writer = await connect(s)
    writer.write(b"GET /health/live HTTP/1.1\r\nhost: t\r\n\r\n")
    await writer.drain()
    data, _ = await until_closed(reader, 10)
    status, headers, body = parse(data)
    assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
    assert body == {
        "error": {"code": "UNAVAILABLE", "message": "server at its connection limit (--http-max-connections 3)"}
    }
    # A held connection is served as usual; once one closes, a new one is too.
    r0, w0 = held[0]
    w0.write(b"GET /health/live HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
    await w0.drain()
    assert parse((await until_closed(r0, 10))[0])[0] == 200
    await asyncio.sleep(0.2)
    async with httpx.AsyncClient(base_url=s.url) as client:
        assert (await client.get("/health/live")).status_code == 200
    for _, w in held[1:]:
        w.close()
