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
the same in ``rloo_trainer.py``; ``trl/experimental/online_dpo``; trl 1.16, older releases below):

- ``func(prompts=..., completions=..., completion_ids=..., **reward_kwargs)``, all keywords:
  the dataset's other columns (one value per completion), ``trainer_state``, and in GRPO/RLOO
  ``log_extra``, ``log_metric`` (and ``environments``). Standard datasets give strings;
  conversational ones give message lists for prompts and ``[{"role": "assistant", "content":
  ...}]`` (more messages after tool calls) for completions.
- GRPO/RLOO call the synchronous functions one after the other in list order, **then** every
  async function of the batch concurrently (``asyncio.gather`` on the trainer's event-loop
  thread). Every function of one batch receives the same ``prompts`` and ``completions`` lists.
  OnlineDPO calls every function synchronously. The experimental AsyncGRPO pickles the functions
  into a spawned process and runs sync ones in threads.
- How a function is found to be async: trl ≥ 1.14 ``trl.trainer.utils.is_async_callable`` (the
  object or its ``__call__`` is a coroutine function); trl 1.0-1.13 ``inspect.iscoroutinefunction
  (func)``; trl 0.27 ``asyncio.iscoroutinefunction(func)``; before 0.27 there are no async reward
  functions. The async classes here pass all three (:class:`_CoroutineFunctionLike`).
- The log name is ``getattr(func, "__name__", type(func).__name__)``: metrics appear as
  ``rewards/<__name__>/mean``.
- ``None`` becomes NaN (trl ≥ 0.16; 0.14/0.15 cannot take ``None`` at all). The functions'
  columns are weighted and summed with ``nansum``: a NaN next to another function's number simply
  drops out, i.e. the failed reward counts as **0**. Only a row where every function gave NaN is
  unscorable: GRPO/RLOO ≥ 1.6 leave it out of the group statistics with advantage 0; older
  releases and OnlineDPO score it 0.

What this module does with that:

- Standard inputs become ``{"prompt": str, "response": str}`` items, rendered by the **reward
  model's** chat template on the server (``template_source="reward_model"``, the default), or
  ``{"text": prompt + completion}`` scored verbatim (``template_source="verbatim"``: for prompts
  already rendered with the template the reward model expects, as TRL does for a local reward
  model on standard data). Conversational inputs become ``{"prompt": messages, "response":
  text}``; a completion of several messages (tool calls) is scored as ``{"messages": prompt +
  completion}``.
- A failed item never silently scores 0. When more than ``max_failure_rate`` of one call's items
  failed (a whole-request failure counts as all of them),
  :class:`~clients.integrations.TooManyFailuresError` is raised with the rate and the reasons.
  Below that rate ``on_failure`` decides: ``"nan"`` gives ``None`` (the reason in
  ``result.errors``), ``"raise"`` raises on any failed item, and ``"auto"`` (the default) gives
  ``None`` only where TRL then drops the whole row (see :func:`resolve_on_failure`) and raises
  otherwise. ``func.gate(rule)`` makes another reward function give ``None`` wherever ``func``
  failed, so the whole row is NaN. Invalid input and authentication errors are raised as they are.
- ``RemoteReward(url, head="helpfulness")`` scores with one head of a vector reward model, so
  several instances and ``reward_weights`` weight its heads.
- The failure rate of each call is logged through TRL's ``log_metric`` as
  ``<__name__>/failure_rate`` when the trainer offers it.
- Every class pickles (the client connects lazily in the process that uses it), so the same
  object works in AsyncGRPO's spawned rollout worker.

Minimum TRL release (read in each release's wheel): ``RemoteReward`` / ``RemoteJudgeReward``
in GRPO 0.14.0 (the first GRPOTrainer; it cannot take ``None``, so there a failed item always
raises: tests/clients/test_trl_oldest.py runs a real 0.14.0 GRPO step), RLOO 0.22.0 and OnlineDPO
0.23.0 (their first ``reward_funcs``); ``on_failure="nan"`` needs 0.16.0 (``None`` → NaN). The
async twins: GRPO and RLOO 0.27.0 (the first async reward functions), never OnlineDPO. ``gate``
leaves the failed row out in GRPO/RLOO 1.6.0 and later, which ``on_failure="auto"`` checks.
"""

from __future__ import annotations

import asyncio
import collections.abc
import inspect
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from clients._core import run_sync
from clients.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError, RlhfFeedbackError
from clients.integrations import TooManyFailuresError, is_sequence, normalize_messages, normalize_prompt
from clients.judge import AsyncJudgeClient
from clients.reward import AsyncRewardClient
from clients.types import Grade, ItemError, Priority, ScoreResults

TemplateSource = Literal["reward_model", "verbatim"]
OnFailure = Literal["auto", "raise", "nan"]
Head = int | str
_FATAL = (InvalidRequestError, AuthenticationError, PermissionDeniedError)
T = TypeVar("T")

# The first trl release whose GRPO and RLOO leave a row where every reward function returned None
# out of the group statistics (``unscorable_mask``, trl 1.6.0); before it such a row scored 0.
TRL_DROPS_UNSCORABLE_ROWS = (1, 6)


def _check_rate(max_failure_rate: float) -> float:
    rate = float(max_failure_rate)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"max_failure_rate must be in [0, 1], got {max_failure_rate!r}")
    return rate


def _check_on_failure(on_failure: str) -> OnFailure:
    if on_failure not in ("auto", "raise", "nan"):
        raise ValueError(f"on_failure must be 'auto', 'raise' or 'nan', got {on_failure!r}")
    return on_failure  # type: ignore[return-value]


def _trl_version() -> tuple[int, int] | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("trl").split(".")
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (PackageNotFoundError, ValueError, IndexError):
        return None


def _add_note(exc: BaseException, note: str) -> None:
    # BaseException.add_note is Python >= 3.11; on 3.10 the same attribute (PEP 678), which the
    # exceptiongroup backport prints
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]


def _callable_name(func: Any) -> str:
    return str(getattr(func, "__name__", type(func).__name__))


# -- async detection -----------------------------------------------------------------------------


async def _reward_call_signature(
    prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """The public signature of every reward function here (never called: its code object is)."""
    raise NotImplementedError


def _mark_coroutine_function(func: Callable[..., T]) -> Callable[..., T]:
    # Python ≥ 3.12: the documented marker, so that inspect.iscoroutinefunction(instance.__call__)
    # is True too (trl ≥ 1.14 checks the instance *or* its __call__). 3.10/3.11 have no marker.
    mark = getattr(inspect, "markcoroutinefunction", None)
    return mark(func) if mark is not None else func


class _CoroutineFunctionLike:
    """Makes an instance read as a coroutine function to ``inspect.iscoroutinefunction(instance)``
    (what trl 1.0-1.13 and 0.27, through ``asyncio.iscoroutinefunction``, ask) on Python 3.10+.

    ``inspect`` treats an object that has a function's attributes (``__code__``, ``__name__``,
    ``__defaults__``, ``__kwdefaults__``, ``__annotations__``) as a function: the duck typing it
    documents for Cython functions (``inspect._signature_is_functionlike``, used by
    ``iscoroutinefunction`` through ``_has_code_flag`` in 3.10 to 3.13). The code object is that of
    an ``async def`` with the public signature, so ``inspect.signature(instance)`` stays
    ``(prompts, completions, **kwargs)``. They are class attributes: nothing extra is pickled.
    The subclass sets ``__name__`` on the instance.
    """

    __code__ = _reward_call_signature.__code__
    __defaults__: tuple[Any, ...] | None = None
    __kwdefaults__: dict[str, Any] | None = None
    __annotations__ = dict(_reward_call_signature.__annotations__)


class RewardCoroutine(collections.abc.Coroutine[Any, Any, T], Generic[T]):
    """What an async reward function returns: a coroutine (await it, ``asyncio.run`` it, make a
    task of it) that refuses to be used as the list of rewards it will produce.

    A trainer that calls reward functions synchronously (OnlineDPO, trl < 0.27) would otherwise
    fail with ``'coroutine' object is not iterable``; this names the fix instead.
    """

    __slots__ = ("_coro", "_name")

    def __init__(self, coro: collections.abc.Coroutine[Any, Any, T], name: str) -> None:
        self._coro = coro
        self._name = name

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        return self._coro.__await__()

    def _misused(self) -> TypeError:
        self._coro.close()  # it will never run: no "never awaited" warning on top of this error
        return TypeError(
            f"reward function {self._name!r} is async and was called without await: this trainer calls reward "
            "functions synchronously (TRL's OnlineDPOTrainer, or a TRL release before 0.27). Use the sync class "
            "(RemoteReward / RemoteJudgeReward) there."
        )

    def __iter__(self) -> Any:
        raise self._misused()

    def __len__(self) -> int:
        raise self._misused()

    def __getitem__(self, index: Any) -> Any:
        raise self._misused()

    def __repr__(self) -> str:
        return f"<RewardCoroutine of {self._name!r}>"


# -- shared behaviour ----------------------------------------------------------------------------


@dataclass
class _Batch:
    """One batch's scores, shared by a function and its gates (TRL hands them the same lists)."""

    prompts: Sequence[Any]
    completions: Sequence[Any]
    loop: asyncio.AbstractEventLoop
    task: asyncio.Task[ScoreResults]
    reads: int = field(default=0)

    def same(self, prompts: Sequence[Any], completions: Sequence[Any], loop: asyncio.AbstractEventLoop) -> bool:
        return self.prompts is prompts and self.completions is completions and self.loop is loop


class _RewardFunc:
    """What the reward and judge functions share: prompts from a column, the failure policy,
    the log name, the results shared with gates, pickling."""

    __name__: str
    _is_async = False

    def __init__(self, *, name: str, prompt_key: str | None, max_failure_rate: float, on_failure: OnFailure) -> None:
        self.__name__ = name
        self.prompt_key = prompt_key
        self.max_failure_rate = _check_rate(max_failure_rate)
        self.on_failure: OnFailure = _check_on_failure(on_failure)
        self._gates = 0
        self._batch: _Batch | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_batch"] = None  # a task of this process's event loop
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

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

    async def _score(
        self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> ScoreResults:
        raise NotImplementedError

    async def _results(
        self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> ScoreResults:
        """This batch's results, scored once for the function and all its gates, whichever TRL
        calls first (sync functions run before async ones). Sync twins run this on the clients'
        one loop thread, so concurrent callers (AsyncGRPO's threads) cannot race."""
        if not self._gates:
            return await self._score(prompts, completions, kwargs)
        loop = asyncio.get_running_loop()
        batch = self._batch
        if batch is None or not batch.same(prompts, completions, loop):
            task = loop.create_task(self._score(prompts, completions, kwargs))
            batch = self._batch = _Batch(prompts, completions, loop, task)
        batch.reads += 1
        if batch.reads > self._gates:  # the function and each gate had it: don't keep the lists alive
            self._batch = None
        return await asyncio.shield(batch.task)

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
        if results.errors:
            mode, why = resolve_on_failure(self, kwargs)
            if mode == "raise":
                loud = TooManyFailuresError(
                    self.__name__, failure_rate=rate, max_failure_rate=0.0, total=len(results), reasons=results.errors
                )
                _add_note(
                    loud,
                    f"{self.__name__}: a failed item raises here ({why}). on_failure='nan' gives None for it instead "
                    "(NaN in TRL: next to other reward functions, and in OnlineDPO, it then adds 0 to the sum).",
                )
                raise loud
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

    def gate(self, func: Callable[..., Any], *, name: str | None = None) -> GatedReward | AsyncGatedReward:
        """``func`` (another TRL reward function, e.g. a rule reward), giving ``None`` wherever
        this function failed, so that a failed row is NaN in every column and TRL leaves it out.

        ``reward_funcs=[rm, rm.gate(exact_match)]``: this batch is scored once, whichever of the
        two TRL calls first. The gate is sync or async like this function; ``func`` may be either.
        Its log name is ``func``'s unless ``name`` is given.
        """
        self._gates += 1
        cls = AsyncGatedReward if self._is_async else GatedReward
        return cls(self, func, name=name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.__name__!r})"


# Keyword arguments TRL adds to the dataset's columns (not columns themselves).
_TRL_EXTRAS = frozenset({"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"})


def resolve_on_failure(func: _RewardFunc, kwargs: Mapping[str, Any]) -> tuple[Literal["raise", "nan"], str]:
    """What a failed item (below ``max_failure_rate``) becomes in this call, and why.

    ``on_failure="auto"`` gives ``"nan"`` only where TRL then drops the whole row: the caller is
    a GRPO or RLOO trainer of trl ≥ 1.6 (found through the ``log_metric`` it passes, trl ≥ 1.0),
    and every one of its reward functions is ``func`` or a gate of ``func``. Everywhere else
    (several ungated functions, OnlineDPO, AsyncGRPO, older trl, a direct call) it raises.
    """
    if func.on_failure != "auto":
        return func.on_failure, f"on_failure={func.on_failure!r}"
    trainer = getattr(kwargs.get("log_metric"), "__self__", None)
    funcs = getattr(trainer, "reward_funcs", None)
    if trainer is None or not isinstance(funcs, list) or not _is_grpo_or_rloo(trainer):
        return "raise", "on_failure='auto': the caller is not a TRL GRPO/RLOO trainer that leaves unscorable rows out"
    trl = _trl_version()
    if trl is None or trl < TRL_DROPS_UNSCORABLE_ROWS:
        return (
            "raise",
            f"on_failure='auto': trl {trl} scores a row whose reward functions all failed as 0 (1.6 does not)",
        )
    others = [f for f in funcs if f is not func and not (isinstance(f, _GateBase) and f.remote is func)]
    if others:
        names = ", ".join(repr(_callable_name(f)) for f in others)
        return "raise", (
            f"on_failure='auto': the trainer's other reward functions ({names}) would still score the row; "
            f"gate them with {func.__name__}.gate(func) to make the failed row NaN in every column, left out by TRL"
        )
    return "nan", "the failed row is NaN in every reward function: TRL leaves it out of the group statistics"


def _is_grpo_or_rloo(trainer: Any) -> bool:
    try:
        from trl import GRPOTrainer, RLOOTrainer
    except ImportError:
        return False
    return isinstance(trainer, GRPOTrainer | RLOOTrainer)


# -- reward model ------------------------------------------------------------------------------------


class _RemoteRewardBase(_RewardFunc):
    def __init__(
        self,
        url: str | Sequence[str],
        *,
        head: Head | None = None,
        template_source: TemplateSource = "reward_model",
        prompt_key: str | None = None,
        api_key: str | None = None,
        timeout: float | None = 60.0,
        max_failure_rate: float = 0.5,
        on_failure: OnFailure = "auto",
        priority: Priority = "online",
        name: str | None = None,
    ) -> None:
        """A TRL reward function scored by the reward service at ``url``.

        ``url``: as for :class:`~clients.RewardClient` (``http://``, ``grpc://``, a list...).
        ``head``: score with one output of a vector reward model (``num_labels > 1``): its index,
        or its name as ``/v1/models`` lists it in ``label_names`` (the model config's
        ``id2label``); default: the service's scalar ``score`` (``--head-weights``).
        ``template_source``: ``"reward_model"`` (default: the service renders prompt and
        completion with the reward model's own chat template) or ``"verbatim"`` (standard data
        only: ``prompt + completion`` is scored as already rendered text). ``prompt_key``: take
        the prompt from this dataset column instead of TRL's ``prompts`` (e.g. the raw question
        when the prompt column holds a policy-specific rendering). ``timeout``: seconds per
        attempt. ``max_failure_rate``: the share of one call's items that may fail before
        :class:`~clients.integrations.TooManyFailuresError` is raised; 0 raises on any failure,
        1 never. ``on_failure``: what a failed item below that rate becomes: ``"nan"`` (``None``),
        ``"raise"``, or ``"auto"`` (default: ``None`` where TRL leaves the whole row out, else
        raise; see :func:`resolve_on_failure`). ``name``: the ``__name__`` TRL logs (default
        ``"remote_reward"``, ``"remote_reward_<head>"`` with a head).
        """
        if template_source not in ("reward_model", "verbatim"):
            raise ValueError(f"template_source must be 'reward_model' or 'verbatim', got {template_source!r}")
        if (head is not None and not isinstance(head, int | str)) or isinstance(head, bool):
            raise TypeError(f"head must be an int index or a label name, not {type(head).__name__}")
        if isinstance(head, int) and head < 0:
            raise ValueError(f"head must be a non-negative index, got {head}")
        default_name = "remote_reward" if head is None else f"remote_reward_{head}"
        super().__init__(
            name=name or default_name, prompt_key=prompt_key, max_failure_rate=max_failure_rate, on_failure=on_failure
        )
        self.head = head
        self._head_index: int | None = head if isinstance(head, int) else None
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

    async def _resolve_head(self) -> int:
        """The index of ``head``: a name is looked up in the model's ``label_names`` (once)."""
        if self._head_index is not None:
            return self._head_index
        info = await self.client.model_info()
        names = list(info.label_names)
        if self.head not in names:
            raise ValueError(f"{self.__name__}: head {self.head!r} is not a head of {info.id} (heads: {names})")
        self._head_index = names.index(str(self.head))
        return self._head_index

    def _select_head(self, results: ScoreResults, index: int) -> ScoreResults:
        if results.vectors is None:  # a scalar model (or every item failed): only head 0 exists
            if index != 0 and any(s is not None for s in results):
                raise ValueError(f"{self.__name__}: head {self.head!r} asked of a reward model with one head")
            scores: list[float | None] = list(results)
        else:
            width = max(len(v) for v in results.vectors if v)
            if index >= width:
                raise ValueError(f"{self.__name__}: head {self.head!r} asked of a reward model with {width} heads")
            scores = [None if v is None else v[index] for v in results.vectors]
        return ScoreResults(
            scores,
            errors=results.errors,
            num_tokens=results.num_tokens,
            truncated=results.truncated,
            vectors=results.vectors,
            model=results.model,
        )

    async def _score(
        self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> ScoreResults:
        items = self.items(prompts, completions, **kwargs)
        if not items:
            return ScoreResults([])
        try:
            index = None if self.head is None else await self._resolve_head()
            results = await self.client.score(items)
        except RlhfFeedbackError as exc:
            return self._all_failed(len(items), exc, kwargs)
        if index is not None:
            results = self._select_head(results, index)
        return self._finish(results, kwargs)


class RemoteReward(_RemoteRewardBase):
    """A synchronous TRL reward function backed by the reward service (see the module docs).

    ``RemoteReward(url)(prompts=..., completions=..., **columns)`` → ``list[float | None]``
    (a :class:`~clients.ScoreResults`: raw scores, ``None`` for a failed item, reasons in
    ``.errors``). Works in every trainer that takes ``reward_funcs``: GRPO (trl ≥ 0.14.0), RLOO
    (≥ 0.22.0), OnlineDPO (≥ 0.23.0; use it there, not the async twin).
    """

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return run_sync(self._results(prompts, completions, kwargs))


class AsyncRemoteReward(_CoroutineFunctionLike, _RemoteRewardBase):
    """The async twin of :class:`RemoteReward`: TRL awaits it concurrently with the other async
    reward functions of the batch. GRPO and RLOO of trl ≥ 0.27.0 (the first with async reward
    functions); OnlineDPO calls functions synchronously: use :class:`RemoteReward` there (given
    this class it fails with a ``TypeError`` that says so)."""

    _is_async = True

    @_mark_coroutine_function
    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> RewardCoroutine[list[float | None]]:
        return RewardCoroutine(self._call(prompts, completions, kwargs), self.__name__)

    async def _call(self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Any) -> list[float | None]:
        return await self._results(prompts, completions, kwargs)


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
        on_failure: OnFailure = "auto",
        name: str | None = None,
    ) -> None:
        """A TRL reward function: the judge service's grade of each completion, in [0, 1].

        ``rubric`` / ``principles`` / ``scale`` are passed to the judge's ``grade``;
        ``reference_key`` names a dataset column holding a reference answer per prompt.
        ``max_concurrency`` bounds the grades in flight. An abstention or a failed grade is a
        failed item (the reason in ``.errors``); ``max_failure_rate`` and ``on_failure`` as for
        :class:`RemoteReward`. ``name`` defaults to ``"remote_judge"``.
        """
        super().__init__(
            name=name or "remote_judge", prompt_key=prompt_key, max_failure_rate=max_failure_rate, on_failure=on_failure
        )
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
    """A synchronous TRL reward function: the judge's grade in [0, 1], ``None`` on abstain.
    Same trainers and releases as :class:`RemoteReward`."""

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        return run_sync(self._results(prompts, completions, kwargs))


class AsyncRemoteJudgeReward(_CoroutineFunctionLike, _RemoteJudgeRewardBase):
    """The async twin of :class:`RemoteJudgeReward` (GRPO and RLOO of trl ≥ 0.27, not OnlineDPO)."""

    _is_async = True

    @_mark_coroutine_function
    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> RewardCoroutine[list[float | None]]:
        return RewardCoroutine(self._call(prompts, completions, kwargs), self.__name__)

    async def _call(self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: Any) -> list[float | None]:
        return await self._results(prompts, completions, kwargs)


# -- gates -------------------------------------------------------------------------------------------


class _GateBase:
    """``func``'s rewards with ``None`` wherever ``remote`` failed on the same batch."""

    __name__: str

    def __init__(self, remote: _RewardFunc, func: Callable[..., Any], *, name: str | None = None) -> None:
        if not callable(func):
            raise TypeError(f"gate() takes a reward function, not {type(func).__name__}")
        self.remote = remote
        self.func = func
        self.__name__ = name or _callable_name(func)

    def _mask(self, values: Any, scored: Sequence[float | None]) -> list[Any]:
        values = list(values)
        if len(values) != len(scored):
            raise ValueError(f"{self.__name__}: {len(values)} rewards for {len(scored)} completions")
        return [None if s is None else v for v, s in zip(values, scored, strict=True)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.__name__!r}, gated by {self.remote.__name__!r})"


class GatedReward(_GateBase):
    """A sync reward function made by :meth:`RemoteReward.gate`."""

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[Any]:
        scored = run_sync(self.remote._results(prompts, completions, kwargs))
        # ``func`` runs in the caller's thread (it may be a sync client's function itself)
        out = self.func(prompts=prompts, completions=completions, **kwargs)
        if inspect.isawaitable(out):
            out = run_sync(_awaited(out))
        return self._mask(out, scored)


class AsyncGatedReward(_CoroutineFunctionLike, _GateBase):
    """An async reward function made by :meth:`AsyncRemoteReward.gate`."""

    @_mark_coroutine_function
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> RewardCoroutine[list[Any]]:
        return RewardCoroutine(self._gated(prompts, completions, kwargs), self.__name__)

    async def _gated(self, prompts: Sequence[Any], completions: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
        scored = await self.remote._results(prompts, completions, kwargs)
        if _is_async_callable(self.func):
            out = await self.func(prompts=prompts, completions=completions, **kwargs)
        else:  # a sync function (a rule, a sync client's function) off the trainer's event loop
            out = await asyncio.to_thread(lambda: self.func(prompts=prompts, completions=completions, **kwargs))
        return self._mask(out, scored)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _is_async_callable(func: Any) -> bool:
    # what trl >= 1.14's is_async_callable answers (partials unwrapped by inspect itself)
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


__all__ = [
    "AsyncGatedReward",
    "AsyncRemoteJudgeReward",
    "AsyncRemoteReward",
    "GatedReward",
    "OnFailure",
    "RemoteJudgeReward",
    "RemoteReward",
    "RewardCoroutine",
    "TemplateSource",
    "TooManyFailuresError",
    "resolve_on_failure",
]
