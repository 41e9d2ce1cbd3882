"""The clients' typed error tree and the one mapping from each transport's failures onto it.

Raised only when a whole request fails (after the retries the policy allows); a runtime failure
of one item is a ``None`` result with its reason (:class:`clients.types.ItemError`), never an
exception and never a zero.

::

    RlhfFeedbackError
    ├── InvalidRequestError      400/413/422, INVALID_ARGUMENT      never retried (``.item``)
    ├── AuthenticationError      401, UNAUTHENTICATED               never retried
    ├── PermissionDeniedError    403, PERMISSION_DENIED             never retried
    ├── OverloadedError          429, RESOURCE_EXHAUSTED            retried after ``.retry_after``
    ├── DeadlineExceededError    504, DEADLINE_EXCEEDED, timeouts   retried only before the caller's deadline
    ├── UnavailableError         503 (502/504 from a proxy), UNAVAILABLE, CANCELLED   retried, elsewhere first
    ├── ConnectionFailedError    connection refused/reset, DNS      retried, elsewhere first
    └── ServerError              500, INTERNAL, malformed answers   never retried
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import grpc

# Trailing metadata keys of the services (services/common/grpc_support.py).
RETRY_DELAY_MS_KEY = "retry-delay-ms"
RETRY_AFTER_KEY = "retry-after"
ERROR_ITEM_KEY = "error-item"


class RlhfFeedbackError(Exception):
    """Base of every error the clients raise.

    ``code`` is the service's error-table name (``"INVALID_ARGUMENT"``...), ``status`` the HTTP
    status when the answer came over HTTP, ``request_id`` the ``x-request-id`` of the request.
    ``retryable`` says whether the retry policy may try again.
    """

    code: str = "UNKNOWN"
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.status = status
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" (HTTP {self.status})" if self.status is not None else ""
        return f"{self.code}{where}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructors do not pickle by default; errors cross process boundaries.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[RlhfFeedbackError], message: str, state: dict[str, Any]) -> RlhfFeedbackError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class InvalidRequestError(RlhfFeedbackError):
    """The request (or item ``item``, an index into the caller's inputs) breaks the schema or a limit."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, *, item: int | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.item = item


class AuthenticationError(RlhfFeedbackError):
    """No API key, or not a Bearer key (set ``api_key=`` or ``RLHF_FEEDBACK_API_KEY``)."""

    code = "UNAUTHENTICATED"


class PermissionDeniedError(RlhfFeedbackError):
    """The API key was not accepted."""

    code = "PERMISSION_DENIED"


class OverloadedError(RlhfFeedbackError):
    """The server's queue is full; ``retry_after`` (seconds) is its hint for when to come back."""

    code = "RESOURCE_EXHAUSTED"
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class DeadlineExceededError(RlhfFeedbackError):
    """The deadline passed (the caller's ``deadline_s``, or one attempt's ``timeout``)."""

    code = "DEADLINE_EXCEEDED"


class UnavailableError(RlhfFeedbackError):
    """The server is loading or draining, or a proxy found no healthy upstream; try elsewhere."""

    code = "UNAVAILABLE"
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ConnectionFailedError(RlhfFeedbackError):
    """No connection (refused, reset, DNS, TLS); ``sent`` is True when the request may have arrived."""

    code = "CONNECTION_FAILED"
    retryable = True

    def __init__(self, message: str, *, sent: bool = False, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.sent = sent


class ServerError(RlhfFeedbackError):
    """A bug on the server (500 / INTERNAL) or an answer the client cannot read."""

    code = "INTERNAL"


# -- mapping: service error codes ---------------------------------------------------------------

_BY_CODE: dict[str, type[RlhfFeedbackError]] = {
    "INVALID_ARGUMENT": InvalidRequestError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "RESOURCE_EXHAUSTED": OverloadedError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "UNAVAILABLE": UnavailableError,
    "INTERNAL": ServerError,
}


def _build(
    cls: type[RlhfFeedbackError],
    message: str,
    *,
    code: str | None = None,
    item: int | None = None,
    retry_after: float | None = None,
    **kw: Any,
) -> RlhfFeedbackError:
    if cls is InvalidRequestError:
        return InvalidRequestError(message, item=item, code=code, **kw)
    if cls in (OverloadedError, UnavailableError):
        return cls(message, retry_after=retry_after, code=code, **kw)
    return cls(message, code=code, **kw)


# -- mapping: HTTP ------------------------------------------------------------------------------


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After``: seconds (a float is accepted) or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(max(0.0, seconds), 3600.0)


def from_http(
    status: int,
    body: Any,
    headers: Mapping[str, str],
    *,
    request_id: str | None,
    offset: int = 0,
) -> RlhfFeedbackError:
    """The error for a non-2xx answer. ``offset`` shifts a reported item index back to the caller's."""
    err = body.get("error") if isinstance(body, Mapping) else None
    ours = isinstance(err, Mapping) and isinstance(err.get("code"), str)
    message = str(err.get("message", "")) if ours and err is not None else f"HTTP {status}"
    code = str(err["code"]) if ours and err is not None else None
    item = err.get("item") if ours and err is not None else None
    item = item + offset if isinstance(item, int) else None
    retry_after = parse_retry_after(headers.get("retry-after"))
    kw: dict[str, Any] = {"status": status, "request_id": request_id}
    if code is not None and code in _BY_CODE:
        cls = _BY_CODE[code]
    elif status in (400, 404, 405, 413, 415, 422):
        cls = InvalidRequestError
    elif status == 401:
        cls = AuthenticationError
    elif status == 403:
        cls = PermissionDeniedError
    elif status == 429:
        cls = OverloadedError
    elif status in (502, 503, 504):
        # Not our service's body: a load balancer or proxy (bad gateway, no upstream, gateway
        # timeout). Scoring is idempotent, so another try (elsewhere) is safe.
        return UnavailableError(
            f"HTTP {status} from a proxy or load balancer: {message}", retry_after=retry_after, **kw
        )
    elif 400 <= status < 500:
        cls = InvalidRequestError
    else:
        cls = ServerError
    if not ours and body:
        message = f"{message}: {str(body)[:200]}"
    return _build(cls, message, code=code, item=item, retry_after=retry_after, **kw)


# -- mapping: gRPC ------------------------------------------------------------------------------


def _metadata(md: Iterable[Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in md or ():
        key, value = (entry.key, entry.value) if hasattr(entry, "key") else entry
        out[str(key).lower()] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return out


def grpc_retry_after(trailers: Mapping[str, str]) -> float | None:
    if RETRY_DELAY_MS_KEY in trailers:
        with contextlib.suppress(ValueError):
            return max(0.0, float(trailers[RETRY_DELAY_MS_KEY]) / 1000.0)
    return parse_retry_after(trailers.get(RETRY_AFTER_KEY))


_CONNECT_HINTS = (
    "failed to connect",
    "connection refused",
    "connect failed",
    "dns resolution failed",
    "name resolution",
    "no address",
    "ssl handshake",
    "handshake failed",
    "socket closed",
    "connection reset",
)


def from_grpc(exc: grpc.RpcError, *, request_id: str | None, offset: int = 0) -> RlhfFeedbackError:
    """The error for a failed gRPC call (``grpc.aio.AioRpcError`` or a sync ``grpc.RpcError``)."""
    code: grpc.StatusCode = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or code.name
    trailers = _metadata(exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None)
    kw: dict[str, Any] = {"request_id": request_id}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        item: int | None = None
        with contextlib.suppress(KeyError, ValueError):
            item = int(trailers[ERROR_ITEM_KEY]) + offset
        return InvalidRequestError(details, item=item, **kw)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(details, **kw)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(details, **kw)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after = grpc_retry_after(trailers)
        if retry_after is None and "larger than max" in details.lower():
            # grpc's own message-size limit, not overload: the same request would fail again.
            return InvalidRequestError(details, **kw)
        return OverloadedError(details, retry_after=retry_after, **kw)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(details, **kw)
    if code == grpc.StatusCode.UNAVAILABLE:
        if any(hint in details.lower() for hint in _CONNECT_HINTS):
            return ConnectionFailedError(details, **kw)
        return UnavailableError(details, retry_after=grpc_retry_after(trailers), **kw)
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED):
        # Not cancelled by this client (that surfaces as asyncio.CancelledError): a server that
        # stopped with the call in flight. Scoring is idempotent: try again (elsewhere).
        return UnavailableError(details, code=code.name, **kw)
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS):
        return ServerError(details, code=code.name, **kw)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return InvalidRequestError(f"the server does not implement this method: {details}", code=code.name, **kw)
    return ServerError(details, code=code.name, **kw)


__all__ = [
    "AuthenticationError",
    "ConnectionFailedError",
    "DeadlineExceededError",
    "InvalidRequestError",
    "OverloadedError",
    "PermissionDeniedError",
    "RlhfFeedbackError",
    "ServerError",
    "UnavailableError",
    "from_grpc",
    "from_http",
    "parse_retry_after",
]
