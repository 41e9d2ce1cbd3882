"""Preference pairs for ``train rm``: TRL rows (or the HH-RLHF folder) as reward-service inputs.

Every pair becomes two :class:`RewardInput` values, exactly what a client would send to the
reward service to score the chosen and the rejected response, so that training and serving
render the same tokens and read the same position. Accepted rows:

- explicit prompt (what ``rlhf-feedback label`` writes)::

      {"prompt": str | [messages], "chosen": str | message | [message], "rejected": ..., "margin"?: float}

- implicit prompt, conversational: ``chosen`` and ``rejected`` are whole conversations sharing
  a prefix (the prompt); the items are the two conversations (``RewardInput.of_pair`` when each
  ends in one assistant turn after the shared prefix, ``of_messages`` otherwise: both render
  through the chat template to the same tokens);
- implicit prompt, plain text: ``chosen`` and ``rejected`` are whole texts, scored verbatim.

A folder is read as the HH-RLHF test files (``helpful-base`` and ``harmless-base``), parsed by
:mod:`rlhf_train.hh_rlhf` with its training rules; that is how the embedded default head is
reproduced (``train rm --head-only``).

The split is deterministic: a seeded hash of the prompt (pairs sharing a prompt stay
together) puts a pair in ``test``, ``val`` (a slice of the training data used to choose the
L2 strength of a frozen-backbone head) or ``train``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_train.hh_rlhf import load_pairs
from rlhf_train.jobs.io import InputError, read_rows
from rlhf_train.jobs.label import as_completion, as_messages
from services.runtime.chat import ChatMessage
from services.runtime.items import RewardInput

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PrefPair:
    """One preference pair, ready to encode with the reward model's own renderer."""

    source: str  # the input file's name, or the HH-RLHF file
    where: str  # "line 12", "row 3", "item 0"
    chosen: RewardInput
    rejected: RewardInput
    chosen_text: str  # the responses alone, for the "longer wins" baseline
    rejected_text: str
    split: str  # "train", "val" or "test"
    margin: float = 0.0


@dataclass
class LoadedData:
    pairs: list[PrefPair]
    skipped: dict[str, int]  # reason -> rows
    rows: int  # rows read (parsed or skipped)

    def count(self, split: str) -> int:
        return sum(1 for p in self.pairs if p.split == split)


class Skip(ValueError):
    """A row that is well-formed but useless for training (counted by reason, not an error)."""


def split_of(prompt: Sequence[ChatMessage], seed: int, test_fraction: float, val_fraction: float) -> str:
    """Deterministic split by a seeded hash of the prompt: pairs sharing a prompt stay together."""
    key = json.dumps([seed, [[m.role, m.content] for m in prompt]], ensure_ascii=False)
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + (1.0 - test_fraction) * val_fraction:
        return "val"
    return "train"


def _prompt_tuple(prompt: str | list[dict[str, str]]) -> tuple[ChatMessage, ...]:
    if isinstance(prompt, str):
        return (ChatMessage("user", prompt),)
    return tuple(ChatMessage(m["role"], m["content"]) for m in prompt)


def _common_prefix(a: Sequence[ChatMessage], b: Sequence[ChatMessage]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_text_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _conversation_item(prefix: tuple[ChatMessage, ...], rest: tuple[ChatMessage, ...]) -> RewardInput:
    if prefix and len(rest) == 1 and rest[0].role == "assistant":
        return RewardInput.of_pair(prefix, rest[0].content)
    return RewardInput.of_messages(prefix + rest)


def parse_preference_row(
    data: Any, *, use_margin: bool = False
) -> tuple[RewardInput, RewardInput, str, str, Any, float]:
    """``(chosen item, rejected item, chosen text, rejected text, split key, margin)`` of one row.

    ``ValueError`` for a malformed row, :class:`Skip` for a useless one (chosen == rejected).
    The split key is the prompt as messages (the shared prefix for implicit prompts).
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"a row is a JSON object, not {type(data).__name__}")
    if "chosen" not in data or "rejected" not in data:
        raise ValueError("the row needs 'chosen' and 'rejected'")
    margin = 0.0
    if use_margin:
        raw = data.get("margin")
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise ValueError("--use-margin needs a finite number in every row's 'margin' (from label --margin)")
        margin = float(raw)
    chosen_raw, rejected_raw = data["chosen"], data["rejected"]
    if data.get("prompt") is not None:
        raw_prompt = data["prompt"]
        prompt = raw_prompt if isinstance(raw_prompt, str) else as_messages(raw_prompt, "prompt")
        a, b = as_completion(chosen_raw, "chosen"), as_completion(rejected_raw, "rejected")
        if a == b:
            raise Skip("chosen == rejected")
        key = _prompt_tuple(prompt)
        item_prompt = prompt if isinstance(prompt, str) else key
        return RewardInput.of_pair(item_prompt, a), RewardInput.of_pair(item_prompt, b), a, b, key, margin
    if isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        if chosen_raw == rejected_raw:
            raise Skip("chosen == rejected")
        shared = _common_text_prefix(chosen_raw, rejected_raw)
        key = (ChatMessage("text", shared),)
        return (
            RewardInput.of_text(chosen_raw),
            RewardInput.of_text(rejected_raw),
            chosen_raw[len(shared) :],
            rejected_raw[len(shared) :],
            key,
            margin,
        )
    if isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        ca = _prompt_tuple(as_messages(chosen_raw, "chosen"))
        cb = _prompt_tuple(as_messages(rejected_raw, "rejected"))
        if ca == cb:
            raise Skip("chosen == rejected")
        n = _common_prefix(ca, cb)
        prefix, rest_a, rest_b = ca[:n], ca[n:], cb[n:]
        if not rest_a or not rest_b:
            raise ValueError("one conversation is a prefix of the other: nothing to compare")
        text_a = "".join(m.content for m in rest_a)
        text_b = "".join(m.content for m in rest_b)
        return _conversation_item(prefix, rest_a), _conversation_item(prefix, rest_b), text_a, text_b, prefix, margin
    raise ValueError(
        "without 'prompt', 'chosen' and 'rejected' must both be texts or both be lists of messages "
        "(TRL's implicit-prompt format)"
    )


def load_preferences(
    path: Path,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.2,
    use_margin: bool = False,
) -> LoadedData:
    """Every usable pair of ``path`` (a ``.jsonl``/``.json``/``.parquet`` file, or the HH-RLHF
    folder) with its split; :class:`InputError` for anything unusable, naming the row."""
    if path.is_dir():
        return _load_hh(path, seed=seed, test_fraction=test_fraction, val_fraction=val_fraction, use_margin=use_margin)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    rows = read_rows(path)
    if not rows:
        raise InputError(f"{path}: no rows; --data needs TRL preference rows {{prompt?, chosen, rejected}}")
    pairs: list[PrefPair] = []
    skipped: collections.Counter[str] = collections.Counter()
    for row in rows:
        try:
            chosen, rejected, a, b, key, margin = parse_preference_row(row.data, use_margin=use_margin)
        except Skip as exc:
            skipped[str(exc)] += 1
            continue
        except ValueError as exc:
            raise InputError(f"{path}: {row.where}: {exc}") from None
        split = split_of(key, seed, test_fraction, val_fraction)
        pairs.append(PrefPair(path.name, row.where, chosen, rejected, a, b, split, margin))
    if not pairs:
        raise InputError(f"{path}: no usable pairs: every row has chosen == rejected")
    return LoadedData(pairs, dict(skipped), len(rows))


def _load_hh(path: Path, *, seed: int, test_fraction: float, val_fraction: float, use_margin: bool) -> LoadedData:
    if use_margin:
        raise InputError("--use-margin needs a 'margin' column; the HH-RLHF files have none")
    try:
        hh, skipped_by_file = load_pairs(path)
    except FileNotFoundError as exc:
        raise InputError(f"{exc}; a folder --data is read as the HH-RLHF test files") from None
    pairs = [
        PrefPair(
            p.source,
            f"row {p.index}",
            RewardInput.of_pair(p.prompt, p.chosen),
            RewardInput.of_pair(p.prompt, p.rejected),
            p.chosen,
            p.rejected,
            split_of(p.prompt, seed, test_fraction, val_fraction),
        )
        for p in hh
    ]
    skipped: collections.Counter[str] = collections.Counter()
    for reasons in skipped_by_file.values():
        skipped.update(reasons)
    if not pairs:
        raise InputError(f"{path}: no usable HH-RLHF pairs")
    return LoadedData(pairs, dict(skipped), len(pairs) + sum(skipped.values()))
