"""The reward engine: the one entry point both transports call.

transport → :class:`RewardEngine` (validate, admit, tokenize in a small pool, check the token
budget) → :class:`Batcher` → backend ``forward`` on the model thread → results back per item.

Every request's work is bounded before it can cost much: its items count against the queue
limit from the moment they are admitted (before tokenization, so ``rlhf_reward_queue_depth``
shows work still being tokenized and overload is refused at the door), the renderer's work per
item is bounded by the model's maximum length, and a request whose tokens after truncation
exceed ``--max-request-tokens`` is refused before anything reaches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.common.errors import INTERNAL_MESSAGE, ErrorCode, ServiceError, invalid
from services.common.lifecycle import EngineState, LifecycleOwner
from services.reward.engine.normalization import Normalizer
from services.reward.engine.results import (
    CompareOutcome,
    ItemError,
    ItemResult,
    Limits,
    ModelRef,
    ScoredItem,
    ScoreOutcome,
)
from services.reward.engine.validation import validate_inputs
from services.reward.metrics import RewardMetrics
from services.runtime.backends.base import RewardBackend, shared_prefix_fn
from services.runtime.batcher import Batcher, BatcherConfig, BatchObserver
from services.runtime.chat import Prompt
from services.runtime.heads import head_weights
from services.runtime.items import EncodedItem, ModelInfo, Priority, RewardInput
from services.runtime.tokenizers import DEFAULT_TOKENIZE_WORKERS, tokenize_pool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    limits: Limits = field(
        default_factory=lambda: Limits(
            max_items_per_request=4096,
            max_body_bytes=64 * 2**20,
            max_text_bytes=256 * 2**10,
            max_batch_tokens=8192,
        )
    )
    tokenize_workers: int = DEFAULT_TOKENIZE_WORKERS
    head_weights: tuple[float, ...] | None = None
    normalize_mean: float | None = None
    normalize_std: float | None = None


class RewardEngine(LifecycleOwner):
    """Owns the backend, the batcher and the service state (starting → ready → draining)."""

    def __init__(
        self,
        load_backend: Callable[[], RewardBackend],
        config: EngineConfig | None = None,
        *,
        metrics: RewardMetrics | None = None,
    ) -> None:
        self._load_backend = load_backend
        self.config = config or EngineConfig()
        self.metrics = metrics or RewardMetrics()
        self._own_lifecycle(self.metrics)
        self._backend: RewardBackend | None = None
        self._batcher: Batcher | None = None
        self._weights: np.ndarray | None = None
        self._normalizer = Normalizer(self.config.normalize_mean, self.config.normalize_std)
        # Backends give each thread its own tokenizer copy, so several requests tokenize at once
        # and one large request cannot hold tokenization for everybody.
        self._tokenize_pool = tokenize_pool(self.config.tokenize_workers, "reward-tokenize")
        self._tokenizing = 0  # items admitted and still being tokenized (counted in queue_depth)
        self._grouping = False  # set at start: the backend shares the prefix of a group
        self._group_ids = itertools.count()

    # -- state ----------------------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return self.config.limits

    @property
    def info(self) -> ModelInfo:
        if self._backend is None:
            raise ServiceError(ErrorCode.UNAVAILABLE, "model is still loading")
        return self._backend.info

    @property
    def queue_depth(self) -> int:
        """Items admitted and not yet in a batch, including those still being tokenized."""
        return (self._batcher.queue_depth if self._batcher else 0) + self._tokenizing

    async def start(self) -> None:
        """Load the model off the event loop, run a warm-up batch, then report ready."""
        try:
            backend = await asyncio.to_thread(self._load_backend)
            self._weights = head_weights(self.config.head_weights, backend.info.num_labels)
            warm = backend.encode([RewardInput(text="Warm-up: is the model ready to score?")])
            await asyncio.to_thread(backend.forward, warm)
        except Exception:
            self.lifecycle.set(EngineState.FAILED)
            raise
        self._backend = backend
        shared = shared_prefix_fn(backend)
        self._grouping = shared is not None
        self._batcher = Batcher(
            backend.forward, self.config.batcher, observer=_WithTokenizing(self), shared_prefix=shared
        )
        await self._batcher.start()
        self.lifecycle.set(EngineState.READY)
        log.info("model %s (%s) ready", backend.info.id, backend.info.revision)

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self.lifecycle.set(EngineState.STOPPED)

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[tuple[RewardBackend, Batcher]]:
        async with self.lifecycle.admitted():
            if self._backend is None or self._batcher is None:
                raise ServiceError(ErrorCode.UNAVAILABLE, "model is not ready yet")
            yield self._backend, self._batcher

    # -- scoring --------------------------------------------------------------------------------

    def _model_ref(self, normalize: bool) -> ModelRef:
        info = self.info
        return ModelRef(info.id, info.revision, self._normalizer.info() if normalize else None)

    async def _submit(
        self,
        backend: RewardBackend,
        batcher: Batcher,
        inputs: Sequence[RewardInput],
        priority: Priority,
        deadline: float | None,
    ) -> list[_Submitted]:
        validate_inputs(inputs, self.limits)
        queued = batcher.queue_depth + self._tokenizing
        if queued + len(inputs) > batcher.config.max_queue_items:
            # Answer overload before spending time on tokenization.
            raise ServiceError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"server overloaded: {queued} items queued (limit {batcher.config.max_queue_items})",
                retry_after=batcher.retry_after(),
            )
        self._tokenizing += len(inputs)
        self.metrics.on_queue_depth(self.queue_depth)
        try:
            encoded = await self._encode(backend, inputs)
        finally:
            # No await between here and batcher.submit: the items move from one count to the other.
            self._tokenizing -= len(inputs)
            self.metrics.on_queue_depth(self.queue_depth)
        if self._grouping:
            encoded = self._assign_groups(inputs, encoded)
        if deadline is not None and time.monotonic() >= deadline:
            raise ServiceError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before scoring started")
        truncated = sum(1 for e in encoded if e.truncated)
        if truncated:
            self.metrics.truncations.inc(truncated)
        futures = batcher.submit(encoded, priority=priority, deadline=deadline)
        return [_Submitted(f, e.num_tokens, e.truncated) for f, e in zip(futures, encoded, strict=True)]

    async def _encode(self, backend: RewardBackend, inputs: Sequence[RewardInput]) -> list[EncodedItem]:
        """Tokenize in the pool, in chunks sized by what the items may cost, and stop as soon as
        the tokens kept so far exceed ``--max-request-tokens``: an over-budget request costs at
        most about one chunk more than the budget, however large it is."""
        loop = asyncio.get_running_loop()
        budget = self.limits.max_request_tokens
        max_length = backend.info.max_length
        out: list[EncodedItem] = []
        total = 0
        start = 0
        while start < len(inputs):
            end = _chunk_end(inputs, start, max(1, budget - total), max_length)
            chunk = await loop.run_in_executor(self._tokenize_pool, backend.encode, list(inputs[start:end]))
            out.extend(chunk)
            total += sum(e.num_tokens for e in chunk)
            if total > budget:
                self.metrics.refused_over_budget.inc()
                raise invalid(
                    f"request too large: its first {end} of {len(inputs)} items already bring {total} tokens "
                    f"after truncation, over --max-request-tokens {budget}; split it into smaller requests "
                    "(GET /v1/models reports the limits)"
                )
            start = end
        return out

    def _assign_groups(self, inputs: Sequence[RewardInput], encoded: list[EncodedItem]) -> list[EncodedItem]:
        """Items of this request with equal prompts share a group id (unique across requests)."""
        keys = [_prompt_key(x) for x in inputs]
        counts: dict[object, int] = {}
        for k in keys:
            if k is not None:
                counts[k] = counts.get(k, 0) + 1
        ids = {k: next(self._group_ids) for k, c in counts.items() if c > 1}
        if not ids:
            return encoded
        return [dataclasses.replace(e, group=ids[k]) if k in ids else e for e, k in zip(encoded, keys, strict=True)]

    def _result(self, sub: _Submitted) -> ItemResult:
        fut, num_tokens, truncated = sub.future, sub.num_tokens, sub.truncated
        if fut.cancelled():
            return ItemError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the item was scored")
        exc = fut.exception()
        if exc is not None:
            if isinstance(exc, ServiceError):
                msg = INTERNAL_MESSAGE if exc.code is ErrorCode.INTERNAL else exc.message
                return ItemError(exc.code, msg)
            return ItemError(ErrorCode.INTERNAL, INTERNAL_MESSAGE)
        row = np.asarray(fut.result(), dtype=np.float32).reshape(-1)
        if not np.isfinite(row).all():
            # JSON has no NaN (it would go out as null where a number is promised) and a NaN reward
            # poisons a trainer's advantages: a failed item, with the reason, never a number.
            log.warning("the model gave a non-finite output %s for an item of %d tokens", row.tolist(), num_tokens)
            return ItemError(ErrorCode.INTERNAL, "the model's output for this item is not a finite number (NaN or inf)")
        if self._weights is None:
            return ScoredItem(score=float(row[0]), num_tokens=num_tokens, truncated=truncated)
        score = float(np.float32(np.dot(self._weights, row)))
        return ScoredItem(score=score, num_tokens=num_tokens, truncated=truncated, scores=tuple(float(v) for v in row))

    def _finish(self, results: list[ItemResult], model: ModelRef) -> list[ItemResult]:
        scored = [r.score for r in results if isinstance(r, ScoredItem)]
        self.metrics.items.labels("ok").inc(len(scored))
        for r in results:
            if isinstance(r, ItemError):
                self.metrics.items.labels(r.code.value.lower()).inc()
        for s in scored:
            self.metrics.scores.observe(s)
        self._normalizer.observe(scored)
        if model.normalization is None:
            return results
        norm = model.normalization
        return [
            ScoredItem(r.score, r.num_tokens, r.truncated, r.scores, self._normalizer.apply(r.score, norm))
            if isinstance(r, ScoredItem)
            else r
            for r in results
        ]

    async def score(
        self,
        inputs: Sequence[RewardInput],
        *,
        priority: Priority = Priority.ONLINE,
        deadline: float | None = None,
        normalize: bool = False,
    ) -> ScoreOutcome:
        """Score every input; per-item errors for runtime failures, DEADLINE_EXCEEDED if none scored."""
        async with self._admitted() as (backend, batcher):
            subs = await self._submit(backend, batcher, inputs, priority, deadline)
            try:
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                await asyncio.wait([s.future for s in subs], timeout=timeout)
            finally:
                for s in subs:
                    s.future.cancel()  # no-op for settled ones; the batcher drops the rest
            model = self._model_ref(normalize)
            results = [self._result(s) for s in subs]
            if all(isinstance(r, ItemError) and r.code is ErrorCode.DEADLINE_EXCEEDED for r in results):
                raise ServiceError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before any item was scored")
            return ScoreOutcome(model, self._finish(results, model))

    async def score_each(
        self,
        inputs: Sequence[RewardInput],
        *,
        priority: Priority = Priority.ONLINE,
        deadline: float | None = None,
        normalize: bool = False,
    ) -> AsyncIterator[tuple[int, ItemResult, ModelRef]]:
        """Like :meth:`score`, but yield ``(index, result, model)`` as each item's batch finishes."""
        async with self._admitted() as (backend, batcher):
            subs = await self._submit(backend, batcher, inputs, priority, deadline)
            model = self._model_ref(normalize)
            index = {id(s.future): i for i, s in enumerate(subs)}
            pending: set[asyncio.Future[np.ndarray]] = {s.future for s in subs}
            try:
                while pending:
                    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                    done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    if not done:
                        for f in pending:
                            f.cancel()
                        done, pending = set(pending), set()
                    for f in sorted(done, key=lambda f: index[id(f)]):
                        res = self._result(subs[index[id(f)]])
                        (res,) = self._finish([res], model)
                        yield index[id(f)], res, model
            finally:
                for s in subs:
                    s.future.cancel()

    async def compare(
        self, prompt: Prompt, responses: Sequence[str], *, deadline: float | None = None
    ) -> CompareOutcome:
        """Score each response to one prompt; P(i best) is the softmax of the raw scores."""
        if not responses:
            raise invalid("responses is empty: send at least one response")
        outcome = await self.score([RewardInput(prompt=prompt, response=r) for r in responses], deadline=deadline)
        scores: list[float] = []
        for r in outcome.results:
            if isinstance(r, ItemError):
                raise ServiceError(r.code, r.message)
            scores.append(r.score)
        top = max(scores)
        exp = [math.exp(s - top) for s in scores]
        total = sum(exp)
        probs = [e / total for e in exp]
        ranking = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return CompareOutcome(outcome.model, scores, probs, ranking)


def _size_bound(x: RewardInput, max_length: int) -> int:
    """A cheap guess of an item's tokens after truncation (characters, plus a few template tokens
    per message), never above ``max_length``: it only sizes tokenization chunks."""
    if x.token_ids is not None:
        return min(max_length, len(x.token_ids))
    if x.text is not None:
        chars = len(x.text)
    elif x.messages is not None:
        chars = sum(len(m.content) + 8 for m in x.messages)
    else:
        prompt = x.prompt if isinstance(x.prompt, str) else "".join(m.content + " " * 8 for m in x.prompt or ())
        chars = len(prompt or "") + len(x.response or "") + 16
    return min(max_length, chars + 8)


def _chunk_end(inputs: Sequence[RewardInput], start: int, remaining: int, max_length: int) -> int:
    """End of the next tokenization chunk: items from ``start`` while their guessed size fits
    ``remaining`` tokens (at least one item)."""
    end, guess = start, 0
    while end < len(inputs):
        guess += _size_bound(inputs[end], max_length)
        if guess > remaining and end > start:
            break
        end += 1
    return end


class _WithTokenizing:
    """The metrics observer, with the queue depth counting items still being tokenized."""

    def __init__(self, engine: RewardEngine) -> None:
        self._engine = engine
        self._metrics: BatchObserver = engine.metrics

    def on_queue_depth(self, items: int) -> None:
        self._metrics.on_queue_depth(items + self._engine._tokenizing)

    def on_batch(
        self,
        *,
        items: int,
        padded_tokens: int,
        real_tokens: int,
        queue_seconds: Sequence[float],
        prefix_tokens_saved: int = 0,
    ) -> None:
        self._metrics.on_batch(
            items=items,
            padded_tokens=padded_tokens,
            real_tokens=real_tokens,
            queue_seconds=queue_seconds,
            prefix_tokens_saved=prefix_tokens_saved,
        )

    def on_inference(self, seconds: float) -> None:
        self._metrics.on_inference(seconds)


def _prompt_key(x: RewardInput) -> object | None:
    """What makes two items of a request "one prompt": the same ``prompt``, or the same
    conversation but for its last message; None for ``text`` items (no prompt to share)."""
    if x.prompt is not None:
        return ("prompt", x.prompt)
    if x.messages is not None and len(x.messages) > 1:
        return ("messages", x.messages[:-1])
    return None


@dataclass(frozen=True)
class _Submitted:
    future: asyncio.Future[np.ndarray]
    num_tokens: int
    truncated: bool
