"""One verdict: the engine's call to the judge backend, and what it cost.

For one :class:`VerdictQuery` the :class:`VerdictCaller` looks in the cache, shares the call with
an identical one already in flight (single flight), takes a limiter permit for every attempt,
retries retryable provider failures with full-jitter backoff, re-asks after unparseable replies,
prices the reply and stores it in the cache. The outcome is a :class:`Verdict` or a
:class:`Failure`, never an exception for a provider failure: the protocols decide what a failure
means for their result.

Failures are never cached (a later request asks again). ``usage`` counts the provider calls this
request made (``calls``: attempts, retries included; tokens and cost as reported, cost from the
price table when the backend gave none); cache hits cost nothing, and a call shared with a
concurrent identical request is charged to the request that made it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass

from services.judge.backends.base import JudgeBackend, UnparseableReply, UpstreamError
from services.judge.clock import Clock, with_deadline
from services.judge.engine.cache import JudgeCache
from services.judge.engine.config import JudgeEngineConfig, price_for
from services.judge.engine.limiter import Limiter, LimiterTimeout, Outcome, Permit
from services.judge.engine.prompts import sha256_hex
from services.judge.metrics import JudgeMetrics
from services.judge.types import Usage, VerdictQuery, VerdictReply

__all__ = ["CallOutcome", "Failure", "Verdict", "VerdictCaller"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """A usable reply; ``usage`` is what this request paid for it (nothing for a hit or a shared call)."""

    reply: VerdictReply
    cached: bool
    usage: Usage


@dataclass(frozen=True)
class Failure:
    """No verdict. ``kind``: "upstream", "unparseable" or "deadline"; ``reason`` starts with it."""

    kind: str
    reason: str
    usage: Usage
    worked: bool  # a provider call was attempted (so a deadline failure is partial work)


CallOutcome = Verdict | Failure

# What one provider attempt ended with (the reply is not yet priced).
_Attempt = VerdictReply | UpstreamError | UnparseableReply | TimeoutError


class VerdictCaller:
    """Gets verdicts for the protocols: cache, single flight, limiter, retries, pricing, usage."""

    def __init__(
        self,
        config: JudgeEngineConfig,
        *,
        cache: JudgeCache | None,
        metrics: JudgeMetrics,
        clock: Clock,
        limiter: Limiter,
        template_hash: str,
    ) -> None:
        self.config = config
        self.cache = cache
        self.metrics = metrics
        self.clock = clock
        self.limiter = limiter
        self.template_hash = template_hash
        self._rng = random.Random(config.seed)
        self._inflight: dict[str, asyncio.Future[CallOutcome]] = {}
        self.tokens_spent = 0
        self.cost_spent = 0.0

    def key(self, backend: JudgeBackend, query: VerdictQuery, meta: Mapping[str, object]) -> str:
        """The cache key of one query: everything that can change the reply, and nothing else."""
        return sha256_hex(
            {
                "v": 1,
                "backend": backend.info.backend,
                "model": backend.info.model,
                "snapshot": backend.info.snapshot,
                "template": self.template_hash,
                "sampling": backend.sampling_key(),
                "meta": dict(meta),
                "messages": [[m.role, m.content] for m in query.messages],
                "choices": list(query.choices),
                "rationale": query.rationale,
                "max_tokens": query.max_tokens,
            }
        )

    async def verdict(
        self, backend: JudgeBackend, query: VerdictQuery, meta: Mapping[str, object], deadline: float | None
    ) -> CallOutcome:
        """The verdict for ``query``: from the cache, from an identical call in flight, or by calling."""
        key = self.key(backend, query, meta)
        if self.cache is not None:
            hit = await self.cache.aget(key)
            self.metrics.on_cache(hit is not None)
            if hit is not None:
                return Verdict(hit, True, Usage())
        while True:
            shared = self._inflight.get(key)
            if shared is None:
                break
            try:
                outcome = await with_deadline(self.clock, asyncio.shield(shared), deadline)
            except TimeoutError:
                return Failure("deadline", "deadline: passed while waiting for an identical judgment", Usage(), False)
            if isinstance(outcome, Verdict):
                return Verdict(outcome.reply, outcome.cached, Usage())
            if outcome.kind != "deadline":
                return Failure(outcome.kind, outcome.reason, Usage(), False)
            # the request that made the call ran out of time; ours may not have: try ourselves
        fut: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        outcome = Failure("deadline", "deadline: cancelled", Usage(), False)
        try:
            outcome = await self._attempts(backend, query, key, deadline)
            return outcome
        finally:
            del self._inflight[key]
            fut.set_result(outcome)

    async def _attempts(
        self, backend: JudgeBackend, query: VerdictQuery, key: str, deadline: float | None
    ) -> CallOutcome:
        cfg = self.config
        usage = Usage()
        upstream_failures = 0
        parse_failures = 0
        worked = False
        # A k-samples backend makes k provider calls per verdict: each one counts against --rpm.
        calls_per_verdict = max(1, int(getattr(backend, "calls_per_verdict", 1)))
        est = (sum(len(m.content) for m in query.messages) // 4 + query.max_tokens + 8) * calls_per_verdict
        while True:
            try:
                permit = await self.limiter.acquire(est, deadline, calls=calls_per_verdict)
            except LimiterTimeout:
                return Failure("deadline", "deadline: would pass while waiting for the provider rate limit",
                               usage, worked)  # fmt: skip
            if self.cache is not None and (permit.waited or worked):
                # Look again right before calling when time passed since the first lookup (a
                # limiter wait, a retry): another process may have stored this verdict meanwhile.
                hit = await self._recheck(key, permit)
                if hit is not None:
                    return Verdict(hit, True, usage)
            worked = True
            outcome = await self._one_call(backend, query, permit, deadline)
            if isinstance(outcome, VerdictReply):
                reply = self._priced(backend, outcome)
                await self._store(key, reply)
                return Verdict(reply, False, usage + reply.usage)
            usage = usage + Usage(calls=1)
            if isinstance(outcome, UnparseableReply):
                parse_failures += 1
                if parse_failures > cfg.max_parse_retries:
                    return Failure("unparseable", f"unparseable: {outcome.reason}", usage, worked)
                continue
            if isinstance(outcome, TimeoutError):
                return Failure("deadline", "deadline: passed during a provider call", usage, worked)
            err = outcome
            upstream_failures += 1
            if not err.retryable or upstream_failures > cfg.max_retries:
                tries = f" after {upstream_failures} attempts" if err.retryable else ""
                return Failure("upstream", f"upstream: {err}{tries}", usage, worked)
            backoff = self._backoff(err, upstream_failures)
            if deadline is not None and self.clock.now() + backoff >= deadline:
                return Failure("deadline", f"deadline: no time left to retry after '{err}'", usage, worked)
            await self.clock.sleep(backoff)

    def _backoff(self, err: UpstreamError, failures: int) -> float:
        """Full jitter: uniform(0, min(max, base * 2**(failures - 1))), at least the provider's Retry-After."""
        cfg = self.config
        backoff = self._rng.uniform(0, min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (failures - 1)))
        if err.retry_after is not None and not err.rate_limited:
            backoff = max(backoff, err.retry_after)  # rate-limited ones pause the whole limiter
        return backoff

    async def _recheck(self, key: str, permit: Permit) -> VerdictReply | None:
        """A cache lookup holding a permit: the permit goes back unused on a hit (or an error)."""
        assert self.cache is not None
        try:
            hit = await self.cache.aget(key)
        except BaseException:
            self.limiter.release(permit, "unused")
            raise
        if hit is not None:
            self.limiter.release(permit, "unused")
        return hit

    async def _store(self, key: str, reply: VerdictReply) -> None:
        if self.cache is None:
            return
        try:
            await self.cache.aput(key, reply)
        except Exception:
            log.exception("judge cache: could not store a verdict")

    async def _one_call(
        self, backend: JudgeBackend, query: VerdictQuery, permit: Permit, deadline: float | None
    ) -> _Attempt:
        """One provider attempt; always gives the permit back with its outcome."""
        timeout = self.config.call_timeout_s
        call_deadline = deadline
        if timeout is not None:
            own = self.clock.now() + timeout
            call_deadline = own if deadline is None else min(deadline, own)
        started = self.clock.now()
        self.metrics.upstream_in_flight.inc()
        released = False
        try:
            try:
                reply = await with_deadline(self.clock, backend.verdict(query), call_deadline)
            except Exception as exc:
                released = True
                return self._failed_call(exc, permit, started, deadline)
            tokens = reply.usage.prompt_tokens + reply.usage.completion_tokens
            self.limiter.release(permit, "ok", tokens=tokens)
            released = True
            if not _usable(reply, query.choices):
                self.metrics.on_upstream("unparseable", self.clock.now() - started)
                return UnparseableReply(reply.raw, f"reply names none of the choices {list(query.choices)}")
            self.metrics.on_upstream("ok", self.clock.now() - started)
            return reply
        finally:
            if not released:
                self.limiter.release(permit, "error")
            self.metrics.upstream_in_flight.dec()

    def _failed_call(self, exc: Exception, permit: Permit, started: float, deadline: float | None) -> _Attempt:
        """What a provider attempt that raised ``exc`` means; releases its permit with that outcome."""
        if isinstance(exc, TimeoutError):
            self.limiter.release(permit, "error")
            self.metrics.on_upstream("timeout", self.clock.now() - started)
            if deadline is not None and self.clock.now() >= deadline:
                return TimeoutError()
            return UpstreamError("provider call timed out (call_timeout_s)", retryable=True)
        if isinstance(exc, UpstreamError):
            kind: Outcome = "rate_limited" if exc.rate_limited else "error"
            self.limiter.release(permit, kind, retry_after=exc.retry_after)
            status = "rate_limited" if exc.rate_limited else (f"error_{exc.status}" if exc.status else "error")
            self.metrics.on_upstream(status, self.clock.now() - started)
            return exc
        if isinstance(exc, UnparseableReply):
            self.limiter.release(permit, "ok")
            self.metrics.on_upstream("unparseable", self.clock.now() - started)
            return exc
        log.error("judge backend raised an unexpected error", exc_info=exc)
        self.limiter.release(permit, "error")
        self.metrics.on_upstream("error", self.clock.now() - started)
        return UpstreamError(f"unexpected backend error ({type(exc).__name__})", retryable=False)

    def _priced(self, backend: JudgeBackend, reply: VerdictReply) -> VerdictReply:
        """``reply`` with its usage priced (the backend's cost, else the price table) and counted."""
        u = reply.usage
        cost = u.cost_usd
        if not cost:
            p_in, p_out = price_for(self.config.prices, backend.info.model)
            cost = (u.prompt_tokens * p_in + u.completion_tokens * p_out) / 1e6
        usage = Usage(u.prompt_tokens, u.completion_tokens, cost, 1)
        self.tokens_spent += u.prompt_tokens + u.completion_tokens
        self.cost_spent += cost
        self.metrics.on_usage(u.prompt_tokens, u.completion_tokens, cost)
        return VerdictReply(reply.choice, reply.probs, reply.soft, reply.raw, reply.rationale, usage)


def _usable(reply: VerdictReply, choices: tuple[str, ...]) -> bool:
    """Whether ``reply`` names one of ``choices`` (by probability mass or by its parsed choice)."""
    if reply.probs is not None and sum(max(0.0, reply.probs.get(c, 0.0)) for c in choices) > 0:
        return True
    return reply.choice in choices
