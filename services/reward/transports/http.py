"""HTTP transport of the reward service (FastAPI): wire → engine → wire, nothing else.

Routes: ``POST /v1/score``, ``POST /v1/compare``, ``POST /get_reward`` (OpenRLHF), ``GET /v1/models``,
``GET /health/live``, ``GET /health/ready``, ``GET /metrics``.

Edge behaviour, all here so the engine stays transport-free:

- Every error is ``{"error": {"code", "message", "item"?}}`` with the status of the one error table
  (:mod:`services.common.errors`). Schema violations are 422 (INVALID_ARGUMENT) and name the field and,
  inside ``inputs[i]`` / ``responses[i]`` / ``query[i]``, the item index; invalid JSON or UTF-8 is 400;
  a body over ``--max-body-bytes`` is 413, checked from ``Content-Length`` and again while the body
  streams in (chunked uploads), so at most ``max_body_bytes`` are ever buffered. RESOURCE_EXHAUSTED
  answers 429 with ``Retry-After`` (whole seconds, rounded up). Anything unexpected is a 500 with the
  generic :data:`~services.common.errors.INTERNAL_MESSAGE`; the traceback goes to the log only.
- ``X-Request-Timeout`` (seconds, float) becomes an absolute ``time.monotonic()`` deadline for the
  engine; ``x-request-id`` is echoed (a uuid4 hex is made when absent); ``Authorization: Bearer`` is
  checked when an API key is set, except on :data:`~services.common.auth.OPEN_HTTP_PATHS`.
- Client disconnects cancel the work. uvicorn does *not* cancel a request's task when the client
  goes away (it only turns later ``send`` calls into no-ops and answers ``receive()`` with
  ``http.disconnect``), so each engine call runs beside a watcher on ``receive()``; a disconnect
  cancels the engine call, and the engine then cancels its item futures, which the batcher drops
  before the forward pass. The request is counted with status ``499`` (nginx's "client closed").

OpenRLHF's remote reward model (``POST /get_reward``), as read in OpenRLHF's sources:

- Client, ``openrlhf/utils/remote_rm_utils.py`` (OpenRLHF/OpenRLHF): ``remote_rm_fn_ray`` /
  ``remote_rm_fn`` POST ``{"query": queries, "prompts": prompts, "labels": labels}`` as JSON with
  ``Content-Type: application/json`` (no other headers: no API key, no timeout header) through
  ``request_api_wrapper``, which calls ``raise_for_status()`` and retries any failure up to 5 times,
  1 s apart (timeout 180 s). Older releases return ``response["rewards"]`` (``score_key="rewards"``)
  as a tensor; current ones return the whole JSON object, and ``update_samples_with_rewards`` in
  ``openrlhf/trainer/ppo_utils/experience_maker.py`` reads ``info["rewards"]`` (advantages),
  ``info["scores"]`` if present (dynamic filtering; falls back to rewards), and every key of
  ``info["extra_logs"]`` if present, concatenated across chunks and logged, so each extra log must
  be a list of numbers, one per query.
- ``queries`` are ``tokenizer.batch_decode(remove_pad_token(sequences, attention_mask),
  skip_special_tokens=False)``: the full prompt + response, chat-template tokens included
  (``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>``). ``prompts`` are
  the prompt strings and ``labels`` the dataset labels (may be ``null``s); a reward model does not
  need them.
- Server, ``openrlhf/cli/serve_rm.py``: reads ``data.get("query")`` (and ``prompts``), tokenizes the
  queries with ``add_special_tokens=False`` (older releases stripped pad/eos and re-appended eos)
  and answers ``{"rewards": r, "scores": r, "extra_logs": {"dummy_scores": r}}``.

So ``/get_reward`` scores each query as a ``text`` item, verbatim (never stripped: the service
tokenizes text items with ``add_special_tokens=False``), and answers ``{"rewards": [...],
"scores": [...], "extra_logs": {"rm_num_tokens": [...], "rm_truncated": [...]}}`` with raw scores.
OpenRLHF needs a number for every query, so a runtime failure of any item fails the whole request
with that item's status (504, 503, 500); its client retries. Never a silent zero reward.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.auth import OPEN_HTTP_PATHS, check_bearer
from services.common.errors import INTERNAL_MESSAGE, ErrorCode, ServiceError, invalid
from services.reward.engine.items import ItemError, Priority, RewardInput, ScoredItem
from services.reward.engine.service import RewardEngine
from services.reward.metrics import RewardMetrics
from services.reward.schemas import (
    ITEM_TAGS,
    PROMPT_TAGS,
    CompareRequest,
    CompareResponse,
    ErrorBody,
    GetRewardRequest,
    GetRewardResponse,
    ModelList,
    ScoreRequest,
    ScoreResponse,
    compare_body,
    models_body,
    score_body,
)
from services.reward.settings import RewardSettings

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

REQUEST_ID_HEADER = "x-request-id"
TIMEOUT_HEADER = "x-request-timeout"
PARSE_INLINE_BYTES = 256 * 2**10  # larger bodies are parsed in a worker thread
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; only ever a metrics label

# Route → metrics label; anything else is "other" (bounded label cardinality).
ROUTE_NAMES: Mapping[str, str] = {
    "/v1/score": "score",
    "/v1/compare": "compare",
    "/get_reward": "get_reward",
    "/v1/models": "models",
    "/health/live": "health_live",
    "/health/ready": "health_ready",
    "/metrics": "metrics",
}

# Validation errors whose loc starts with one of these and an index carry that index as `item`.
_ITEM_LISTS = frozenset({"inputs", "responses", "query"})
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 413, 422, 429, 500, 503, 504)
}


class OrjsonResponse(Response):
    """JSON rendered by orjson (NaN/inf become ``null``; numpy scalars allowed)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class _ClientGone(Exception):
    """The client disconnected while its request was being served."""


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


def _internal_response() -> OrjsonResponse:
    return OrjsonResponse(ServiceError(ErrorCode.INTERNAL, INTERNAL_MESSAGE).to_body(), status_code=500)


# -- request validation -------------------------------------------------------------------------


def _clean_loc(loc: Sequence[int | str]) -> list[int | str]:
    """Drop the union tags pydantic inserts, so the path is what the client wrote."""
    out: list[int | str] = []
    for i, part in enumerate(loc):
        prev = loc[i - 1] if i > 0 else None
        if isinstance(part, str):
            if part in ITEM_TAGS and isinstance(prev, int) and i == 2 and loc[0] == "inputs":
                continue
            if part in PROMPT_TAGS and prev == "prompt":
                continue
        out.append(part)
    return out


def _path(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def validation_error(
    errors: Sequence[Mapping[str, Any]], *, body: bytes | None = None, fastapi_loc: bool = False
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
    loc = _clean_loc(loc)
    item = loc[1] if len(loc) >= 2 and loc[0] in _ITEM_LISTS and isinstance(loc[1], int) else None
    message = f"{_path(loc)}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return invalid(message, item=item, http_status=422)


def parse_body(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc.errors(include_url=False, include_input=False), body=body) from None


async def read_request(request: Request, model: type[M], limit: int) -> M:
    """Read (bounded) and parse the body; big bodies parse off the event loop so that probes and
    other requests keep being answered meanwhile."""
    body = await read_body(request, limit)
    if len(body) > PARSE_INLINE_BYTES:
        return await asyncio.to_thread(parse_body, model, body)
    return parse_body(model, body)


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
            raise _too_large(size, limit)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int | None, limit: int) -> ServiceError:
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
    engine cancels its item futures and leaves admission), and raise :class:`_ClientGone`."""
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
    raise _ClientGone


# -- edge middleware ----------------------------------------------------------------------------


class EdgeMiddleware:
    """Pure ASGI middleware: request id, auth, request metrics and the last-resort 500.

    Pure ASGI (not ``BaseHTTPMiddleware``) so that disconnects and cancellation reach the handler.
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, metrics: RewardMetrics) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

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
        route = ROUTE_NAMES.get(path, "other")
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
            await _internal_response()(scope, receive, send_with_id)
        finally:
            self.metrics.on_request("http", route, str(status or CLIENT_CLOSED))


# -- the app ------------------------------------------------------------------------------------


def create_http_app(engine: RewardEngine, settings: RewardSettings, *, api_key: str | None) -> FastAPI:
    """The reward service's HTTP app. The caller owns the engine's lifecycle (start, drain, stop)."""
    max_body = settings.max_body_bytes
    created = int(time.time())
    app = FastAPI(
        title="rlhf-feedback reward service",
        default_response_class=OrjsonResponse,
        responses=_ERROR_RESPONSES,
    )
    app.state.engine = engine

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(_ClientGone)
    @app.exception_handler(ClientDisconnect)  # raised by request.stream() mid-body
    async def _client_gone(request: Request, exc: Exception) -> Response:
        # Nobody reads this; uvicorn drops sends after a disconnect. It fixes the metrics label.
        return OrjsonResponse(
            {"error": {"code": "CANCELLED", "message": "client closed the request"}}, status_code=CLIENT_CLOSED
        )

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(list(exc.errors()), fastapi_loc=True))

    @app.exception_handler(StarletteHTTPException)
    async def _http_exception(request: Request, exc: StarletteHTTPException) -> Response:
        err = ServiceError(ErrorCode.INVALID_ARGUMENT, str(exc.detail), http_status=exc.status_code)
        return OrjsonResponse(err.to_body(), status_code=exc.status_code, headers=exc.headers)

    # -- scoring ---------------------------------------------------------------------------------

    @app.post("/v1/score", response_model=ScoreResponse, summary="Score prompt + response pairs")
    async def score(request: Request) -> Response:
        deadline = request_deadline(request)
        req = await read_request(request, ScoreRequest, max_body)
        outcome = await run_until_disconnect(
            request,
            engine.score(req.to_engine(), priority=req.engine_priority, deadline=deadline, normalize=req.normalize),
        )
        return OrjsonResponse(score_body(outcome))

    @app.post("/v1/compare", response_model=CompareResponse, summary="Bradley-Terry comparison of N responses")
    async def compare(request: Request) -> Response:
        deadline = request_deadline(request)
        req = await read_request(request, CompareRequest, max_body)
        outcome = await run_until_disconnect(
            request, engine.compare(req.engine_prompt(), req.responses, deadline=deadline)
        )
        return OrjsonResponse(compare_body(outcome))

    @app.post("/get_reward", response_model=GetRewardResponse, summary="OpenRLHF remote reward model")
    async def get_reward(request: Request) -> Response:
        deadline = request_deadline(request)
        req = await read_request(request, GetRewardRequest, max_body)
        inputs = [RewardInput(text=q) for q in req.query]
        outcome = await run_until_disconnect(request, engine.score(inputs, priority=Priority.ONLINE, deadline=deadline))
        rewards: list[float] = []
        num_tokens: list[float] = []
        truncated: list[float] = []
        for i, r in enumerate(outcome.results):
            if isinstance(r, ItemError):
                raise ServiceError(r.code, f"query {i}: {r.message}", item=i)
            assert isinstance(r, ScoredItem)
            rewards.append(r.score)
            num_tokens.append(float(r.num_tokens))
            truncated.append(1.0 if r.truncated else 0.0)
        return OrjsonResponse(
            {
                "rewards": rewards,
                "scores": rewards,
                "extra_logs": {"rm_num_tokens": num_tokens, "rm_truncated": truncated},
            }
        )

    # -- model info, health, metrics ---------------------------------------------------------------

    @app.get("/v1/models", response_model=ModelList, summary="The loaded model and the request limits")
    async def models() -> Response:
        return OrjsonResponse(models_body(engine.info, engine.limits, max_body_bytes=max_body, created=created))

    @app.get("/health/live", summary="200 while the process can serve at all")
    async def live() -> Response:
        if engine.live:
            return OrjsonResponse({"status": "live", "state": engine.state.value})
        return error_response(ServiceError(ErrorCode.UNAVAILABLE, f"not live: {engine.state.value}"))

    @app.get("/health/ready", summary="200 once the model is loaded and warm; 503 before and while draining")
    async def ready() -> Response:
        if engine.ready:
            return OrjsonResponse({"status": "ready", "state": engine.state.value})
        return error_response(ServiceError(ErrorCode.UNAVAILABLE, f"not ready: {engine.state.value}"))

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(EdgeMiddleware, api_key=api_key, metrics=engine.metrics)
    return app
