"""Render, tokenize and truncate reward inputs with the reward model's own tokenizer.

Shared by every backend that runs a Hugging Face tokenizer (torch, onnx). The rules
(DESIGN.md, "Precise contract"):

- ``text`` items are tokenized verbatim with ``add_special_tokens=False``; over the maximum
  they keep their last tokens.
- ``messages`` and ``prompt``+``response`` items go through the model's chat template and the
  rendered string is tokenized with ``add_special_tokens=False``. Without a chat template,
  ``prompt``+``response`` is a sentence pair (``tokenizer(prompt, response)``) and ``messages``
  are ``role: content`` lines.
- Over the maximum, the prompt loses tokens from the left first; only if the response alone
  is too long does it lose its beginning. Either way the item is flagged ``truncated``.

Everything works on token ids of the rendered text (never on concatenated strings), so an
untruncated item gets exactly the ids ``tokenizer(rendered)`` gives.

Cut before you tokenize. A request may carry a 60 MiB conversation of which only the last
``max_length`` tokens survive; tokenizing all of it (with offsets) took minutes and gigabytes.
So the tokenizer only ever sees a *tail window* of a long string: the rendered conversation,
the ``text``, the role lines, either side of a sentence pair. Rendering stays whole (it is
string concatenation: 0.1 s for 60 MiB), so a template's head (SmolLM2's default system
prompt when the first turn is not ``system``) and the prompt part are exactly what they were.
To keep the last ``need`` tokens of a string (``max_length`` less the special tokens the
tokenizer adds, and for a pair's prompt the room the response leaves), with windows of
``span(k) = F * 2 ** k + k`` characters, ``F = _CHARS_PER_TOKEN * (need + _SURPLUS)``, for
``k`` = 0 to ``_DOUBLINGS``:

1. A string that window ``k + 1`` would cover entirely is tokenized whole, exactly as before.
   So every string of up to ``span(1)`` characters is (all untruncated items of ordinary size;
   ``text`` and chat-template ones in one batched call, as before).
2. Otherwise window ``k`` is the string's last ``span(k)`` characters, its start moved back (at
   most ``_REACH`` characters) to just after a word (a non-space followed by a space). For
   byte-level BPE with the GPT-2 split pattern (SmolLM2, GPT-2; with or without split digits)
   such a point splits the tokenization: the window's tokens are exactly the string's tokens
   after it. Inside a run with no such point, the odd distance between two windows' starts
   (``F`` is a multiple of 6) makes periodic tokens (``aaaa`` BPE merges, digits in threes)
   disagree, so a start inside such a run is noticed, not accepted.
3. Window ``k`` is accepted once it has at least ``need + _SURPLUS`` tokens and window ``k + 1``
   gives the same last ``need + _SURPLUS // 2`` tokens, ids and character offsets alike:
   whatever the cut changed (a split word, a normalizer or a pattern looking across it) has
   died out before the kept tokens. The kept tokens, the ``truncated`` flag, the prompt tokens
   among them (from the offsets) and the tokenizer's own truncation of the window (pairs, role
   lines) then come out as tokenizing everything and cutting would give them.

What that guarantees: every untruncated item's ids are exactly ``tokenizer(rendered)``'s, and a
truncated item's ids, ``truncated``, ``prompt_tokens`` and ``token_type_ids`` are those of
tokenizing everything, whenever tokenization after the cut does not depend on where a run
more than a window long started: 0 differences on the first 1,000 rows of both HH-RLHF test
files with SmolLM2 at 32 to 256 tokens, in every item form, and on hostile strings of 2 million
characters (random Unicode without spaces, newlines only, emoji, CJK, digits), checked by
``scripts/check_truncation_parity.py``. Two kinds of input are cut without that guarantee,
after the largest window: a single pre-token longer than it (a run with no split point: BPE
merges ``"a" * 2_000_001`` from its own start, so its last token is ``a``, not the window's
``aaaa``), and a tail whose largest window has fewer than ``need + _SURPLUS`` tokens (tokens
over ``_CHARS_PER_TOKEN * 2 ** _DOUBLINGS`` = 96 characters on average: a WordPiece word over
its 100-character limit is one ``[UNK]``, a normalizer may drop characters; SmolLM2's longest
token is 81 characters). Such an item keeps the largest window's last tokens and is flagged
``truncated``.

The work per item is therefore bounded by its kept length, not its size: a tokenizer call sees
at most ``span(_DOUBLINGS) + _REACH`` = 96 × (need + 32) + 68 characters of it, and usually two
calls do: window 0, then window 1 (or the whole string, when window 2 would cover it).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import invalid
from services.runtime.chat import ChatMessage
from services.runtime.items import EncodedItem, RewardInput

_HUGE = 10**29  # transformers' "no limit" sentinel for model_max_length is 1e30

# The window rule (module docstring). 6 characters per token is above the average of English,
# code and CJK for byte-level BPE vocabularies (SmolLM2: ~4.3 on HH-RLHF), so the first window
# usually suffices; the 32 surplus tokens absorb the cut's effect on the window's first tokens.
_CHARS_PER_TOKEN = 6
_SURPLUS = 32
_DOUBLINGS = 4
_REACH = 64
_WORD_END = re.compile(r"\S(?=\s)")


def model_max_length(tokenizer: Any, config: Any, override: int | None) -> int:
    """``--max-length`` if given, else min(tokenizer.model_max_length when real, max_position_embeddings)."""
    if override is not None:
        return int(override)
    candidates = []
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int | float) and 0 < tml < _HUGE:
        candidates.append(int(tml))
    mpe = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(mpe, int) and mpe > 0:
        candidates.append(mpe)
    if not candidates:
        raise ValueError("cannot tell the model's maximum length; pass --max-length")
    return min(candidates)


def _as_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _lines(messages: Sequence[ChatMessage]) -> str:
    return "".join(f"{m.role}: {m.content}\n" for m in messages)


def _span(need: int, doubling: int = 0) -> int:
    """Characters in window ``doubling`` (module docstring, step 2)."""
    return ((_CHARS_PER_TOKEN * (max(need, 0) + _SURPLUS)) << doubling) + doubling


def _snap(text: str, pos: int) -> int:
    """``pos`` moved back to just after a word (within ``_REACH`` characters), else ``pos``."""
    lo = max(1, pos - _REACH)
    last = None
    for last in _WORD_END.finditer(text, lo - 1, pos + 1):  # noqa: B007  # only the last match counts
        pass
    return last.end() if last is not None else pos


@dataclass(frozen=True)
class _Window:
    """Tokens (no special tokens) of ``text[start:]``, offsets relative to the whole ``text``.

    ``whole`` (``start == 0``): exactly ``tokenizer(text)``. Otherwise the last ``need`` ids and
    offsets are those of the whole text, which has more than ``need`` tokens (but for the
    exceptions of the module docstring)."""

    start: int
    ids: list[int]
    offsets: list[tuple[int, int]]

    @property
    def whole(self) -> bool:
        return self.start == 0


class Renderer:
    """Turns :class:`RewardInput` into :class:`EncodedItem` for one tokenizer and maximum length."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast (Rust) tokenizer is required: offsets keep prompt truncation exact")
        self.tokenizer = tokenizer
        # Only the sentence-pair and role-line paths let the tokenizer truncate, and both must
        # keep the end (the response). Tokenizers are not thread-safe: a Renderer belongs to one
        # thread (backends give each tokenizing thread its own copy, services/runtime/tokenizers.py).
        tokenizer.truncation_side = "left"
        self.max_length = max_length
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self._wrap = _special_wrap(tokenizer)

    def encode(self, inputs: Sequence[RewardInput]) -> list[EncodedItem]:
        """Encode a request's items: short ``text`` and chat-template items in one batched
        tokenizer call each (the Rust tokenizer's per-call overhead dominates short items),
        the rest one by one, long strings through a tail window (module docstring). The ids
        are those of the item's own ``tokenizer(rendered)`` call, cut to the maximum."""
        out: list[EncodedItem | None] = [None] * len(inputs)
        texts: list[tuple[int, str]] = []
        templated: list[tuple[int, str, str]] = []  # index, rendered, rendered prompt part
        heads: dict[tuple[tuple[ChatMessage, ...], bool], str] = {}  # one render per distinct prompt
        short = _span(self.max_length, 1)  # tokenized whole by the window rule too
        for i, item in enumerate(inputs):
            if item.token_ids is not None:
                out[i] = self._encode_ids(item.token_ids, i)
            elif item.text is not None and item.add_special_tokens:
                out[i] = self._encode_with_specials(item.text)
            elif item.text is not None:
                if len(item.text) <= short:
                    texts.append((i, item.text))
                else:
                    out[i] = self._encode_long(item.text, "")
            elif self.has_template:
                rendered, prefix = self._render(item, heads)
                if len(rendered) <= short:
                    templated.append((i, rendered, prefix))
                else:  # encoded now, so that only one long rendering is held at a time
                    out[i] = self._encode_long(rendered, prefix)
            elif item.messages is not None:
                out[i] = self._encode_lines(item.messages)
            else:
                assert item.prompt is not None and item.response is not None
                prompt = item.prompt if isinstance(item.prompt, str) else _lines(item.prompt)
                out[i] = self._encode_sentence_pair(prompt, item.response)
        if texts:
            batch = self.tokenizer([t for _, t in texts], add_special_tokens=False)["input_ids"]
            for (i, _), ids in zip(texts, batch, strict=True):
                keep = ids[-self.max_length :] if len(ids) > self.max_length else ids
                out[i] = EncodedItem(tuple(keep), truncated=len(keep) < len(ids))
        if templated:
            enc = self.tokenizer([r for _, r, _ in templated], add_special_tokens=False, return_offsets_mapping=True)
            for (i, _, prefix), ids, offsets in zip(templated, enc["input_ids"], enc["offset_mapping"], strict=True):
                out[i] = self._truncate(list(ids), _prompt_tokens(offsets, prefix))
        for i, enc_item in enumerate(out):
            if enc_item is None or enc_item.num_tokens == 0:
                raise invalid("item renders to zero tokens", item=i)
        return [e for e in out if e is not None]

    # -- the tail window ----------------------------------------------------------------------

    def _tokens(self, text: str, start: int) -> _Window:
        enc = self.tokenizer(text[start:], add_special_tokens=False, return_offsets_mapping=True)
        offsets = [(a + start, b + start) for a, b in enc["offset_mapping"]] if start else list(enc["offset_mapping"])
        return _Window(start, list(enc["input_ids"]), offsets)

    def _window(self, text: str, need: int) -> _Window:
        """The last ``need`` tokens of ``text`` (and whether there are more) without tokenizing
        more than a bounded tail of it: the rule of the module docstring."""
        candidate: _Window | None = None
        compared = need + _SURPLUS // 2
        for doubling in range(_DOUBLINGS + 1):
            if doubling < _DOUBLINGS and len(text) <= _span(need, doubling + 1):
                return self._tokens(text, 0)  # the next window would be all of it anyway
            window = self._tokens(text, _snap(text, len(text) - _span(need, doubling)))
            if (
                candidate is not None
                and window.ids[-compared:] == candidate.ids[-compared:]
                and window.offsets[-compared:] == candidate.offsets[-compared:]
            ):
                return candidate
            # Too few tokens to cut, or the cut still shows in the compared ones: start further back.
            candidate = window if len(window.ids) >= need + _SURPLUS else None
        return window  # the exceptions of the module docstring

    def _encode_long(self, text: str, prefix: str) -> EncodedItem:
        """A ``text`` (``prefix`` "") or rendered chat item too long for the batched call."""
        window = self._window(text, self.max_length)
        if window.whole:
            return self._truncate(window.ids, _prompt_tokens(window.offsets, prefix))
        keep = window.offsets[-self.max_length :]
        return EncodedItem(
            tuple(window.ids[-self.max_length :]), truncated=True, prompt_tokens=_prompt_tokens(keep, prefix)
        )

    # -- per form -----------------------------------------------------------------------------

    def _encode_with_specials(self, text: str) -> EncodedItem:
        """``tokenizer(text)`` with its special tokens, cut to the maximum: the plain ids (through the
        tail window when long) between the tokenizer's special prefix and suffix."""
        if self._wrap is None:  # the special tokens change how the text splits: tokenize all of it
            ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
            whole = True
        else:
            window = (
                self._tokens(text, 0) if len(text) <= _span(self.max_length, 1) else self._window(text, self.max_length)
            )
            prefix, suffix = self._wrap
            ids, whole = [*prefix, *window.ids, *suffix], window.whole
        keep = ids[-self.max_length :] if len(ids) > self.max_length else ids
        return EncodedItem(tuple(keep), truncated=not whole or len(keep) < len(ids))

    def _encode_ids(self, ids: tuple[int, ...], i: int) -> EncodedItem:
        """Token ids as given; an id the tokenizer does not know would index past the embeddings."""
        vocab = len(self.tokenizer)
        top = max(ids)
        if top >= vocab:
            raise invalid(f"token id {top} is outside the vocabulary (0..{vocab - 1})", item=i)
        keep = ids[-self.max_length :] if len(ids) > self.max_length else ids
        return EncodedItem(tuple(keep), truncated=len(keep) < len(ids))

    def _render(self, item: RewardInput, heads: dict[tuple[tuple[ChatMessage, ...], bool], str]) -> tuple[str, str]:
        """``(rendered, prompt part)`` with the chat template; the prompt part is "" when the
        template re-renders earlier turns (then the item counts as prompt-less)."""
        if item.messages is not None:
            conversation = list(item.messages)
            head = conversation[:-1]
            generation_prompt = conversation[-1].role == "assistant"
        else:
            assert item.prompt is not None and item.response is not None
            head = [ChatMessage("user", item.prompt)] if isinstance(item.prompt, str) else list(item.prompt)
            conversation = [*head, ChatMessage("assistant", item.response)]
            generation_prompt = True
        rendered = self.tokenizer.apply_chat_template(_as_dicts(conversation), tokenize=False)
        prefix = ""
        if head:
            key = (tuple(head), generation_prompt)
            if key not in heads:
                heads[key] = self.tokenizer.apply_chat_template(
                    _as_dicts(head), tokenize=False, add_generation_prompt=generation_prompt
                )
            prefix = heads[key]
            if not rendered.startswith(prefix):
                prefix = ""  # template re-renders earlier turns; treat everything as prompt-less
        return str(rendered), str(prefix)

    def _encode_lines(self, messages: Sequence[ChatMessage]) -> EncodedItem:
        prefix = _lines(messages[:-1])
        text = prefix + _lines(messages[-1:])
        need = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=False)
        window = self._window(text, need)
        if not window.whole:
            # The tokenizer truncates from the left (set in __init__), i.e. the earlier turns
            # first, and keeps its special tokens in place; the window's extra tokens go first.
            cut = self._call(text[window.start :], truncation=True, max_length=self.max_length)
            return self._item(cut, truncated=True, prompt_tokens=_lines_prompt(window, prefix, need))
        full = self._call(text)
        boundary = sum(1 for _, end in window.offsets if end <= len(prefix))
        if len(full["input_ids"]) <= self.max_length:
            return self._item(full, truncated=False, prompt_tokens=boundary)
        cut = self._call(text, truncation=True, max_length=self.max_length)
        excess = len(full["input_ids"]) - len(cut["input_ids"])
        return self._item(cut, truncated=True, prompt_tokens=max(0, boundary - excess))

    def _encode_sentence_pair(self, prompt: str, response: str) -> EncodedItem:
        # Every count here is of tokens without special tokens: the pair's specials come on top.
        room = self.max_length - self.tokenizer.num_special_tokens_to_add(pair=True)
        answer = self._window(response, room)
        if not answer.whole or len(answer.ids) > room:
            # The response alone is too long: the prompt goes entirely ("only_first" cannot
            # empty the first sequence: it raises) and the response loses its beginning.
            tail = response[answer.start :]
            return self._item(self._only_second(tail), truncated=True, prompt_tokens=0)
        room -= len(answer.ids)
        question = self._window(prompt, room)
        if question.whole and len(question.ids) <= room:
            return self._item(self._call(prompt, response), truncated=False, prompt_tokens=len(question.ids))
        if room > 0:  # the prompt loses tokens from the left, keeping `room` of them
            cut = self._call(prompt[question.start :], response, truncation="only_first", max_length=self.max_length)
            return self._item(cut, truncated=True, prompt_tokens=min(room, len(question.ids)))
        # The response fills the maximum exactly: none of the prompt fits.
        return self._item(self._call("", response), truncated=True, prompt_tokens=0)

    def _only_second(self, response: str) -> Any:
        alone = self._call("", response)
        if len(alone["input_ids"]) <= self.max_length:
            return alone
        return self._call("", response, truncation="only_second", max_length=self.max_length)

    def _call(self, text: str, pair: str | None = None, **kw: Any) -> Any:
        return self.tokenizer(text, pair, **kw) if pair is not None else self.tokenizer(text, **kw)

    @staticmethod
    def _item(enc: Any, *, truncated: bool, prompt_tokens: int) -> EncodedItem:
        tt = enc.get("token_type_ids")
        return EncodedItem(
            tuple(enc["input_ids"]),
            truncated=truncated,
            token_type_ids=tuple(tt) if tt is not None else None,
            prompt_tokens=prompt_tokens,
        )

    def _truncate(self, ids: list[int], boundary: int) -> EncodedItem:
        excess = len(ids) - self.max_length
        if excess <= 0:
            return EncodedItem(tuple(ids), truncated=False, prompt_tokens=boundary)
        # Dropping the first `excess` ids removes prompt tokens from the left first and touches
        # the response only once the prompt is gone.
        kept = ids[excess:]
        return EncodedItem(tuple(kept), truncated=True, prompt_tokens=max(0, boundary - excess))


def _special_wrap(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The ids ``tokenizer(text)`` puts before and after a text's own ids (BOS, [CLS] ... [SEP]),
    found on a probe; None when the text's ids do not appear unchanged between them."""
    probe = "Hello world, 12 ok."
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return tuple(full[:k]), tuple(full[k + len(plain) :])
    return None


def _prompt_tokens(offsets: Sequence[tuple[int, int]], prefix: str) -> int:
    """How many of these tokens lie inside the rendered prompt ``prefix``: token ends never
    decrease, so they are a prefix of them."""
    return bisect_right(offsets, len(prefix), key=lambda o: o[1]) if prefix else 0


def _lines_prompt(window: _Window, prefix: str, need: int) -> int:
    # As for the whole text: the prompt's tokens, less those the tokenizer's truncation removes.
    boundary = sum(1 for _, end in window.offsets if end <= len(prefix))
    return max(0, boundary - max(0, len(window.ids) - need))
