"""Transport plumbing every grpc.aio server of the project shares (reward and judge).

- :class:`ApiKeyInterceptor`: ``authorization: Bearer`` via :func:`services.common.auth.check_bearer`;
  health and reflection stay open.
- :func:`safe_deserializer`: requests that are too large, malformed or carry a string that is not
  valid UTF-8 become INVALID_ARGUMENT (grpc's own deserializer failure would be INTERNAL, and its
  own size limit RESOURCE_EXHAUSTED, which the error table reserves for overload).
- :func:`unary_handler` / :func:`stream_handler`: wrap a servicer method with the request id
  (``x-request-id`` echoed or generated, sent as initial metadata), the mapping of
  :class:`ServiceError` through the one error table, the generic INTERNAL answer for bugs, and
  the request metric.
- :func:`server_options`: connection age, message size limits.
- :func:`build_grpc_server` / :class:`GrpcServerHandle`: one service's server with all of the
  above plus health (:class:`~services.common.grpc_health.CallableHealthServicer`), reflection and
  TLS; :class:`MethodHandlers` builds its method handlers.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import OPEN_GRPC_PREFIXES, check_bearer
from services.common.errors import INTERNAL_MESSAGE, ServiceError, invalid
from services.common.grpc_health import CallableHealthServicer
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
RETRY_DELAY_MS_KEY = "retry-delay-ms"
RETRY_AFTER_KEY = "retry-after"
ERROR_ITEM_KEY = "error-item"

_REQUEST_ID_OK = re.compile(r"^[\x21-\x7e]{1,128}$")  # visible ASCII, bounded: safe to log and echo

M = TypeVar("M", bound=Message)
T = TypeVar("T")
R = TypeVar("R")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class RequestMetrics(Protocol):
    def on_request(self, transport: str, method: str, status: str) -> None: ...


# -- request decoding --------------------------------------------------------------------------


class Rejected:
    """What :func:`safe_deserializer` hands the handler instead of a request it could not accept."""

    __slots__ = ("error",)

    def __init__(self, error: ServiceError) -> None:
        self.error = error


def safe_deserializer(message_cls: type[M], max_bytes: int) -> Callable[[bytes], M | Rejected]:
    """A request deserializer that never raises: oversized or undecodable input → :class:`Rejected`."""
    name = message_cls.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> M | Rejected:
        if len(data) > max_bytes:
            return Rejected(invalid(f"request message of {len(data)} bytes exceeds --max-body-bytes {max_bytes}"))
        try:
            return message_cls.FromString(data)
        except DecodeError:
            return Rejected(
                invalid(f"request is not a valid {name}: malformed protobuf or a string that is not valid UTF-8")
            )

    return deserialize


def accept(request: T | Rejected) -> T:
    """The request itself, or raise the INVALID_ARGUMENT that rejected it."""
    if isinstance(request, Rejected):
        raise request.error
    return request


# -- server options ----------------------------------------------------------------------------


def grpc_message_limit(max_body_bytes: int) -> int:
    """grpc's own receive limit: above ours, so that our check (INVALID_ARGUMENT) answers first."""
    return int(min(2**31 - 1, 2 * max_body_bytes + 2**20))


def server_options(
    *, max_body_bytes: int, max_connection_age_s: float, max_connection_age_grace_s: float
) -> list[tuple[str, Any]]:
    limit = grpc_message_limit(max_body_bytes)
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace_s * 1000)),
        ("grpc.so_reuseport", 0),  # never share a port silently with another server
    ]


# -- auth --------------------------------------------------------------------------------------


def _metadata_value(metadata: Any, key: str) -> str | None:
    """The first value of ``key`` in call metadata (a sequence of (key, value) pairs)."""
    for k, v in metadata or ():
        if k == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without ``authorization: Bearer <api_key>``; health and reflection stay open."""

    def __init__(self, api_key: str | None, *, metrics: RequestMetrics | None = None) -> None:
        self._api_key = api_key
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if self._api_key is None or method.startswith(OPEN_GRPC_PREFIXES):
            return await continuation(handler_call_details)
        try:
            check_bearer(_metadata_value(handler_call_details.invocation_metadata, "authorization"), self._api_key)
        except ServiceError as err:
            if self._metrics is not None:
                self._metrics.on_request("grpc", method.rsplit("/", 1)[-1], err.grpc_code.name)
            handler = await continuation(handler_call_details)
            return _abort_handler(handler, err)
        return await continuation(handler_call_details)


def _abort_handler(handler: grpc.RpcMethodHandler | None, err: ServiceError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers ``err`` without running anything."""

    async def abort_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(err.grpc_code, err.message)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(err.grpc_code, err.message)
        yield  # pragma: no cover (makes this an async generator)

    # Keep the real deserializer so that an unauthenticated request is still read off the wire.
    deser = handler.request_deserializer if handler is not None else None
    ser = handler.response_serializer if handler is not None else None
    streaming_in = handler is not None and handler.request_streaming
    streaming_out = handler is not None and handler.response_streaming
    if streaming_in and streaming_out:
        return grpc.stream_stream_rpc_method_handler(abort_stream, deser, ser)
    if streaming_in:
        return grpc.stream_unary_rpc_method_handler(abort_unary, deser, ser)
    if streaming_out:
        return grpc.unary_stream_rpc_method_handler(abort_stream, deser, ser)
    return grpc.unary_unary_rpc_method_handler(abort_unary, deser, ser)


# -- per-call wrapping: request id, error mapping, metrics --------------------------------------


async def begin_call(context: grpc.aio.ServicerContext) -> str:
    """Echo the caller's ``x-request-id`` (or a new one) as initial metadata; return it."""
    given = _metadata_value(context.invocation_metadata(), REQUEST_ID_KEY)
    request_id = given if given is not None and _REQUEST_ID_OK.match(given) else uuid.uuid4().hex
    await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
    return request_id


def error_trailers(err: ServiceError) -> tuple[tuple[str, str], ...]:
    trailers: list[tuple[str, str]] = []
    if err.retry_after is not None:
        trailers.append((RETRY_DELAY_MS_KEY, str(max(0, round(err.retry_after * 1000)))))
        trailers.append((RETRY_AFTER_KEY, f"{err.retry_after:g}"))
    if err.item is not None:
        trailers.append((ERROR_ITEM_KEY, str(err.item)))
    return tuple(trailers)


def error_details(err: ServiceError) -> str:
    return f"item {err.item}: {err.message}" if err.item is not None else err.message


async def abort_with(context: grpc.aio.ServicerContext, err: ServiceError) -> None:
    """Answer ``err`` through the one error table (code, message, retry delay, item index)."""
    await context.abort(err.grpc_code, error_details(err), trailing_metadata=error_trailers(err))


def _status_name(exc: BaseException, context: grpc.aio.ServicerContext) -> str:
    """The status a failed call ends with, for the request metric."""
    if isinstance(exc, grpc.aio.AbortError):  # the method aborted the call itself
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    if isinstance(exc, ServiceError):
        return exc.grpc_code.name
    if isinstance(exc, Exception):
        return "INTERNAL"
    return "CANCELLED"  # the client went away, or the server is shutting down


async def _fail(exc: Exception, context: grpc.aio.ServicerContext, method: str, request_id: str | None) -> None:
    """Abort the call for ``exc`` (the abort raises); return only when an abort is already under
    way, and the caller re-raises it."""
    if isinstance(exc, grpc.aio.AbortError):
        return
    if isinstance(exc, ServiceError):
        await abort_with(context, exc)
    log.error("gRPC %s (request %s) failed", method, request_id, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


def unary_handler(
    method: str,
    fn: Callable[[Req, grpc.aio.ServicerContext, str], Awaitable[Resp]],
    metrics: RequestMetrics,
) -> Callable[[Req | Rejected, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """Wrap a unary-unary servicer method ``fn(request, context, request_id)``."""

    async def handle(request: Req | Rejected, context: grpc.aio.ServicerContext) -> Resp:
        status = "UNKNOWN"
        request_id: str | None = None
        try:
            request_id = await begin_call(context)
            response = await fn(accept(request), context, request_id)
            status = "OK"
            return response
        except BaseException as exc:
            status = _status_name(exc, context)
            if isinstance(exc, Exception):
                await _fail(exc, context, method, request_id)
            raise
        finally:
            metrics.on_request("grpc", method, status)

    return handle


def stream_handler(
    method: str,
    fn: Callable[[AsyncIterator[Req | Rejected], grpc.aio.ServicerContext, str], AsyncIterator[Resp]],
    metrics: RequestMetrics,
) -> Callable[[AsyncIterator[Req | Rejected], grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    """Wrap a stream-stream servicer method ``fn(request_iterator, context, request_id)``.

    ``fn`` receives the raw iterator (items may be :class:`Rejected`; pass each through
    :func:`accept`) so that it decides what one bad message means for the rest of the stream.
    """

    async def handle(requests: AsyncIterator[Req | Rejected], context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
        status = "UNKNOWN"
        request_id: str | None = None
        try:
            request_id = await begin_call(context)
            async for response in fn(requests, context, request_id):
                yield response
            status = "OK"
        except BaseException as exc:
            status = _status_name(exc, context)
            if isinstance(exc, Exception):
                await _fail(exc, context, method, request_id)
            raise
        finally:
            metrics.on_request("grpc", method, status)

    return handle


# -- method handlers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodHandlers:
    """Builds a service's method handlers: the wrappers above plus the safe deserializer."""

    metrics: RequestMetrics
    max_bytes: int

    def unary(
        self,
        method: str,
        fn: Callable[[Any, grpc.aio.ServicerContext, str], Awaitable[Any]],
        request_cls: type[Message],
        response_cls: type[Message],
    ) -> grpc.RpcMethodHandler:
        """A unary-unary handler: :func:`unary_handler` with the safe deserializer of ``request_cls``."""
        return grpc.unary_unary_rpc_method_handler(
            unary_handler(method, fn, self.metrics),
            request_deserializer=safe_deserializer(request_cls, self.max_bytes),
            response_serializer=response_cls.SerializeToString,
        )

    def stream(
        self,
        method: str,
        fn: Callable[[AsyncIterator[Any], grpc.aio.ServicerContext, str], AsyncIterator[Any]],
        request_cls: type[Message],
        response_cls: type[Message],
    ) -> grpc.RpcMethodHandler:
        """A stream-stream handler: :func:`stream_handler` with the safe deserializer of ``request_cls``."""
        return grpc.stream_stream_rpc_method_handler(
            stream_handler(method, fn, self.metrics),
            request_deserializer=safe_deserializer(request_cls, self.max_bytes),
            response_serializer=response_cls.SerializeToString,
        )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as an absolute ``time.monotonic()`` time (None: no deadline)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# -- the server --------------------------------------------------------------------------------


@dataclass
class GrpcServerHandle:
    """A built (not yet started) gRPC server of one service.

    ``await handle.start()`` binds ``settings.host:settings.grpc_port`` (or ``port=``; 0 picks a
    free port) and returns the bound port; ``await handle.stop(grace)`` reports NOT_SERVING,
    ends health watches and stops the server, letting calls in flight finish for ``grace`` seconds.
    Call ``handle.health.refresh()`` after each engine state change (ready, draining) so that
    health watchers hear of it at once (``Check`` always reads the live state).
    """

    server: grpc.aio.Server
    health: CallableHealthServicer
    settings: ServiceSettings
    port: int | None = None
    _started: bool = field(default=False, repr=False)

    async def start(self, *, port: int | None = None) -> int:
        host = self.settings.host
        bind_port = self.settings.grpc_port if port is None else port
        address = f"[{host}]:{bind_port}" if ":" in host else f"{host}:{bind_port}"
        if self.settings.tls_cert is not None and self.settings.tls_key is not None:
            creds = grpc.ssl_server_credentials(
                [(self.settings.tls_key.read_bytes(), self.settings.tls_cert.read_bytes())]
            )
            bound = self.server.add_secure_port(address, creds)
        else:
            bound = self.server.add_insecure_port(address)
        if bound == 0:
            raise OSError(f"gRPC: could not bind {address}")
        await self.server.start()
        self._started = True
        self.port = bound
        log.info("gRPC listening on %s:%d%s", host, bound, " (TLS)" if self.settings.tls_cert else "")
        return bound

    def refresh(self) -> None:
        """Tell health watchers to re-read the engine state (call after start-up and when draining)."""
        self.health.refresh()

    async def stop(self, grace: float | None = None) -> None:
        self.health.enter_graceful_shutdown()
        if self._started:
            await self.server.stop(grace)
            self._started = False

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


def build_grpc_server(
    service_name: str,
    handlers: Mapping[str, grpc.RpcMethodHandler],
    settings: ServiceSettings,
    *,
    api_key: str | None,
    metrics: RequestMetrics,
    live: Callable[[], bool],
    ready: Callable[[], bool],
    health_poll_interval: float = 1.0,
) -> GrpcServerHandle:
    """A grpc.aio server with ``handlers`` as ``service_name``, plus auth, limits, health and reflection.

    Health: ``""``, ``"readiness"`` and ``service_name`` mirror ``ready``; ``"liveness"`` mirrors ``live``.
    """
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(api_key, metrics=metrics)],
        options=server_options(
            max_body_bytes=settings.max_body_bytes,
            max_connection_age_s=settings.grpc_max_connection_age_s,
            max_connection_age_grace_s=max(settings.drain_seconds, 30.0),
        ),
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, dict(handlers)),))
    server.add_registered_method_handlers(service_name, dict(handlers))  # type: ignore[attr-defined]
    health = CallableHealthServicer(
        {"": ready, "readiness": ready, service_name: ready, "liveness": live}, poll_interval=health_poll_interval
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((service_name, "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
    return GrpcServerHandle(server=server, health=health, settings=settings)


# -- bidirectional streams -----------------------------------------------------------------------


async def fan_out(
    requests: AsyncIterator[T | Rejected],
    handle: Callable[[T, Callable[[R], None]], Awaitable[None]],
) -> AsyncIterator[R]:
    """Serve a bidirectional stream: each request runs concurrently as ``handle(request, emit)``
    and every ``emit``-ted answer is yielded as soon as it exists.

    ``handle`` must report its own request-level failures through ``emit`` (one request failing
    must not end the stream); an undecodable message ends the stream with INVALID_ARGUMENT.
    """
    out: asyncio.Queue[R | _Done] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    outstanding = 1  # the reader, plus one per request being handled

    async def run(request: T) -> None:
        try:
            await handle(request, out.put_nowait)
        finally:
            out.put_nowait(_Done(None))

    async def read() -> None:
        nonlocal outstanding
        try:
            async for raw in requests:
                request = accept(raw)
                outstanding += 1
                task = asyncio.create_task(run(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except BaseException as exc:
            out.put_nowait(_Done(exc))
            raise
        out.put_nowait(_Done(None))

    reader = asyncio.create_task(read())
    try:
        while outstanding:
            item = await out.get()
            if isinstance(item, _Done):
                if item.error is not None:
                    raise item.error
                outstanding -= 1
                continue
            yield item
    finally:
        for task in (reader, *tasks):
            task.cancel()
        await asyncio.gather(reader, *tasks, return_exceptions=True)


@dataclass(frozen=True)
class _Done:
    """End marker of the reader or of one request's task (``error``: the stream must end with it)."""

    error: BaseException | None
