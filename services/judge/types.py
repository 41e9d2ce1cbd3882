"""The judge's item model: requests, verdicts, results, usage. No transport, no provider.

Typed results only: a failed judgment is an :class:`Abstain` with a reason, never a sentinel
label (TRL's judges returned -1 and a position flip turned it into "the second wins").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

from services.runtime.chat import ChatMessage

JudgePrompt = str | tuple[ChatMessage, ...]
Protocol = Literal["both_orders", "single"]
DEFAULT_SCALE = (1, 5)  # a grade's scale when the request names none


# -- what the engine asks a backend ------------------------------------------------------------


@dataclass(frozen=True)
class VerdictQuery:
    """One call to an LLM: rendered messages and the verdict tokens it must choose between.

    ``choices`` are single tokens the template asks for (``("A", "B")`` for a pairwise
    comparison, ``("1", ..., "5")`` for a grade). With ``rationale`` the model reasons first and
    gives the verdict after (structured output where the provider has it).
    """

    messages: tuple[ChatMessage, ...]
    choices: tuple[str, ...]
    rationale: bool = False
    max_tokens: int = 8


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    calls: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cost_usd + other.cost_usd,
            self.calls + other.calls,
        )


@dataclass(frozen=True)
class VerdictReply:
    """What a backend got back for one :class:`VerdictQuery`.

    ``probs`` is a distribution over ``choices`` when the provider gave one (logprobs,
    verbalised probability, or k samples), else None and ``choice`` holds the parsed hard label
    (``soft`` False). ``raw`` is the reply text, kept for audit.
    """

    choice: str | None
    probs: dict[str, float] | None
    soft: bool
    raw: str
    rationale: str | None = None
    usage: Usage = field(default_factory=Usage)


# -- what the engine returns -------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeRef:
    backend: str
    model: str
    template_hash: str


@dataclass(frozen=True)
class Abstain:
    """A judgment that could not be made (unparseable replies, upstream failure after retries)."""

    reason: str
    judge: JudgeRef | None = None
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class CompareResult:
    """P(a better than b) after undoing any position flip; ``winner`` None inside the tie margin."""

    preference: float
    winner: int | None
    consistent: bool
    soft: bool
    judge: JudgeRef
    usage: Usage
    cached: bool
    rationale: str | None = None

    @property
    def confidence(self) -> float:
        return abs(2 * self.preference - 1)


@dataclass(frozen=True)
class RankResult:
    """Bradley-Terry scores of N responses (higher is better) and their ranking, best first."""

    scores: list[float]
    ranking: list[int]
    judge: JudgeRef
    usage: Usage
    cached: bool
    consistent_rate: float = 1.0


@dataclass(frozen=True)
class GradeResult:
    """``score`` in [0, 1] (expected value under the verdict distribution where available);
    ``raw`` on the stated scale."""

    score: float
    raw: float
    soft: bool
    judge: JudgeRef
    usage: Usage
    cached: bool
    rationale: str | None = None


@dataclass(frozen=True)
class CompareInput:
    prompt: JudgePrompt
    responses: tuple[str, str]
    rubric: str | None = None
    reference: str | None = None
    protocol: Protocol = "both_orders"
    principles: tuple[str, ...] = ()

    @classmethod
    def from_wire(
        cls,
        prompt: JudgePrompt,
        responses: Sequence[str],
        *,
        rubric: str | None,
        reference: str | None,
        protocol: str,
        principles: Sequence[str],
    ) -> CompareInput:
        """A transport's values as they came: how many responses and which protocol are for the
        engine's validation to check (with the API's messages), not for a transport."""
        return cls(
            prompt=prompt,
            responses=cast("tuple[str, str]", tuple(responses)),
            rubric=rubric,
            reference=reference,
            protocol=cast(Protocol, protocol),
            principles=tuple(principles),
        )


@dataclass(frozen=True)
class RankInput:
    prompt: JudgePrompt
    responses: tuple[str, ...]
    rubric: str | None = None
    reference: str | None = None
    principles: tuple[str, ...] = ()


@dataclass(frozen=True)
class GradeInput:
    prompt: JudgePrompt
    response: str
    rubric: str | None = None
    reference: str | None = None
    scale: tuple[int, int] = DEFAULT_SCALE
    principles: tuple[str, ...] = ()
