"""A ready ``reward_func`` file for OpenRLHF: ``--reward.remote_url /path/to/openrlhf_reward_func.py``.

OpenRLHF (0.9.1 and later, ``SingleTurnAgentExecutor`` in ``openrlhf/utils/agent.py``; 0.11.2 read)
loads a ``--reward.remote_url`` that ends in ``.py`` as a file, and calls its
``reward_func(queries, prompts, labels)`` in a worker thread for every sample (one-element lists),
reading ``rewards``, ``scores`` and ``extra_logs`` from the returned dict. This file scores the
queries through the reward service and, if you name one, mixes in a rule reward that sees the
labels (ground truth)::

    export RLHF_FEEDBACK_REWARD_URL=http://reward-host:8000          # or grpc://..., or a,b for several
    export RLHF_FEEDBACK_RULE=clients.integrations.rules:exact_match  # optional
    python -m openrlhf.cli.train_ppo_ray ... \\
        --reward.remote_url "$(python -m clients.integrations.openrlhf --reward-func-path)"

Environment (read at the first call): ``RLHF_FEEDBACK_REWARD_URL`` (required; comma-separated for
several replicas), ``RLHF_FEEDBACK_API_KEY``, ``RLHF_FEEDBACK_RULE`` (``module:function``, see
:mod:`clients.integrations.rules`), ``RLHF_FEEDBACK_RM_WEIGHT`` and ``RLHF_FEEDBACK_RULE_WEIGHT``
(default 1: reward = rm_weight × RM score + rule_weight × rule), ``RLHF_FEEDBACK_SCORES``
(``raw`` or ``sigmoid``: what ``scores``, used by dynamic filtering with its default (0, 1)
range, carries; ``rewards`` are always raw).

A query the service cannot score (after the client's retries) raises: OpenRLHF logs it and the
sample gets no reward. Never a made-up number.
"""

from __future__ import annotations

import importlib
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from clients.integrations import RewardUnavailableError
from clients.reward import RewardClient

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _rule(spec: str) -> Callable[..., float]:
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"RLHF_FEEDBACK_RULE wants module:function, got {spec!r}")
    fn = getattr(importlib.import_module(module_name), attr, None)
    if not callable(fn):
        raise ValueError(f"RLHF_FEEDBACK_RULE {spec!r}: {module_name} has no function {attr!r}")
    return fn


def _setup() -> dict[str, Any]:
    """Client, rule and weights from the environment, once per process (OpenRLHF calls from threads)."""
    with _lock:
        if not _state:
            url = os.environ.get("RLHF_FEEDBACK_REWARD_URL", "").strip()
            if not url:
                raise RuntimeError("set RLHF_FEEDBACK_REWARD_URL to the reward service (http://host:8000)")
            urls = [u.strip() for u in url.split(",") if u.strip()]
            scores = os.environ.get("RLHF_FEEDBACK_SCORES", "raw").strip()
            if scores not in ("raw", "sigmoid"):
                raise ValueError(f"RLHF_FEEDBACK_SCORES must be raw or sigmoid, got {scores!r}")
            spec = os.environ.get("RLHF_FEEDBACK_RULE", "").strip()
            _state.update(
                client=RewardClient(urls[0] if len(urls) == 1 else urls),
                rule=_rule(spec) if spec else None,
                rule_spec=spec,
                rm_weight=float(os.environ.get("RLHF_FEEDBACK_RM_WEIGHT", "1")),
                rule_weight=float(os.environ.get("RLHF_FEEDBACK_RULE_WEIGHT", "1")),
                scores=scores,
            )
        return _state


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _response(query: str, prompt: Any) -> str:
    return query[len(prompt) :] if isinstance(prompt, str) and prompt and query.startswith(prompt) else query


def reward_func(queries: Sequence[str], prompts: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """OpenRLHF's ``reward_func``: ``{"rewards", "scores", "extra_logs"}``, one number per query."""
    state = _setup()
    queries = list(queries)
    if not queries:
        return {"rewards": [], "scores": [], "extra_logs": {}}
    results = state["client"].score_texts(queries)
    for i in sorted(results.errors):
        raise RewardUnavailableError(results.errors[i])
    rm = [float(s) for s in results]
    extra: dict[str, list[float]] = {
        "rm_num_tokens": [float(n or 0) for n in results.num_tokens],
        "rm_truncated": [1.0 if t else 0.0 for t in results.truncated],
    }
    rewards = rm
    rule = state["rule"]
    if rule is not None:
        prompts = list(prompts) if prompts is not None else [None] * len(queries)
        labels = list(labels) if labels is not None else [None] * len(queries)
        ruled = [
            float(rule(query=q, prompt=p, label=lab, response=_response(q, p)))
            for q, p, lab in zip(queries, prompts, labels, strict=True)
        ]
        rewards = [state["rm_weight"] * s + state["rule_weight"] * v for s, v in zip(rm, ruled, strict=True)]
        extra = {"rm_score": rm, "rule_reward": ruled, **extra}
    scores = [_sigmoid(r) for r in rewards] if state["scores"] == "sigmoid" else rewards
    return {"rewards": rewards, "scores": scores, "extra_logs": extra}


def reset() -> None:
    """Forget the client and settings (tests; a changed environment)."""
    with _lock:
        client = _state.get("client")
        _state.clear()
    if client is not None:
        client.close()


__all__ = ["reset", "reward_func"]
