"""Wire models of the judge service's HTTP API, and the translation to and from the engine.

Requests are parsed strictly (``strict=True``: a number where a string belongs is an error, never
coerced; ``extra="forbid"``: unknown keys are errors) straight from the JSON bytes. The gRPC
transport validates its requests through the same models (:func:`validate`), so both transports
reject exactly the same requests with the same messages.

Responses are built as plain dicts by the ``*_body`` functions (serialised with orjson; absent
optional fields are omitted, never ``null``, except ``winner``, which is ``null`` inside the tie
margin). An abstain is a result: ``{"abstain": {"reason"}, "judge"?, "usage"?}`` with HTTP 200.
The response models below document the shapes for OpenAPI and typed clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, field_validator

from services.common.errors import invalid
from services.common.http_support import BodyParser, Loc
from services.common.settings import ServiceSettings
from services.common.wire import PROMPT_TAGS, PromptWire, StrictModel
from services.judge.engine.service import GRADE_SCALE_BOUNDS
from services.judge.types import (
    Abstain,
    CompareInput,
    CompareResult,
    GradeInput,
    GradeResult,
    JudgePrompt,
    JudgeRef,
    RankInput,
    RankResult,
    Usage,
)
from services.runtime.chat import as_prompt

W = TypeVar("W", bound=BaseModel)


def _clean_loc(loc: Sequence[int | str]) -> Loc:
    """Drop the union tags pydantic inserts under ``prompt``, so the path is what the client wrote."""
    return [part for i, part in enumerate(loc) if not (part in PROMPT_TAGS and i > 0 and loc[i - 1] == "prompt")]


# Errors inside ``responses[i]`` carry ``item: i``.
PARSER = BodyParser(item_lists=frozenset({"responses"}), clean_loc=_clean_loc)


def validate(model: type[W], data: Mapping[str, Any]) -> W:
    """Validate already decoded data (the gRPC transport's requests) exactly as HTTP bodies are."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise PARSER.error(exc.errors(include_url=False, include_input=False)) from None


class _JudgeRequest(StrictModel):
    prompt: PromptWire = Field(description="A string, or chat messages [{role, content}, ...].")
    rubric: str | None = Field(None, description="What 'better' means, if not the default instructions.")
    reference: str | None = Field(None, description="A reference answer to judge against.")
    principles: list[str] = Field(
        default_factory=list, description="Principles (a constitution) to judge by; one is chosen per item or several."
    )

    def engine_prompt(self) -> JudgePrompt:
        return as_prompt(self.prompt)


class CompareRequest(_JudgeRequest):
    """``POST /v1/compare``: which of two responses is better."""

    responses: list[str] = Field(min_length=2, max_length=2, description="Exactly two responses: a, then b.")
    protocol: Literal["both_orders", "single"] = Field(
        "both_orders", description="both_orders: judge (a, b) and (b, a) and average; single: one random order."
    )

    def to_engine(self) -> CompareInput:
        a, b = self.responses
        return CompareInput(
            prompt=self.engine_prompt(),
            responses=(a, b),
            rubric=self.rubric,
            reference=self.reference,
            protocol=self.protocol,
            principles=tuple(self.principles),
        )


class RankRequest(_JudgeRequest):
    """``POST /v1/rank``: Bradley-Terry ranking of N >= 2 responses from pairwise judgments."""

    responses: list[str] = Field(min_length=2, description="At least two responses.")

    def to_engine(self) -> RankInput:
        return RankInput(
            prompt=self.engine_prompt(),
            responses=tuple(self.responses),
            rubric=self.rubric,
            reference=self.reference,
            principles=tuple(self.principles),
        )


class GradeRequest(_JudgeRequest):
    """``POST /v1/grade``: a rubric score of one response, mapped to [0, 1]."""

    response: str
    scale: tuple[int, int] | None = Field(None, description="[lo, hi], integers, 0 <= lo < hi <= 9 (default [1, 5]).")

    @field_validator("scale")
    @classmethod
    def _ordered(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        lo, hi = GRADE_SCALE_BOUNDS
        if v is not None and not lo <= v[0] < v[1] <= hi:
            raise ValueError(
                f"scale must be [lo, hi] with {lo} <= lo < hi <= {hi} (grades are single digits), got [{v[0]}, {v[1]}]"
            )
        return v

    def to_engine(self) -> GradeInput:
        extra: dict[str, Any] = {} if self.scale is None else {"scale": self.scale}
        return GradeInput(
            prompt=self.engine_prompt(),
            response=self.response,
            rubric=self.rubric,
            reference=self.reference,
            principles=tuple(self.principles),
            **extra,
        )


# -- request limits (both transports) ------------------------------------------------------------


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True)
class RequestLimits:
    """The service's size limits, checked by both transports after translation (400 / INVALID_ARGUMENT).

    Texts longer than ``max_text_bytes`` (UTF-8) are rejected, naming the response index when a
    response is too long; a rank request with more than ``max_items_per_request`` responses too.
    """

    max_items_per_request: int
    max_body_bytes: int
    max_text_bytes: int

    @classmethod
    def of(cls, settings: ServiceSettings) -> RequestLimits:
        return cls(settings.max_items_per_request, settings.max_body_bytes, settings.max_text_bytes)

    def _text(self, what: str, text: str, *, item: int | None = None) -> None:
        size = _utf8_len(text)
        if size > self.max_text_bytes:
            raise invalid(f"{what} is {size} bytes, over --max-text-bytes {self.max_text_bytes}", item=item)

    def _common(
        self, prompt: JudgePrompt, rubric: str | None, reference: str | None, principles: Sequence[str]
    ) -> None:
        if isinstance(prompt, str):
            self._text("prompt", prompt)
        else:
            for i, m in enumerate(prompt):
                self._text(f"prompt[{i}].content", m.content)
        if rubric is not None:
            self._text("rubric", rubric)
        if reference is not None:
            self._text("reference", reference)
        for i, p in enumerate(principles):
            self._text(f"principles[{i}]", p)

    def _responses(self, responses: Sequence[str]) -> None:
        if len(responses) > self.max_items_per_request:
            raise invalid(
                f"{len(responses)} responses exceed --max-items-per-request {self.max_items_per_request}; "
                "GET /v1/models reports the limits"
            )
        for i, r in enumerate(responses):
            self._text(f"responses[{i}]", r, item=i)

    def check_compare(self, req: CompareInput) -> CompareInput:
        self._common(req.prompt, req.rubric, req.reference, req.principles)
        self._responses(req.responses)
        return req

    def check_rank(self, req: RankInput) -> RankInput:
        self._common(req.prompt, req.rubric, req.reference, req.principles)
        self._responses(req.responses)
        return req

    def check_grade(self, req: GradeInput) -> GradeInput:
        self._common(req.prompt, req.rubric, req.reference, req.principles)
        self._text("response", req.response)
        return req

    def body(self, engine_limits: Any) -> dict[str, Any]:
        """What ``/v1/models`` and ``GetModelInfo`` report: these limits and the engine's."""
        out: dict[str, Any] = {
            "max_items_per_request": self.max_items_per_request,
            "max_body_bytes": self.max_body_bytes,
            "max_text_bytes": self.max_text_bytes,
        }
        if is_dataclass(engine_limits) and not isinstance(engine_limits, type):
            out.update(asdict(engine_limits))
        return out


# -- response models (documentation and typed clients; the transport builds dicts) -------------


class JudgeOut(BaseModel):
    backend: str
    model: str
    template_hash: str


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    calls: int = Field(description="Upstream calls, retries included (0 when cached).")


class AbstainReason(BaseModel):
    reason: str


class AbstainOut(BaseModel):
    """A judgment that could not be made (HTTP 200: a result, not a transport error)."""

    abstain: AbstainReason
    judge: JudgeOut | None = None
    usage: UsageOut | None = None


class _Judged(BaseModel):
    judge: JudgeOut
    usage: UsageOut
    cached: bool


class CompareOut(_Judged):
    preference: float = Field(description="P(a better than b), position flips undone.")
    winner: int | None = Field(description="0 (a) or 1 (b); null inside the tie margin.")
    consistent: bool = Field(description="Whether both orders agreed.")
    soft: bool = Field(description="False when the preference is a hard label (no probabilities available).")
    rationale: str | None = None


class RankOut(_Judged):
    scores: list[float] = Field(description="Bradley-Terry score per response, in request order.")
    ranking: list[int] = Field(description="Response indices, best first.")
    consistent_rate: float = Field(description="Share of pairwise comparisons whose two orders agreed.")


class GradeOut(_Judged):
    score: float = Field(description="The grade mapped to [0, 1].")
    raw: float = Field(description="The grade on the requested scale.")
    soft: bool
    rationale: str | None = None


class LimitsOut(BaseModel):
    max_items_per_request: int = Field(description="Most responses one rank request may carry.")
    max_body_bytes: int
    max_text_bytes: int
    max_queue_items: int = Field(description="Provider calls admitted and unfinished before 429.")
    max_concurrency: int
    rpm: float | None = Field(description="Provider requests per minute (null: unlimited).")
    tpm: float | None = Field(description="Provider tokens per minute (null: unlimited).")
    max_tokens_total: int | None = Field(description="Token budget of the server's life (null: unlimited).")
    rank_max_pairs: int = Field(description="rank judges a balanced sample of pairs above this many.")
    grade_scale_bounds: tuple[int, int] = Field(description="Widest accepted grading scale [lo, hi].")


class JudgeCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    backend: str
    model: str
    template_hash: str
    limits: LimitsOut


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JudgeCard]


# -- engine → wire ------------------------------------------------------------------------------


def judge_body(ref: JudgeRef) -> dict[str, str]:
    return {"backend": ref.backend, "model": ref.model, "template_hash": ref.template_hash}


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cost_usd": usage.cost_usd,
        "calls": usage.calls,
    }


def abstain_body(result: Abstain) -> dict[str, Any]:
    out: dict[str, Any] = {"abstain": {"reason": result.reason}}
    if result.judge is not None:
        out["judge"] = judge_body(result.judge)
    out["usage"] = usage_body(result.usage)
    return out


def compare_body(result: CompareResult | Abstain) -> dict[str, Any]:
    if isinstance(result, Abstain):
        return abstain_body(result)
    out: dict[str, Any] = {
        "preference": result.preference,
        "winner": result.winner,
        "consistent": result.consistent,
        "soft": result.soft,
    }
    if result.rationale is not None:
        out["rationale"] = result.rationale
    out.update(judge=judge_body(result.judge), usage=usage_body(result.usage), cached=result.cached)
    return out


def rank_body(result: RankResult | Abstain) -> dict[str, Any]:
    if isinstance(result, Abstain):
        return abstain_body(result)
    return {
        "scores": list(result.scores),
        "ranking": list(result.ranking),
        "consistent_rate": result.consistent_rate,
        "judge": judge_body(result.judge),
        "usage": usage_body(result.usage),
        "cached": result.cached,
    }


def grade_body(result: GradeResult | Abstain) -> dict[str, Any]:
    if isinstance(result, Abstain):
        return abstain_body(result)
    out: dict[str, Any] = {"score": result.score, "raw": result.raw, "soft": result.soft}
    if result.rationale is not None:
        out["rationale"] = result.rationale
    out.update(judge=judge_body(result.judge), usage=usage_body(result.usage), cached=result.cached)
    return out


def models_body(ref: JudgeRef, limits: Mapping[str, Any], *, created: int) -> dict[str, Any]:
    card = {
        "id": ref.model,
        "object": "model",
        "created": created,
        "owned_by": "rlhf-feedback",
        **judge_body(ref),
        "limits": dict(limits),
    }
    return {"object": "list", "data": [card]}
