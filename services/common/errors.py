"""The one error table shared by every service and transport.

Each domain error has exactly one HTTP status and one gRPC code; the transports map a
:class:`ServiceError` through :data:`ERROR_TABLE` and nothing else, so HTTP and gRPC agree by
construction (and ``tests/reward/test_error_table.py`` checks that they do).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc


class ErrorCode(str, enum.Enum):
    """Wire names of the domain errors (the ``error.code`` field of every error body)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    NOT_FOUND = "NOT_FOUND"


@dataclass(frozen=True)
class ErrorSpec:
    """How one domain error travels: its HTTP status, gRPC code and whether clients retry it."""

    http_status: int
    grpc_code: grpc.StatusCode
    retryable: bool


ERROR_TABLE: dict[ErrorCode, ErrorSpec] = {
    ErrorCode.INVALID_ARGUMENT: ErrorSpec(400, grpc.StatusCode.INVALID_ARGUMENT, False),
    ErrorCode.UNAUTHENTICATED: ErrorSpec(401, grpc.StatusCode.UNAUTHENTICATED, False),
    ErrorCode.PERMISSION_DENIED: ErrorSpec(403, grpc.StatusCode.PERMISSION_DENIED, False),
    ErrorCode.RESOURCE_EXHAUSTED: ErrorSpec(429, grpc.StatusCode.RESOURCE_EXHAUSTED, True),
    ErrorCode.DEADLINE_EXCEEDED: ErrorSpec(504, grpc.StatusCode.DEADLINE_EXCEEDED, False),
    ErrorCode.UNAVAILABLE: ErrorSpec(503, grpc.StatusCode.UNAVAILABLE, True),
    ErrorCode.INTERNAL: ErrorSpec(500, grpc.StatusCode.INTERNAL, False),
    # An unknown route (404) or a method the route does not have (405, the same domain error).
    # Only the HTTP edge raises it: grpc itself answers an unknown method with UNIMPLEMENTED.
    ErrorCode.NOT_FOUND: ErrorSpec(404, grpc.StatusCode.UNIMPLEMENTED, False),
}

# What a client sees for a bug: details stay in the server log.
INTERNAL_MESSAGE = "internal error; see the server log for details"


class ServiceError(Exception):
    """A domain error with everything a transport needs to answer it.

    ``http_status`` overrides the table's status only within the same domain error (422 for a
    schema violation and 413 for an oversized body are both INVALID_ARGUMENT; 405 for a method a
    route does not have is NOT_FOUND).
    ``item`` is the index of the offending input item, when one item caused it.
    ``retry_after`` (seconds) is sent as ``Retry-After`` / ``retry-delay-ms`` trailing metadata.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        item: int | None = None,
        retry_after: float | None = None,
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.item = item
        self.retry_after = retry_after
        self._http_status = http_status

    @property
    def spec(self) -> ErrorSpec:
        return ERROR_TABLE[self.code]

    @property
    def http_status(self) -> int:
        return self._http_status if self._http_status is not None else self.spec.http_status

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.spec.grpc_code

    def to_body(self) -> dict[str, object]:
        """The JSON error body: ``{"error": {"code", "message", "item"?}}``."""
        err: dict[str, object] = {"code": self.code.value, "message": self.message}
        if self.item is not None:
            err["item"] = self.item
        return {"error": err}

    def __repr__(self) -> str:
        return f"ServiceError({self.code.value}, {self.message!r}, item={self.item})"


def invalid(message: str, *, item: int | None = None, http_status: int | None = None) -> ServiceError:
    """Shorthand for the most common error: bad input, never retried."""
    return ServiceError(ErrorCode.INVALID_ARGUMENT, message, item=item, http_status=http_status)
