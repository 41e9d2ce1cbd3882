"""Reward functions for TRL: ``reward_funcs=[RemoteReward("grpc://reward-host:50051")]``.

::

    from trl import GRPOConfig, GRPOTrainer
    from clients.integrations.trl import RemoteReward

    trainer = GRPOTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        reward_funcs=[RemoteReward("http://reward-host:8000")],
        args=GRPOConfig(...),
        train_dataset=dataset,
    )

How TRL calls a reward function (read in ``trl/trainer/grpo_trainer.py`` ``_calculate_rewards``,
the same in ``rloo_trainer.py``; ``trl/experimental/online_dpo``; trl 1.16):

- ``func(prompts=..., completions=..., completion_ids=..., **reward_kwargs)``, all keywords:
  the dataset's other columns (one value per completion), ``trainer_state``, and in GRPO/RLOO
  ``log_extra``, ``log_metric`` (and ``environments``). Standard datasets give strings;
  conversational ones give message lists for prompts and ``[{"role": "assistant", "content":
  ...}]`` (more messages after tool calls) for completions.
- A function is async when its ``__call__`` is a coroutine function
  (``trl.trainer.utils.is_async_callable``); GRPO/RLOO run every async reward function of a batch
  concurrently with ``asyncio.gather`` on the trainer's own event-loop thread. The experimental
  AsyncGRPO pickles the reward functions into a spawned process and runs sync ones in a thread.
- The log name is ``getattr(func, "__name__", type(func).__name__)``: metrics appear as
  ``rewards/<__name__>/mean``.
- ``None`` becomes NaN. GRPO/RLOO leave NaN out of the group mean/std (``nanmean``) and give a
  completion whose every reward function returned ``None`` an advantage of 0. **OnlineDPO** sums
  the functions with ``nansum``, so a ``None`` there counts as 0: use ``max_failure_rate=0`` with
  OnlineDPO to fail loudly instead.

What this module does with that:

- Standard inputs become ``{"prompt": str, "response": str}`` items, rendered by the **reward
  model's** chat template on the server (``template_source="reward_model"``, the default), or
  ``{"text": prompt + completion}`` scored verbatim (``template_source="verbatim"``: for prompts
  already rendered with the template the reward model expects, as TRL does for a local reward
  model on standard data). Conversational inputs become ``{"prompt": messages, "response":
  text}``; a completion of several messages (tool calls) is scored as ``{"messages": prompt +
  completion}``.
- A failed item is ``None`` (its reason in ``result.errors``); when more than
  ``max_failure_rate`` of one call's items failed (a whole-request failure counts as all of
  them), :class:`~clients.integrations.TooManyFailuresError` is raised with the rate and the
  reasons. Invalid input and authentication errors are raised as they are.
- The failure rate of each call is logged through TRL's ``log_metric`` as
  ``<__name__>/failure_rate`` when the trainer offers it.
- Every class pickles (the client connects lazily in the process that uses it), so the same
  object works in AsyncGRPO's spawned rollout worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from clients._core import run_sync
from clients.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError, RlhfFeedbackError
from clients.integrations import TooManyFailuresError, is_sequence, normalize_messages, normalize_prompt
from clients.judge import AsyncJudgeClient
from clients.reward import AsyncRewardClient
from clients.types import Grade, ItemError, Priority, ScoreResults

TemplateSource = Literal["reward_model", "verbatim"]
_FATAL = (InvalidRequestError, AuthenticationError, PermissionDeniedError)


def _check_rate(max_failure_rate: float) -> float:
    rate = float(max_failure_rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"max_failure_rate must be in [0, 1], got {max_failure_rate!r}")
    return rate


class _RewardFunc:
    """What the reward and judge functions share: prompts from a column, the failure policy,
    the log name, pickling."""

    __name__: str

    def __init__(self, *, name: str, prompt_key: str | None, max_failure_rate: float) -> None:
        self.__name__ = name
        self.prompt_key = prompt_key
        self.max_failure_rate = _check_rate(max_failure_rate)

    def _prompts(self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any]) -> Sequence[Any]:
        if self.prompt_key is not None:
            if self.prompt_key not in kwargs:
                raise KeyError(
                    f"{self.__name__}: prompt_key={self.prompt_key!r} is not a column of the batch "
                    f"(columns: {sorted(k for k in kwargs if k not in _TRL_EXTRAS)})"
                )
            prompts = kwargs[self.prompt_key]
        if len(prompts) != len(completions):
            raise ValueError(f"{self.__name__}: {len(prompts)} prompts but {len(completions)} completions")
        return prompts

    def _finish(self, results: ScoreResults, kwargs: Mapping[str, Any]) -> ScoreResults:
        rate = results.failure_rate
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"{self.__name__}/failure_rate", rate)
        if rate > self.max_failure_rate:
            raise TooManyFailuresError(
                self.__name__,
                failure_rate=rate,
                max_failure_rate=self.max_failure_rate,
                total=len(results),
                reasons=results.errors,
            )
        return results

    def _all_failed(self, n: int, exc: RlhfFeedbackError, kwargs: Mapping[str, Any]) -> ScoreResults:
        """A whole-call failure: every item failed with the call's reason (raised past the threshold)."""
        if isinstance(exc, _FATAL):
            raise exc
        reason = ItemError(exc.code, exc.message)
        results = ScoreResults([None] * n, errors=dict.fromkeys(range(n), reason))
        try:
            return self._finish(results, kwargs)
        except TooManyFailuresError as loud:
            raise loud from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r})"


# Keyword arguments TRL adds to the dataset's columns (not columns themselves).
_TRL_EXTRAS = frozenset({"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"})


# -- reward model ------------------------------------------------------------------------------------


class _RemoteRewardBase(_RewardFunc):
    def __init__(
        self,
        url: str | Sequence[str],
        *,
        template_source: TemplateSource = "reward_model",
        prompt_key: str | None = None,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        max_failure_rate: float = 0.5,
        priority: Priority = "online",
        name: str | None = None,
    ) -> None:
        """A TRL reward function scored by the reward service at ``url``.

        ``url``: as for :class:`~clients.RewardClient` (``http://``, ``grpc://``, a list...).
        ``template_source``: ``"reward_model"`` (default: the service renders prompt and
        completion with the reward model's own chat template) or ``"verbatim"`` (standard data
        only: ``prompt + completion`` is scored as already rendered text). ``prompt_key``: take
        the prompt from this dataset column instead of TRL's ``prompts`` (e.g. the raw question
        when the prompt column holds a policy-specific rendering). ``timeout``: seconds per
        attempt. ``max_failure_rate``: the share of one call's items that may fail (they are
        ``None``) before :class:`~clients.integrations.TooManyFailuresError` is raised; 0 raises
        on any failure, 1 never. ``name``: the ``__name__`` TRL logs (default
        ``"remote_reward"``).
        """
        if template_source not in ("reward_model", "verbatim"):
            raise ValueError(f"template_source must be 'reward_model' or 'verbatim', got {template_source!r}")
        super().__init__(name=name or "remote_reward", prompt_key=prompt_key, max_failure_rate=max_failure_rate)
        self.template_source: TemplateSource = template_source
        self.client = AsyncRewardClient(url, api_key=api_key, timeout=timeout, priority=priority)

    def items(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[dict[str, Any]]:
        """The reward-service items this function sends for TRL's arguments (for inspection)."""
        prompts = self._prompts(prompts, completions, kwargs)
        return [self._item(p, c, i) for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]

    def _item(self, prompt: Any, completion: Any, i: int) -> dict[str, Any]:
        where = f"{self.__name__}: item {i}"
        if isinstance(completion, str):
            if self.template_source == "verbatim":
                if not isinstance(prompt, str):
                    raise ValueError(f"{where}: template_source='verbatim' needs string prompts, not messages")
                return {"text": prompt + completion}
            return {"prompt": normalize_prompt(prompt, f"{where} prompt"), "response": completion}
        if not is_sequence(completion):
            raise TypeError(f"{where}: a completion is a string or a list of messages, not {type(completion).__name__}")
        if self.template_source == "verbatim":
            raise ValueError(f"{where}: template_source='verbatim' is for standard (string) data, not conversations")
        turns = normalize_messages(completion, f"{where} completion")
        p = normalize_prompt(prompt, f"{where} prompt")
        if len(turns) == 1:
            return {"prompt": p, "response": turns[0]["content"]}
        head = [{"role": "user", "content": p}] if isinstance(p, str) else p
        return {"messages": [*head, *turns]}

    async def _score(
        self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> ScoreResults:
        items = self.items(prompts, completions, **kwargs)
        if not items:
            return ScoreResults([])
        try:
            results = await self.client.score(items)
        except RlhfFeedbackError as exc:
            return self._all_failed(len(items), exc, kwargs)
        return self._finish(results, kwargs)


class RemoteReward(_RemoteRewardBase):
    """A synchronous TRL reward function backed by the reward service (see the module docs).

    ``RemoteReward(url)(prompts=..., completions=..., **columns)`` → ``list[float | None]``
    (a :class:`~clients.ScoreResults`: raw scores, ``None`` for a failed item, reasons in
    ``.errors``).
    """

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return run_sync(self._score(prompts, completions, kwargs))


class AsyncRemoteReward(_RemoteRewardBase):
    """The async twin of :class:`RemoteReward`: TRL awaits it concurrently with the other async
    reward functions of the batch."""

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return await self._score(prompts, completions, kwargs)


# -- judge -------------------------------------------------------------------------------------------


class _RemoteJudgeRewardBase(_RewardFunc):
    def __init__(
        self,
        url: str | Sequence[str],
        *,
        rubric: str | None = None,
        reference_key: str | None = None,
        scale: tuple[int, int] = (1, 5),
        principles: Sequence[str] | None = None,
        prompt_key: str | None = None,
        api_key: str | None = None,
        timeout: float | None = 120.0,
        max_concurrency: int = 16,
        max_failure_rate: float = 0.5,
        name: str | None = None,
    ) -> None:
        """A TRL reward function: the judge service's grade of each completion, in [0, 1].

        ``rubric`` / ``principles`` / ``scale`` are passed to the judge's ``grade``;
        ``reference_key`` names a dataset column holding a reference answer per prompt.
        ``max_concurrency`` bounds the grades in flight. An abstention or a failed grade is
        ``None`` (the reason in ``.errors``); ``max_failure_rate`` as for :class:`RemoteReward`.
        ``name`` defaults to ``"remote_judge"``.
        """
        super().__init__(name=name or "remote_judge", prompt_key=prompt_key, max_failure_rate=max_failure_rate)
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.rubric = rubric
        self.reference_key = reference_key
        self.scale = (int(scale[0]), int(scale[1]))
        self.principles = list(principles) if principles is not None else None
        self.max_concurrency = max_concurrency
        self.client = AsyncJudgeClient(url, api_key=api_key, timeout=timeout, max_concurrency=max_concurrency)

    @staticmethod
    def _response(completion: Any, where: str) -> str:
        if isinstance(completion, str):
            return completion
        turns = normalize_messages(completion, f"{where} completion")
        answers = [m["content"] for m in turns if m["role"] == "assistant"]
        return answers[-1] if answers else turns[-1]["content"]

    async def _score(
        self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> ScoreResults:
        prompts = self._prompts(prompts, completions, kwargs)
        n = len(completions)
        references: Sequence[Any] = [None] * n
        if self.reference_key is not None:
            if self.reference_key not in kwargs:
                raise KeyError(f"{self.__name__}: reference_key={self.reference_key!r} is not a column of the batch")
            references = kwargs[self.reference_key]
        jobs = []
        for i, (p, c, ref) in enumerate(zip(prompts, completions, references, strict=True)):
            where = f"{self.__name__}: item {i}"
            jobs.append((normalize_prompt(p, f"{where} prompt"), self._response(c, where), ref))
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(prompt: Any, response: str, reference: Any) -> Grade | ItemError:
            async with gate:
                try:
                    return await self.client.grade(
                        prompt,
                        response,
                        rubric=self.rubric,
                        reference=None if reference is None else str(reference),
                        scale=self.scale,
                        principles=self.principles,
                    )
                except _FATAL:
                    raise
                except RlhfFeedbackError as exc:
                    return ItemError(exc.code, exc.message)

        outcomes = await asyncio.gather(*(one(*job) for job in jobs))
        scores: list[float | None] = []
        errors: dict[int, ItemError] = {}
        for i, out in enumerate(outcomes):
            if isinstance(out, ItemError):
                errors[i] = out
                scores.append(None)
            elif out.score is None:
                errors[i] = ItemError("ABSTAINED", out.abstain_reason or "the judge abstained")
                scores.append(None)
            else:
                scores.append(out.score)
        return self._finish(ScoreResults(scores, errors=errors), kwargs)


class RemoteJudgeReward(_RemoteJudgeRewardBase):
    """A synchronous TRL reward function: the judge's grade in [0, 1], ``None`` on abstain."""

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return run_sync(self._score(prompts, completions, kwargs))


class AsyncRemoteJudgeReward(_RemoteJudgeRewardBase):
    """The async twin of :class:`RemoteJudgeReward`."""

    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return await self._score(prompts, completions, kwargs)


__all__ = [
    "AsyncRemoteJudgeReward",
    "AsyncRemoteReward",
    "RemoteJudgeReward",
    "RemoteReward",
    "TemplateSource",
    "TooManyFailuresError",
]
