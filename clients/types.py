"""Typed inputs and results of the clients (shared by the sync and async twins and both transports).

Inputs of the reward service are the wire dicts (``{"text"}``, ``{"prompt", "response"}``,
``{"messages"}``) or the small helpers :class:`Text`, :class:`Pair`, :class:`Conversation`.
A failed item is a ``None`` in :class:`ScoreResults` with its reason in ``.errors``; a judgment
that could not be made has ``preference is None`` and says why (``abstain_reason`` or ``error``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Message = Mapping[str, str]
Prompt = str | Sequence[Message]
Priority = Literal["online", "batch"]


# -- reward inputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """Already rendered text, scored verbatim (no special tokens added)."""

    text: str

    def to_wire(self) -> dict[str, Any]:
        return {"text": self.text}


@dataclass(frozen=True)
class Pair:
    """A prompt (string or chat messages) and the response to score."""

    prompt: Prompt
    response: str

    def to_wire(self) -> dict[str, Any]:
        return {"prompt": _prompt_wire(self.prompt), "response": self.response}


@dataclass(frozen=True)
class Conversation:
    """A whole conversation whose last message is scored."""

    messages: Sequence[Message]

    def to_wire(self) -> dict[str, Any]:
        return {"messages": [_message_wire(m) for m in self.messages]}


RewardItem = Mapping[str, Any] | Text | Pair | Conversation


def _message_wire(m: Any) -> dict[str, str]:
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise TypeError("a message is a mapping with string 'role' and 'content'")
    return {"role": m["role"], "content": m["content"]}


def _prompt_wire(p: Any) -> str | list[dict[str, str]]:
    if isinstance(p, str):
        return p
    if isinstance(p, Sequence) and not isinstance(p, bytes | bytearray):
        return [_message_wire(m) for m in p]
    raise TypeError("a prompt is a string or a list of messages")


def item_to_wire(x: Any) -> dict[str, Any]:
    """One reward input in its wire form; TypeError/ValueError when it is none of the three forms."""
    if isinstance(x, Text | Pair | Conversation):
        return x.to_wire()
    if not isinstance(x, Mapping):
        raise TypeError(f"an item is a dict or Text/Pair/Conversation, not {type(x).__name__}")
    keys = set(x)
    if keys == {"text"}:
        if not isinstance(x["text"], str):
            raise TypeError("'text' must be a string")
        return {"text": x["text"]}
    if keys == {"prompt", "response"}:
        if not isinstance(x["response"], str):
            raise TypeError("'response' must be a string")
        return {"prompt": _prompt_wire(x["prompt"]), "response": x["response"]}
    if keys == {"messages"}:
        if isinstance(x["messages"], str | bytes) or not isinstance(x["messages"], Sequence):
            raise TypeError("'messages' must be a list of messages")
        return {"messages": [_message_wire(m) for m in x["messages"]]}
    raise ValueError(f"an item has exactly the keys text, prompt+response, or messages; got {sorted(keys)}")


# -- reward results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemError:
    """Why one item has no result: the service's error code and message."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Normalization:
    mean: float
    std: float
    source: str


@dataclass(frozen=True)
class ModelRef:
    """The model that produced the scores (scores of different revisions never mix)."""

    id: str
    revision: str
    normalization: Normalization | None = None


class ScoreResults(list[float | None]):
    """``list[float | None]``: the raw score of each input, in input order; ``None`` where an item
    failed, with the reason in ``errors[index]``.

    Also: ``num_tokens`` and ``truncated`` per item (None for a failed item), ``normalized`` (when
    the call asked for normalisation), ``vectors`` (every head output, vector heads only) and
    ``model``.
    """

    errors: dict[int, ItemError]
    num_tokens: list[int | None]
    truncated: list[bool | None]
    normalized: list[float | None] | None
    vectors: list[tuple[float, ...] | None] | None
    model: ModelRef | None

    def __init__(
        self,
        scores: Iterable[float | None] = (),
        *,
        errors: Mapping[int, ItemError] | None = None,
        num_tokens: Sequence[int | None] | None = None,
        truncated: Sequence[bool | None] | None = None,
        normalized: Sequence[float | None] | None = None,
        vectors: Sequence[tuple[float, ...] | None] | None = None,
        model: ModelRef | None = None,
    ) -> None:
        super().__init__(scores)
        n = len(self)
        self.errors = dict(errors or {})
        self.num_tokens = list(num_tokens) if num_tokens is not None else [None] * n
        self.truncated = list(truncated) if truncated is not None else [None] * n
        self.normalized = list(normalized) if normalized is not None else None
        self.vectors = list(vectors) if vectors is not None and any(v for v in vectors) else None
        self.model = model

    @property
    def ok(self) -> bool:
        """True when every item has a score."""
        return not self.errors

    @property
    def failure_rate(self) -> float:
        return len(self.errors) / len(self) if len(self) else 0.0

    def __repr__(self) -> str:
        return f"ScoreResults({list.__repr__(self)}, errors={self.errors!r})"


@dataclass(frozen=True)
class CompareResult:
    """Bradley-Terry comparison of several responses: P(i best) = softmax(scores)[i]."""

    scores: list[float]
    probabilities: list[float]
    ranking: list[int]
    model: ModelRef | None = None


@dataclass(frozen=True)
class Limits:
    max_items_per_request: int
    max_body_bytes: int
    max_text_bytes: int
    max_batch_tokens: int
    max_request_tokens: int = 0  # 0: the server did not say (a release before 0.4.0)


@dataclass(frozen=True)
class ModelInfo:
    """The reward model a server hosts, and its request limits (for chunking)."""

    id: str
    revision: str
    architecture: str
    backend: str
    dtype: str
    device: str
    max_length: int
    num_labels: int
    label_names: tuple[str, ...]
    has_chat_template: bool
    limits: Limits


# -- judge results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeRef:
    backend: str
    model: str
    template_hash: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0


@dataclass(frozen=True)
class Judgment:
    """A pairwise judgment: ``preference`` = P(a better than b), or None with the reason.

    ``abstain_reason`` is the judge's own abstention (upstream failure, unparseable replies);
    ``error`` is set instead by :meth:`compare_many` when this item's request failed as a whole.
    """

    preference: float | None
    winner: int | None = None
    consistent: bool | None = None
    soft: bool | None = None
    rationale: str | None = None
    abstain_reason: str | None = None
    error: ItemError | None = None
    judge: JudgeRef | None = None
    usage: Usage = field(default_factory=Usage)
    cached: bool = False

    @property
    def abstained(self) -> bool:
        return self.preference is None

    @property
    def confidence(self) -> float | None:
        """``|2p - 1|``: 0 for a coin flip, 1 for a certain verdict."""
        return None if self.preference is None else abs(2.0 * self.preference - 1.0)


@dataclass(frozen=True)
class Ranking:
    """Bradley-Terry scores per response (request order) and the ranking, best first; or an abstain."""

    scores: list[float] | None
    ranking: list[int] | None
    consistent_rate: float | None = None
    abstain_reason: str | None = None
    judge: JudgeRef | None = None
    usage: Usage = field(default_factory=Usage)
    cached: bool = False

    @property
    def abstained(self) -> bool:
        return self.scores is None


@dataclass(frozen=True)
class Grade:
    """``score`` in [0, 1] and ``raw`` on the requested scale; or an abstain."""

    score: float | None
    raw: float | None = None
    soft: bool | None = None
    rationale: str | None = None
    abstain_reason: str | None = None
    judge: JudgeRef | None = None
    usage: Usage = field(default_factory=Usage)
    cached: bool = False

    @property
    def abstained(self) -> bool:
        return self.score is None


__all__ = [
    "CompareResult",
    "Conversation",
    "Grade",
    "ItemError",
    "JudgeRef",
    "Judgment",
    "Limits",
    "ModelInfo",
    "ModelRef",
    "Normalization",
    "Pair",
    "Prompt",
    "Ranking",
    "RewardItem",
    "ScoreResults",
    "Text",
    "Usage",
    "item_to_wire",
]
