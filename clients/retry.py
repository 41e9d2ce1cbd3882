"""The one retry policy of every client (reward and judge, sync and async, HTTP and gRPC).

- Retried: OVERLOADED (429 / RESOURCE_EXHAUSTED) after the server's delay (``Retry-After`` header,
  ``retry-delay-ms`` trailer), UNAVAILABLE (503, and 502/504 from a proxy), connection failures,
  and, for idempotent calls (scoring is), read timeouts and connections lost after sending.
- Never retried: INVALID_ARGUMENT (400/413/422), UNAUTHENTICATED, PERMISSION_DENIED, INTERNAL,
  and a DEADLINE_EXCEEDED that the server reported.
- The delay is the server's (plus up to 20% jitter, so that clients shed together do not come back
  together), else exponential backoff with full jitter (``uniform(0, min(max_delay, base * 2**n))``).
  With several endpoints, UNAVAILABLE and connection failures move to the next endpoint at once
  while there is an untried one.
- The caller's deadline wins: no retry starts whose delay would end past it.

Every logical request (one chunk of a ``score`` call, one judge call) carries one
``Idempotency-Key`` and one ``x-request-id``, generated once and reused by every attempt
(:class:`RequestIds`), so that a server or proxy may deduplicate the retries.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field

from clients.errors import (
    ConnectionFailedError,
    DeadlineExceededError,
    OverloadedError,
    RlhfFeedbackError,
    UnavailableError,
)


@dataclass(frozen=True)
class RequestIds:
    """The identity of one logical request, shared by all of its attempts."""

    idempotency_key: str = field(default_factory=lambda: str(uuid.uuid4()))
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


class AttemptTimeout(DeadlineExceededError):
    """One attempt timed out on the client (no answer within ``timeout``); retryable when idempotent."""

    retryable = True


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before the next attempt of a failed request."""

    max_retries: int = 8
    base_delay: float = 0.1
    max_delay: float = 8.0
    # A server delay above this is not waited for: the error is raised instead.
    max_server_delay: float = 120.0
    server_jitter: float = 0.2

    def retryable(self, err: BaseException, *, idempotent: bool) -> bool:
        if not isinstance(err, RlhfFeedbackError) or not err.retryable:
            return False
        if isinstance(err, AttemptTimeout):
            return idempotent
        if isinstance(err, ConnectionFailedError) and err.sent:
            return idempotent
        return True

    def backoff(self, retry: int) -> float:
        """Full-jitter exponential backoff for the ``retry``-th retry (0-based)."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * (2.0**retry)))

    def delay(
        self,
        err: BaseException,
        *,
        retry: int,
        idempotent: bool = True,
        deadline: float | None = None,
        untried_endpoints: int = 0,
    ) -> float | None:
        """Seconds to wait before retry number ``retry`` (0-based), or None: raise ``err`` now.

        ``deadline`` is an absolute ``time.monotonic()`` time; ``untried_endpoints`` counts other
        endpoints this request has not tried yet.
        """
        if retry >= self.max_retries or not self.retryable(err, idempotent=idempotent):
            return None
        server = getattr(err, "retry_after", None)
        if isinstance(err, OverloadedError) and server is not None:
            if server > self.max_server_delay:
                return None
            wait = server * random.uniform(1.0, 1.0 + self.server_jitter)
        elif isinstance(err, UnavailableError | ConnectionFailedError) and untried_endpoints > 0:
            wait = 0.0  # "yes, elsewhere": the next endpoint at once
        elif server is not None and server <= self.max_server_delay:
            wait = server * random.uniform(1.0, 1.0 + self.server_jitter)
        else:
            wait = self.backoff(retry)
        if deadline is not None and time.monotonic() + wait >= deadline:
            return None
        return wait


def remaining(deadline: float | None) -> float | None:
    """Seconds left until an absolute ``time.monotonic()`` deadline (None: no deadline)."""
    return None if deadline is None else deadline - time.monotonic()


def attempt_timeout(timeout: float | None, deadline: float | None, *, grace: float = 0.0) -> float | None:
    """How long one attempt may take: the per-attempt ``timeout`` bounded by what is left of the
    deadline (plus ``grace``, so that a server answering at the deadline is still heard)."""
    left = remaining(deadline)
    if left is None:
        return timeout
    left += grace
    return left if timeout is None else min(timeout, left)


__all__ = ["AttemptTimeout", "RequestIds", "RetryPolicy", "attempt_timeout", "remaining"]
