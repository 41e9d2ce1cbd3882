"""Slow and idle HTTP clients cannot hold the server: timeouts, a minimum body rate, a connection cap.

The HTTP server (:func:`services.common.serving.uvicorn_server`) bounds what a slow or idle client can hold
(:class:`HttpLimits`, the ``--http-*`` flags):

- **Headers**: a request line and headers must be complete within ``--http-header-timeout-s`` of the
  connection's start (a new connection that sends nothing is closed then) or of the first byte of a
  later request on a keep-alive connection; else 408 (when part of a request came) and close.
- **Bodies**: while the application reads a request body, no read may wait more than
  ``--http-body-timeout-s``, and past that much time the body must have averaged
  ``--http-body-min-rate`` bytes/s; else 408 ``DEADLINE_EXCEEDED`` (the error body of every error)
  with ``Connection: close``. A pause limit alone would let a client trickle one byte per period
  forever; a whole-body limit would cut off honest 64 MiB uploads on slow links. The rest of a body
  the application answered without reading (401, 413...) is drained under the same two rules, then
  the connection is closed.
- **Keep-alive**: an idle connection between requests is closed after ``--http-keep-alive-s``.
- **Connections**: a request on a connection beyond ``--http-max-connections`` is answered 503
  ``UNAVAILABLE`` with ``Retry-After: 1`` and ``Connection: close`` without reaching the application
  (an idle extra connection lasts at most the header timeout).

The protocol is uvicorn's h11 one, always (not httptools where that happens to be installed): the
timeouts follow h11's connection state.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.common.errors import ErrorCode, ServiceError
from services.common.settings import ServiceSettings


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP client may hold: the ``--http-*`` flags of :class:`ServiceSettings`."""

    header_timeout_s: float
    body_timeout_s: float
    body_min_rate: int
    keep_alive_s: int
    max_connections: int

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> HttpLimits:
        return cls(
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            body_min_rate=settings.http_body_min_rate,
            keep_alive_s=settings.http_keep_alive_s,
            max_connections=settings.http_max_connections,
        )


class _BodyClock:
    """The two body rules: no wait over ``timeout`` and, past ``timeout``, at least ``rate`` bytes/s."""

    __slots__ = ("rate", "received", "start", "timeout")

    def __init__(self, limits: HttpLimits, now: float) -> None:
        self.timeout = limits.body_timeout_s
        self.rate = limits.body_min_rate
        self.start = now
        self.received = 0

    def allowed_wait(self, now: float) -> tuple[float, bool]:
        """How long the next bytes may take, and whether the rate rule (not the pause) sets that."""
        wait = self.timeout
        if self.rate:
            by_rate = self.start + self.timeout + self.received / self.rate - now
            if by_rate < wait:
                return max(0.0, by_rate), True
        return wait, False

    def error(self, now: float, by_rate: bool) -> ServiceError:
        rule = (
            f"it averaged under --http-body-min-rate {self.rate} bytes/s"
            if by_rate
            else f"it paused for over --http-body-timeout-s {self.timeout:g} s"
        )
        return ServiceError(
            ErrorCode.DEADLINE_EXCEEDED,
            f"request body arrived too slowly ({self.received} bytes in {now - self.start:.1f} s): {rule}",
            http_status=408,
        )


class _GuardedBody:
    """One request's ``receive``, with the body rules applied until the body is complete."""

    def __init__(self, receive: Callable[[], Awaitable[Any]], limits: HttpLimits) -> None:
        self._receive = receive
        self._clock = _BodyClock(limits, asyncio.get_running_loop().time())
        self.complete = False
        self.timed_out = False

    async def receive(self) -> Any:
        if self.complete:  # later receives only watch for a disconnect: no limit
            return await self._receive()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        wait, by_rate = self._clock.allowed_wait(loop.time())
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        # A timer that cancels this task, not asyncio.wait_for: no task per body chunk (3.10 has no
        # asyncio.timeout).
        timer = loop.call_later(wait, expire)
        try:
            message = await self._receive()
        except asyncio.CancelledError:
            if not expired:
                raise
            uncancel = getattr(task, "uncancel", None)  # 3.11+: this cancellation is handled
            if uncancel is not None:
                uncancel()
            self.timed_out = True
            raise self._clock.error(loop.time(), by_rate) from None
        finally:
            timer.cancel()
        if message["type"] == "http.request":
            self._clock.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True
        return message


class SlowBodyGuard:
    """ASGI wrapper: a request body read slower than :class:`HttpLimits` allows makes ``receive()``
    raise a 408 :class:`ServiceError` (the edge app answers it like any other), and that answer
    carries ``Connection: close``."""

    def __init__(self, app: Any, limits: HttpLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _GuardedBody(receive, self.limits)

        async def send_closing(message: Any) -> None:
            if message["type"] == "http.response.start" and body.timed_out:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, body.receive, send_closing)


def _error_bytes(err: ServiceError) -> bytes:
    return json.dumps(err.to_body(), separators=(",", ":")).encode()


def _raw_response(status: int, reason: str, err: ServiceError) -> bytes:
    """A whole HTTP/1.1 error answer that closes the connection, for when no request cycle exists."""
    body = _error_bytes(err)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _over_capacity_app(max_connections: int) -> Callable[[Any, Any, Any], Awaitable[None]]:
    body = _error_bytes(
        ServiceError(
            ErrorCode.UNAVAILABLE, f"server at its connection limit (--http-max-connections {max_connections})"
        )
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the header timeout, the drain rules and the connection cap.

    One timer per connection, set from h11's state after every event: while a request line and
    headers are due (header timeout, counted once, not per byte), and while the rest of a body the
    application did not read is drained (body rules). The body being read by the application is
    :class:`SlowBodyGuard`'s.
    """

    limits: ClassVar[HttpLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers" | "drain" while a timer runs
        self._drain: _BodyClock | None = None
        self._first_request = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.app = _over_capacity_app(self.limits.max_connections)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch(len(data))

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)

    def _watch(self, received: int = 0) -> None:
        if self.transport is None or self.transport.is_closing():
            self._stop()
            return
        theirs, ours = self.conn.their_state, self.conn.our_state
        if theirs is not h11.IDLE:
            self._first_request = False
        if theirs is h11.IDLE and (self._first_request or self.conn.trailing_data[0]):
            if self._phase != "headers":  # from the first byte (or the connection), not re-armed
                self._start("headers", self.limits.header_timeout_s, self._headers_late)
        elif theirs is h11.SEND_BODY and ours is h11.DONE:
            now = self.loop.time()
            if self._phase != "drain" or self._drain is None:
                self._drain = _BodyClock(self.limits, now)
            else:
                self._drain.received += received
            self._start("drain", self._drain.allowed_wait(now)[0], self._drain_late)
        else:
            self._stop()
            if theirs is h11.IDLE and ours is h11.IDLE and self.timeout_keep_alive_task is None:
                # Idle between requests after a drain: uvicorn's keep-alive timer was cancelled by
                # the drained bytes and is not set again by uvicorn.
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    def _start(self, phase: str, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._phase = phase
        self._timer = self.loop.call_later(delay, callback)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._phase = None

    def _headers_late(self) -> None:
        self._timer = None
        self._phase = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it is cut off
            timeout = self.limits.header_timeout_s
            err = ServiceError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"request headers took longer than --http-header-timeout-s {timeout:g} s",
                http_status=408,
            )
            self.transport.write(_raw_response(408, "Request Timeout", err))
        self.transport.close()

    def _drain_late(self) -> None:
        self._timer = None
        self._phase = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(limits: HttpLimits) -> type[GuardedH11Protocol]:
    """:class:`GuardedH11Protocol` bound to ``limits`` (uvicorn builds protocols from a class)."""
    return cast(type[GuardedH11Protocol], type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits}))
