"""OpenRLHF's remote reward model: the body of ``POST /get_reward``.

What OpenRLHF sends (read in its sources, the release named where it matters):

- 0.9.1 and later (``openrlhf/utils/agent.py``, ``SingleTurnAgentExecutor``, 0.11.2 read): after
  each rollout, **one sample per request**: ``{"query": [q], "prompts": [p], "labels": [l]}``,
  posted with aiohttp (180 s timeout, 5 tries 1 s apart, ``raise_for_status()``). ``q`` is the
  prompt + response token ids decoded with ``skip_special_tokens=False``. With several endpoints
  (``--reward.remote_url a,b``) it shards the one-sample list over them and rotates the endpoint
  per call; 0.11.0 posted ``{"query": []}`` to every endpoint past the first (a 400 here then lost
  every reward), 0.11.2 skips empty shards. It reads ``rewards`` (the advantage), ``scores``
  (dynamic filtering, whose default range is (0, 1); falls back to ``rewards``) and every key of
  ``extra_logs``. A request that keeps failing leaves the sample without a reward (logged).
- 0.9.0 and earlier (``openrlhf/utils/remote_rm_utils.py``): the same body for a whole micro-batch
  through ``requests``, the same keys read.

So: every query is scored verbatim as a ``text`` item (tokenized with ``add_special_tokens=False``,
as OpenRLHF's own ``serve_rm`` does); an empty ``query`` list is answered 200 with empty lists; a
runtime failure of any item fails the whole request with that item's status (OpenRLHF retries):
never a made-up reward.

Two opt-ins, per server (flags) or per request (``?scores=``):

- a **rule hook** (``--openrlhf-rule module:function``) that sees each sample's label (ground truth)
  and returns a number; the reward is then ``rm_weight * rm_score + rule_weight * rule``. The hook is
  called as ``rule(query=..., prompt=..., label=..., response=...)`` where ``response`` is the query
  without its prompt prefix (the whole query when it does not start with the prompt);
- ``scores`` squashed with a sigmoid (``--openrlhf-scores sigmoid`` or ``?scores=sigmoid`` on the
  URL given to ``--reward.remote_url``), for dynamic filtering's (0, 1) range. ``rewards`` stay raw.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from services.common.errors import ErrorCode, ServiceError, invalid
from services.reward.engine.results import ItemError, ScoredItem, ScoreOutcome
from services.reward.settings import OpenRLHFScores as ScoresMode
from services.reward.settings import RewardSettings

SCORES_MODES: tuple[str, ...] = get_args(ScoresMode)

Rule = Callable[..., float]


@dataclass(frozen=True)
class RuleHook:
    """A user rule mixed into the reward: ``rm_weight * rm_score + rule_weight * rule(...)``."""

    spec: str
    fn: Rule
    rm_weight: float = 1.0
    rule_weight: float = 1.0


def load_rule(spec: str) -> Rule:
    """``"package.module:function"`` → the function, imported once at start-up (a typo fails there,
    not on the first request)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"--openrlhf-rule wants module:function (e.g. clients.integrations.rules:exact_match), got {spec!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--openrlhf-rule {spec!r}: cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--openrlhf-rule {spec!r}: {module_name} has no function {attr!r}")
    return fn


def rule_hook(settings: RewardSettings) -> RuleHook | None:
    """The server's rule hook, loaded at start-up, or None."""
    if settings.openrlhf_rule is None:
        return None
    return RuleHook(
        spec=settings.openrlhf_rule,
        fn=load_rule(settings.openrlhf_rule),
        rm_weight=settings.openrlhf_rm_weight,
        rule_weight=settings.openrlhf_rule_weight,
    )


def scores_mode(requested: str | None, default: ScoresMode) -> ScoresMode:
    """The ``?scores=`` query parameter, checked (400 for an unknown mode)."""
    if requested is None:
        return default
    if requested not in SCORES_MODES:
        raise invalid(f"scores must be one of {', '.join(SCORES_MODES)}, got {requested!r}")
    return requested  # type: ignore[return-value]


def response_of(query: str, prompt: Any) -> str:
    """The generated part of an OpenRLHF query: the query minus its prompt when it starts with it."""
    if isinstance(prompt, str) and prompt and query.startswith(prompt):
        return query[len(prompt) :]
    return query


def sigmoid(x: float) -> float:
    # the two branches keep exp() from overflowing for large |x|
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _aligned(name: str, values: Sequence[Any] | None, n: int) -> Sequence[Any]:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise invalid(f"{name} has {len(values)} entries but query has {n}: the rule needs one per query")
    return values


def _apply_rule(hook: RuleHook, queries: Sequence[str], prompts: Sequence[Any], labels: Sequence[Any]) -> list[float]:
    out: list[float] = []
    for i, (q, p, label) in enumerate(zip(queries, prompts, labels, strict=True)):
        try:
            value = hook.fn(query=q, prompt=p, label=label, response=response_of(q, p))
        except Exception as exc:  # a user rule's bug: the request fails (5xx, retried), never a guess
            raise ServiceError(
                ErrorCode.INTERNAL, f"query {i}: the rule {hook.spec} raised {type(exc).__name__}: {exc}", item=i
            ) from exc
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ServiceError(
                ErrorCode.INTERNAL, f"query {i}: the rule {hook.spec} returned {value!r}, not a finite number", item=i
            )
        out.append(float(value))
    return out


async def get_reward_body(
    outcome: ScoreOutcome | None,
    queries: Sequence[str],
    prompts: Sequence[Any] | None,
    labels: Sequence[Any] | None,
    *,
    rule: RuleHook | None,
    mode: ScoresMode,
) -> dict[str, Any]:
    """OpenRLHF's answer for the scored ``queries`` (``outcome`` None: there were none)."""
    rm: list[float] = []
    num_tokens: list[float] = []
    truncated: list[float] = []
    for i, r in enumerate(outcome.results if outcome is not None else ()):
        if isinstance(r, ItemError):
            raise ServiceError(r.code, f"query {i}: {r.message}", item=i)
        assert isinstance(r, ScoredItem)
        rm.append(r.score)
        num_tokens.append(float(r.num_tokens))
        truncated.append(1.0 if r.truncated else 0.0)
    extra_logs: dict[str, list[float]] = {"rm_num_tokens": num_tokens, "rm_truncated": truncated}
    rewards = rm
    if rule is not None:
        n = len(queries)
        p, lab = _aligned("prompts", prompts, n), _aligned("labels", labels, n)
        # a user function: off the event loop, so a slow rule stalls only its own request
        ruled = await asyncio.to_thread(_apply_rule, rule, queries, p, lab)
        rewards = [rule.rm_weight * s + rule.rule_weight * v for s, v in zip(rm, ruled, strict=True)]
        extra_logs = {"rm_score": rm, "rule_reward": ruled, **extra_logs}
    scores = [sigmoid(x) for x in rewards] if mode == "sigmoid" else rewards
    return {"rewards": rewards, "scores": scores, "extra_logs": extra_logs}


__all__ = [
    "SCORES_MODES",
    "RuleHook",
    "ScoresMode",
    "get_reward_body",
    "load_rule",
    "response_of",
    "rule_hook",
    "scores_mode",
]
