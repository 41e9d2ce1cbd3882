"""Remote scoring in the background: the learner submits a batch and keeps generating.

:class:`Scorer` owns one worker thread with its own event loop; the async clients live on that
loop. ``submit`` returns at once with a future; the scoring call's own wall time is measured in
the worker (``score_s``), so the learner can compare it with the time it actually blocked
(``wait_s``). Batches are scored one after another, in submission order.

Reward sources: the reward service (:class:`RewardServiceSource`: raw scores of
``{"prompt": messages, "response": text}`` items, rendered by the reward model with its own
template) or the judge's grade (:class:`JudgeGradeSource`: a score in [0, 1]). A result that
can't be had is ``None`` with a reason, never a number: the trainer drops that sample.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlhf_train.ppo.rollout import Messages


@dataclass(frozen=True)
class Scores:
    """One batch's scores in order (``None`` where there is none, with its reason) and the call's wall time."""

    scores: list[float | None]
    reasons: dict[int, str] = field(default_factory=dict)
    score_s: float = 0.0

    @property
    def dropped(self) -> int:
        return sum(s is None for s in self.scores)


class RewardSource(Protocol):
    """Anything that scores responses to prompts, asynchronously, on the scorer's event loop."""

    async def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> Scores: ...

    async def aclose(self) -> None: ...


def _is_fatal(exc: BaseException) -> bool:
    """Errors no retry can fix (bad request, credentials, a bug): the job stops on them."""
    from clients.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError, RlhfFeedbackError

    if isinstance(exc, InvalidRequestError | AuthenticationError | PermissionDeniedError):
        return True
    return not isinstance(exc, RlhfFeedbackError)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class RewardServiceSource:
    """Scores from the reward service (HTTP or gRPC, chosen by the URL) through :class:`clients.AsyncRewardClient`."""

    def __init__(
        self, url: str | Sequence[str], *, api_key: str | None = None, timeout: float = 120.0, max_retries: int = 8
    ) -> None:
        from clients import AsyncRewardClient

        self.client = AsyncRewardClient(url, api_key=api_key, timeout=timeout, max_retries=max_retries)

    async def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> Scores:
        try:
            results = await self.client.score_pairs(list(prompts), list(responses))
        except Exception as exc:
            if _is_fatal(exc):
                raise
            return Scores([None] * len(responses), dict.fromkeys(range(len(responses)), _reason(exc)))
        reasons = {i: f"{e.code}: {e.message}" for i, e in results.errors.items()}
        scores = [None if s is None else float(s) for s in results]
        return Scores(scores, reasons)

    async def aclose(self) -> None:
        await self.client.aclose()


class JudgeGradeSource:
    """Scores from the judge service's ``grade`` (in [0, 1]); an abstention is ``None``."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        rubric: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        max_retries: int = 8,
        concurrency: int = 16,
    ) -> None:
        from clients import AsyncJudgeClient

        self.client = AsyncJudgeClient(url, api_key=api_key, timeout=timeout, max_retries=max_retries)
        self.rubric = rubric
        self.concurrency = concurrency

    async def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> Scores:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(prompt: Messages, response: str) -> Any:
            async with gate:
                return await self.client.grade(prompt, response, rubric=self.rubric)

        outcomes = await asyncio.gather(
            *(one(p, r) for p, r in zip(prompts, responses, strict=True)), return_exceptions=True
        )
        scores: list[float | None] = []
        reasons: dict[int, str] = {}
        for i, o in enumerate(outcomes):
            if isinstance(o, BaseException):
                if _is_fatal(o):
                    raise o
                scores.append(None)
                reasons[i] = _reason(o)
            elif o.score is None:
                scores.append(None)
                reasons[i] = f"abstain: {o.abstain_reason}"
            else:
                scores.append(float(o.score))
        return Scores(scores, reasons)

    async def aclose(self) -> None:
        await self.client.aclose()


class Scorer:
    """Scores batches on a background thread while the caller goes on (see the module doc)."""

    def __init__(self, source: RewardSource) -> None:
        self.source = source
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppo-scorer")
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, prompts: Sequence[Messages], responses: Sequence[str]) -> concurrent.futures.Future[Scores]:
        """Queue a batch; the future's result is its :class:`Scores` (or the fatal error)."""
        return self._pool.submit(self._score, list(prompts), list(responses))

    def _run(self, coro: Any) -> Any:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coro)

    def _score(self, prompts: list[Messages], responses: list[str]) -> Scores:
        t0 = time.perf_counter()
        result: Scores = self._run(self.source.score(prompts, responses))
        if len(result.scores) != len(responses):
            raise RuntimeError(f"the reward source gave {len(result.scores)} scores for {len(responses)} responses")
        return Scores(result.scores, result.reasons, time.perf_counter() - t0)

    def _close(self) -> None:
        try:
            self._run(self.source.aclose())
        finally:
            if self._loop is not None:
                self._loop.close()
                self._loop = None

    def close(self) -> None:
        """Close the source's connections on the worker thread, then stop the thread (pending batches are dropped)."""
        with contextlib.suppress(Exception):  # best effort: the process may be on its way out
            self._pool.submit(self._close).result(timeout=30)
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["JudgeGradeSource", "RewardServiceSource", "RewardSource", "Scorer", "Scores"]
