"""verl's custom reward function, scored by the reward service.

::

    # data preparation: put the prompt where compute_score finds it
    row["extra_info"] = {"prompt": question_or_messages, ...}

    # training
    export RLHF_FEEDBACK_REWARD_URL=grpc://reward-host:50051
    python -m verl.trainer.main_ppo ... \\
        custom_reward_function.path=pkg://clients.integrations.verl \\
        custom_reward_function.name=compute_score

How verl calls it (read in verl's ``verl/trainer/ppo/reward.py`` ``get_custom_reward_fn``,
``verl/utils/import_utils.py`` ``load_module``, ``verl/experimental/reward_loop/reward_loop.py``
and ``reward_manager/{naive,batch}.py``):

- ``path=pkg://a.b.c`` is ``importlib.import_module("a.b.c")``; ``name`` is looked up on it.
  ``custom_reward_function.reward_kwargs`` are merged into every call's keywords (they win), and
  an ``async def`` stays awaitable through that wrapper (``inspect.iscoroutinefunction``).
- The reward-loop managers call ``compute_score(data_source=..., solution_str=...,
  ground_truth=..., extra_info=..., **extra)`` per sample, awaiting an async function directly (a
  sync one runs in a thread pool); a worker scores its samples concurrently
  (``asyncio.gather`` over one task per sample). ``solution_str`` is the decoded response (special
  tokens skipped); ``extra_info`` is the dataset row's ``extra_info`` plus ``num_turns`` and
  ``rollout_reward_scores``; ``extra`` may hold ``reward_router_address`` /
  ``reward_model_tokenizer`` (ignored here).
- The ``batch`` manager calls ``compute_score(data_sources=[...], solution_strs=[...],
  ground_truths=[...], extra_infos=[...])`` once per chunk: use :func:`compute_score_batch`.
- The older managers in ``verl/workers/reward_manager`` call the function synchronously: use
  :func:`compute_score_sync` there.
- The result is a float (or a dict with ``"score"``). There is no "no reward" value: ``None``
  breaks the reward tensor, and NaN would poison the advantages.

So a failed item **raises** :class:`~clients.integrations.RewardUnavailableError` (after the
client's retries: UNAVAILABLE, RESOURCE_EXHAUSTED, 429/503 are retried, spread over the
endpoints), and the training step fails loudly. It never returns a made-up 0.

The service URL comes from the ``reward_url`` keyword (``+custom_reward_function.reward_kwargs.
reward_url=...``) or ``RLHF_FEEDBACK_REWARD_URL`` (comma-separated for several endpoints); the
API key from ``api_key`` or ``RLHF_FEEDBACK_API_KEY``. The prompt is ``extra_info["prompt"]``, a
string or chat messages; the service renders it with the reward model's own chat template.

One client per process and URL is reused, and the samples of one worker that arrive within a
few milliseconds of each other are sent as one request (verl calls once per sample).
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clients._core import run_sync
from clients.integrations import RewardUnavailableError, normalize_prompt
from clients.reward import AsyncRewardClient
from clients.types import ItemError

URL_ENV = "RLHF_FEEDBACK_REWARD_URL"
BATCH_WINDOW_S = 0.005  # how long the first sample of a request waits for its neighbours
MAX_BATCH_ITEMS = 256

_ClientKey = tuple[tuple[str, ...], str | None, float | None]
_clients: dict[_ClientKey, AsyncRewardClient] = {}
_clients_lock = threading.Lock()


def _urls(reward_url: str | Sequence[str] | None) -> tuple[str, ...]:
    raw: Any = reward_url if reward_url is not None else os.environ.get(URL_ENV)
    if raw is None or raw == "" or raw == []:
        raise ValueError(
            f"no reward service URL: set {URL_ENV} (e.g. grpc://reward-host:50051) or pass "
            "+custom_reward_function.reward_kwargs.reward_url=..."
        )
    if isinstance(raw, str):
        return tuple(u.strip() for u in raw.split(",") if u.strip())
    return tuple(str(u) for u in raw)


def get_client(
    reward_url: str | Sequence[str] | None = None, *, api_key: str | None = None, timeout: float | None = 60.0
) -> AsyncRewardClient:
    """This process's client for ``reward_url`` (or ``RLHF_FEEDBACK_REWARD_URL``), made once."""
    key: _ClientKey = (_urls(reward_url), api_key, timeout)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            urls = key[0]
            client = _clients[key] = AsyncRewardClient(
                urls[0] if len(urls) == 1 else list(urls), api_key=api_key, timeout=timeout
            )
        return client


# -- coalescing one worker's per-sample calls into requests ---------------------------------------


@dataclass
class _Batcher:
    client: AsyncRewardClient
    pending: list[tuple[dict[str, Any], asyncio.Future[float]]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def submit(self, item: dict[str, Any]) -> asyncio.Future[float]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[float] = loop.create_future()
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

    async def _send(self, batch: list[tuple[dict[str, Any], asyncio.Future[float]]]) -> None:
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
        for i, (_, fut) in enumerate(live):
            if fut.done():
                continue
            score = results[i]
            if score is None:
                reason = results.errors.get(i) or ItemError("INTERNAL", "no score returned")
                fut.set_exception(RewardUnavailableError(reason))
            else:
                fut.set_result(score)


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, _Batcher]] = weakref.WeakKeyDictionary()


def _batcher(client: AsyncRewardClient) -> _Batcher:
    per_loop = _batchers.setdefault(asyncio.get_running_loop(), {})
    b = per_loop.get(id(client))
    if b is None or b.client is not client:
        b = per_loop[id(client)] = _Batcher(client)
    return b


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


async def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    reward_url: str | Sequence[str] | None = None,
    api_key: str | None = None,
    timeout: float | None = 60.0,
    **kwargs: Any,
) -> float:
    """verl's custom reward: the reward model's raw score of ``solution_str`` as the answer to
    ``extra_info["prompt"]``. ``data_source`` and ``ground_truth`` are not used (a reward model
    needs neither). Raises :class:`~clients.integrations.RewardUnavailableError` when the
    service has no score for this sample after the client's retries (never a silent 0)."""
    item = _item(solution_str, extra_info)
    client = get_client(reward_url, api_key=api_key, timeout=timeout)
    return await _batcher(client).submit(item)


async def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None],
    *,
    reward_url: str | Sequence[str] | None = None,
    api_key: str | None = None,
    timeout: float | None = 60.0,
    **kwargs: Any,
) -> list[float]:
    """For ``reward_model.reward_manager=batch`` (``custom_reward_function.name=compute_score_batch``):
    the scores of a whole chunk in one call; raises if any sample has no score."""
    if len(solution_strs) != len(extra_infos):
        raise ValueError(f"{len(solution_strs)} solution_strs but {len(extra_infos)} extra_infos")
    items = [_item(s, e) for s, e in zip(solution_strs, extra_infos, strict=True)]
    if not items:
        return []
    results = await get_client(reward_url, api_key=api_key, timeout=timeout).score(items)
    if results.errors:
        first = min(results.errors)
        raise RewardUnavailableError(results.errors[first])
    return [float(s) for s in results if s is not None]


def compute_score_sync(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    """The blocking twin of :func:`compute_score`, for verl's older reward managers
    (``verl/workers/reward_manager``) that call the function synchronously."""
    return run_sync(compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs))


__all__ = ["URL_ENV", "compute_score", "compute_score_batch", "compute_score_sync", "get_client"]
