"""Drop-in reward functions for training frameworks, built on :mod:`clients`.

- :mod:`clients.integrations.trl`: ``RemoteReward`` / ``AsyncRemoteReward`` and
  ``RemoteJudgeReward`` / ``AsyncRemoteJudgeReward`` for ``reward_funcs=[...]`` of TRL's
  ``GRPOTrainer``, ``RLOOTrainer`` and ``OnlineDPOTrainer``.
- :mod:`clients.integrations.verl`: ``compute_score`` (async), ``compute_score_batch`` (sync, for the
  batch manager) and ``compute_score_heads`` (one column per head, for GDPO) for
  ``reward.custom_reward_function.path=pkg://clients.integrations.verl`` (verl >= 0.7.1).
- :mod:`clients.integrations.openrlhf`: OpenRLHF posts to the reward service's ``/get_reward``
  route itself (``--reward.remote_url http://host:8000/get_reward``), or loads the ready
  :mod:`clients.integrations.openrlhf_reward_func` file; :mod:`clients.integrations.rules` holds
  rule rewards (``exact_match``) for either.

None of them imports its framework: they only speak the framework's calling convention.

The one rule they share: a reward that could not be computed is never a silent number. TRL takes
``None`` (it becomes NaN and is left out of the group statistics), so the TRL functions return
``None`` for a failed item and raise :class:`TooManyFailuresError` when too many items of one
call failed. verl has no "no reward" value, so its ``compute_score`` raises
:class:`RewardUnavailableError` (the training step fails loudly) after the client's retries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from clients.errors import RlhfFeedbackError
from clients.types import ItemError


class TooManyFailuresError(RlhfFeedbackError):
    """More items of one reward call failed than ``max_failure_rate`` allows.

    ``failure_rate`` (failed / total), ``max_failure_rate``, ``total`` and ``reasons`` (item
    index → :class:`~clients.types.ItemError`) say what happened.
    """

    code = "TOO_MANY_FAILURES"

    def __init__(
        self,
        name: str,
        *,
        failure_rate: float,
        max_failure_rate: float,
        total: int,
        reasons: Mapping[int, ItemError],
    ) -> None:
        self.failure_rate = failure_rate
        self.max_failure_rate = max_failure_rate
        self.total = total
        self.reasons = dict(reasons)
        super().__init__(
            f"{name}: {len(self.reasons)} of {total} rewards failed ({failure_rate:.0%} > max_failure_rate "
            f"{max_failure_rate:.0%}); reasons: {summarize_reasons(self.reasons)}"
        )


class RewardUnavailableError(RlhfFeedbackError):
    """The service gave no score for an item (after the client's retries) and the caller has no
    way to say "no reward" (verl): ``reason`` is the service's reason."""

    def __init__(self, reason: ItemError) -> None:
        self.reason = reason
        super().__init__(f"no reward for this item: {reason}", code=reason.code)


def summarize_reasons(reasons: Mapping[int, ItemError], top: int = 3) -> str:
    """``"UNAVAILABLE: draining (x6), DEADLINE_EXCEEDED: ... (x2)"``: the most common reasons."""
    counts = Counter(str(r) for r in reasons.values())
    parts = [f"{text} (x{n})" for text, n in counts.most_common(top)]
    if len(counts) > top:
        parts.append(f"and {len(counts) - top} other reasons")
    return ", ".join(parts) or "none"


# -- chat messages as the frameworks hand them over ------------------------------------------------


def content_text(content: Any) -> str:
    """A message's content as text: a string as is, ``None`` as ``""``, content blocks
    (``[{"type": "text", "text": ...}, {"type": "image"}]``, as TRL passes for VLMs) as their text
    parts joined by newlines (non-text blocks are dropped: the reward model reads text)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if is_sequence(content):
        parts = []
        for block in as_list(content):
            if isinstance(block, Mapping) and block.get("type") == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "\n".join(parts)
    raise TypeError(f"a message's content is a string or a list of content blocks, not {type(content).__name__}")


def is_sequence(x: Any) -> bool:
    """A list-like value (list, tuple, or a numpy array as pandas/parquet hand out), not a string."""
    if isinstance(x, str | bytes | bytearray | Mapping):
        return False
    return isinstance(x, Sequence) or (hasattr(x, "tolist") and hasattr(x, "__len__"))


def as_list(x: Any) -> list[Any]:
    return list(x.tolist()) if hasattr(x, "tolist") and not isinstance(x, Sequence) else list(x)


def normalize_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """Chat messages as the wire wants them (``role`` and text ``content`` only)."""
    if not is_sequence(messages):
        raise TypeError(f"{where}: expected a list of messages, got {type(messages).__name__}")
    out = []
    for m in as_list(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TypeError(f"{where}: a message is a mapping with a string 'role'")
        out.append({"role": m["role"], "content": content_text(m.get("content"))})
    if not out:
        raise ValueError(f"{where}: the message list is empty")
    return out


def normalize_prompt(prompt: Any, where: str) -> str | list[dict[str, str]]:
    """A prompt as a string or normalized chat messages."""
    if isinstance(prompt, str):
        return prompt
    return normalize_messages(prompt, where)


__all__ = [
    "RewardUnavailableError",
    "TooManyFailuresError",
    "content_text",
    "normalize_messages",
    "normalize_prompt",
    "summarize_reasons",
]
