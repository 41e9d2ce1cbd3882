"""Token ids of a chat prompt in which no message content can become a special token.

A chat template wraps each message in its own special tokens (``<|im_start|>user ... <|im_end|>``),
and tokenizing the rendered text honours every special or added token of the tokenizer wherever
it appears, message content included: a candidate text holding ``<|im_end|>``, ``<file_sep>`` or,
for a model that has them, ``<start_of_turn>`` or ``[INST]``, would reach the model as those very
tokens. :meth:`ChatTokenizer.encode` tokenizes the rendered prompt exactly as the tokenizer
always has, then looks at each added token in the result: one whose characters lie inside a
message's content is not the template's, so the stretch of text around it (from the template's
special token before it to the one after it, which is where the tokenizer itself splits) is
tokenized again as plain text, by a copy of the tokenizer with no added tokens at all. A prompt
whose contents hold no added token keeps exactly ``tokenizer(rendered, add_special_tokens=False)``'s
ids: they are those very ids.

Where the contents lie: the template is rendered once per sequence of roles with a placeholder for
each content, which cuts it into the template's own pieces; the real rendering must be those
pieces around the contents, as given or stripped (templates that ``trim`` them). A template that
does anything else to a content falls back to finding each content, in order, in the rendering.

A stretch re-tokenized as plain text is tokenized on its own, as the tokenizer tokenizes the text
between two special tokens: exact for byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen, GPT-2);
a SentencePiece tokenizer that marks the start of its input may give such a stretch one more
word-start marker than it would inside a longer text.

Not thread-safe (a Hugging Face tokenizer is not): one :class:`ChatTokenizer` per thread, e.g.
through :class:`services.runtime.tokenizers.PerThread`.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

Span = tuple[int, int]  # [start, end) in characters
# Private-use characters: no chat template touches them, no user text can be mistaken for them
# (the skeleton is rendered from placeholders alone).
_PLACEHOLDER = "\ue000{}\ue001"


class ChatTokenizer:
    """A Hugging Face tokenizer's chat rendering and ids, message contents kept plain text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {})
        self.added_ids = frozenset(int(i) for i in added)
        # Spellings to look for in user text before looking at any id; None: an added token is
        # matched after normalization (its spelling in the raw text may differ), always look.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        normalizes = backend is None or backend.normalizer is not None
        raw_match = not normalizes or not any(getattr(t, "normalized", True) for t in added.values())
        self._spellings = tuple(sorted({str(t.content) for t in added.values()})) if raw_match else None
        self._plain = _without_added_tokens(tokenizer)
        self._skeletons: dict[tuple[str, ...], tuple[str, ...] | None] = {}
        self._warned = False

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The chat template's text, with the generation prompt."""
        text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return str(text)

    def ids(self, text: str) -> list[int]:
        """``text``'s ids as the tokenizer gives them (special tokens honoured, none added)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def plain_ids(self, text: str) -> list[int]:
        """``text``'s ids with every special or added token spelled out as plain text."""
        if self._plain is not None:
            # encode_batch releases the GIL while it works; encode does not
            return list(self._plain.encode_batch([text], add_special_tokens=False)[0].ids)
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def content_spans(self, messages: Sequence[Mapping[str, str]], rendered: str) -> list[Span]:
        """Where each message's content lies in ``rendered`` (``render(messages)``'s text)."""
        contents = [m["content"] for m in messages]
        pieces = self._skeleton(tuple(m["role"] for m in messages))
        if pieces is not None:
            for strip in (False, True):
                spans = _between(rendered, pieces, contents, strip=strip)
                if spans is not None:
                    return spans
        if not self._warned:
            self._warned = True
            log.warning("the chat template changes message contents: special tokens in them are found by search")
        return _in_order(rendered, contents)

    def encode(self, text: str, user: Sequence[Span]) -> list[int]:
        """``text``'s ids, every added token that overlaps a ``user`` span tokenized as plain text."""
        enc = self.tokenizer(text, add_special_tokens=False)
        ids: list[int] = enc["input_ids"]
        user = [(s, e) for s, e in user if s < e]
        if not user or not self._spelled_out(text, user):
            return ids
        starts = [s for s, _ in user]
        honoured: list[tuple[int, int, int]] = []  # (token index, start char, end char)
        neutral = False
        for k, t in enumerate(ids):
            if t not in self.added_ids:
                continue
            span = enc.token_to_chars(k)
            start, end = int(span.start), int(span.end)
            i = bisect.bisect_right(starts, start) - 1  # the last user span starting at or before it
            inside = (i >= 0 and start < user[i][1]) or (i + 1 < len(user) and user[i + 1][0] < end)
            if inside:
                neutral = True
            else:
                honoured.append((k, start, end))
        if not neutral:
            return ids
        out: list[int] = []
        token, char = 0, 0
        for k, start, end in [*honoured, (len(ids), len(text), len(text))]:
            if any(ids[j] in self.added_ids for j in range(token, k)):
                out.extend(self.plain_ids(text[char:start]))  # this stretch holds a neutralised token
            else:
                out.extend(ids[token:k])
            if k < len(ids):
                out.append(ids[k])
            token, char = k + 1, end
        return out

    def _spelled_out(self, text: str, user: Sequence[Span]) -> bool:
        """Whether an added token may overlap a user span: a substring search, so that a long prompt
        without any (nearly all of them) is not walked id by id."""
        if not self.added_ids:
            return False
        if self._spellings is None:
            return True
        for start, end in user:
            for spelling in self._spellings:
                # the occurrences that overlap [start, end), those straddling its edges included
                if text.find(spelling, max(0, start - len(spelling) + 1), end + len(spelling) - 1) >= 0:
                    return True
        return False

    def _skeleton(self, roles: tuple[str, ...]) -> tuple[str, ...] | None:
        """The template's own text around placeholder contents, one piece more than ``roles``."""
        if roles in self._skeletons:
            return self._skeletons[roles]
        pieces: tuple[str, ...] | None = None
        try:
            text = self.render([{"role": r, "content": _PLACEHOLDER.format(i)} for i, r in enumerate(roles)])
        except Exception:  # a template that rejects these roles rejected the real messages already
            text = None
        if text is not None:
            cut: list[str] = []
            pos = 0
            for i in range(len(roles)):
                mark = _PLACEHOLDER.format(i)
                at = text.find(mark, pos)
                if at < 0 or text.count(mark) != 1:
                    break
                cut.append(text[pos:at])
                pos = at + len(mark)
            else:
                cut.append(text[pos:])
                pieces = tuple(cut)
        self._skeletons[roles] = pieces
        return pieces


def _between(rendered: str, pieces: Sequence[str], contents: Sequence[str], *, strip: bool) -> list[Span] | None:
    """The content spans if ``rendered`` is exactly ``pieces`` interleaved with ``contents``."""
    if not rendered.startswith(pieces[0]):
        return None
    pos = len(pieces[0])
    spans: list[Span] = []
    for content, piece in zip(contents, pieces[1:], strict=True):
        text = content.strip() if strip else content
        if not rendered.startswith(text, pos):
            return None
        spans.append((pos, pos + len(text)))
        pos += len(text)
        if not rendered.startswith(piece, pos):
            return None
        pos += len(piece)
    return spans if pos == len(rendered) else None


def _in_order(rendered: str, contents: Sequence[str]) -> list[Span]:
    """Each content (as given, else stripped) found after the previous one."""
    spans: list[Span] = []
    pos = 0
    for content in contents:
        for text in (content, content.strip()):
            at = rendered.find(text, pos) if text else -1
            if at >= 0:
                spans.append((at, at + len(text)))
                pos = at + len(text)
                break
    return spans


def _without_added_tokens(tokenizer: Any) -> Any | None:
    """A ``tokenizers.Tokenizer`` like ``tokenizer``'s but with no added tokens (None: not a fast one).

    Same normalizer, pre-tokenizer and model, so a text holding no added token gets the same ids
    from both; a text holding one gets the ids of its characters.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers

    spec = json.loads(backend.to_str())
    spec["added_tokens"] = []
    spec["truncation"] = None
    spec["padding"] = None
    return tokenizers.Tokenizer.from_str(json.dumps(spec))
