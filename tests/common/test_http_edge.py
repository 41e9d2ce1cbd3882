"""The HTTP edge every service shares (``services/common/http_support.py``), on a tiny app of its own.

One app built here with :func:`create_edge_app`, a few routes over a tiny pydantic body, and the
probe routes, driven in process (``httpx.AsyncClient(transport=ASGITransport(app))``, or raw ASGI
where httpx would fix the request up). Covers the error body and the one error table (400 / 413 /
422 with ``item`` / 429 + ``Retry-After`` / 500 with the generic text only), bodies (invalid JSON,
bad UTF-8, size limit by ``Content-Length`` and while streaming), ``X-Request-Timeout``, request
ids, bearer auth and its open paths, 404 / 405, client disconnects, probes, and metrics labels
that stay bounded whatever path a client sends.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter
from starlette.types import Message

from services.common.errors import INTERNAL_MESSAGE, ErrorCode, ServiceError
from services.common.http_support import (
    PARSE_INLINE_BYTES,
    PROBE_ROUTE_NAMES,
    BodyParser,
    add_probe_routes,
    create_edge_app,
    request_deadline,
    run_until_disconnect,
)
from services.common.wire import StrictModel

LIMIT = 4096
KEY = "s3cret-key"
HEX_ID = re.compile(r"^[0-9a-f]{32}$")


class Item(StrictModel):
    text: str


class Body(StrictModel):
    inputs: list[Item]
    note: str | None = None


@dataclass
class Recorder:
    """RequestMetrics that keeps every label triple."""

    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def on_request(self, transport: str, method: str, status: str) -> None:
        self.calls.append((transport, method, status))


@dataclass
class Probe:
    live: bool = True
    ready: bool = False
    state: str = "starting"


@dataclass
class Edge:
    app: FastAPI
    client: httpx.AsyncClient
    metrics: Recorder
    probe: Probe
    cancelled: asyncio.Event


def build(api_key: str | None, limit: int = LIMIT) -> tuple[FastAPI, Recorder, Probe, asyncio.Event]:
    metrics, probe, cancelled = Recorder(), Probe(), asyncio.Event()
    parser = BodyParser(item_lists=frozenset({"inputs"}))
    routes = {
        **PROBE_ROUTE_NAMES,
        "/v1/echo": "echo",
        "/v1/fail": "fail",
        "/v1/bug": "bug",
        "/v1/typed": "typed",
        "/v1/wait": "wait",
    }
    app = create_edge_app(title="edge test", api_key=api_key, metrics=metrics, route_names=routes, parser=parser)

    @app.post("/v1/echo")
    async def echo(request: Request) -> Any:
        body = await parser.read(request, Body, limit)
        deadline = request_deadline(request)
        return {
            "texts": [x.text for x in body.inputs],
            "seconds_left": None if deadline is None else deadline - time.monotonic(),
            "request_id": request.state.request_id,
            "nan": float("nan"),
        }

    @app.post("/v1/fail")
    async def fail(code: str, retry_after: float | None = None, item: int | None = None) -> Any:
        raise ServiceError(ErrorCode(code), f"secret detail of {code}", retry_after=retry_after, item=item)

    @app.get("/v1/bug")
    async def bug() -> Any:
        raise RuntimeError("secret detail: /etc/passwd")

    @app.get("/v1/typed")
    async def typed(n: int) -> Any:
        return {"n": n}

    @app.post("/v1/wait")
    async def wait(request: Request) -> Any:
        await request.body()  # as every engine route does: read the body, then run the work

        async def work() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                cancelled.set()

        return await run_until_disconnect(request, work())

    registry = CollectorRegistry()
    Counter("edge_test_things", "A metric to find in /metrics.", registry=registry).inc(3)
    add_probe_routes(app, probe, registry, state=lambda: probe.state)
    return app, metrics, probe, cancelled


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Any]:
    clients: list[httpx.AsyncClient] = []

    def factory(api_key: str | None = None, limit: int = LIMIT) -> Edge:
        app, metrics, probe, cancelled = build(api_key, limit)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge.test")
        clients.append(client)
        return Edge(app, client, metrics, probe, cancelled)

    yield factory
    for c in clients:
        await c.aclose()


@pytest.fixture
def edge(make: Any) -> Edge:
    edge: Edge = make()
    return edge


def error_of(r: httpx.Response, status: int, code: str, item: int | None = None) -> str:
    """The message of an error response, after checking its status and its exact shape."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert err["code"] == code, body
    assert set(err) == ({"code", "message"} if item is None else {"code", "message", "item"}), body
    if item is not None:
        assert err["item"] == item
    assert isinstance(err["message"], str) and err["message"]
    return str(err["message"])


async def raw(
    app: FastAPI, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes], method: str = "POST"
) -> tuple[int, dict[str, str], bytes]:
    """One request straight through ASGI: headers exactly as given, the body in ``chunks``."""
    pending = list(chunks) or [b""]
    sent: list[Message] = []

    async def receive() -> dict[str, Any]:
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
        await asyncio.Event().wait()  # never disconnects
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *headers],
        "client": ("127.0.0.1", 1234),
        "server": ("edge.test", 80),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return int(start["status"]), {k.decode(): v.decode() for k, v in start["headers"]}, body


# -- bodies -----------------------------------------------------------------------------------------


async def test_a_valid_body_is_parsed_and_json_is_rendered_by_orjson(edge: Edge) -> None:
    r = await edge.client.post("/v1/echo", json={"inputs": [{"text": "  verbatim \n"}, {"text": "b"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["texts"] == ["  verbatim \n", "b"]
    assert body["seconds_left"] is None  # no X-Request-Timeout: no deadline
    assert body["nan"] is None  # NaN is rendered as null, not as invalid JSON


async def test_invalid_json_is_400(edge: Edge) -> None:
    r = await edge.client.post("/v1/echo", content=b'{"inputs": [', headers={"content-type": "application/json"})
    message = error_of(r, 400, "INVALID_ARGUMENT")
    assert message.startswith("request body is not valid JSON: EOF while parsing")


async def test_bad_utf8_is_400_with_the_byte_offset(edge: Edge) -> None:
    body = b'{"inputs": [{"text": "caf\xe9"}]}'
    offset = body.index(0xE9)
    r = await edge.client.post("/v1/echo", content=body, headers={"content-type": "application/json"})
    assert error_of(r, 400, "INVALID_ARGUMENT") == f"request body is not valid UTF-8 (byte {offset})"


async def test_a_lone_surrogate_escape_is_invalid_json(edge: Edge) -> None:
    r = await edge.client.post(
        "/v1/echo", content=b'{"inputs": [{"text": "\\ud800"}]}', headers={"content-type": "application/json"}
    )
    assert error_of(r, 400, "INVALID_ARGUMENT").startswith("request body is not valid JSON")


@pytest.mark.parametrize(
    ("body", "message", "item"),
    [
        pytest.param({"inputs": [{"text": "a"}, {"text": 5}]}, "inputs[1].text: Input should be a valid string", 1),
        pytest.param({"inputs": [{"text": "a", "extra": 1}]}, "inputs[0].extra: Extra inputs are not permitted", 0),
        pytest.param({"inputs": "abc"}, "inputs: Input should be a valid array", None, id="not a list"),
        pytest.param({}, "inputs: Field required", None, id="missing"),
        pytest.param({"inputs": [], "note": 1}, "note: Input should be a valid string", None, id="outside the items"),
        pytest.param([1, 2], "body: Input should be an object", None, id="not an object"),
    ],
)
async def test_schema_errors_are_422_naming_the_field_and_item(
    edge: Edge, body: Any, message: str, item: int | None
) -> None:
    r = await edge.client.post("/v1/echo", json=body)
    assert error_of(r, 422, "INVALID_ARGUMENT", item) == message


async def test_several_schema_errors_name_the_first_and_count_the_rest(edge: Edge) -> None:
    r = await edge.client.post("/v1/echo", json={"inputs": [{"text": 1}, {"text": 2}]})
    assert (
        error_of(r, 422, "INVALID_ARGUMENT", 0) == "inputs[0].text: Input should be a valid string (and 1 more error)"
    )
    r = await edge.client.post("/v1/echo", json={"inputs": [{"text": 1}, {"text": 2}, {}]})
    assert error_of(r, 422, "INVALID_ARGUMENT", 0).endswith("(and 2 more errors)")


async def test_fastapi_parameter_errors_use_the_same_body(edge: Edge) -> None:
    r = await edge.client.get("/v1/typed", params={"n": "many"})
    message = error_of(r, 422, "INVALID_ARGUMENT")
    assert message.startswith("n: Input should be a valid integer")
    assert (await edge.client.get("/v1/typed", params={"n": "7"})).json() == {"n": 7}


async def test_a_large_body_is_parsed_off_the_loop_with_the_same_result(make: Any) -> None:
    edge: Edge = make(limit=4 * PARSE_INLINE_BYTES)
    texts = [f"text {i} " + "x" * 200 for i in range(2 * PARSE_INLINE_BYTES // 200)]
    r = await edge.client.post("/v1/echo", json={"inputs": [{"text": t} for t in texts]})
    assert r.status_code == 200 and r.json()["texts"] == texts
    bad = {"inputs": [{"text": t} for t in texts] + [{"text": 0}]}
    r = await edge.client.post("/v1/echo", json=bad)
    assert error_of(r, 422, "INVALID_ARGUMENT", len(texts)).startswith(f"inputs[{len(texts)}].text")


# -- body size --------------------------------------------------------------------------------------


async def test_a_declared_size_over_the_limit_is_413_before_reading(edge: Edge) -> None:
    body = b'{"inputs": [{"text": "' + b"x" * LIMIT + b'"}]}'
    r = await edge.client.post("/v1/echo", content=body, headers={"content-type": "application/json"})
    message = error_of(r, 413, "INVALID_ARGUMENT")
    assert message.startswith(f"request body of {len(body)} bytes exceeds --max-body-bytes {LIMIT}")


async def test_a_body_exactly_at_the_limit_is_read(edge: Edge) -> None:
    head, tail = b'{"inputs": [{"text": "', b'"}]}'
    body = head + b"x" * (LIMIT - len(head) - len(tail)) + tail
    assert len(body) == LIMIT
    r = await edge.client.post("/v1/echo", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


async def test_a_streamed_body_over_the_limit_is_413_while_it_arrives(edge: Edge) -> None:
    # No Content-Length: chunks of 1 KiB until past the limit.
    chunks = [b'{"inputs": [{"text": "'] + [b"x" * 1024] * 8
    status, headers, body = await raw(edge.app, "/v1/echo", [], chunks)
    assert status == 413
    assert b"request body exceeds --max-body-bytes 4096" in body
    assert headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("length", "message"),
    [(b"many", b"Content-Length is not a number"), (b"-5", b"Content-Length is negative")],
)
async def test_a_broken_content_length_is_400(edge: Edge, length: bytes, message: bytes) -> None:
    status, _, body = await raw(edge.app, "/v1/echo", [(b"content-length", length)], [b'{"inputs": []}'])
    assert status == 400
    assert message in body and b'"INVALID_ARGUMENT"' in body


# -- deadlines and request ids ----------------------------------------------------------------------


async def test_x_request_timeout_becomes_a_deadline(edge: Edge) -> None:
    before = time.monotonic()
    r = await edge.client.post("/v1/echo", json={"inputs": []}, headers={"X-Request-Timeout": "1000.5"})
    after = time.monotonic()
    left = r.json()["seconds_left"]
    # The deadline is (arrival + 1000.5), read again before the answer: both moments lie in [before, after].
    assert 1000.5 - (after - before) <= left <= 1000.5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "X-Request-Timeout must be a number of seconds, got 'soon'"),
        ("0", "X-Request-Timeout must be a positive, finite number of seconds, got '0'"),
        ("-1.5", "X-Request-Timeout must be a positive, finite number of seconds, got '-1.5'"),
        ("nan", "X-Request-Timeout must be a positive, finite number of seconds, got 'nan'"),
        ("inf", "X-Request-Timeout must be a positive, finite number of seconds, got 'inf'"),
    ],
)
async def test_a_bad_x_request_timeout_is_400(edge: Edge, value: str, message: str) -> None:
    r = await edge.client.post("/v1/echo", json={"inputs": []}, headers={"X-Request-Timeout": value})
    assert error_of(r, 400, "INVALID_ARGUMENT") == message


async def test_a_request_id_is_echoed_or_made(edge: Edge) -> None:
    r = await edge.client.post("/v1/echo", json={"inputs": []}, headers={"x-request-id": "trace-7:a/b"})
    assert r.headers["x-request-id"] == "trace-7:a/b" == r.json()["request_id"]
    r = await edge.client.post("/v1/echo", json={"inputs": []})
    assert HEX_ID.match(r.headers["x-request-id"]) and r.json()["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize("bad", ["has spaces", "x" * 129, "new\tline", "ünicode"])
async def test_an_unsafe_request_id_is_replaced(edge: Edge, bad: str) -> None:
    r = await edge.client.post("/v1/echo", json={"inputs": []}, headers=[(b"x-request-id", bad.encode("utf-8"))])
    assert HEX_ID.match(r.headers["x-request-id"]), r.headers["x-request-id"]


async def test_error_responses_carry_the_request_id_too(edge: Edge) -> None:
    r = await edge.client.get("/v1/typed", params={"n": "x"}, headers={"x-request-id": "req-422"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "req-422"


# -- the error table --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("INVALID_ARGUMENT", 400),
        ("UNAUTHENTICATED", 401),
        ("PERMISSION_DENIED", 403),
        ("DEADLINE_EXCEEDED", 504),
        ("UNAVAILABLE", 503),
    ],
)
async def test_service_errors_answer_with_the_table_status(edge: Edge, code: str, status: int) -> None:
    r = await edge.client.post("/v1/fail", params={"code": code})
    assert error_of(r, status, code) == f"secret detail of {code}"
    assert "retry-after" not in r.headers


async def test_the_item_index_is_in_the_body(edge: Edge) -> None:
    r = await edge.client.post("/v1/fail", params={"code": "INVALID_ARGUMENT", "item": 3})
    error_of(r, 400, "INVALID_ARGUMENT", item=3)


@pytest.mark.parametrize(("retry_after", "header"), [(None, "1"), (0.2, "1"), (1.0, "1"), (2.1, "3"), (30.0, "30")])
async def test_overload_is_429_with_retry_after_in_whole_seconds(
    edge: Edge, retry_after: float | None, header: str
) -> None:
    params: dict[str, Any] = {"code": "RESOURCE_EXHAUSTED"}
    if retry_after is not None:
        params["retry_after"] = retry_after
    r = await edge.client.post("/v1/fail", params=params)
    error_of(r, 429, "RESOURCE_EXHAUSTED")
    assert r.headers["retry-after"] == header


async def test_an_internal_service_error_hides_its_message(edge: Edge) -> None:
    r = await edge.client.post("/v1/fail", params={"code": "INTERNAL"})
    assert error_of(r, 500, "INTERNAL") == INTERNAL_MESSAGE
    assert "secret" not in r.text


async def test_an_unexpected_exception_is_a_generic_500_logged_with_the_request_id(
    edge: Edge, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="services.common.http_support"):
        r = await edge.client.get("/v1/bug", headers={"x-request-id": "bug-42"})
    assert error_of(r, 500, "INTERNAL") == INTERNAL_MESSAGE
    assert "secret" not in r.text and "passwd" not in r.text
    assert r.headers["x-request-id"] == "bug-42"
    logged = [rec for rec in caplog.records if "bug-42" in rec.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback goes to the log
    assert ("http", "bug", "500") in edge.metrics.calls


async def test_unknown_route_is_404_and_wrong_method_405_in_the_error_shape(edge: Edge) -> None:
    # DESIGN.md's error table: "unknown route or method", 404 (NOT_FOUND) / 405, one domain error.
    message = error_of(await edge.client.get("/nope"), 404, "NOT_FOUND")
    assert message == "no route GET /nope; GET /openapi.json (or /docs) lists the routes"
    r = await edge.client.get("/v1/echo")
    assert error_of(r, 405, "NOT_FOUND") == "GET /v1/echo: method not allowed; this route accepts POST"
    assert r.headers["allow"] == "POST"


async def test_unknown_route_code_is_not_found(edge: Edge) -> None:
    error_of(await edge.client.get("/nope"), 404, "NOT_FOUND")
    # a long path is cut in the message, never echoed whole
    assert len(error_of(await edge.client.post("/x" * 5000, json={}), 404, "NOT_FOUND")) < 300


# -- auth -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "status", "code"),
    [
        (None, 401, "UNAUTHENTICATED"),
        ("", 401, "UNAUTHENTICATED"),
        (f"Basic {KEY}", 401, "UNAUTHENTICATED"),
        ("Bearer", 401, "UNAUTHENTICATED"),
        ("Bearer wrong-key", 403, "PERMISSION_DENIED"),
        (f"Bearer {KEY}x", 403, "PERMISSION_DENIED"),
    ],
)
async def test_a_missing_or_wrong_key_is_refused(make: Any, authorization: str | None, status: int, code: str) -> None:
    edge: Edge = make(api_key=KEY)
    headers = {"x-request-id": "auth-1"}
    if authorization is not None:
        headers["authorization"] = authorization
    r = await edge.client.post("/v1/echo", json={"inputs": []}, headers=headers)
    error_of(r, status, code)
    assert r.headers["x-request-id"] == "auth-1"
    assert ("www-authenticate" in r.headers) == (status == 401)
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert KEY not in r.text


@pytest.mark.parametrize("authorization", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}  "])
async def test_the_right_key_is_accepted(make: Any, authorization: str) -> None:
    edge: Edge = make(api_key=KEY)
    r = await edge.client.post("/v1/echo", json={"inputs": []}, headers={"authorization": authorization})
    assert r.status_code == 200, r.text


async def test_probes_stay_open_and_everything_else_is_closed(make: Any) -> None:
    edge: Edge = make(api_key=KEY)
    edge.probe.ready = True
    for path in ("/health/live", "/health/ready", "/metrics"):
        assert (await edge.client.get(path)).status_code == 200, path
    for path in ("/v1/models", "/nope", "/health/live/x", "/docs"):
        error_of(await edge.client.get(path), 401, "UNAUTHENTICATED")


async def test_without_a_key_nothing_is_checked(edge: Edge) -> None:
    r = await edge.client.post("/v1/echo", json={"inputs": []}, headers={"authorization": "Bearer anything"})
    assert r.status_code == 200


# -- probes, metrics labels, disconnects ------------------------------------------------------------


async def test_probes_follow_the_probe(edge: Edge) -> None:
    assert (await edge.client.get("/health/live")).json() == {"status": "live", "state": "starting"}
    r = await edge.client.get("/health/ready")
    assert error_of(r, 503, "UNAVAILABLE") == "not ready: starting"
    edge.probe.ready, edge.probe.state = True, "ready"
    assert (await edge.client.get("/health/ready")).json() == {"status": "ready", "state": "ready"}
    edge.probe.live, edge.probe.ready, edge.probe.state = False, False, "failed"
    assert error_of(await edge.client.get("/health/live"), 503, "UNAVAILABLE") == "not live: failed"
    metrics = await edge.client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "edge_test_things_total 3.0" in metrics.text


async def test_metrics_labels_are_the_route_names_and_other(edge: Edge) -> None:
    await edge.client.post("/v1/echo", json={"inputs": []})
    await edge.client.post("/v1/echo", content=b"{", headers={"content-type": "application/json"})
    await edge.client.get("/health/live")
    for i in range(3):
        await edge.client.get(f"/scan/{i}/../../etc/passwd")
    await edge.client.get("/v1/echo")
    assert edge.metrics.calls == [
        ("http", "echo", "200"),
        ("http", "echo", "400"),
        ("http", "health_live", "200"),
        ("http", "other", "404"),
        ("http", "other", "404"),
        ("http", "other", "404"),
        ("http", "echo", "405"),
    ]


async def test_a_client_disconnect_cancels_the_work_and_counts_499(edge: Edge) -> None:
    gone = asyncio.Event()
    sent: list[Message] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/wait",
        "raw_path": b"/v1/wait",
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 1234),
        "server": ("edge.test", 80),
    }
    request = asyncio.create_task(edge.app(scope, receive, send))
    gone.set()
    await asyncio.wait_for(request, 30)
    assert edge.cancelled.is_set()  # the work was cancelled, not left running
    assert edge.metrics.calls == [("http", "wait", "499")]
