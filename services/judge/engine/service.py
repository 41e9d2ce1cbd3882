"""The judge engine: the one entry point both judge transports call.

transport → :class:`JudgeEngine` (validate, admit) → :class:`~services.judge.engine.protocols.Protocols`
(plan the verdict queries, combine the verdicts) → per verdict
:class:`~services.judge.engine.verdicts.VerdictCaller` (cache, single flight, limiter, backend with
retries, pricing) → a typed result or an :class:`Abstain`.

Failure semantics (see DESIGN.md's error table):

- invalid input → ``ServiceError(INVALID_ARGUMENT)`` before any work
  (:mod:`services.judge.engine.validation`), a prompt over ``max_prompt_chars`` included: first
  on the request's texts, then on its longest prompt as rendered, before any backend call.
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
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

from services.common.errors import ErrorCode, ServiceError, invalid
from services.common.lifecycle import EngineState, LifecycleOwner
from services.judge.backends.base import DEFAULT_MAX_PROMPT_CHARS, JudgeBackend
from services.judge.clock import Clock, SystemClock
from services.judge.engine.cache import JudgeCache
from services.judge.engine.config import GRADE_SCALE_BOUNDS, JudgeEngineConfig, JudgeLimits
from services.judge.engine.limiter import Limiter
from services.judge.engine.prompts import TemplateSet
from services.judge.engine.protocols import Protocols
from services.judge.engine.validation import validate_compare, validate_grade, validate_rank
from services.judge.engine.verdicts import VerdictCaller
from services.judge.metrics import JudgeMetrics
from services.judge.types import (
    Abstain,
    CompareInput,
    CompareResult,
    GradeInput,
    GradeResult,
    JudgeRef,
    RankInput,
    RankResult,
)

__all__ = ["DEFAULT_MAX_PROMPT_CHARS", "GRADE_SCALE_BOUNDS", "JudgeEngine", "JudgeEngineConfig", "JudgeLimits"]

log = logging.getLogger(__name__)


class JudgeEngine(LifecycleOwner):
    """Owns the backend, the verdict cache, the limiter and the service state; admits requests."""

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
        self._own_lifecycle(self.metrics)
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
        self.verdicts = VerdictCaller(
            self.config,
            cache=cache,
            metrics=self.metrics,
            clock=self.clock,
            limiter=self.limiter,
            template_hash=self.templates.hash,
        )
        self.protocols = Protocols(self.config, self.templates, self.metrics, self.verdicts)
        self._backend: JudgeBackend | None = None
        self._pending_calls = 0

    # -- state ----------------------------------------------------------------------------------

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
        """What this engine enforces (validation and admission).

        ``max_prompt_chars``: the configured one, else what the loaded backend says it can read
        (its ``max_prompt_chars``), else :data:`DEFAULT_MAX_PROMPT_CHARS`.
        """
        limits = self.config.limits
        if self.config.max_prompt_chars is None and self._backend is not None:
            own = getattr(self._backend, "max_prompt_chars", None)
            if isinstance(own, int) and own > 0:
                limits = dataclasses.replace(limits, max_prompt_chars=own)
        return limits

    @property
    def tokens_spent(self) -> int:
        """Provider tokens spent in this engine's life (what ``max_tokens_total`` bounds)."""
        return self.verdicts.tokens_spent

    @property
    def cost_spent(self) -> float:
        """USD spent in this engine's life."""
        return self.verdicts.cost_spent

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

    async def stop(self) -> None:
        """Close the backend and the cache (the engine owns the cache it was given)."""
        if self._backend is not None:
            with contextlib.suppress(Exception):
                await self._backend.aclose()
        if self.cache is not None:
            await asyncio.to_thread(self.cache.close)
        self.lifecycle.set(EngineState.STOPPED)

    # -- admission ------------------------------------------------------------------------------

    def _check_prompt(self, req: CompareInput | RankInput | GradeInput, limits: JudgeLimits) -> None:
        """INVALID_ARGUMENT when the longest prompt ``req`` can send, rendered, is over the budget."""
        chars = self.protocols.longest_prompt_chars(req)
        if chars > limits.max_prompt_chars:
            raise invalid(
                f"the judge prompt would be {chars} characters as rendered (template, fences and escaping "
                f"included), over --max-prompt-chars {limits.max_prompt_chars}"
            )

    @contextlib.asynccontextmanager
    async def _admitted(self, calls: int, deadline: float | None) -> AsyncIterator[JudgeBackend]:
        """Admit a request that will make up to ``calls`` provider calls, or refuse it at once."""
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

    # -- the public API: validate, admit, then the protocol -------------------------------------

    async def compare(self, req: CompareInput, *, deadline: float | None = None) -> CompareResult | Abstain:
        """P(responses[0] better than responses[1]); ``winner`` None inside the tie margin."""
        limits = self.limits
        validate_compare(req, limits)
        self._check_prompt(req, limits)
        async with self._admitted(self.protocols.compare_calls(req), deadline) as backend:
            return await self.protocols.compare(backend, self.info, req, deadline)

    async def rank(self, req: RankInput, *, deadline: float | None = None) -> RankResult | Abstain:
        """Bradley-Terry log-strengths from pairwise judgments in both orders; ranking best first.

        Pairs whose judgment abstained are left out of the fit; when that leaves some response
        in no judged pair, the whole rank abstains (standing for the worst failure).
        """
        limits = self.limits
        validate_rank(req, limits)
        self._check_prompt(req, limits)
        pairs = self.protocols.rank_pairs(req)
        async with self._admitted(self.protocols.rank_calls(req, pairs), deadline) as backend:
            return await self.protocols.rank(backend, self.info, req, pairs, deadline)

    async def grade(self, req: GradeInput, *, deadline: float | None = None) -> GradeResult | Abstain:
        """The expected grade on ``scale`` (hard choice without probabilities), mapped to [0, 1]."""
        limits = self.limits
        validate_grade(req, limits)
        self._check_prompt(req, limits)
        async with self._admitted(self.protocols.grade_calls(req), deadline) as backend:
            return await self.protocols.grade(backend, self.info, req, deadline)
