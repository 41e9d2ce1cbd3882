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

Everything works on token ids of the whole rendered text (never on concatenated strings),
so an untruncated item gets exactly the ids ``tokenizer(rendered)`` gives.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

from services.common.errors import invalid
from services.runtime.chat import ChatMessage
from services.runtime.items import EncodedItem, RewardInput

_HUGE = 10**29  # transformers' "no limit" sentinel for model_max_length is 1e30


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


class Renderer:
    """Turns :class:`RewardInput` into :class:`EncodedItem` for one tokenizer and maximum length."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast (Rust) tokenizer is required: offsets keep prompt truncation exact")
        self.tokenizer = tokenizer
        # Only the sentence-pair and role-line paths let the tokenizer truncate, and both must
        # keep the end (the response). Tokenizers are not thread-safe: one renderer thread.
        tokenizer.truncation_side = "left"
        self.max_length = max_length
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def encode(self, inputs: Sequence[RewardInput]) -> list[EncodedItem]:
        """Encode a request's items: ``text`` and chat-template items in one batched tokenizer
        call each (the Rust tokenizer's per-call overhead dominates short items), the rest one
        by one. The ids are those of the item's own ``tokenizer(rendered)`` call."""
        out: list[EncodedItem | None] = [None] * len(inputs)
        texts: list[tuple[int, str]] = []
        templated: list[tuple[int, str, str]] = []  # index, rendered, rendered prompt part
        heads: dict[tuple[tuple[ChatMessage, ...], bool], str] = {}  # one render per distinct prompt
        for i, item in enumerate(inputs):
            if item.text is not None:
                texts.append((i, item.text))
            elif self.has_template:
                templated.append((i, *self._render(item, heads)))
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
                # Token ends never decrease: the tokens inside the prompt are a prefix of them.
                boundary = bisect_right(offsets, len(prefix), key=lambda o: o[1]) if prefix else 0
                out[i] = self._truncate(list(ids), boundary)
        for i, enc_item in enumerate(out):
            if enc_item is None or enc_item.num_tokens == 0:
                raise invalid("item renders to zero tokens", item=i)
        return [e for e in out if e is not None]

    # -- per form -----------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

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
        full = self._call(text)
        body = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        boundary = sum(1 for _, end in body["offset_mapping"] if end <= len(prefix))
        if len(full["input_ids"]) <= self.max_length:
            return self._item(full, truncated=False, prompt_tokens=boundary)
        # The tokenizer truncates from the left (set in __init__), i.e. the earlier turns first,
        # and keeps its special tokens in place.
        cut = self._call(text, truncation=True, max_length=self.max_length)
        excess = len(full["input_ids"]) - len(cut["input_ids"])
        return self._item(cut, truncated=True, prompt_tokens=max(0, boundary - excess))

    def _encode_sentence_pair(self, prompt: str, response: str) -> EncodedItem:
        full = self._call(prompt, response)
        p_len = len(self._ids(prompt))
        if len(full["input_ids"]) <= self.max_length:
            return self._item(full, truncated=False, prompt_tokens=p_len)
        # Prompt first, from the left; if the response alone is too long, the prompt goes
        # entirely and the response loses its beginning.
        if len(full["input_ids"]) - self.max_length < p_len:
            cut = self._call(prompt, response, truncation="only_first", max_length=self.max_length)
            excess = len(full["input_ids"]) - len(cut["input_ids"])
            return self._item(cut, truncated=True, prompt_tokens=p_len - excess)
        # The whole prompt must go ("only_first" cannot empty the first sequence: it raises).
        alone = self._call("", response)
        if len(alone["input_ids"]) <= self.max_length:
            return self._item(alone, truncated=True, prompt_tokens=0)
        cut = self._call("", response, truncation="only_second", max_length=self.max_length)
        return self._item(cut, truncated=True, prompt_tokens=0)

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

    def _truncate(self, ids: list[int], boundary: int, budget: int | None = None) -> EncodedItem:
        limit = self.max_length if budget is None else budget
        excess = len(ids) - limit
        if excess <= 0:
            return EncodedItem(tuple(ids), truncated=False, prompt_tokens=boundary)
        # Dropping the first `excess` ids removes prompt tokens from the left first and touches
        # the response only once the prompt is gone.
        kept = ids[excess:]
        return EncodedItem(tuple(kept), truncated=True, prompt_tokens=max(0, boundary - excess))
