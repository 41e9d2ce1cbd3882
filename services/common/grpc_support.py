"""Transport plumbing every grpc.aio server of the project shares (reward and judge).

- :class:`ApiKeyInterceptor`: ``authorization: Bearer`` via :func:`services.common.auth.check_bearer`,
  checked before the request message is read (an unauthenticated call costs no memory for its
  message); health and reflection stay open; metric labels only name methods the server serves.
- :func:`safe_deserializer`: requests that are malformed or carry a string that is not valid UTF-8
  become INVALID_ARGUMENT (grpc's own deserializer failure would be INTERNAL). A message over
  ``--max-body-bytes`` never reaches it: grpc's receive limit is that same number, and grpc answers
  RESOURCE_EXHAUSTED "Received message larger than max" (DESIGN's "transport limit"; the clients
  read that message as a non-retryable invalid request, not as overload).
- :func:`unary_handler` / :func:`stream_handler`: wrap a servicer method with the request id
  (``x-request-id`` echoed or generated, sent as initial metadata), the mapping of
  :class:`ServiceError` through the one error table, the generic INTERNAL answer for bugs, and
  the request metric.
- :func:`server_options`: connection age, message size limits (receive: ``--max-body-bytes``).
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


_GRPC_MAX_MESSAGE = 2**31 - 1  # grpc's channel arguments are C ints


def grpc_receive_limit(max_body_bytes: int) -> int:
    """grpc's own receive limit: exactly ``--max-body-bytes``, so that a bigger message is refused by
    grpc before it is buffered whole (our own check could only run after that)."""
    return int(min(_GRPC_MAX_MESSAGE, max_body_bytes))


def grpc_send_limit(max_body_bytes: int) -> int:
    """grpc's send limit: generous, since an answer may outgrow its request (rationales, errors)
    and answers are ours, not an attacker's."""
    return int(min(_GRPC_MAX_MESSAGE, 2 * max_body_bytes + 2**20))


def server_options(
    *, max_body_bytes: int, max_connection_age_s: float, max_connection_age_grace_s: float
) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", grpc_receive_limit(max_body_bytes)),
        ("grpc.max_send_message_length", grpc_send_limit(max_body_bytes)),
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


UNKNOWN_METHOD = "unknown"  # the metrics label of every method the server does not serve


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Reject calls without ``authorization: Bearer <api_key>``; health and reflection stay open.

    The key is checked from the call's metadata, before the request message is read: a rejected
    call is answered by a handler that never reads its request (see :func:`_abort_handler`), so
    that an unauthenticated client cannot make the server buffer and parse messages of up to
    ``--max-body-bytes``. Rejected calls and calls to methods the server does not serve are counted
    here; ``served`` (full names, ``/package.Service/Method``) bounds the metric labels, every other
    name counts as :data:`UNKNOWN_METHOD`.
    """

    def __init__(
        self, api_key: str | None, *, metrics: RequestMetrics | None = None, served: frozenset[str] = frozenset()
    ) -> None:
        self._api_key = api_key
        self._metrics = metrics
        self._served = served

    def method_label(self, method: str) -> str:
        """The metric label of a call to ``method``: its short name if served, else ``unknown``."""
        return method.rsplit("/", 1)[-1] if method in self._served else UNKNOWN_METHOD

    def _count(self, method: str, status: str) -> None:
        if self._metrics is not None:
            self._metrics.on_request("grpc", self.method_label(method), status)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.startswith(OPEN_GRPC_PREFIXES):
            return await continuation(handler_call_details)
        if self._api_key is not None:
            try:
                check_bearer(_metadata_value(handler_call_details.invocation_metadata, "authorization"), self._api_key)
            except ServiceError as err:
                # Same answer whether or not the method exists: no probing of the API without a key.
                self._count(method, err.grpc_code.name)
                return _abort_handler(err)
        handler = await continuation(handler_call_details)
        if handler is None:  # grpc answers UNIMPLEMENTED
            self._count(method, grpc.StatusCode.UNIMPLEMENTED.name)
        return handler


def _abort_handler(err: ServiceError) -> grpc.RpcMethodHandler:
    """A handler that answers ``err`` without reading the request.

    It has a streaming request shape whatever the method's real shape: grpc.aio receives (and
    deserializes) a unary request before it calls the handler, but a streaming one only when the
    handler pulls the request iterator, which this one never does. The client cannot tell: the
    wire format of a call does not depend on the server handler's shape, and it gets ``err``'s
    status whatever it sent. Message bytes already on their way are dropped by grpc with the stream
    (HTTP/2 flow control keeps them to a window, not a whole message: 4 concurrent 120 MiB calls
    raise the server's RSS by under 20 MiB, tests/common/test_grpc_hardening.py).
    """

    async def abort(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        await context.abort(err.grpc_code, err.message)

    return grpc.stream_unary_rpc_method_handler(abort, request_deserializer=None, response_serializer=None)


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
    served = frozenset(f"/{service_name}/{name}" for name in handlers)
    server = grpc.aio.server(
        interceptors=[ApiKeyInterceptor(api_key, metrics=metrics, served=served)],
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
