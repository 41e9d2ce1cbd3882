"""The judge engine: the one entry point both judge transports call.

transport → :class:`JudgeEngine` (validate, admit, plan the calls) → per call: cache, single
flight, limiter, backend (with retries) → protocol maths (both orders, soft labels, grade
expectation, Bradley-Terry) → a typed result or an :class:`Abstain`.

Failure semantics (see DESIGN.md's error table):

- invalid input → ``ServiceError(INVALID_ARGUMENT)`` before any work.
- not ready / draining → ``UNAVAILABLE`` (from :class:`Lifecycle`).
- the bounded call queue (``max_queue_items`` provider calls admitted and unfinished) is full,
  or the token budget (``max_tokens_total``) is spent → ``RESOURCE_EXHAUSTED`` at once; the
  queue case carries ``retry_after``.
- the deadline passes before any provider call was attempted and nothing was answered (from the
  cache or a shared call) → ``DEADLINE_EXCEEDED``. When some work was done (a call attempted,
  one order judged), the result is ``Abstain(reason="deadline: ...")`` with the usage spent.
- a provider failure after the retries, a non-retryable provider error, or replies still
  unparseable after ``max_parse_retries`` re-asks → ``Abstain(reason="upstream: ..." |
  "unparseable: ...")``. Never an exception, never a default label.

``cached`` is true when every verdict behind a result came from the cache. ``usage`` counts the
provider calls made for this result (``calls``: attempts, retries included; tokens and cost as
reported, cost from the price table when the backend gave none); cache hits cost nothing, and a
call shared with a concurrent identical request is charged to the request that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from services.common.errors import ErrorCode, ServiceError, invalid
from services.common.lifecycle import EngineState, Lifecycle
from services.judge.backends.base import JudgeBackend, UnparseableReply, UpstreamError
from services.judge.engine.cache import JudgeCache
from services.judge.engine.clock import Clock, SystemClock, with_deadline
from services.judge.engine.config import JudgeEngineConfig, price_for
from services.judge.engine.limiter import Limiter, LimiterTimeout, Outcome, Permit
from services.judge.engine.prompts import TemplateSet, prompt_json, sha256_hex
from services.judge.engine.ranking import bradley_terry, pairs_to_judge, ranking_from_scores
from services.judge.metrics import JudgeMetrics
from services.judge.types import (
    Abstain,
    CompareInput,
    CompareResult,
    GradeInput,
    GradeResult,
    JudgePrompt,
    JudgeRef,
    RankInput,
    RankResult,
    Usage,
    VerdictQuery,
    VerdictReply,
)

__all__ = ["GRADE_SCALE_BOUNDS", "JudgeEngine", "JudgeEngineConfig", "JudgeLimits"]

log = logging.getLogger(__name__)

# Grade verdicts are single tokens: the digits 0..9.
GRADE_SCALE_BOUNDS = (0, 9)
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class JudgeLimits:
    """What ``/v1/models`` reports about the judge engine's limits."""

    max_queue_items: int
    max_concurrency: int
    rpm: float | None
    tpm: float | None
    max_tokens_total: int | None
    rank_max_pairs: int
    grade_scale_bounds: tuple[int, int]  # a scale [lo, hi] needs bounds[0] <= lo < hi <= bounds[1]


# -- per-call outcomes -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Verdict:
    reply: VerdictReply
    cached: bool
    usage: Usage


@dataclass(frozen=True)
class _Failure:
    kind: str  # "upstream", "unparseable", "deadline"
    reason: str
    usage: Usage
    worked: bool  # a provider call was attempted (so a deadline failure is partial work)


_Outcome = _Verdict | _Failure


@dataclass(frozen=True)
class _PairJudgment:
    """P(first given response better) over the orders and principles judged for one pair."""

    preference: float
    consistent: bool
    soft: bool
    cached: bool
    usage: Usage
    rationale: str | None


class JudgeEngine:
    """Owns the backend, the verdict cache, the limiter and the service state."""

    def __init__(
        self,
        load_backend: Callable[[], JudgeBackend],
        config: JudgeEngineConfig | None = None,
        *,
        cache: JudgeCache | None = None,
        metrics: JudgeMetrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._load_backend = load_backend
        self.config = config or JudgeEngineConfig()
        self.cache = cache
        self.metrics = metrics or JudgeMetrics()
        self.clock: Clock = clock or SystemClock()
        self.lifecycle = Lifecycle(self._on_lifecycle)
        self.templates = TemplateSet(self.config.template)
        self.limiter = Limiter(
            max_concurrency=self.config.max_concurrency,
            rpm=self.config.rpm,
            tpm=self.config.tpm,
            clock=self.clock,
            on_limit_change=self.metrics.concurrency_limit.set,
            on_wait=self.metrics.limiter_waits.inc,
        )
        self.metrics.concurrency_limit.set(self.config.max_concurrency)
        self._backend: JudgeBackend | None = None
        self._rng = random.Random(self.config.seed)
        self._inflight: dict[str, asyncio.Future[_Outcome]] = {}
        self._pending_calls = 0
        self.tokens_spent = 0
        self.cost_spent = 0.0

    # -- state ----------------------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self.lifecycle.state

    @property
    def live(self) -> bool:
        return self.lifecycle.live

    @property
    def ready(self) -> bool:
        return self.lifecycle.ready

    def _on_lifecycle(self, ready: bool, in_flight: int) -> None:
        self.metrics.ready.set(1 if ready else 0)
        self.metrics.in_flight.set(in_flight)

    @property
    def backend(self) -> JudgeBackend:
        if self._backend is None:
            raise ServiceError(ErrorCode.UNAVAILABLE, "judge backend is still loading")
        return self._backend

    @property
    def info(self) -> JudgeRef:
        b = self.backend.info
        return JudgeRef(b.backend, b.model, self.templates.hash)

    @property
    def limits(self) -> JudgeLimits:
        c = self.config
        return JudgeLimits(
            c.max_queue_items, c.max_concurrency, c.rpm, c.tpm, c.max_tokens_total, c.rank_max_pairs,
            GRADE_SCALE_BOUNDS,
        )  # fmt: skip

    @property
    def queue_depth(self) -> int:
        """Provider calls admitted and not finished (waiting in the limiter or running)."""
        return self._pending_calls

    async def start(self) -> None:
        """Load the backend off the event loop, then report ready."""
        try:
            backend = await asyncio.to_thread(self._load_backend)
            # Readiness means warm: a backend that can warm up (the local model) does so first.
            warmup = getattr(backend, "warmup", None)
            if warmup is not None:
                await warmup()
        except Exception:
            self.lifecycle.set(EngineState.FAILED)
            raise
        self._backend = backend
        self.lifecycle.set(EngineState.READY)
        log.info("judge %s/%s ready (template %s)", backend.info.backend, backend.info.model, self.templates.hash)

    async def drain(self, seconds: float) -> bool:
        """Refuse new work, let admitted work finish for up to ``seconds``; True if all finished."""
        return await self.lifecycle.drain(seconds)

    async def stop(self) -> None:
        """Close the backend and the cache (the engine owns the cache it was given)."""
        if self._backend is not None:
            with contextlib.suppress(Exception):
                await self._backend.aclose()
        if self.cache is not None:
            await asyncio.to_thread(self.cache.close)
        self.lifecycle.set(EngineState.STOPPED)

    # -- admission ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _admitted(self, calls: int, deadline: float | None) -> AsyncIterator[JudgeBackend]:
        async with self.lifecycle.admitted():
            backend = self.backend
            budget = self.config.max_tokens_total
            if budget is not None and self.tokens_spent >= budget:
                raise ServiceError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"judge token budget spent ({self.tokens_spent} of {budget} tokens)",
                )
            if self._pending_calls + calls > self.config.max_queue_items:
                raise ServiceError(
                    ErrorCode.RESOURCE_EXHAUSTED,
                    f"judge overloaded: {self._pending_calls} provider calls queued",
                    retry_after=self.limiter.expected_wait(self._pending_calls),
                )
            if deadline is not None and self.clock.now() >= deadline:
                raise ServiceError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before judging started")
            self._pending_calls += calls
            self.metrics.queue_depth.set(self._pending_calls)
            try:
                yield backend
            finally:
                self._pending_calls -= calls
                self.metrics.queue_depth.set(self._pending_calls)

    # -- one verdict: cache, single flight, limiter, retries ------------------------------------

    def _key(self, backend: JudgeBackend, query: VerdictQuery, meta: Mapping[str, object]) -> str:
        return sha256_hex(
            {
                "v": 1,
                "backend": backend.info.backend,
                "model": backend.info.model,
                "snapshot": backend.info.snapshot,
                "template": self.templates.hash,
                "sampling": backend.sampling_key(),
                "meta": dict(meta),
                "messages": [[m.role, m.content] for m in query.messages],
                "choices": list(query.choices),
                "rationale": query.rationale,
                "max_tokens": query.max_tokens,
            }
        )

    async def _verdict(
        self, backend: JudgeBackend, query: VerdictQuery, meta: Mapping[str, object], deadline: float | None
    ) -> _Outcome:
        key = self._key(backend, query, meta)
        if self.cache is not None:
            hit = await self.cache.aget(key)
            self.metrics.on_cache(hit is not None)
            if hit is not None:
                return _Verdict(hit, True, Usage())
        while True:
            shared = self._inflight.get(key)
            if shared is None:
                break
            try:
                outcome = await with_deadline(self.clock, asyncio.shield(shared), deadline)
            except TimeoutError:
                return _Failure("deadline", "deadline: passed while waiting for an identical judgment", Usage(), False)
            if isinstance(outcome, _Verdict):
                return _Verdict(outcome.reply, outcome.cached, Usage())
            if outcome.kind != "deadline":
                return _Failure(outcome.kind, outcome.reason, Usage(), False)
            # the request that made the call ran out of time; ours may not have: try ourselves
        fut: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        outcome = _Failure("deadline", "deadline: cancelled", Usage(), False)
        try:
            outcome = await self._attempts(backend, query, key, deadline)
            return outcome
        finally:
            del self._inflight[key]
            fut.set_result(outcome)

    async def _attempts(self, backend: JudgeBackend, query: VerdictQuery, key: str, deadline: float | None) -> _Outcome:
        cfg = self.config
        usage = Usage()
        upstream_failures = 0
        parse_failures = 0
        worked = False
        est = sum(len(m.content) for m in query.messages) // 4 + query.max_tokens + 8
        # A k-samples backend makes k provider calls per verdict: each one counts against --rpm.
        calls_per_verdict = max(1, int(getattr(backend, "calls_per_verdict", 1)))
        est *= calls_per_verdict
        while True:
            try:
                permit = await self.limiter.acquire(est, deadline, calls=calls_per_verdict)
            except LimiterTimeout:
                return _Failure("deadline", "deadline: would pass while waiting for the provider rate limit",
                                usage, worked)  # fmt: skip
            if self.cache is not None and (permit.waited or worked):
                # Look again right before calling when time passed since the first lookup (a
                # limiter wait, a retry): another process may have stored this verdict meanwhile.
                try:
                    hit = await self.cache.aget(key)
                except BaseException:
                    self.limiter.release(permit, "unused")
                    raise
                if hit is not None:
                    self.limiter.release(permit, "unused")
                    return _Verdict(hit, True, usage)
            worked = True
            outcome = await self._one_call(backend, query, permit, deadline)
            if isinstance(outcome, VerdictReply):
                reply = self._priced(backend, outcome)
                usage = usage + reply.usage
                if self.cache is not None:
                    try:
                        await self.cache.aput(key, reply)
                    except Exception:
                        log.exception("judge cache: could not store a verdict")
                return _Verdict(reply, False, usage)
            usage = usage + Usage(calls=1)
            if isinstance(outcome, UnparseableReply):
                parse_failures += 1
                if parse_failures > cfg.max_parse_retries:
                    return _Failure("unparseable", f"unparseable: {outcome.reason}", usage, worked)
                continue
            if isinstance(outcome, TimeoutError):
                return _Failure("deadline", "deadline: passed during a provider call", usage, worked)
            err = outcome
            upstream_failures += 1
            if not err.retryable or upstream_failures > cfg.max_retries:
                tries = f" after {upstream_failures} attempts" if err.retryable else ""
                return _Failure("upstream", f"upstream: {err}{tries}", usage, worked)
            backoff = self._rng.uniform(0, min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (upstream_failures - 1)))
            if err.retry_after is not None and not err.rate_limited:
                backoff = max(backoff, err.retry_after)  # rate-limited ones pause the whole limiter
            if deadline is not None and self.clock.now() + backoff >= deadline:
                return _Failure("deadline", f"deadline: no time left to retry after '{err}'", usage, worked)
            await self.clock.sleep(backoff)

    async def _one_call(
        self, backend: JudgeBackend, query: VerdictQuery, permit: Permit, deadline: float | None
    ) -> VerdictReply | UpstreamError | UnparseableReply | TimeoutError:
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
            except TimeoutError:
                self.limiter.release(permit, "error")
                released = True
                self.metrics.on_upstream("timeout", self.clock.now() - started)
                if deadline is not None and self.clock.now() >= deadline:
                    return TimeoutError()
                return UpstreamError("provider call timed out (call_timeout_s)", retryable=True)
            except UpstreamError as err:
                kind: Outcome = "rate_limited" if err.rate_limited else "error"
                self.limiter.release(permit, kind, retry_after=err.retry_after)
                released = True
                status = "rate_limited" if err.rate_limited else (f"error_{err.status}" if err.status else "error")
                self.metrics.on_upstream(status, self.clock.now() - started)
                return err
            except UnparseableReply as err:
                self.limiter.release(permit, "ok")
                released = True
                self.metrics.on_upstream("unparseable", self.clock.now() - started)
                return err
            except Exception as exc:
                log.exception("judge backend raised an unexpected error")
                self.limiter.release(permit, "error")
                released = True
                self.metrics.on_upstream("error", self.clock.now() - started)
                return UpstreamError(f"unexpected backend error ({type(exc).__name__})", retryable=False)
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

    def _priced(self, backend: JudgeBackend, reply: VerdictReply) -> VerdictReply:
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

    # -- planning helpers -----------------------------------------------------------------------

    def _principles(self, requested: tuple[str, ...], item_hash: str) -> list[str | None]:
        pool = requested or self.config.principles
        if not pool:
            return [None]
        rng = random.Random(f"{self.config.seed}:{item_hash}")
        if self.config.principle_mode == "one":
            return [pool[rng.randrange(len(pool))]]
        k = min(self.config.ensemble_k, len(pool))
        return list(rng.sample(list(pool), k))

    def _pair_hash(self, prompt: JudgePrompt, x: str, y: str, rubric: str | None, reference: str | None) -> str:
        """Order-independent: compare(a, b), compare(b, a) and rank share their calls (and cache)."""
        lo, hi = sorted((x, y))
        return sha256_hex({"kind": "pairwise", "prompt": prompt_json(prompt), "texts": [lo, hi],
                           "rubric": rubric, "reference": reference})  # fmt: skip

    async def _judge_pair(
        self,
        backend: JudgeBackend,
        prompt: JudgePrompt,
        a: str,
        b: str,
        *,
        rubric: str | None,
        reference: str | None,
        principles: tuple[str, ...],
        protocol: str,
        deadline: float | None,
    ) -> _PairJudgment | _Failure:
        item_hash = self._pair_hash(prompt, a, b, rubric, reference)
        nonce = sha256_hex(["nonce", item_hash])[:16]
        chosen = self._principles(principles, item_hash)
        if protocol == "both_orders":
            orders = [False, True]  # flipped?
        else:
            # One order, chosen from the item hash; the same physical order whichever way round
            # the caller passed the pair.
            lo_first = int(sha256_hex(["order", self.config.seed, item_hash])[:8], 16) % 2 == 0
            orders = [(a > b) == lo_first] if a != b else [False]
        rationale = self.config.rationale
        plan: list[tuple[str | None, bool]] = [(p, flipped) for p in chosen for flipped in orders]

        async def one(principle: str | None, flipped: bool) -> _Outcome:
            first, second = (b, a) if flipped else (a, b)
            messages = self.templates.pairwise(
                prompt=prompt, first=first, second=second, reference=reference,
                criteria=self.templates.criteria(rubric, principle), nonce=nonce, rationale=rationale,
            )  # fmt: skip
            query = VerdictQuery(messages=messages, choices=("A", "B"), rationale=rationale,
                                 max_tokens=512 if rationale else 8)  # fmt: skip
            meta = {"kind": "pairwise", "rubric": rubric, "principle": principle,
                    "order": "sorted" if first <= second else "reversed", "reference": reference}  # fmt: skip
            return await self._verdict(backend, query, meta, deadline)

        outcomes = await asyncio.gather(*(one(p, f) for p, f in plan))
        usage = sum((o.usage for o in outcomes), Usage())
        failures = [o for o in outcomes if isinstance(o, _Failure)]
        if failures:
            worst = next((f for f in failures if f.kind != "deadline"), failures[0])
            worked = any(f.worked for f in failures) or len(failures) < len(outcomes)
            return _Failure(worst.kind, worst.reason, usage, worked)
        verdicts = [o for o in outcomes if isinstance(o, _Verdict)]
        # P(a better) per call, after undoing the flip
        per_call: list[float] = []
        soft = True
        for (_principle, flipped), v in zip(plan, verdicts, strict=True):
            p_first, is_soft = _p_first(v.reply)
            soft = soft and is_soft
            if rationale:
                lo, hi = self.config.clamp
                p_first = min(hi, max(lo, p_first))
            if p_first != 0.5:
                self.metrics.on_first_position(p_first > 0.5)
            per_call.append(1 - p_first if flipped else p_first)
        if protocol == "both_orders":
            for k in range(0, len(per_call), 2):
                self.metrics.on_consistency(_side(per_call[k]) == _side(per_call[k + 1]))
        consistent = len({_side(p) for p in per_call}) == 1
        # mean over orders within each principle, then over principles (same thing: equal counts)
        preference = sum(per_call) / len(per_call)
        rationales = [v.reply.rationale for v in verdicts if v.reply.rationale]
        return _PairJudgment(
            preference=preference,
            consistent=consistent,
            soft=soft,
            cached=all(v.cached for v in verdicts),
            usage=usage,
            rationale="\n\n".join(rationales) if rationales else None,
        )

    def _abstain(self, failure: _Failure, *, judge: JudgeRef | None = None) -> Abstain:
        if failure.kind == "deadline" and not failure.worked:
            raise ServiceError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before a judgment was made")
        self.metrics.on_abstain(failure.kind)
        return Abstain(reason=failure.reason, judge=judge, usage=failure.usage)

    # -- the protocols --------------------------------------------------------------------------

    async def compare(self, req: CompareInput, *, deadline: float | None = None) -> CompareResult | Abstain:
        """P(responses[0] better than responses[1]); ``winner`` None inside the tie margin."""
        _validate_common(req.prompt, req.rubric, req.reference, req.principles)
        if len(req.responses) != 2:
            raise invalid(f"compare needs exactly 2 responses, got {len(req.responses)}")
        _validate_texts(req.responses)
        if req.protocol not in ("both_orders", "single"):
            raise invalid(f"protocol must be 'both_orders' or 'single', not {req.protocol!r}")
        orders = 2 if req.protocol == "both_orders" else 1
        async with self._admitted(orders * self._principle_count(req.principles), deadline) as backend:
            judge = self.info
            out = await self._judge_pair(
                backend, req.prompt, req.responses[0], req.responses[1], rubric=req.rubric,
                reference=req.reference, principles=req.principles, protocol=req.protocol, deadline=deadline,
            )  # fmt: skip
            if isinstance(out, _Failure):
                return self._abstain(out, judge=judge)
            p = out.preference
            winner = None if abs(p - 0.5) < self.config.tie_margin else (0 if p > 0.5 else 1)
            return CompareResult(
                preference=p, winner=winner, consistent=out.consistent, soft=out.soft, judge=judge,
                usage=out.usage, cached=out.cached, rationale=out.rationale,
            )  # fmt: skip

    async def rank(self, req: RankInput, *, deadline: float | None = None) -> RankResult | Abstain:
        """Bradley-Terry log-strengths from pairwise judgments in both orders; ranking best first.

        Pairs whose judgment abstained are left out of the fit; when that leaves some response
        in no judged pair, the whole rank abstains (with the first failure's reason).
        """
        _validate_common(req.prompt, req.rubric, req.reference, req.principles)
        n = len(req.responses)
        if n < 2:
            raise invalid(f"rank needs at least 2 responses, got {n}")
        _validate_texts(req.responses)
        seed_hash = sha256_hex({"kind": "rank", "prompt": prompt_json(req.prompt), "texts": sorted(req.responses)})
        pairs = pairs_to_judge(n, self.config.rank_max_pairs, int(seed_hash[:8], 16) ^ self.config.seed)
        calls = 2 * len(pairs) * self._principle_count(req.principles)
        async with self._admitted(calls, deadline) as backend:
            judge = self.info

            async def pair(i: int, j: int) -> _PairJudgment | _Failure:
                return await self._judge_pair(
                    backend, req.prompt, req.responses[i], req.responses[j], rubric=req.rubric,
                    reference=req.reference, principles=req.principles, protocol="both_orders", deadline=deadline,
                )  # fmt: skip

            results = await asyncio.gather(*(pair(i, j) for i, j in pairs))
            usage = sum((r.usage for r in results), Usage())
            outcomes: list[tuple[int, int, float]] = []
            covered: set[int] = set()
            judged: list[_PairJudgment] = []
            for (i, j), r in zip(pairs, results, strict=True):
                if isinstance(r, _PairJudgment):
                    outcomes.append((i, j, r.preference))
                    covered.update((i, j))
                    judged.append(r)
            failures = [r for r in results if isinstance(r, _Failure)]
            if len(covered) < n:
                first = next((f for f in failures if f.kind != "deadline"), failures[0])
                worked = any(f.worked for f in failures) or bool(judged)
                return self._abstain(_Failure(first.kind, first.reason, usage, worked), judge=judge)
            for f in failures:
                self.metrics.on_abstain(f.kind)
            scores = bradley_terry(n, outcomes)
            return RankResult(
                scores=scores,
                ranking=ranking_from_scores(scores),
                judge=judge,
                usage=usage,
                cached=all(r.cached for r in judged),
                consistent_rate=sum(r.consistent for r in judged) / len(judged),
            )

    async def grade(self, req: GradeInput, *, deadline: float | None = None) -> GradeResult | Abstain:
        """The expected grade on ``scale`` (hard choice without probabilities), mapped to [0, 1]."""
        _validate_common(req.prompt, req.rubric, req.reference, req.principles)
        _validate_texts((req.response,))
        lo, hi = _validate_scale(req.scale)
        item_hash = sha256_hex({"kind": "grade", "prompt": prompt_json(req.prompt), "response": req.response,
                                "rubric": req.rubric, "reference": req.reference, "scale": [lo, hi]})  # fmt: skip
        nonce = sha256_hex(["nonce", item_hash])[:16]
        chosen = self._principles(req.principles, item_hash)
        choices = tuple(str(v) for v in range(lo, hi + 1))
        rationale = self.config.rationale
        async with self._admitted(len(chosen), deadline) as backend:
            judge = self.info

            async def one(principle: str | None) -> _Outcome:
                messages = self.templates.grade(
                    prompt=req.prompt, response=req.response, reference=req.reference,
                    criteria=self.templates.criteria(req.rubric, principle), scale=(lo, hi), nonce=nonce,
                    rationale=rationale,
                )  # fmt: skip
                query = VerdictQuery(messages, choices, rationale, 512 if rationale else 8)
                meta = {"kind": "grade", "rubric": req.rubric, "principle": principle, "reference": req.reference}
                return await self._verdict(backend, query, meta, deadline)

            outcomes = await asyncio.gather(*(one(p) for p in chosen))
            usage = sum((o.usage for o in outcomes), Usage())
            failures = [o for o in outcomes if isinstance(o, _Failure)]
            if failures:
                worst = next((f for f in failures if f.kind != "deadline"), failures[0])
                worked = any(f.worked for f in failures) or len(failures) < len(outcomes)
                return self._abstain(_Failure(worst.kind, worst.reason, usage, worked), judge=judge)
            verdicts = [o for o in outcomes if isinstance(o, _Verdict)]
            values = [_expected_grade(v.reply, choices) for v in verdicts]
            raw = sum(x for x, _ in values) / len(values)
            rationales = [v.reply.rationale for v in verdicts if v.reply.rationale]
            return GradeResult(
                score=(raw - lo) / (hi - lo), raw=raw, soft=all(s for _, s in values), judge=judge, usage=usage,
                cached=all(v.cached for v in verdicts), rationale="\n\n".join(rationales) if rationales else None,
            )  # fmt: skip

    def _principle_count(self, requested: tuple[str, ...]) -> int:
        pool = requested or self.config.principles
        if not pool or self.config.principle_mode == "one":
            return 1
        return min(self.config.ensemble_k, len(pool))


# -- verdict maths ------------------------------------------------------------------------------


def _usable(reply: VerdictReply, choices: tuple[str, ...]) -> bool:
    if reply.probs is not None and sum(max(0.0, reply.probs.get(c, 0.0)) for c in choices) > 0:
        return True
    return reply.choice in choices


def _dist(reply: VerdictReply, choices: Sequence[str]) -> tuple[dict[str, float], bool]:
    """The verdict distribution over ``choices`` (renormalised), and whether it is soft."""
    if reply.probs is not None:
        mass = {c: max(0.0, float(reply.probs.get(c, 0.0))) for c in choices}
        total = sum(mass.values())
        if total > 0:
            return {c: m / total for c, m in mass.items()}, reply.soft
    return {c: (1.0 if c == reply.choice else 0.0) for c in choices}, False


def _p_first(reply: VerdictReply) -> tuple[float, bool]:
    dist, soft = _dist(reply, ("A", "B"))
    return dist["A"], soft


def _expected_grade(reply: VerdictReply, choices: tuple[str, ...]) -> tuple[float, bool]:
    dist, soft = _dist(reply, choices)
    return sum(int(c) * p for c, p in dist.items()), soft


def _side(p: float) -> int:
    return (p > 0.5) - (p < 0.5)


# -- validation ---------------------------------------------------------------------------------


def _validate_common(
    prompt: JudgePrompt, rubric: str | None, reference: str | None, principles: tuple[str, ...]
) -> None:
    if isinstance(prompt, str):
        if prompt == "":
            raise invalid("prompt is empty")
    else:
        if len(prompt) == 0:
            raise invalid("prompt has no messages")
        for m in prompt:
            if m.role not in _ROLES:
                raise invalid(f"message role must be one of {list(_ROLES)}, not {m.role!r}")
            if not isinstance(m.content, str):
                raise invalid("message content must be a string")
    if rubric is not None and rubric == "":
        raise invalid("rubric is empty (leave it out for the default criteria)")
    if reference is not None and reference == "":
        raise invalid("reference is empty (leave it out for no reference)")
    if any(not isinstance(p, str) or p == "" for p in principles):
        raise invalid("principles must be non-empty strings")


def _validate_texts(texts: Sequence[str]) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise invalid(f"responses[{i}] must be a string", item=i)
        # an empty response is a legitimate (bad) candidate: it is judged, not rejected


def _validate_scale(scale: tuple[int, int]) -> tuple[int, int]:
    if len(scale) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in scale):
        raise invalid("scale must be two integers [lo, hi]")
    lo, hi = scale
    blo, bhi = GRADE_SCALE_BOUNDS
    if not blo <= lo < hi <= bhi:
        raise invalid(f"scale must satisfy {blo} <= lo < hi <= {bhi} (grades are single digits), got [{lo}, {hi}]")
    return lo, hi
