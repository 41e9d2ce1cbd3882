"""Benchmark inputs: HH-RLHF dialogues or a JSONL file, cut from the left to a token cap.

Every text the bench sends is a pre-rendered ``{"text": ...}`` item whose token count the
reward model's own tokenizer gives exactly (the server tokenizes ``text`` items verbatim, so
the load generator, the in-process limit and the reference all see the same ids). Dialogues are
rendered with the model's chat template (or HH's ``Human:/Assistant:`` lines without one) and
lose tokens from the left, like a trainer's long prompts do.

The GRPO-shaped load keeps the ``{prompt, response}`` form instead: one real HH prompt with
G responses per request, so that the server can see the shared prompt. Its prompts lose whole
turns from the left until every item fits the cap.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("../shared/data/hh-rlhf")


class TextsError(ValueError):
    """Unusable input (missing file, bad row, nothing fits the cap): a one-line CLI error."""


@dataclass(frozen=True)
class BenchText:
    """One ``{"text"}`` item and its exact token count under the model's tokenizer."""

    text: str
    num_tokens: int

    def wire(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True)
class GrpoGroup:
    """One prompt (chat messages) and its G responses: one request of the GRPO-shaped load."""

    prompt: tuple[tuple[str, str], ...]  # (role, content)
    responses: tuple[str, ...]
    prompt_tokens: int = 0  # the items' common token prefix (what prefix sharing can skip)
    item_tokens: tuple[int, ...] = ()

    def wire(self) -> list[dict[str, Any]]:
        messages = [{"role": r, "content": c} for r, c in self.prompt]
        return [{"prompt": messages, "response": resp} for resp in self.responses]


# -- raw sources ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _hh_rows(data_dir: Path) -> list[tuple[tuple[tuple[str, str], ...], str, str]]:
    """(prompt messages, chosen, rejected) of every parseable HH row, in file order (parsed once)."""
    from rlhf_train.hh_rlhf import load_pairs

    try:
        pairs, _skipped = load_pairs(data_dir)
    except FileNotFoundError as exc:
        raise TextsError(f"{exc}; see --data-dir") from None
    return [(tuple((m.role, m.content) for m in p.prompt), p.chosen, p.rejected) for p in pairs]


def _jsonl_conversations(path: Path) -> list[list[dict[str, str]] | str]:
    """Rows of a JSONL file as raw text (``{"text"}``) or a conversation (``{prompt, response}``)."""
    if not path.is_file():
        raise TextsError(f"{path}: no such file")
    out: list[list[dict[str, str]] | str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TextsError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                out.append(row["text"])
            elif isinstance(row, dict) and isinstance(row.get("response"), str) and "prompt" in row:
                p = row["prompt"]
                head = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
                out.append([*head, {"role": "assistant", "content": row["response"]}])
            else:
                raise TextsError(f'{path}:{lineno}: a row needs "text" or "prompt" + "response"')
    if not out:
        raise TextsError(f"{path}: no rows")
    return out


# -- rendering and truncation -----------------------------------------------------------------


def render(tokenizer: Any, conversation: Sequence[dict[str, str]]) -> str:
    """The conversation as the model reads it: its chat template, else HH's own lines."""
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(list(conversation), tokenize=False))
    names = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names.get(m['role'], m['role'])}: {m['content']}" for m in conversation)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_left(tokenizer: Any, text: str, max_tokens: int) -> BenchText | None:
    """``text`` cut to its last ``max_tokens`` tokens, as a string that re-tokenizes to exactly
    those ids (a cut can split a merge; then one more token goes). None if no cut round-trips."""
    ids = _ids(tokenizer, text)
    if len(ids) <= max_tokens:
        return BenchText(text, len(ids)) if ids else None
    for drop in range(8):
        keep = ids[len(ids) - max_tokens + drop :]
        cut = tokenizer.decode(keep, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if _ids(tokenizer, cut) == keep:
            return BenchText(cut, len(keep))
    return None


def load_texts(
    tokenizer: Any,
    source: str,
    *,
    num_texts: int,
    max_tokens: int,
    data_dir: Path = DEFAULT_DATA_DIR,
    seed: int = 0,
) -> list[BenchText]:
    """``num_texts`` texts, a seeded sample of ``source`` ("hh" or a JSONL path), each ≤ ``max_tokens``."""
    if source == "hh":
        conversations: list[list[dict[str, str]] | str] = [
            [*({"role": r, "content": c} for r, c in prompt), {"role": "assistant", "content": chosen}]
            for prompt, chosen, _ in _hh_rows(data_dir)
        ]
    else:
        conversations = _jsonl_conversations(Path(source))
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    texts: list[BenchText] = []
    for i in order:
        conv = conversations[i]
        rendered = conv if isinstance(conv, str) else render(tokenizer, conv)
        cut = truncate_left(tokenizer, rendered, max_tokens)
        if cut is not None:
            texts.append(cut)
        if len(texts) == num_texts:
            return texts
    if source != "hh" and texts:
        # A small file: cycle through it so that every run has the load it asked for.
        return [texts[i % len(texts)] for i in range(num_texts)]
    raise TextsError(f"only {len(texts)} usable texts in {source}, {num_texts} asked for")


def load_grpo_groups(
    tokenizer: Any,
    *,
    num_groups: int,
    group_size: int,
    max_tokens: int,
    data_dir: Path = DEFAULT_DATA_DIR,
    seed: int = 0,
    min_prompt_tokens: int = 0,
) -> list[GrpoGroup]:
    """Real HH prompts, each with ``group_size`` responses: its chosen and rejected turns, then
    responses of other dialogues (a seeded draw). Prompts lose whole turns from the left until
    every rendered item fits ``max_tokens``; a prompt whose last turn alone does not fit is skipped."""
    if group_size < 1:
        raise TextsError("--grpo needs G >= 1")
    rows = _hh_rows(data_dir)
    rng = random.Random(seed)
    pool = [r for _, c, rj in rows for r in (c, rj)]
    order = list(range(len(rows)))
    rng.shuffle(order)
    groups: list[GrpoGroup] = []
    for i in order:
        prompt, chosen, rejected = rows[i]
        responses = [chosen, rejected][:group_size]
        while len(responses) < group_size:
            responses.append(pool[rng.randrange(len(pool))])
        fitted = _fit_prompt(tokenizer, prompt, responses, max_tokens)
        if fitted is None:
            continue
        head = [{"role": r, "content": c} for r, c in fitted]
        ids = [_ids(tokenizer, render(tokenizer, [*head, {"role": "assistant", "content": r}])) for r in responses]
        shared = _common_prefix(ids)
        if shared >= min_prompt_tokens:
            groups.append(GrpoGroup(fitted, tuple(responses), shared, tuple(len(x) for x in ids)))
        if len(groups) == num_groups:
            return groups
    raise TextsError(
        f"only {len(groups)} HH prompts fit {max_tokens} tokens with {group_size} responses"
        + (f" and a prompt of at least {min_prompt_tokens} tokens" if min_prompt_tokens else "")
    )


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _fit_prompt(
    tokenizer: Any, prompt: tuple[tuple[str, str], ...], responses: Sequence[str], max_tokens: int
) -> tuple[tuple[str, str], ...] | None:
    longest = max(responses, key=len)
    for start in range(0, len(prompt), 2):  # drop (user, assistant) turn pairs: still starts with user
        head = prompt[start:]
        conv = [*({"role": r, "content": c} for r, c in head), {"role": "assistant", "content": longest}]
        if len(_ids(tokenizer, render(tokenizer, conv))) > max_tokens:
            continue
        if all(
            len(_ids(tokenizer, render(tokenizer, [*conv[:-1], {"role": "assistant", "content": r}]))) <= max_tokens
            for r in responses
        ):
            return head
    return None
