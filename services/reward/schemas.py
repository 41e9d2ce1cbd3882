"""Wire models of the reward service's HTTP API, and the translation to and from the engine.

Requests are parsed strictly (``strict=True``: a number where a string belongs is an error, never
coerced; ``extra="forbid"``: unknown keys are errors) straight from the JSON bytes with
``model_validate_json``. The one exception is :class:`GetRewardRequest`, OpenRLHF's payload, which
ignores keys it does not use (forks of OpenRLHF add their own).

Responses are built as plain dicts by the ``*_body`` functions (serialised with orjson; absent
optional fields are omitted, never ``null``). The response models below document the same shapes
for OpenAPI and typed clients; the transport does not run them on the hot path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from services.common.http_support import named_examples
from services.common.wire import ErrorBody, Message, PromptWire, StrictModel
from services.reward.engine.results import CompareOutcome, ItemError, ItemResult, Limits, ModelRef, ScoreOutcome
from services.runtime.chat import Prompt, as_messages, as_prompt
from services.runtime.items import ModelInfo, Priority, RewardInput

# Discriminator tags appear in pydantic error locations; the transport strips them so that an
# error names the field the client wrote (``inputs[3].text``), not the union member.
ITEM_TAGS = frozenset({"text", "messages", "pair"})


class TextItem(StrictModel):
    """Already rendered text, tokenized as is (no special tokens added)."""

    text: str = Field(json_schema_extra={"minLength": 1})  # the engine's check (400), documented

    def to_engine(self) -> RewardInput:
        return RewardInput(text=self.text)


class MessagesItem(StrictModel):
    """A whole conversation, rendered with the reward model's own chat template."""

    messages: list[Message] = Field(json_schema_extra={"minItems": 1})  # the engine's check (400), documented

    def to_engine(self) -> RewardInput:
        return RewardInput(messages=as_messages(self.messages))


class PairItem(StrictModel):
    """A prompt (string or messages) and the response to score."""

    prompt: PromptWire
    response: str

    def to_engine(self) -> RewardInput:
        return RewardInput(prompt=as_prompt(self.prompt), response=self.response)


def _item_kind(v: Any) -> str | None:
    if isinstance(v, dict):
        if "text" in v:
            return "text"
        if "messages" in v:
            return "messages"
        if "prompt" in v or "response" in v:
            return "pair"
        return None
    if isinstance(v, TextItem):
        return "text"
    if isinstance(v, MessagesItem):
        return "messages"
    if isinstance(v, PairItem):
        return "pair"
    return None


Item = Annotated[
    Annotated[TextItem, Tag("text")] | Annotated[MessagesItem, Tag("messages")] | Annotated[PairItem, Tag("pair")],
    Discriminator(
        _item_kind,
        custom_error_type="item_type",
        custom_error_message="an item is exactly one of {text}, {prompt, response} or {messages}",
    ),
]


# Examples shown in /docs (and checked against the models and a live service by tests/common/test_openapi.py).
_CHATML = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
_MODEL = {"id": "my-org/my-reward-model", "revision": "0123abcd"}


class ScoreRequest(StrictModel):
    """``POST /v1/score``: one score per item, in request order."""

    model_config = ConfigDict(
        json_schema_extra=named_examples(
            pairs={
                "inputs": [
                    {"prompt": "What is 2 + 2?", "response": "4"},
                    {"prompt": "What is 2 + 2?", "response": "5"},
                ]
            },
            conversation={
                "inputs": [
                    {
                        "messages": [
                            {"role": "system", "content": "You are terse."},
                            {"role": "user", "content": "Name a prime number."},
                            {"role": "assistant", "content": "7"},
                        ]
                    }
                ],
                "priority": "batch",
            },
            rendered_text={"inputs": [{"text": _CHATML + "4<|im_end|>\n"}]},
        )
    )

    inputs: list[Item] = Field(
        description="The items: {text} (rendered, tokenized as is), {prompt, response} (prompt: a string or "
        "messages) or {messages} (rendered with the model's chat template). At most max_items_per_request "
        "(GET /v1/models); an empty list is a 400.",
        json_schema_extra={"minItems": 1},
    )
    priority: Literal["online", "batch"] = Field(
        "online", description="online (rollouts) is served before batch (bulk labelling)."
    )
    normalize: bool = Field(False, description="Also report each score normalized by the server's statistics.")

    def to_engine(self) -> list[RewardInput]:
        return [item.to_engine() for item in self.inputs]

    @property
    def engine_priority(self) -> Priority:
        return Priority(self.priority)


class CompareRequest(StrictModel):
    """``POST /v1/compare``: N responses to one prompt, Bradley-Terry probabilities."""

    model_config = ConfigDict(
        json_schema_extra=named_examples(
            three_responses={"prompt": "Name a prime number.", "responses": ["7", "8", "I don't know."]},
            chat_prompt={
                "prompt": [{"role": "user", "content": "Say hello in French."}],
                "responses": ["Bonjour !", "Hello!"],
            },
        )
    )

    prompt: PromptWire = Field(description="A string, or chat messages [{role, content}, ...].")
    responses: list[str] = Field(
        description="The responses to compare (at least one).", json_schema_extra={"minItems": 1}
    )

    def engine_prompt(self) -> Prompt:
        return as_prompt(self.prompt)


class GetRewardRequest(BaseModel):
    """``POST /get_reward``: OpenRLHF's remote reward-model payload.

    ``query`` holds full rendered sequences (prompt + response, decoded with special tokens); an
    empty list is answered with empty lists. ``prompts`` and ``labels`` (ground truth) go to the
    server's rule hook (``--openrlhf-rule``) when it has one, else they are unused. Unknown keys are
    ignored, since forks of OpenRLHF send extra ones (``metas``, ``metadata``...).
    """

    model_config = ConfigDict(
        strict=True,
        extra="ignore",
        frozen=True,
        json_schema_extra=named_examples(
            one_sample={"query": [_CHATML + "4<|im_end|>"], "prompts": [_CHATML], "labels": ["4"]},
            empty_shard={"query": []},
        ),
    )

    query: list[str]
    prompts: list[Any] | None = None
    labels: list[Any] | None = None


# -- response models (documentation and typed clients; the transport builds dicts) -------------


class NormalizationOut(BaseModel):
    """The statistics ``normalized`` was computed with."""

    mean: float
    std: float
    source: Literal["static", "running"]


class ModelOut(BaseModel):
    """The model that produced the scores."""

    id: str
    revision: str
    normalization: NormalizationOut | None = Field(None, description="Only when the request asked to normalize.")


class ScoredOut(BaseModel):
    """One item's score."""

    score: float = Field(description="Raw model output (no sigmoid).")
    scores: list[float] | None = Field(None, description="Every head output, for vector heads.")
    num_tokens: int
    truncated: bool
    normalized: float | None = Field(None, description="Only with normalize: true.")


class ScoreResponse(BaseModel):
    """``POST /v1/score``'s answer: one result per input, in order; an item that failed at run time
    carries its error (the others are still scored)."""

    model_config = ConfigDict(
        json_schema_extra=named_examples(
            scored={
                "model": _MODEL,
                "results": [
                    {"score": 2.375, "num_tokens": 14, "truncated": False},
                    {"score": -1.5, "num_tokens": 14, "truncated": False},
                ],
            },
            one_item_failed={
                "model": _MODEL,
                "results": [
                    {"score": 0.25, "num_tokens": 31, "truncated": False},
                    {"error": {"code": "DEADLINE_EXCEEDED", "message": "deadline exceeded before scoring"}},
                ],
            },
        )
    )

    model: ModelOut
    results: list[ScoredOut | ErrorBody]


class CompareResponse(BaseModel):
    """``POST /v1/compare``'s answer."""

    model_config = ConfigDict(
        json_schema_extra=named_examples(
            three_responses={
                "model": _MODEL,
                "scores": [2.1, -0.4, 0.3],
                "probabilities": [0.8017, 0.0658, 0.1325],
                "ranking": [0, 2, 1],
            }
        )
    )

    model: ModelOut
    scores: list[float]
    probabilities: list[float] = Field(description="softmax(scores): P(response i is best).")
    ranking: list[int] = Field(description="Response indices, best first.")


class GetRewardResponse(BaseModel):
    """``POST /get_reward``'s answer, as OpenRLHF reads it (``extra_logs``: one number per query each)."""

    model_config = ConfigDict(
        json_schema_extra=named_examples(
            one_sample={
                "rewards": [1.875],
                "scores": [1.875],
                "extra_logs": {"rm_num_tokens": [17.0], "rm_truncated": [0.0]},
            },
            empty_shard={"rewards": [], "scores": [], "extra_logs": {"rm_num_tokens": [], "rm_truncated": []}},
        )
    )

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class LimitsOut(BaseModel):
    max_items_per_request: int
    max_body_bytes: int
    max_text_bytes: int
    max_batch_tokens: int
    max_request_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    revision: str
    architecture: str
    backend: str
    dtype: str
    device: str
    max_length: int
    num_labels: int
    label_names: list[str]
    has_chat_template: bool
    limits: LimitsOut


class ModelList(BaseModel):
    """``GET /v1/models``: the loaded model and the limits a request must keep to."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- engine → wire ------------------------------------------------------------------------------


def model_body(model: ModelRef) -> dict[str, Any]:
    out: dict[str, Any] = {"id": model.id, "revision": model.revision}
    if model.normalization is not None:
        n = model.normalization
        out["normalization"] = {"mean": n.mean, "std": n.std, "source": n.source}
    return out


def result_body(r: ItemResult) -> dict[str, Any]:
    if isinstance(r, ItemError):
        return {"error": {"code": r.code.value, "message": r.message}}
    out: dict[str, Any] = {"score": r.score}
    if r.scores is not None:
        out["scores"] = list(r.scores)
    out["num_tokens"] = r.num_tokens
    out["truncated"] = r.truncated
    if r.normalized is not None:
        out["normalized"] = r.normalized
    return out


def score_body(outcome: ScoreOutcome) -> dict[str, Any]:
    return {"model": model_body(outcome.model), "results": [result_body(r) for r in outcome.results]}


def compare_body(outcome: CompareOutcome) -> dict[str, Any]:
    return {
        "model": model_body(outcome.model),
        "scores": outcome.scores,
        "probabilities": outcome.probabilities,
        "ranking": outcome.ranking,
    }


def limits_body(limits: Limits, *, max_body_bytes: int) -> dict[str, int]:
    return {
        "max_items_per_request": limits.max_items_per_request,
        "max_body_bytes": max_body_bytes,
        "max_text_bytes": limits.max_text_bytes,
        "max_batch_tokens": limits.max_batch_tokens,
        "max_request_tokens": limits.max_request_tokens,
    }


def models_body(info: ModelInfo, limits: Limits, *, max_body_bytes: int, created: int) -> dict[str, Any]:
    card = {
        "id": info.id,
        "object": "model",
        "created": created,
        "owned_by": "rlhf-feedback",
        "revision": info.revision,
        "architecture": info.architecture,
        "backend": info.backend,
        "dtype": info.dtype,
        "device": info.device,
        "max_length": info.max_length,
        "num_labels": info.num_labels,
        "label_names": list(info.label_names),
        "has_chat_template": info.has_chat_template,
        "limits": limits_body(limits, max_body_bytes=max_body_bytes),
    }
    return {"object": "list", "data": [card]}
