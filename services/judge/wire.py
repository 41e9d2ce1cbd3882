"""The judge's results on the wire: each engine result as its HTTP body and as its protobuf message.

Each response shape is declared once, as a pydantic model (:class:`CompareOut`, :class:`RankOut`,
:class:`GradeOut`, :class:`AbstainOut`, :class:`ModelList`, ...). The model documents the JSON for
OpenAPI, and it names the fields that :func:`_fields` copies, by name and in its order, from the
engine's result (a nested shape from a nested result). The models are never run on the hot path.

- HTTP: the body is that dict, serialised with orjson. An optional field that is absent (``None``)
  is left out, never ``null``; a required one is kept, so ``winner`` is ``null`` inside the tie
  margin and ``rpm`` is ``null`` when unlimited.
- gRPC: the message is built from the same dict; ``None`` leaves a field unset. A judgment's own
  fields go into the response's ``outcome`` member (``comparison``, ``ranking``, ``grade``),
  ``judge``, ``usage`` and ``cached`` beside it; ``grade_scale_bounds`` ``[lo, hi]`` is a ``Scale``.

An abstain is a result, not an error: ``{"abstain": {"reason"}, "judge"?, "usage"}`` with HTTP 200,
the ``abstain`` member of ``outcome`` over gRPC.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args

from google.protobuf.message import Message
from pydantic import BaseModel, Field

from protos.rlhf.v1 import judge_pb2 as pb
from services.judge.engine.config import JudgeLimits
from services.judge.types import Abstain, CompareResult, GradeResult, JudgeRef, RankResult

__all__ = [
    "AbstainOut",
    "CompareOut",
    "GradeOut",
    "JudgeCard",
    "JudgeOut",
    "LimitsOut",
    "ModelList",
    "RankOut",
    "UsageOut",
    "compare_body",
    "compare_to_grpc",
    "grade_body",
    "grade_to_grpc",
    "info_to_grpc",
    "limits_body",
    "models_body",
    "rank_body",
    "rank_to_grpc",
]

P = TypeVar("P", bound=Message)

OWNER = "rlhf-feedback"

# -- the shapes -----------------------------------------------------------------------------------


class JudgeOut(BaseModel):
    backend: str = Field(description='"local", "openai", "anthropic", "openai-compatible" (or a test fake).')
    model: str = Field(description="The model name, as passed to the provider.")
    template_hash: str = Field(description="Hash of the prompt template set.")


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
    usage: UsageOut


class _Judged(BaseModel):
    """What every judgment carries after its own fields."""

    judge: JudgeOut
    usage: UsageOut
    cached: bool = Field(description="True when every verdict behind the judgment came from the cache.")


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
    max_items_per_request: int = Field(description="Most responses one request may carry.")
    max_body_bytes: int
    max_text_bytes: int
    max_queue_items: int = Field(description="Provider calls admitted and unfinished before 429.")
    max_concurrency: int
    rpm: float | None = Field(description="Provider requests per minute (null: unlimited).")
    tpm: float | None = Field(description="Provider tokens per minute (null: unlimited).")
    max_tokens_total: int | None = Field(description="Token budget of the server's life (null: unlimited).")
    rank_max_pairs: int = Field(description="rank judges a balanced sample of pairs above this many.")
    grade_scale_bounds: tuple[int, int] = Field(description="Widest accepted grading scale [lo, hi].")
    max_prompt_chars: int = Field(description="Longest judge prompt, in characters; longer is a 400.")


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


# -- engine → HTTP body ---------------------------------------------------------------------------


def compare_body(result: CompareResult | Abstain) -> dict[str, Any]:
    """``POST /v1/compare``'s body: :class:`CompareOut` or :class:`AbstainOut`."""
    return _judgment(CompareOut, result)


def rank_body(result: RankResult | Abstain) -> dict[str, Any]:
    """``POST /v1/rank``'s body: :class:`RankOut` or :class:`AbstainOut`."""
    return _judgment(RankOut, result)


def grade_body(result: GradeResult | Abstain) -> dict[str, Any]:
    """``POST /v1/grade``'s body: :class:`GradeOut` or :class:`AbstainOut`."""
    return _judgment(GradeOut, result)


def limits_body(limits: JudgeLimits, *, max_body_bytes: int) -> dict[str, Any]:
    """The engine's limits and the transport's body limit, as ``/v1/models`` reports them."""
    return _fields(LimitsOut, limits, given={"max_body_bytes": max_body_bytes})


def models_body(ref: JudgeRef, limits: JudgeLimits, *, max_body_bytes: int, created: int) -> dict[str, Any]:
    """``GET /v1/models``: one card, the judge and the limits."""
    given = {
        "id": ref.model,
        "object": "model",
        "created": created,
        "owned_by": OWNER,
        "limits": limits_body(limits, max_body_bytes=max_body_bytes),
    }
    return {"object": "list", "data": [_fields(JudgeCard, ref, given=given)]}


# -- engine → protobuf (from the same dicts) ------------------------------------------------------


def compare_to_grpc(result: CompareResult | Abstain) -> pb.JudgeCompareResponse:
    """``Compare``'s answer: the ``comparison`` or the ``abstain``."""
    return _response(pb.JudgeCompareResponse, "comparison", compare_body(result))


def rank_to_grpc(result: RankResult | Abstain) -> pb.JudgeRankResponse:
    """``Rank``'s answer: the ``ranking`` or the ``abstain``."""
    return _response(pb.JudgeRankResponse, "ranking", rank_body(result))


def grade_to_grpc(result: GradeResult | Abstain) -> pb.JudgeGradeResponse:
    """``Grade``'s answer: the ``grade`` or the ``abstain``."""
    return _response(pb.JudgeGradeResponse, "grade", grade_body(result))


def info_to_grpc(ref: JudgeRef, limits: JudgeLimits, *, max_body_bytes: int) -> pb.JudgeInfo:
    """``GetModelInfo``: the judge and the limits ``/v1/models`` reports."""
    fields = limits_body(limits, max_body_bytes=max_body_bytes)
    lo, hi = fields.pop("grade_scale_bounds")
    return pb.JudgeInfo(
        judge=_fields(JudgeOut, ref),
        limits=pb.JudgeLimits(**_set(fields), grade_scale_bounds=pb.Scale(lo=lo, hi=hi)),
    )


# -- the one conversion ---------------------------------------------------------------------------

_JUDGED = tuple(_Judged.model_fields)


def _judgment(shape: type[_Judged], result: CompareResult | RankResult | GradeResult | Abstain) -> dict[str, Any]:
    """A judgment's body: its own fields first, then ``judge``, ``usage``, ``cached``; or the abstain."""
    if isinstance(result, Abstain):
        return _fields(AbstainOut, result, given={"abstain": {"reason": result.reason}})
    own = tuple(name for name in shape.model_fields if name not in _JUDGED)
    return _fields(shape, result, names=own + _JUDGED)


def _fields(
    shape: type[BaseModel],
    obj: object,
    *,
    names: tuple[str, ...] | None = None,
    given: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``shape``'s fields (or ``names``), in order: from ``given`` when there, else ``obj``'s attribute
    of the same name (a nested shape converted the same way). An optional field that is None is left out."""
    plan = _plan(shape)
    out: dict[str, Any] = {}
    for name in plan if names is None else names:
        if given is not None and name in given:
            out[name] = given[name]
            continue
        required, nested = plan[name]
        value = getattr(obj, name)
        if value is None:
            if not required:
                continue
        elif nested is not None:
            value = _fields(nested, value)
        elif isinstance(value, list | tuple):
            value = list(value)
        out[name] = value
    return out


@functools.cache
def _plan(shape: type[BaseModel]) -> dict[str, tuple[bool, type[BaseModel] | None]]:
    """Per field of ``shape``, in order: whether it is required, and its nested shape if any."""
    return {name: (info.is_required(), _nested(info.annotation)) for name, info in shape.model_fields.items()}


def _nested(annotation: Any) -> type[BaseModel] | None:
    for t in (annotation, *get_args(annotation)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _set(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Protobuf constructor arguments: None leaves a field unset (also inside nested messages)."""
    return {k: _set(v) if isinstance(v, Mapping) else v for k, v in fields.items() if v is not None}


def _response(cls: type[P], member: str, body: Mapping[str, Any]) -> P:
    """A judge response message from a judgment's body: its own fields in ``member``, or the abstain."""
    fields = _set(body)
    if "abstain" in fields:
        return cls(**fields)
    outcome = {k: v for k, v in fields.items() if k not in _JUDGED}
    return cls(**{member: outcome}, **{k: fields[k] for k in _JUDGED})
