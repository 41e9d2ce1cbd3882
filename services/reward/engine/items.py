"""The engine's item model: what a transport hands in and what it gets back.

Transports translate their wire format into :class:`RewardInput` and translate
:class:`ScoredItem` / :class:`ItemError` back; nothing here knows HTTP or gRPC.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.common.errors import ErrorCode

ROLES = frozenset({"system", "user", "assistant", "tool"})


class Priority(str, enum.Enum):
    """Online work (rollouts a trainer is waiting for) is batched before bulk work."""

    ONLINE = "online"
    BATCH = "batch"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


Prompt = str | tuple[ChatMessage, ...]


@dataclass(frozen=True)
class RewardInput:
    """One thing to score, in exactly one of three forms.

    - ``text``: already rendered; tokenized as is, no special tokens added.
    - ``prompt`` + ``response``: rendered with the reward model's own chat template
      (or as a sentence pair when it has none).
    - ``messages``: a whole conversation, rendered with the chat template.
    """

    text: str | None = None
    prompt: Prompt | None = None
    response: str | None = None
    messages: tuple[ChatMessage, ...] | None = None

    @staticmethod
    def of_text(text: str) -> RewardInput:
        return RewardInput(text=text)

    @staticmethod
    def of_pair(prompt: Prompt | Sequence[ChatMessage], response: str) -> RewardInput:
        p = prompt if isinstance(prompt, str) else tuple(prompt)
        return RewardInput(prompt=p, response=response)

    @staticmethod
    def of_messages(messages: Sequence[ChatMessage]) -> RewardInput:
        return RewardInput(messages=tuple(messages))


@dataclass(frozen=True)
class EncodedItem:
    """A tokenized, truncated input ready for a backend's forward pass.

    ``prompt_tokens`` counts the leading tokens that belong to the prompt (0 for ``text``
    items); items of one request with equal prompts share ``group`` so that a decoder backend
    can run their common prefix once (the engine sets it, only for a backend that shares).
    ``readout_ids`` are token ids whose next-token log probabilities a verdict backend reads
    (the local judge's ``A``/``B``); None for rewards.
    """

    input_ids: tuple[int, ...]
    truncated: bool
    token_type_ids: tuple[int, ...] | None = None
    prompt_tokens: int = 0
    group: int | None = None
    readout_ids: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class NormalizationInfo:
    mean: float
    std: float
    source: str  # "static" or "running"


@dataclass(frozen=True)
class ModelRef:
    """What every score response says about the model that produced it."""

    id: str
    revision: str
    normalization: NormalizationInfo | None = None


@dataclass(frozen=True)
class ScoredItem:
    """A successful result. ``score`` is the raw model output (no sigmoid), float32-valued."""

    score: float
    num_tokens: int
    truncated: bool
    scores: tuple[float, ...] | None = None
    normalized: float | None = None


@dataclass(frozen=True)
class ItemError:
    """A runtime failure of one item (deadline passed, backend failed); its neighbours still score."""

    code: ErrorCode
    message: str


ItemResult = ScoredItem | ItemError


@dataclass(frozen=True)
class ScoreOutcome:
    model: ModelRef
    results: list[ItemResult]


@dataclass(frozen=True)
class CompareOutcome:
    """Bradley-Terry view of N responses to one prompt: P(i best) = softmax(scores)."""

    model: ModelRef
    scores: list[float]
    probabilities: list[float]
    ranking: list[int]  # indices, best first


@dataclass(frozen=True)
class Limits:
    max_items_per_request: int
    max_body_bytes: int
    max_text_bytes: int
    max_batch_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the loaded model, reported by ``/v1/models`` and ``GetModelInfo``."""

    id: str
    revision: str
    architecture: str
    backend: str
    dtype: str
    device: str
    max_length: int
    num_labels: int
    label_names: tuple[str, ...] = field(default_factory=tuple)
    has_chat_template: bool = False
