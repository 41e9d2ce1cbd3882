"""Rule rewards to mix with the reward model's score: the OpenRLHF rule hook's calling convention.

A rule is called with keywords ``query`` (the whole decoded sequence), ``prompt``, ``label`` (the
sample's ground truth, OpenRLHF's ``--data.label_key``) and ``response`` (the query without its
prompt) and returns a number. The same function works in both places:

- on the server: ``rlhf-feedback serve reward --openrlhf-rule clients.integrations.rules:exact_match``;
- in OpenRLHF's process, through the ready file :mod:`clients.integrations.openrlhf_reward_func`
  with ``RLHF_FEEDBACK_RULE=clients.integrations.rules:exact_match``.

Write your own in any importable module with the same keywords.
"""

from __future__ import annotations

import re
from typing import Any

# Special tokens a decoded OpenRLHF query ends with (``skip_special_tokens=False``): ChatML, Llama 3,
# Gemma, Mistral and the common eos/pad spellings.
_TRAILING_SPECIAL = re.compile(r"(?:\s*(?:<\|[^|<>]{1,40}\|>|</s>|<eos>|<end_of_turn>|<pad>|\[/INST\]))+\s*$")


def final_answer(response: str) -> str:
    """The response's last non-empty line, trailing special tokens and whitespace removed."""
    text = _TRAILING_SPECIAL.sub("", response)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exact_match(*, query: str, prompt: Any, label: Any, response: str) -> float:
    """1.0 when the response's final line equals the label (both stripped), else 0.0.

    A sample without a label (``None`` or empty) scores 0.0: the rule has nothing to match, so
    only the reward model's score counts for it.
    """
    del query, prompt  # part of the calling convention; this rule only needs the response
    if label is None or str(label).strip() == "":
        return 0.0
    return 1.0 if final_answer(response) == str(label).strip() else 0.0


__all__ = ["exact_match", "final_answer"]
