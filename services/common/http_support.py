"""HTTP edge plumbing every FastAPI transport of the project shares (reward and judge).

Only what is independent of a service's routes lives here; a service's ``transports/http.py``
builds its app with :func:`create_edge_app`, adds its own routes (reading bodies with
:meth:`BodyParser.read`, deadlines with :func:`request_deadline`, and running the engine call
through :func:`run_until_disconnect`), then :func:`add_probe_routes`.

- Every error is ``{"error": {"code", "message", "item"?}}`` with the status of the one error table
  (:mod:`services.common.errors`). Schema violations are 422 (INVALID_ARGUMENT) and name the field
  and, inside one of the service's item lists (``inputs[i]``, ``responses[i]``...), the item index;
  invalid JSON or UTF-8 is 400; a body over ``--max-body-bytes`` is 413, checked from
  ``Content-Length`` and again while the body streams in (chunked uploads), so at most
  ``max_body_bytes`` are ever buffered; a body that arrives too slowly is 408 (DEADLINE_EXCEEDED,
  raised by the server's ``receive``: :class:`services.common.http_guard.SlowBodyGuard`) and its
  connection is closed. RESOURCE_EXHAUSTED answers 429 with ``Retry-After`` (whole
  seconds, rounded up). An unknown route is 404 and a method the route does not have 405 (with
  ``Allow``), both NOT_FOUND. Anything unexpected is a 500 with the generic
  :data:`~services.common.errors.INTERNAL_MESSAGE`; the traceback goes to the log only.
- /openapi.json shows every route's request and 200 bodies from the pydantic models the routes parse
  and answer with (:func:`document_bodies`), every error status with the error body, and the Bearer
  scheme when an API key is set; /docs is Swagger UI over it.
- ``X-Request-Timeout`` (seconds, float) becomes an absolute ``time.monotonic()`` deadline for the
  engine; ``x-request-id`` is echoed (a uuid4 hex is made when absent); ``Authorization: Bearer`` is
  checked when an API key is set, except on :data:`~services.common.auth.OPEN_HTTP_PATHS`.
- Client disconnects cancel the work. uvicorn does *not* cancel a request's task when the client
  goes away (it only turns later ``send`` calls into no-ops and answers ``receive()`` with
  ``http.disconnect``), so each engine call runs beside a watcher on ``receive()``; a disconnect
  cancels the engine call (whose cleanup then cancels its own work). The request is counted with
  status ``499`` (nginx's "client closed").
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.auth import OPEN_HTTP_PATHS, check_bearer
from services.common.errors import INTERNAL_MESSAGE, ErrorCode, ServiceError, invalid
from services.common.grpc_support import RequestMetrics
from services.common.wire import ErrorBody

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

REQUEST_ID_HEADER = "x-request-id"
TIMEOUT_HEADER = "x-request-timeout"
PARSE_INLINE_BYTES = 256 * 2**10  # larger bodies are parsed in a worker thread
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; only ever a metrics label

# Routes every service has (→ metrics label); a service adds its own to these.
PROBE_ROUTE_NAMES: Mapping[str, str] = {
    "/v1/models": "models",
    "/health/live": "health_live",
    "/health/ready": "health_ready",
    "/metrics": "metrics",
}

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


class OrjsonResponse(Response):
    """JSON rendered by orjson (NaN/inf become ``null``; numpy scalars allowed)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ClientGone(Exception):
    """The client disconnected while its request was being served."""


# -- error bodies -------------------------------------------------------------------------------


# What each error status means, from the one error table (DESIGN.md); /docs shows these texts.
ERROR_STATUS_TEXT: Mapping[int, str] = {
    400: "Invalid input: bad JSON or UTF-8, an empty or too long list, a value or limit the service refuses "
    "(INVALID_ARGUMENT; `item` names the offending input). Never retry.",
    401: "No API key, or not a Bearer key (UNAUTHENTICATED).",
    403: "The API key was not accepted (PERMISSION_DENIED).",
    408: "The body arrived slower than the read timeout; the connection is closed (DEADLINE_EXCEEDED). Retry.",
    413: "The body is over --max-body-bytes (INVALID_ARGUMENT); GET /v1/models reports the limit.",
    422: "The body does not match the request schema (INVALID_ARGUMENT; `item` names the offending list item).",
    429: "Overloaded: queue full or rate budget spent (RESOURCE_EXHAUSTED). Retry after `Retry-After` seconds.",
    500: "A bug: a generic message, the details are in the server log (INTERNAL).",
    503: "Not ready (loading) or draining (UNAVAILABLE). Retry, elsewhere.",
    504: "The deadline (X-Request-Timeout) passed before the work was done (DEADLINE_EXCEEDED).",
}


def error_responses() -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for every status an edge can answer with the error body."""
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": text} for status, text in ERROR_STATUS_TEXT.items()
    }
    out[401]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "`Bearer`"}}
    out[429]["headers"] = {
        "Retry-After": {"required": True, "schema": {"type": "integer", "minimum": 1}, "description": "Seconds."}
    }
    return out


def error_response(err: ServiceError) -> OrjsonResponse:
    """The HTTP answer for a domain error, via the one error table."""
    headers: dict[str, str] = {}
    if err.code is ErrorCode.RESOURCE_EXHAUSTED:
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after or 1.0)))
    elif err.code is ErrorCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    if err.code is ErrorCode.INTERNAL:
        log.error("internal error answered as 500: %s", err.message)
        err = ServiceError(ErrorCode.INTERNAL, INTERNAL_MESSAGE, item=err.item)
    return OrjsonResponse(err.to_body(), status_code=err.http_status, headers=headers)


def routing_error(request: Request, exc: StarletteHTTPException) -> ServiceError:
    """The domain error for an exception Starlette's router raised: 404 (no such route) and 405 (the
    route exists, the method does not; ``Allow`` lists the methods) are NOT_FOUND, the error table's
    "unknown route or method"; anything else keeps the old INVALID_ARGUMENT."""
    where = f"{request.method} {request.url.path[:200]}"
    if exc.status_code == 404:
        return ServiceError(ErrorCode.NOT_FOUND, f"no route {where}; GET /openapi.json (or /docs) lists the routes")
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        message = f"{where}: method not allowed" + (f"; this route accepts {allow}" if allow else "")
        return ServiceError(ErrorCode.NOT_FOUND, message, http_status=405)
    return ServiceError(ErrorCode.INVALID_ARGUMENT, str(exc.detail), http_status=exc.status_code)


def internal_response() -> OrjsonResponse:
    return OrjsonResponse(ServiceError(ErrorCode.INTERNAL, INTERNAL_MESSAGE).to_body(), status_code=500)


# -- request validation -------------------------------------------------------------------------


Loc = list[int | str]


def _keep_loc(loc: Sequence[int | str]) -> Loc:
    return list(loc)


def _path(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


@dataclass(frozen=True)
class BodyParser:
    """How one service reads request bodies and explains schema errors.

    ``item_lists``: top-level list fields whose index is reported as the error's ``item``
    (``inputs``, ``responses``...). ``clean_loc`` drops the union tags pydantic inserts into an
    error location, so the path names what the client wrote.
    """

    item_lists: frozenset[str] = frozenset()
    clean_loc: Callable[[Sequence[int | str]], Loc] = field(default=_keep_loc)

    def error(
        self, errors: Sequence[Mapping[str, Any]], *, body: bytes | None = None, fastapi_loc: bool = False
    ) -> ServiceError:
        """One readable INVALID_ARGUMENT for pydantic / FastAPI errors: 400 for bad JSON, else 422."""
        if not errors:
            return invalid("request body does not match the schema", http_status=422)
        first = errors[0]
        if first.get("type") == "json_invalid":
            if body is not None:
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return invalid(f"request body is not valid UTF-8 (byte {exc.start})")
            detail = str((first.get("ctx") or {}).get("error") or first.get("msg") or "")
            return invalid(f"request body is not valid JSON: {detail}" if detail else "request body is not valid JSON")
        loc = list(first.get("loc") or ())
        if fastapi_loc and loc and loc[0] in ("body", "query", "header", "path", "cookie"):
            loc = loc[1:]  # FastAPI prefixes where the value came from
        loc = self.clean_loc(loc)
        item = loc[1] if len(loc) >= 2 and loc[0] in self.item_lists and isinstance(loc[1], int) else None
        message = f"{_path(loc)}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
        return invalid(message, item=item, http_status=422)

    def parse(self, model: type[M], body: bytes) -> M:
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise self.error(exc.errors(include_url=False, include_input=False), body=body) from None

    async def read(self, request: Request, model: type[M], limit: int) -> M:
        """Read (bounded) and parse the body; big bodies parse off the event loop so that probes and
        other requests keep being answered meanwhile."""
        body = await read_body(request, limit)
        if len(body) > PARSE_INLINE_BYTES:
            return await asyncio.to_thread(self.parse, model, body)
        return self.parse(model, body)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, never buffering more than ``limit`` bytes (413 beyond it)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise invalid("Content-Length is not a number") from None
        if size < 0:
            raise invalid("Content-Length is negative")
        if size > limit:
            raise too_large(size, limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(size: int | None, limit: int) -> ServiceError:
    what = f"request body of {size} bytes" if size is not None else "request body"
    return invalid(
        f"{what} exceeds --max-body-bytes {limit}; split the request (GET /v1/models reports the limits)",
        http_status=413,
    )


def request_deadline(request: Request) -> float | None:
    """``X-Request-Timeout`` (seconds) as an absolute ``time.monotonic()`` deadline."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        raise invalid(f"X-Request-Timeout must be a number of seconds, got {raw[:40]!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise invalid(f"X-Request-Timeout must be a positive, finite number of seconds, got {raw[:40]!r}")
    return time.monotonic() + seconds


# -- client disconnects -------------------------------------------------------------------------


async def _wait_disconnect(receive: Receive) -> None:
    """Return when the client disconnects; park forever on anything unexpected."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if message["type"] == "http.request" and not message.get("more_body", False):
            # The body was already read; a server would not send more. Stop listening rather
            # than spin on a receive() that keeps answering at once.
            await asyncio.Event().wait()


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it, let its cleanup finish (the
    engine cancels its own work and leaves admission), and raise :class:`ClientGone`."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # never raises; the outcome is nobody's business any more
    if not task.cancelled() and task.exception() is not None:
        log.debug("request failed after its client left", exc_info=task.exception())
    raise ClientGone


# -- edge middleware ----------------------------------------------------------------------------


class EdgeMiddleware:
    """Pure ASGI middleware: request id, auth, request metrics and the last-resort 500.

    Pure ASGI (not ``BaseHTTPMiddleware``) so that disconnects and cancellation reach the handler.
    ``route_names`` maps a path to its metrics label; any other path counts as ``other`` (bounded
    label cardinality).
    """

    def __init__(
        self, app: ASGIApp, *, api_key: str | None, metrics: RequestMetrics, route_names: Mapping[str, str]
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics
        self.route_names = route_names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get(REQUEST_ID_HEADER) or ""
        if not _REQUEST_ID_OK.match(request_id):
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path: str = scope.get("path", "")
        route = self.route_names.get(path, "other")
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            if path not in OPEN_HTTP_PATHS:
                try:
                    check_bearer(headers.get("authorization"), self.api_key)
                except ServiceError as err:
                    await error_response(err)(scope, receive, send_with_id)
                    return
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s (request id %s)", scope.get("method"), path, request_id)
            if status:
                raise  # the response has started; the server closes the connection
            await internal_response()(scope, receive, send_with_id)
        finally:
            self.metrics.on_request("http", route, str(status or CLIENT_CLOSED))


# -- the app ------------------------------------------------------------------------------------


def create_edge_app(
    *,
    title: str,
    api_key: str | None,
    metrics: RequestMetrics,
    route_names: Mapping[str, str],
    parser: BodyParser,
) -> FastAPI:
    """A FastAPI app with the edge behaviour: error handlers, request ids, auth, request metrics.

    The caller adds its routes (and :func:`add_probe_routes`); metrics labels come from
    ``route_names`` (include :data:`PROBE_ROUTE_NAMES`).
    """
    app = FastAPI(title=title, default_response_class=OrjsonResponse, responses=error_responses())

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # raised by request.stream() mid-body
    async def _client_gone(request: Request, exc: Exception) -> Response:
        # Nobody reads this; uvicorn drops sends after a disconnect. It fixes the metrics label.
        return OrjsonResponse(
            {"error": {"code": "CANCELLED", "message": "client closed the request"}}, status_code=CLIENT_CLOSED
        )

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(parser.error(list(exc.errors()), fastapi_loc=True))

    @app.exception_handler(StarletteHTTPException)
    async def _http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        return OrjsonResponse(routing_error(request, exc).to_body(), status_code=exc.status_code, headers=exc.headers)

    app.add_middleware(EdgeMiddleware, api_key=api_key, metrics=metrics, route_names=route_names)
    if api_key is not None:
        document_bearer_auth(app)
    return app


class Probe(Protocol):
    """What the health routes read: an engine's (or its lifecycle's) live state."""

    @property
    def live(self) -> bool: ...

    @property
    def ready(self) -> bool: ...


def add_probe_routes(
    app: FastAPI, probe: Probe, registry: CollectorRegistry, *, state: Callable[[], str], what: str = "the model"
) -> None:
    """``GET /health/live``, ``GET /health/ready`` (from ``probe``) and ``GET /metrics`` (``registry``)."""

    @app.get("/health/live", summary="200 while the process can serve at all")
    async def live() -> Response:
        if probe.live:
            return OrjsonResponse({"status": "live", "state": state()})
        return error_response(ServiceError(ErrorCode.UNAVAILABLE, f"not live: {state()}"))

    @app.get("/health/ready", summary=f"200 once {what} is loaded and warm; 503 before and while draining")
    async def ready() -> Response:
        if probe.ready:
            return OrjsonResponse({"status": "ready", "state": state()})
        return error_response(ServiceError(ErrorCode.UNAVAILABLE, f"not ready: {state()}"))

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


# -- OpenAPI --------------------------------------------------------------------------------------

# A route as /openapi.json shows it: (method, request body model or None, the 200 body's shapes).
DocumentedRoute = tuple[str, type[BaseModel] | None, tuple[type[BaseModel], ...]]

_REF = "#/components/schemas/{model}"
# Names of a model's examples (see :func:`named_examples`); moved out of the JSON Schema into the
# media type's ``examples`` map, which is what Swagger UI offers in its example menu.
_EXAMPLE_NAMES = "x-example-names"


_METRICS_PATH = "/metrics"

# ``X-Request-Timeout`` as an OpenAPI header parameter of every route that reads a body.
_TIMEOUT_PARAMETER: dict[str, Any] = {
    "name": "X-Request-Timeout",
    "in": "header",
    "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0},
    "description": "Seconds the caller waits: work not done by then answers 504 (DEADLINE_EXCEEDED).",
}


def named_examples(**examples: Any) -> dict[str, Any]:
    """A model's ``json_schema_extra``: JSON Schema ``examples``, named (the names label the examples
    of a request or response body in /docs; :func:`document_bodies` moves them there)."""
    return {"examples": list(examples.values()), _EXAMPLE_NAMES: list(examples)}


class HealthOut(BaseModel):
    """``GET /health/live`` and ``GET /health/ready`` when the answer is yes (else 503, the error body)."""

    model_config = ConfigDict(json_schema_extra=named_examples(ready={"status": "ready", "state": "ready"}))

    status: Literal["live", "ready"]
    state: str = Field(description="The lifecycle state: starting, ready, draining, stopped or failed.")


# The probe routes of :func:`add_probe_routes`, documented wherever the app has them.
PROBE_DOCUMENTED: Mapping[str, DocumentedRoute] = {
    "/health/live": ("get", None, (HealthOut,)),
    "/health/ready": ("get", None, (HealthOut,)),
}


def document_bodies(app: FastAPI, *routes: Mapping[str, DocumentedRoute]) -> None:
    """Show the request and 200 bodies of ``routes`` (path -> method, request model, 200 shapes) in
    /openapi.json, from the same pydantic models the routes parse and answer with.

    FastAPI cannot see them: the routes read their bodies themselves (bounded, strict, big ones off
    the event loop) and answer with :class:`OrjsonResponse`, not a ``JSONResponse``. Several
    mappings merge (a service's own routes, then e.g. a compatibility API's); the probe routes of
    :func:`add_probe_routes` are documented too when the app has them. Every route with a request
    body also documents the ``X-Request-Timeout`` header, and each body its models' examples.
    """
    merged: dict[str, DocumentedRoute] = {}
    for mapping in routes:
        merged.update(mapping)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        paths: dict[str, Any] = schema["paths"]
        documented = {**{p: r for p, r in PROBE_DOCUMENTED.items() if p in paths}, **merged}
        missing = sorted(p for p, (method, _, _) in documented.items() if method not in paths.get(p, {}))
        if missing:
            raise RuntimeError(f"documented routes the app does not have: {missing}")
        models: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {}
        for _, request, shapes in documented.values():
            if request is not None:
                models[request, "validation"] = None
            models.update(dict.fromkeys((shape, "serialization") for shape in shapes))
        # One call for every model, so that a model used by several routes is one component; the
        # refs it returns name the components (pydantic renames a model whose input and output
        # schemas differ, or two models of the same name).
        refs, defs = models_json_schema(list(models), ref_template=_REF)
        components: dict[str, Any] = defs.get("$defs", {})
        names = {name: component.pop(_EXAMPLE_NAMES, None) for name, component in components.items()}
        schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
        for path, (method, request, shapes) in documented.items():
            operation = paths[path][method]
            if request is not None:
                ref = dict(refs[request, "validation"])
                operation["requestBody"] = {
                    "required": True,
                    "content": _json(ref, _examples([ref], components, names)),
                }
                operation.setdefault("parameters", []).append(dict(_TIMEOUT_PARAMETER))
            out = [dict(refs[shape, "serialization"]) for shape in shapes]
            operation["responses"]["200"]["content"] = _json(
                out[0] if len(out) == 1 else {"anyOf": out}, _examples(out, components, names)
            )
        if _METRICS_PATH in paths and "get" in paths[_METRICS_PATH]:
            metrics = paths[_METRICS_PATH]["get"]["responses"]["200"]
            metrics["content"] = {"text/plain": {"schema": {"type": "string"}}}
            metrics["description"] = "Prometheus text exposition format"
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema


def document_bearer_auth(app: FastAPI) -> None:
    """Declare the ``Authorization: Bearer`` API key in /openapi.json, on every route that checks it
    (all but :data:`~services.common.auth.OPEN_HTTP_PATHS`), so that /docs offers "Authorize"."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "The server's --api-key."}
        }
        for path, item in schema["paths"].items():
            if path in OPEN_HTTP_PATHS:
                continue
            for operation in item.values():
                operation["security"] = [{"bearer": []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _json(schema: dict[str, Any], examples: dict[str, Any] | None = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if examples:
        media["examples"] = examples
    return {"application/json": media}


def _examples(
    refs: Sequence[Mapping[str, Any]], components: Mapping[str, Any], names: Mapping[str, list[str] | None]
) -> dict[str, Any]:
    """The OpenAPI ``examples`` map of a body: the JSON Schema examples of each referenced model, by
    name; a model without examples of its own that is a union (a ``RootModel`` over request
    variants) shows its variants' examples."""
    out: dict[str, Any] = {}
    for ref in refs:
        name = str(ref["$ref"]).rsplit("/", 1)[-1]
        component = components.get(name, {})
        values = component.get("examples") or []
        if not values:
            variants = component.get("oneOf") or component.get("anyOf") or []
            out.update(_examples([v for v in variants if "$ref" in v], components, names))
            continue
        labels = names.get(name) or [f"{name} {i + 1}" for i in range(len(values))]
        out.update({label: {"value": value} for label, value in zip(labels, values, strict=True)})
    return out
