"""Provider rate control shared by every request: concurrency (AIMD), rpm, tpm, global pauses.

Every attempt to the provider, retries included, takes a :class:`Permit` from one
:class:`Limiter` and gives it back with its outcome:

- **concurrency**: at most ``limit`` calls at once; ``limit`` starts at ``max_concurrency``, halves
  (down to 1) on each rate-limited answer and grows by ``1/limit`` per success (about +1 per
  round of ``limit`` successes) back up to ``max_concurrency``. Waiters are served first come,
  first served.
- **rpm**: no more than ``max(1, floor(rpm/6))`` calls start in any 10-second window (a sliding
  window of start times), and a token bucket of capacity ``max(1, rpm/60)`` refilled at
  ``rpm/60`` per second bounds bursts and the long-run rate below rpm/6 per 10 s too.
- **tpm**: a token bucket of capacity ``tpm/6`` refilled at ``tpm/60`` per second, charged with
  an estimate before a call and corrected with the reported usage after it (it may go
  negative; later calls then wait). A call larger than the bucket waits for a full bucket.
- **pause**: a rate-limited answer with ``retry_after`` pauses every new call until then.

Waiting never goes past the caller's deadline: when the wait a call would need ends after it,
:class:`LimiterTimeout` is raised at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from services.judge.clock import Clock, with_deadline

Outcome = Literal["ok", "rate_limited", "error", "unused"]

WINDOW_S = 10.0
_EPS = 1e-6  # windows are widened by this much so float rounding never lets a call in early


class LimiterTimeout(Exception):
    """The limiter could not grant a call before the caller's deadline."""


@dataclass
class Permit:
    est_tokens: int
    started: float
    waited: bool
    calls: int = 1  # provider calls this attempt makes (k for a k-samples backend)


class Limiter:
    def __init__(
        self,
        *,
        max_concurrency: int,
        rpm: float | None,
        tpm: float | None,
        clock: Clock,
        on_limit_change: Callable[[float], None] | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.rpm = rpm
        self.tpm = tpm
        self.clock = clock
        self.limit = float(max_concurrency)
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._on_limit_change = on_limit_change or (lambda limit: None)
        self._on_wait = on_wait or (lambda: None)
        now = clock.now()
        self.paused_until = now
        # rpm
        self._starts: deque[float] = deque()
        self._window_max = max(1, math.floor(rpm / 6)) if rpm else 0
        self._burst = max(1.0, rpm / 60) if rpm else 0.0
        self._req_tokens = self._burst
        self._req_at = now
        # tpm
        self._tok_cap = tpm / 6 if tpm else 0.0
        self._tok = self._tok_cap
        self._tok_at = now

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    def expected_wait(self, queued_calls: int) -> float:
        """A rough 'come back in' hint (seconds, 1 to 60) for ``queued_calls`` ahead in the queue."""
        per_s = self.rpm / 60 if self.rpm else max(1.0, self.limit)
        pause = max(0.0, self.paused_until - self.clock.now())
        return float(min(60.0, max(1.0, pause + queued_calls / per_s)))

    # -- concurrency ----------------------------------------------------------------------------

    def _wake(self) -> None:
        while self._waiters and self.in_use < max(1, int(self.limit)):
            fut = self._waiters.popleft()
            if fut.done():
                continue
            self.in_use += 1
            fut.set_result(None)

    async def _slot(self, deadline: float | None) -> bool:
        """Take a concurrency slot; True if that meant waiting."""
        if not self._waiters and self.in_use < max(1, int(self.limit)):
            self.in_use += 1
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await with_deadline(self.clock, asyncio.shield(fut), deadline)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._give_back_slot()  # granted just as we gave up
            else:
                fut.cancel()
            if isinstance(exc, TimeoutError):
                raise LimiterTimeout from None
            raise
        return True

    def _give_back_slot(self) -> None:
        self.in_use -= 1
        self._wake()

    # -- rates ----------------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        if self.rpm:
            self._req_tokens = min(self._burst, self._req_tokens + (now - self._req_at) * self.rpm / 60)
            self._req_at = now
            while self._starts and self._starts[0] + WINDOW_S + _EPS <= now:
                self._starts.popleft()
        if self.tpm:
            self._tok = min(self._tok_cap, self._tok + (now - self._tok_at) * self.tpm / 60)
            self._tok_at = now

    def _wait_needed(self, now: float, est_tokens: int, calls: int = 1) -> float:
        wait = self.paused_until - now
        if self.rpm:
            # An attempt of k calls needs k free places in the window (all of it when k is larger),
            # and k request tokens (capped at the burst, so a large k still gets through, later).
            in_window = min(calls, self._window_max)
            if len(self._starts) + in_window > self._window_max:
                wait = max(
                    wait, self._starts[len(self._starts) + in_window - self._window_max - 1] + WINDOW_S + 2 * _EPS - now
                )
            need = min(float(calls), self._burst)
            if self._req_tokens < need:
                wait = max(wait, (need - self._req_tokens) / (self.rpm / 60) + _EPS)
        if self.tpm:
            need = min(float(est_tokens), self._tok_cap)
            if self._tok < need:
                wait = max(wait, (need - self._tok) / (self.tpm / 60) + _EPS)
        return wait

    async def acquire(self, est_tokens: int, deadline: float | None, *, calls: int = 1) -> Permit:
        """Wait for a slot and for the rates to allow one more call; raise LimiterTimeout past ``deadline``."""
        waited = await self._slot(deadline)
        try:
            counted = False
            while True:
                now = self.clock.now()
                self._refill(now)
                wait = self._wait_needed(now, est_tokens, calls)
                if wait <= 0:
                    break
                if deadline is not None and now + wait > deadline:
                    raise LimiterTimeout
                if not counted:
                    self._on_wait()
                    counted = True
                waited = True
                await self.clock.sleep(wait)
        except BaseException:
            self._give_back_slot()
            raise
        if self.rpm:
            self._starts.extend([now] * calls)
            self._req_tokens -= calls
        if self.tpm:
            self._tok -= est_tokens
        return Permit(est_tokens, now, waited, calls)

    def release(
        self, permit: Permit, outcome: Outcome, *, tokens: int | None = None, retry_after: float | None = None
    ) -> None:
        """Give the slot back. ``tokens``: what the call really used; ``unused``: no call was made."""
        now = self.clock.now()
        self._refill(now)
        if outcome == "unused":
            if self.rpm:
                for _ in range(permit.calls):
                    with contextlib.suppress(ValueError):
                        self._starts.remove(permit.started)
                self._req_tokens = min(self._burst, self._req_tokens + permit.calls)
            if self.tpm:
                self._tok = min(self._tok_cap, self._tok + permit.est_tokens)
        elif self.tpm and tokens is not None:
            self._tok -= tokens - permit.est_tokens
        if outcome == "rate_limited":
            self.limit = max(1.0, self.limit / 2)
            if retry_after is not None and retry_after > 0:
                self.paused_until = max(self.paused_until, now + retry_after)
            self._on_limit_change(self.limit)
        elif outcome == "ok" and self.limit < self.max_concurrency:
            self.limit = min(float(self.max_concurrency), self.limit + 1 / self.limit)
            self._on_limit_change(self.limit)
        self._give_back_slot()
