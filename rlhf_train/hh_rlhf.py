"""The Anthropic HH-RLHF format, and the one parser of it (training, ``judge-eval`` and the benchmarks).

A row is ``{"chosen": dialogue, "rejected": dialogue}``; a dialogue is
``"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."``. The two dialogues share
everything up to the final ``\\n\\nAssistant:``: that shared part is the prompt, and what follows
it in each is the chosen and the rejected response.

Rules every caller gets:

- the prompt is ``chosen`` up to its last ``\\n\\nAssistant:``, and ``rejected`` must start with the
  same text through that tag;
- the prompt starts with ``\\n\\nHuman:``; each ``\\n\\nHuman:`` / ``\\n\\nAssistant:`` opens a turn
  (Human → ``user``, Assistant → ``assistant``); the one space after a tag is the format's
  separator and is dropped, everything else is kept verbatim (DESIGN: texts are never stripped);
- two identical responses are no comparison.

Two rules depend on who reads the pair (:func:`parse_pair`'s keywords):

- ``chat_form`` (on by default; training and the benchmarks): the dialogue is a chat the reward
  model's chat template renders as a model saw it: turns alternate, the prompt ends with a Human
  turn, and no turn and no response is empty. ``judge-eval`` turns it off: a judge reads any
  dialogue, and the judge service judges an empty response (a legitimate, bad candidate; in
  harmless-base the human-chosen answer is sometimes the empty one).
- ``single_turn`` (off by default; on for ``judge-eval``): a response that runs on into further
  ``Human:`` / ``Assistant:`` turns is not one answer to the prompt, so the pair is skipped.
  Training keeps such pairs: the committed default head (``services/runtime/default_head``) was
  trained on the seven of the shared test files, and ``train rm --head-only`` must reproduce it.
"""

from __future__ import annotations

import collections
import gzip
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from services.runtime.chat import ChatMessage

HH_FILES = ("helpful-base", "harmless-base")  # the test files of ../shared/data/hh-rlhf, in this order
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


class Malformed(ValueError):
    """A row that does not have the HH shape the caller needs; ``str(exc)`` is the reason rows are counted by."""


class HHPair(NamedTuple):
    """A parsed row: the prompt messages and the two final assistant turns."""

    prompt: tuple[ChatMessage, ...]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class SourcedPair:
    """A parsed row of one of the :data:`HH_FILES`, with where it came from."""

    source: str  # "helpful-base" / "harmless-base"
    index: int  # row number in its file, from 0
    prompt: tuple[ChatMessage, ...]
    chosen: str
    rejected: str


def _strip_separator(text: str) -> str:
    # "Human: hi" -> "hi": the one space after the colon is HH's separator, not content.
    return text.removeprefix(" ")


def parse_dialogue(text: str, *, chat_form: bool = True) -> tuple[ChatMessage, ...]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` as chat messages (Human → user, Assistant → assistant).

    :class:`Malformed` unless it starts with ``\\n\\nHuman:``; with ``chat_form``, also when two
    turns in a row have the same speaker or a turn is empty.
    """
    if not text.startswith(HUMAN):
        raise Malformed("does not start with Human")
    parts = _TURN.split(text)  # ["", speaker, content, speaker, content, ...]
    messages = tuple(
        ChatMessage(_ROLE[speaker], _strip_separator(content))
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    )
    if chat_form:
        if any(prev.role == nxt.role for prev, nxt in itertools.pairwise(messages)):
            raise Malformed("turns do not alternate")
        if any(m.content == "" for m in messages):
            raise Malformed("empty turn")
    return messages


def _runs_on(response: str) -> bool:
    return HUMAN in response or ASSISTANT in response


def parse_pair(chosen: str, rejected: str, *, chat_form: bool = True, single_turn: bool = False) -> HHPair:
    """The prompt (the shared dialogue up to the last ``\\n\\nAssistant:``) and the two final turns.

    :class:`Malformed` with the reason when the row breaks a rule (module docstring); the checks
    run in a fixed order, so a row is always counted under the same reason.
    """
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise Malformed("no Assistant turn")
    head = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(head):
        raise Malformed("chosen and rejected do not share the prompt")
    prompt = parse_dialogue(chosen[:cut], chat_form=chat_form)
    a = _strip_separator(chosen[len(head) :])
    b = _strip_separator(rejected[len(head) :])
    if chat_form:
        if prompt[-1].role != "user":
            raise Malformed("prompt does not end with a Human turn")
        if a == "" or b == "":
            raise Malformed("empty response")
    if single_turn and (_runs_on(a) or _runs_on(b)):
        raise Malformed("a response runs on into further turns")
    if a == b:
        raise Malformed("chosen == rejected")
    return HHPair(prompt, a, b)


def load_pairs(data_dir: Path) -> tuple[list[SourcedPair], dict[str, collections.Counter[str]]]:
    """Every pair of the HH-RLHF test files in ``data_dir`` that parses with the default (training)
    rules, in file order, and per file the skipped rows by reason.

    ``FileNotFoundError`` when one of the :data:`HH_FILES` (``<name>.test.jsonl.gz``) is missing.
    """
    pairs: list[SourcedPair] = []
    skipped: dict[str, collections.Counter[str]] = {}
    for name in HH_FILES:
        path = data_dir / f"{name}.test.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (expected the HH-RLHF test files in {data_dir})")
        reasons: collections.Counter[str] = collections.Counter()
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for index, line in enumerate(fh):
                try:
                    row = json.loads(line)
                    chosen, rejected = row["chosen"], row["rejected"]
                    if not isinstance(chosen, str) or not isinstance(rejected, str):
                        raise TypeError("chosen and rejected must be strings")
                    prompt, a, b = parse_pair(chosen, rejected)
                except Malformed as exc:
                    reasons[str(exc)] += 1
                    continue
                except (KeyError, TypeError, json.JSONDecodeError):
                    reasons["not a {chosen, rejected} JSON row"] += 1
                    continue
                pairs.append(SourcedPair(name, index, prompt, a, b))
        skipped[name] = reasons
    return pairs, skipped
