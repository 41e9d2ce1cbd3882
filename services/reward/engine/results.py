"""The reward engine's results: what a transport gets back for each item and request.

Transports translate :class:`ScoredItem` / :class:`ItemError` (and the outcomes around them)
into their wire format; nothing here knows HTTP or gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import ErrorCode


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
    max_request_tokens: int = 4096
