"""Batch jobs: fill the verdict cache through the providers' batch endpoints, at batch prices.

A job is a list of compare / rank / grade requests, exactly as the interactive routes take them.
The manager runs each request's protocol in a *collect* mode (a :class:`VerdictCaller` whose
``verdict`` records the query instead of calling the provider), so the queries are exactly the
ones the interactive path makes: both orders of each pair, the principles chosen for the item,
every pair a rank judges. Queries already in the cache cost nothing; the rest go to the provider
in chunks (within its limits), as the very requests the interactive backend would send
(:mod:`services.judge.backends.batch_api`), with ``custom_id`` = the query's cache key (its first
40 hex digits) and the call's number. Each result is parsed by the interactive backend's own code,
priced at the batch price (``batch_price_factor`` x the price table: half, for both providers) and
stored in the verdict cache: afterwards the interactive requests all hit the cache.

Durability (a SQLite file next to the cache, :class:`BatchStore`):

- A job is stored with its queries before the POST answers; the same ``idempotency_key`` returns
  the stored job, never a second one.
- Before a provider batch is created, the *intent* is recorded (a chunk id, its queries, the
  time). After a restart, a chunk still in ``intent`` is first looked for at the provider
  (:meth:`ProviderBatches.find`) and only created when it is not there; a chunk ``submitted`` is
  polled, never created again.
- Results are written to the cache before the store marks their queries done; a crash in between
  re-reads the same results (cache writes are ``INSERT OR IGNORE``).
- A request that failed (a per-request error, an expired batch, an unparseable reply) goes into a
  later chunk, up to ``max_attempts`` submissions in all; then it is failed with its reason (the
  interactive path will ask for it, and abstain as it would).

A query already submitted by another job is shared, not submitted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.errors import ErrorCode, ServiceError, invalid
from services.judge.backends.base import JudgeBackend, UnparseableReply
from services.judge.backends.batch_api import ItemResult, ProviderBatches, batch_support
from services.judge.engine.batch_store import BatchStore, Chunk, query_from_json, query_to_json
from services.judge.engine.config import price_for
from services.judge.engine.protocols import Protocols
from services.judge.engine.service import JudgeEngine
from services.judge.engine.validation import validate_compare, validate_grade, validate_rank
from services.judge.engine.verdicts import CallOutcome, Verdict, VerdictCaller
from services.judge.metrics import JudgeMetrics
from services.judge.types import CompareInput, GradeInput, RankInput, Usage, VerdictQuery, VerdictReply

__all__ = ["BatchManager", "BatchOptions"]

log = logging.getLogger(__name__)

T = TypeVar("T")
JudgeRequest = CompareInput | RankInput | GradeInput
CUSTOM_ID_HEX = 40


@dataclass(frozen=True)
class BatchOptions:
    """``poll_s``: seconds between polls of the provider; ``max_attempts``: submissions of one request
    before it is failed; ``max_requests``: most requests per provider batch (None: the provider's
    limit); ``price_factor``: batch price / interactive price; ``compatible``: the openai-compatible
    server speaks the batch API too."""

    poll_s: float = 30.0
    max_attempts: int = 3
    max_requests: int | None = None
    price_factor: float = 0.5
    compatible: bool = False


# -- collect mode ---------------------------------------------------------------------------------


class _Collector(VerdictCaller):
    """A verdict caller that records the uncached queries instead of calling the provider."""

    def __init__(self, engine: JudgeEngine) -> None:
        super().__init__(
            engine.config,
            cache=engine.cache,
            metrics=JudgeMetrics(),
            clock=engine.clock,
            limiter=engine.limiter,
            template_hash=engine.templates.hash,
        )
        self.found: dict[str, VerdictQuery] = {}
        self.hits: set[str] = set()

    async def verdict(
        self, backend: JudgeBackend, query: VerdictQuery, meta: Mapping[str, object], deadline: float | None
    ) -> CallOutcome:
        key = self.key(backend, query, meta)
        if key not in self.found and key not in self.hits and self.cache is not None:
            hit = await self.cache.aget(key)
            if hit is not None:
                self.hits.add(key)
                return Verdict(hit, True, Usage())
        if key not in self.hits:
            self.found[key] = query
        # Any usable verdict: the protocol's result is thrown away, only its queries matter.
        return Verdict(VerdictReply(query.choices[0], None, False, ""), False, Usage())


def _usable(reply: VerdictReply, choices: tuple[str, ...]) -> bool:
    """The interactive caller's test (:func:`services.judge.engine.verdicts._usable`)."""
    if reply.probs is not None and sum(max(0.0, reply.probs.get(c, 0.0)) for c in choices) > 0:
        return True
    return reply.choice in choices


# -- the manager ----------------------------------------------------------------------------------


class BatchManager:
    """Creates batch jobs and drives their provider batches (one background task, started on first use)."""

    def __init__(self, engine: JudgeEngine, store: BatchStore, options: BatchOptions | None = None) -> None:
        self.engine = engine
        self.store = store
        self.options = options or BatchOptions()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._provider: ProviderBatches | None = None
        self._create_lock = asyncio.Lock()

    def provider(self) -> ProviderBatches:
        """The loaded backend's batch endpoint; INVALID_ARGUMENT saying why there is none."""
        if self.engine.cache is None:
            raise invalid("the batch API fills the verdict cache, and this judge runs with --cache off")
        if self._provider is None:
            found = batch_support(self.engine.backend, compatible=self.options.compatible)
            if isinstance(found, str):
                raise invalid(f"no batch API: {found}")
            self._provider = found
        return self._provider

    def ensure_running(self) -> None:
        """Start (or restart) the driver: it resumes every unfinished chunk from the store."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drive(), name="judge-batches")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.store.close()

    # -- jobs ---------------------------------------------------------------------------------------

    async def create(self, idem: str, requests: Sequence[JudgeRequest]) -> dict[str, Any]:
        """The job for ``idem`` (the existing one if there is one), its queries stored before answering."""
        if not idem:
            raise invalid("idempotency_key must be a non-empty string")
        provider = self.provider()
        async with self._create_lock:  # one collect at a time: the same key twice waits and finds the job
            existing = await self.store.run(self.store.job_by_idem, idem)
            if existing is None:
                existing = await self._collect_and_store(idem, requests, provider)
        self.ensure_running()
        self._wake.set()
        return await self.status(existing)

    async def _collect_and_store(self, idem: str, requests: Sequence[JudgeRequest], provider: ProviderBatches) -> str:
        engine = self.engine
        backend = engine.backend
        collector = _Collector(engine)
        protocols = Protocols(engine.config, engine.templates, collector.metrics, collector)
        limits = engine.limits
        bad: list[dict[str, Any]] = []
        for i, req in enumerate(requests):
            try:
                if isinstance(req, CompareInput):
                    validate_compare(req, limits)
                    engine._check_prompt(req, limits)
                    await protocols.compare(backend, engine.info, req, None)
                elif isinstance(req, RankInput):
                    validate_rank(req, limits)
                    engine._check_prompt(req, limits)
                    await protocols.rank(backend, engine.info, req, protocols.rank_pairs(req), None)
                else:
                    validate_grade(req, limits)
                    engine._check_prompt(req, limits)
                    await protocols.grade(backend, engine.info, req, None)
            except ServiceError as err:
                if err.code != ErrorCode.INVALID_ARGUMENT:
                    raise
                bad.append({"index": i, "message": err.message})  # the interactive request gets the same error
        queries: dict[str, tuple[str, str]] = {}
        for key, query in collector.found.items():
            queries[key] = (query_to_json(query), json.dumps(await provider.plan(query)))
        return await self.store.run(
            self.store.add_job, idem, provider.name, len(requests), len(collector.hits), bad, queries
        )

    async def status(self, job: str) -> dict[str, Any]:
        found = await self.store.run(self.store.job, job)
        if found is None:
            raise ServiceError(ErrorCode.NOT_FOUND, f"no batch job {job!r}")
        self.ensure_running()
        return found

    # -- the driver ---------------------------------------------------------------------------------

    async def _drive(self) -> None:
        while True:
            try:
                busy = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("judge batches: a polling round failed; trying again")
                busy = True
            if not busy:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.options.poll_s)

    async def step(self) -> bool:
        """One round: (re)submit, poll, collect results. True while some chunk is unfinished."""
        store = self.store
        in_flight = await store.run(store.chunks, "intent") or await store.run(store.chunks, "submitted")
        if not in_flight and not await store.run(store.pending):
            return False  # nothing in flight: a judge without a batch API idles here, no error
        provider = self.provider()
        for chunk in await store.run(store.chunks, "intent"):
            await self._submit(provider, chunk, reconcile=True)
        await self._submit_pending(provider)
        for chunk in await store.run(store.chunks, "submitted"):
            assert chunk.batch_id is not None
            state = await provider.state(chunk.batch_id)
            if not state.ended:
                await store.run(store.set_status, chunk.id, state.status)
                continue
            results = await provider.results(state)
            await self._process(provider, chunk, state.status, results)
        left = await store.run(store.chunks, "submitted")
        return bool(left) or bool(await store.run(store.chunks, "intent")) or bool(await store.run(store.pending))

    async def _submit_pending(self, provider: ProviderBatches) -> None:
        pending = await self.store.run(self.store.pending)
        limit = min(provider.max_requests, self.options.max_requests or provider.max_requests)
        group: list[str] = []
        n = size = 0
        for key, pjson in pending:
            params = json.loads(pjson)
            k = len(params)
            s = sum(provider.line_bytes(f"{key[:CUSTOM_ID_HEX]}_{i}", p) for i, p in enumerate(params))
            if group and (n + k > limit or size + s > provider.max_bytes):
                await self._new_chunk(provider, group, n)
                group, n, size = [], 0, 0
            group.append(key)
            n += k
            size += s
        if group:
            await self._new_chunk(provider, group, n)

    async def _new_chunk(self, provider: ProviderBatches, keys: list[str], n: int) -> None:
        chunk = await self.store.run(self.store.record_intent, provider.name, keys, n)
        await self._submit(provider, chunk, reconcile=False)

    async def _submit(self, provider: ProviderBatches, chunk: Chunk, *, reconcile: bool) -> None:
        """Create the provider batch of a recorded intent (after looking for it when resuming)."""
        store = self.store
        rows = await store.run(store.chunk_queries, chunk.id)
        items = [
            (f"{key[:CUSTOM_ID_HEX]}_{i}", params)
            for key, _, pjson, _ in rows
            for i, params in enumerate(json.loads(pjson))
        ]
        if not items:  # nothing left to do (its queries were settled elsewhere)
            await store.run(store.finish_chunk, chunk.id, "empty", [], [], [])
            return
        batch_id = None
        if reconcile:
            known = await store.run(store.known_batch_ids)
            batch_id = await provider.find(chunk.id, chunk.intent, len(items), known)
            if batch_id is not None:
                log.info("judge batches: found %s for %s, created before a restart", batch_id, chunk.id)
        if batch_id is None:
            batch_id = await provider.create(chunk.id, items)
        await store.run(store.set_submitted, chunk.id, batch_id)
        log.info("judge batches: %s submitted as %s (%d requests)", chunk.id, batch_id, len(items))

    async def _process(
        self, provider: ProviderBatches, chunk: Chunk, status: str, results: Mapping[str, ItemResult]
    ) -> None:
        cache = self.engine.cache
        assert cache is not None
        p_in, p_out = price_for(self.engine.config.prices, self.engine.backend.info.model)
        factor = self.options.price_factor
        done: list[tuple[str, Usage, float]] = []
        retry: list[tuple[str, str]] = []
        failed: list[tuple[str, str]] = []
        for key, qjson, pjson, attempts in await self.store.run(self.store.chunk_queries, chunk.id):
            query = query_from_json(qjson)
            got = [results.get(f"{key[:CUSTOM_ID_HEX]}_{i}") for i in range(len(json.loads(pjson)))]
            reason: str | None = None
            retryable = True
            reply: VerdictReply | None = None
            missing = next((r for r in got if r is None or r.response is None), None)
            if any(r is None for r in got):
                reason = f"no result (provider batch {status})"
            elif missing is not None:
                reason = missing.error or "failed"
                retryable = missing.retryable
            else:
                try:
                    reply = await provider.parse(query, [r.response for r in got if r is not None])
                    if not _usable(reply, query.choices):
                        reason, reply = f"unparseable: reply names none of the choices {list(query.choices)}", None
                except UnparseableReply as exc:
                    reason = f"unparseable: {exc.reason}"
                except Exception as exc:  # a reply the backend could not read at all
                    reason = f"upstream: unreadable batch result ({type(exc).__name__})"
            if reply is not None:
                u = reply.usage
                list_cost = u.cost_usd or (u.prompt_tokens * p_in + u.completion_tokens * p_out) / 1e6
                usage = Usage(u.prompt_tokens, u.completion_tokens, list_cost * factor, 1)
                priced = VerdictReply(reply.choice, reply.probs, reply.soft, reply.raw, reply.rationale, usage)
                await cache.aput(key, priced)
                self.engine.metrics.on_usage(u.prompt_tokens, u.completion_tokens, usage.cost_usd)
                done.append((key, usage, list_cost))
            elif retryable and attempts < self.options.max_attempts:
                retry.append((key, str(reason)))
            else:
                tries = f" (after {attempts} submissions)" if retryable else ""
                failed.append((key, f"{reason}{tries}"))
        await self.store.run(self.store.finish_chunk, chunk.id, status, done, retry, failed)
        log.info(
            "judge batches: %s (%s) ended %s: %d done, %d to resubmit, %d failed",
            chunk.id, chunk.batch_id, status, len(done), len(retry), len(failed),
        )  # fmt: skip
