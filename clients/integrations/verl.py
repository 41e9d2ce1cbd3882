"""verl's custom reward function, scored by the reward service.

::

    # data preparation: every verl reward manager reads reward_model.ground_truth (None is fine
    # for a reward model); compute_score reads the prompt from extra_info["prompt"]
    row["reward_model"] = {"style": "model", "ground_truth": None}
    row["extra_info"] = {"prompt": question_or_messages, ...}

    # training, verl >= 0.7.1 (tested with 0.9.1)
    export RLHF_FEEDBACK_REWARD_URL=grpc://reward-host:50051
    python -m verl.trainer.main_ppo ... \\
        reward.custom_reward_function.path=pkg://clients.integrations.verl \\
        reward.custom_reward_function.name=compute_score

Which function for which manager (``reward.reward_manager.name``):

- :func:`compute_score` (async, one sample -> float): the reward-loop ``naive`` (default) and
  ``dapo`` managers.
- :func:`compute_score_heads` (async, one sample -> dict, one key per head): ``gdpo``.
- :func:`compute_score_sync` (sync, one sample -> float): ``remote`` (it asserts a sync function
  and runs it in Ray workers) and the legacy ``verl/workers/reward_manager`` managers.
- :func:`compute_score_batch` (sync, a batch -> list): the legacy ``batch`` manager (``main_ppo``
  up to verl 0.7.0, ``reward_model.reward_manager=batch``); :func:`compute_score_batch_async`
  is its awaitable form.
- ``rate_limited`` takes :func:`compute_score` but turns every failure into reward 0.0 (below).

How verl calls them (read in verl 0.9.1: ``verl/trainer/ppo/reward.py`` ``get_custom_reward_fn``,
``verl/utils/import_utils.py``, ``verl/experimental/reward_loop/reward_loop.py`` and
``reward_manager/{naive,limited,gdpo,remote}.py``, ``verl/workers/reward_manager/{naive,batch}.py``,
``verl/trainer/ppo/core_algos.py`` ``compute_gdpo_outcome_advantage``):

- Config keys: verl >= 0.7.1 reads ``reward.custom_reward_function.{path,name,reward_kwargs}``.
  verl <= 0.7.0 read the top-level ``custom_reward_function.*``; 0.7.1 and 0.8.x still migrate
  the top-level keys in ``main_ppo``, 0.9.x only in ``fully_async_main``: in ``main_ppo`` 0.9.x
  they are silently ignored and verl falls back to its rule scorer. ``reward_kwargs`` is not
  declared in verl's yaml, so Hydra needs the ``+`` prefix to add one.
- ``path=pkg://a.b.c`` is ``importlib.import_module("a.b.c")``; ``name`` is looked up on it.
  ``reward_kwargs`` are merged into every call's keywords (they win), and an ``async def`` stays
  awaitable through that wrapper (``inspect.iscoroutinefunction``).
- The reward-loop managers call ``compute_score(data_source=..., solution_str=...,
  ground_truth=..., extra_info=..., **extra)`` per sample, awaiting an async function directly (a
  sync one runs in a thread pool); a worker scores its samples concurrently (``asyncio.gather``
  over one task per sample). ``solution_str`` is the decoded response (special tokens skipped);
  ``ground_truth`` is ``non_tensor_batch["reward_model"]["ground_truth"]`` (a row without that
  key is a ``KeyError`` in the manager, before this module runs); ``extra_info`` is the dataset
  row's ``extra_info`` plus ``num_turns`` and ``rollout_reward_scores``; ``extra`` may hold
  ``reward_router_address`` / ``reward_model_tokenizer`` (ignored here).
- A dict result must hold ``"score"`` (the reward); every key, ``"score"`` included, becomes a
  per-sample column (``reward_extra_info``), and GDPO (``algorithm.adv_estimator=gdpo``)
  normalises each column named in ``algorithm.gdpo_reward_keys`` within its group.
- The legacy ``batch`` manager calls ``compute_score(data_sources=[...], solution_strs=[...],
  ground_truths=[...], extra_infos=[...])`` once per batch, synchronously (an ``async def`` there
  gives ``TypeError: 'coroutine' object is not subscriptable``).
- There is no "no reward" value: ``None`` breaks the reward tensor, and NaN would poison the
  advantages.

So a failed item **raises**: :class:`~clients.integrations.RewardUnavailableError` when the
service answered without a score for it, or the client's error
(:class:`~clients.errors.RlhfFeedbackError`) when the whole request failed, both after the
client's retries (UNAVAILABLE, RESOURCE_EXHAUSTED, 429/503, connection failures; spread over the
endpoints). The training step fails loudly; it never gets a made-up 0 from here. **Except under
verl's ``rate_limited`` manager**, which catches every ``Exception`` a reward function raises (and
its own timeout) and gives the sample reward 0.0, logging the error: nothing a function can raise
within Python's ``Exception`` hierarchy gets through it.

Keywords (from ``+reward.custom_reward_function.reward_kwargs.<key>=...``): ``reward_url`` (else
``RLHF_FEEDBACK_REWARD_URL``; comma-separated for several endpoints), ``api_key`` (else
``RLHF_FEEDBACK_API_KEY``), ``timeout`` (seconds per attempt, default 60), ``max_retries``
(default 8), and for :func:`compute_score_heads` ``head_names`` (the dict keys, in head order;
default: the model's label names). The prompt is ``extra_info["prompt"]``, a string or chat
messages; the service renders it with the reward model's own chat template.

One client per process and settings is reused, and the samples of one worker that arrive within a
few milliseconds of each other are sent as one request (verl calls once per sample).
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from clients._core import run_sync
from clients.integrations import RewardUnavailableError, normalize_prompt
from clients.reward import AsyncRewardClient
from clients.types import ItemError

URL_ENV = "RLHF_FEEDBACK_REWARD_URL"
BATCH_WINDOW_S = 0.005  # how long the first sample of a request waits for its neighbours
MAX_BATCH_ITEMS = 256
SCORE_KEY = "score"  # the key verl's managers read the reward from in a dict result

_ClientKey = tuple[tuple[str, ...], str | None, float | None, int]
_clients: dict[_ClientKey, AsyncRewardClient] = {}
_clients_lock = threading.Lock()


def _urls(reward_url: str | Sequence[str] | None) -> tuple[str, ...]:
    raw: Any = reward_url if reward_url is not None else os.environ.get(URL_ENV)
    if raw is None or raw == "" or raw == []:
        raise ValueError(
            f"no reward service URL: set {URL_ENV} (e.g. grpc://reward-host:50051) or pass "
            "+reward.custom_reward_function.reward_kwargs.reward_url=..."
        )
    if isinstance(raw, str):
        return tuple(u.strip() for u in raw.split(",") if u.strip())
    return tuple(str(u) for u in raw)


def get_client(
    reward_url: str | Sequence[str] | None = None,
    *,
    api_key: str | None = None,
    timeout: float | None = 60.0,
    max_retries: int = 8,
) -> AsyncRewardClient:
    """This process's client for ``reward_url`` (or ``RLHF_FEEDBACK_REWARD_URL``) and these
    settings, made once."""
    key: _ClientKey = (_urls(reward_url), api_key, timeout, int(max_retries))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            urls = key[0]
            client = _clients[key] = AsyncRewardClient(
                urls[0] if len(urls) == 1 else list(urls), api_key=api_key, timeout=timeout, max_retries=key[3]
            )
        return client


# -- coalescing one worker's per-sample calls into requests ---------------------------------------


class _Scored(NamedTuple):
    score: float
    heads: tuple[float, ...]  # every head output; (score,) for a scalar head


def _scored(score: float, vector: tuple[float, ...] | None) -> _Scored:
    return _Scored(float(score), tuple(float(v) for v in vector) if vector else (float(score),))


@dataclass
class _Batcher:
    client: AsyncRewardClient
    pending: list[tuple[dict[str, Any], asyncio.Future[_Scored]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def submit(self, item: dict[str, Any]) -> asyncio.Future[_Scored]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Scored] = loop.create_future()
        self.pending.append((item, fut))
        if len(self.pending) >= MAX_BATCH_ITEMS:
            self.flush()
        elif self.timer is None:
            self.timer = loop.call_later(BATCH_WINDOW_S, self.flush)
        return fut

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending = self.pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self.tasks.add(task)  # keep a reference until it is done
            task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[tuple[dict[str, Any], asyncio.Future[_Scored]]]) -> None:
        live = [(item, fut) for item, fut in batch if not fut.done()]
        if not live:
            return
        try:
            results = await self.client.score([item for item, _ in live])
        except asyncio.CancelledError:
            for _, fut in live:
                fut.cancel()
            raise
        except Exception as exc:  # the whole request failed: every caller gets the error
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(exc)
            return
        vectors = results.vectors or [None] * len(live)
        for i, (_, fut) in enumerate(live):
            if fut.done():
                continue
            score = results[i]
            if score is None:
                reason = results.errors.get(i) or ItemError("INTERNAL", "no score returned")
                fut.set_exception(RewardUnavailableError(reason))
            else:
                fut.set_result(_scored(score, vectors[i]))


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _Batcher]] = weakref.WeakKeyDictionary()


def _batcher(client: AsyncRewardClient) -> _Batcher:
    per_loop = _batchers.setdefault(asyncio.get_running_loop(), {})
    b = per_loop.get(id(client))
    if b is None or b.client is not client:
        b = per_loop[id(client)] = _Batcher(client)
    return b


# -- vector heads as dict keys ----------------------------------------------------------------------

_label_names: weakref.WeakKeyDictionary[AsyncRewardClient, tuple[str, ...]] = weakref.WeakKeyDictionary()


async def _head_keys(client: AsyncRewardClient, head_names: Sequence[str] | None, num_heads: int) -> tuple[str, ...]:
    if head_names is not None:
        keys = tuple(str(n) for n in head_names)
        where = "head_names"
    else:
        names = _label_names.get(client)
        if names is None:
            info = await client.model_info()
            names = _label_names[client] = tuple(info.label_names) or tuple(
                f"LABEL_{i}" for i in range(info.num_labels)
            )
        keys, where = names, "the model's label names"
    if len(keys) != num_heads:
        raise ValueError(f"{where} {list(keys)} name {len(keys)} heads, but the model returned {num_heads}")
    if SCORE_KEY in keys or len(set(keys)) != len(keys):
        # "score" is the reward verl reads; a duplicate would silently overwrite a head
        raise ValueError(
            f"{where} {list(keys)} must be distinct and not {SCORE_KEY!r}: pass "
            "+reward.custom_reward_function.reward_kwargs.head_names=[...]"
        )
    return keys


# -- the functions verl loads -----------------------------------------------------------------------


def _prompt_of(extra_info: Mapping[str, Any] | None) -> str | list[dict[str, str]]:
    if not isinstance(extra_info, Mapping) or extra_info.get("prompt") is None:
        raise ValueError(
            'clients.integrations.verl needs the prompt in extra_info["prompt"] (a string or chat messages): '
            "add it when preparing the dataset"
        )
    return normalize_prompt(extra_info["prompt"], 'extra_info["prompt"]')


def _item(solution_str: Any, extra_info: Any) -> dict[str, Any]:
    if not isinstance(solution_str, str):
        raise TypeError(f"solution_str must be a string, got {type(solution_str).__name__}")
    return {"prompt": _prompt_of(extra_info), "response": solution_str}


async def _score_one(
    solution_str: Any,
    extra_info: Any,
    reward_url: str | Sequence[str] | None,
    api_key: str | None,
    timeout: float | None,
    max_retries: int,
) -> tuple[AsyncRewardClient, _Scored]:
    item = _item(solution_str, extra_info)
    client = get_client(reward_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
    return client, await _batcher(client).submit(item)


async def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    *,
    reward_url: str | Sequence[str] | None = None,
    api_key: str | None = None,
    timeout: float | None = 60.0,
    max_retries: int = 8,
    **kwargs: Any,
) -> float:
    """verl's custom reward: the reward model's raw score of ``solution_str`` as the answer to
    ``extra_info["prompt"]``. ``data_source`` and ``ground_truth`` are not used (a reward model
    needs neither; ``None`` is fine). Raises :class:`~clients.integrations.RewardUnavailableError`
    (or the client's error when the whole request failed) after the client's retries: never a
    silent 0."""
    _, scored = await _score_one(solution_str, extra_info, reward_url, api_key, timeout, max_retries)
    return scored.score


async def compute_score_heads(
    data_source: Any,
    solution_str: str,
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    *,
    reward_url: str | Sequence[str] | None = None,
    api_key: str | None = None,
    timeout: float | None = 60.0,
    max_retries: int = 8,
    head_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """For verl's ``gdpo`` manager and a vector-head reward model: ``{"score": s, <head>: v, ...}``
    with ``s`` the service's scalar score (its ``--head-weights`` combination) and one key per head
    (the model's label names, or ``head_names``), to be listed in ``algorithm.gdpo_reward_keys``.
    A scalar model gives its one head. Fails like :func:`compute_score`."""
    client, scored = await _score_one(solution_str, extra_info, reward_url, api_key, timeout, max_retries)
    keys = await _head_keys(client, head_names, len(scored.heads))
    return {SCORE_KEY: scored.score, **dict(zip(keys, scored.heads, strict=True))}


async def compute_score_batch_async(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any] | None = None,
    extra_infos: Sequence[Mapping[str, Any] | None] | None = None,
    *,
    reward_url: str | Sequence[str] | None = None,
    api_key: str | None = None,
    timeout: float | None = 60.0,
    max_retries: int = 8,
    **kwargs: Any,
) -> list[float]:
    """The scores of a whole chunk in one call (the awaitable form of :func:`compute_score_batch`);
    raises if any sample has no score."""
    infos: Sequence[Any] = extra_infos if extra_infos is not None else [None] * len(solution_strs)
    if len(solution_strs) != len(infos):
        raise ValueError(f"{len(solution_strs)} solution_strs but {len(infos)} extra_infos")
    items = [_item(s, e) for s, e in zip(solution_strs, infos, strict=True)]
    if not items:
        return []
    client = get_client(reward_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
    results = await client.score(items)
    if results.errors:
        first = min(results.errors)
        raise RewardUnavailableError(results.errors[first])
    return [float(s) for s in results if s is not None]


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any] | None = None,
    extra_infos: Sequence[Mapping[str, Any] | None] | None = None,
    **kwargs: Any,
) -> list[float]:
    """For verl's legacy ``batch`` manager (``verl/workers/reward_manager/batch.py``; in ``main_ppo``
    up to verl 0.7.0 with ``reward_model.reward_manager=batch``), which calls the function
    synchronously once per batch: the scores of the whole batch, in order. Blocks on the clients'
    shared loop thread; raises if any sample has no score. (Before this release it was ``async``,
    which that manager cannot call: use :func:`compute_score_batch_async` where you await.)"""
    return run_sync(compute_score_batch_async(data_sources, solution_strs, ground_truths, extra_infos, **kwargs))


def compute_score_sync(
    data_source: Any,
    solution_str: str,
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """The blocking twin of :func:`compute_score`, for the managers that need a sync function:
    the reward-loop ``remote`` manager (it asserts one and runs it in Ray workers; the function
    pickles by reference) and the legacy ``verl/workers/reward_manager`` managers. Calls from
    several threads share one loop thread, so concurrent samples still travel together."""
    return run_sync(compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs))


__all__ = [
    "SCORE_KEY",
    "URL_ENV",
    "compute_score",
    "compute_score_batch",
    "compute_score_batch_async",
    "compute_score_heads",
    "compute_score_sync",
    "get_client",
]
