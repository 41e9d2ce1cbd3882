"""Request models of the judge service's HTTP API, and their translation to the engine's inputs.

Requests are parsed strictly (``strict=True``: a number where a string belongs is an error, never
coerced; ``extra="forbid"``: unknown keys are errors) straight from the JSON bytes. The models check
the JSON's shape and types only (422); every rule about the values (how many responses, the
protocol, the scale, empty texts, roles, size limits) is the engine's validation
(:mod:`services.judge.engine.validation`), which both transports share. The schema rules the
models leave to it are still documented here (``minItems``, ``enum``), for OpenAPI.

The response shapes and their conversions are in :mod:`services.judge.wire`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import ConfigDict, Field

from services.common.http_support import BodyParser, Loc, named_examples
from services.common.wire import PROMPT_TAGS, PromptWire, StrictModel
from services.judge.engine.config import GRADE_SCALE_BOUNDS
from services.judge.engine.validation import PROTOCOLS
from services.judge.types import DEFAULT_SCALE, CompareInput, GradeInput, JudgePrompt, RankInput
from services.runtime.chat import as_prompt


def _clean_loc(loc: Sequence[int | str]) -> Loc:
    """Drop the union tags pydantic inserts under ``prompt``, so the path is what the client wrote."""
    return [part for i, part in enumerate(loc) if not (part in PROMPT_TAGS and i > 0 and loc[i - 1] == "prompt")]


# Errors inside ``responses[i]`` carry ``item: i``.
PARSER = BodyParser(item_lists=frozenset({"responses"}), clean_loc=_clean_loc)


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

    model_config = ConfigDict(
        json_schema_extra=named_examples(
            two_responses={
                "prompt": "What is the capital of France?",
                "responses": ["Paris.", "I think it is Lyon."],
            },
            rubric_and_reference={
                "prompt": [{"role": "user", "content": "Summarize: the cat sat on the mat."}],
                "responses": ["A cat sat on a mat.", "Dogs are loyal."],
                "rubric": "Faithful to the text, and shorter is better.",
                "reference": "A cat sat on a mat.",
                "protocol": "single",
            },
        )
    )

    responses: list[str] = Field(
        description="Exactly two responses: a, then b.", json_schema_extra={"minItems": 2, "maxItems": 2}
    )
    protocol: str = Field(
        "both_orders",
        description="both_orders: judge (a, b) and (b, a) and average; single: one random order.",
        json_schema_extra={"enum": list(PROTOCOLS)},
    )

    def to_engine(self) -> CompareInput:
        return CompareInput.from_wire(
            self.engine_prompt(),
            self.responses,
            rubric=self.rubric,
            reference=self.reference,
            protocol=self.protocol,
            principles=self.principles,
        )


class RankRequest(_JudgeRequest):
    """``POST /v1/rank``: Bradley-Terry ranking of N >= 2 responses from pairwise judgments."""

    model_config = ConfigDict(
        json_schema_extra=named_examples(
            three_responses={
                "prompt": "Name a prime number greater than 10.",
                "responses": ["11", "12", "13, since it has no divisors but 1 and itself."],
                "principles": ["Be correct.", "Explain briefly."],
            }
        )
    )

    responses: list[str] = Field(description="At least two responses.", json_schema_extra={"minItems": 2})

    def to_engine(self) -> RankInput:
        return RankInput(
            prompt=self.engine_prompt(),
            responses=tuple(self.responses),
            rubric=self.rubric,
            reference=self.reference,
            principles=tuple(self.principles),
        )


_LO, _HI = GRADE_SCALE_BOUNDS


class GradeRequest(_JudgeRequest):
    """``POST /v1/grade``: a rubric score of one response, mapped to [0, 1]."""

    model_config = ConfigDict(
        json_schema_extra=named_examples(
            default_scale={
                "prompt": "Explain photosynthesis in one sentence.",
                "response": "Plants make sugar from light.",
            },
            rubric_and_scale={
                "prompt": "Write a haiku about rain.",
                "response": "Soft rain on the roof / the garden drinks in silence / puddles hold the sky",
                "rubric": "5-7-5 syllables, one clear image.",
                "scale": [1, 5],
            },
        )
    )

    response: str
    scale: tuple[int, int] | None = Field(
        None, description=f"[lo, hi], integers, {_LO} <= lo < hi <= {_HI} (default {list(DEFAULT_SCALE)})."
    )

    def to_engine(self) -> GradeInput:
        return GradeInput(
            prompt=self.engine_prompt(),
            response=self.response,
            rubric=self.rubric,
            reference=self.reference,
            scale=DEFAULT_SCALE if self.scale is None else self.scale,
            principles=tuple(self.principles),
        )
