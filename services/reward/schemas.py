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

from services.common.wire import ErrorBody, Message, PromptWire, StrictModel
from services.reward.engine.results import CompareOutcome, ItemError, ItemResult, Limits, ModelRef, ScoreOutcome
from services.runtime.chat import Prompt, as_messages, as_prompt
from services.runtime.items import ModelInfo, Priority, RewardInput

# Discriminator tags appear in pydantic error locations; the transport strips them so that an
# error names the field the client wrote (``inputs[3].text``), not the union member.
ITEM_TAGS = frozenset({"text", "messages", "pair"})


class TextItem(StrictModel):
    """Already rendered text, tokenized as is (no special tokens added)."""

    text: str

    def to_engine(self) -> RewardInput:
        return RewardInput(text=self.text)


class MessagesItem(StrictModel):
    """A whole conversation, rendered with the reward model's own chat template."""

    messages: list[Message]

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


class ScoreRequest(StrictModel):
    """``POST /v1/score``."""

    inputs: list[Item]
    priority: Literal["online", "batch"] = "online"
    normalize: bool = False

    def to_engine(self) -> list[RewardInput]:
        return [item.to_engine() for item in self.inputs]

    @property
    def engine_priority(self) -> Priority:
        return Priority(self.priority)


class CompareRequest(StrictModel):
    """``POST /v1/compare``: N responses to one prompt, Bradley-Terry probabilities."""

    prompt: PromptWire
    responses: list[str]

    def engine_prompt(self) -> Prompt:
        return as_prompt(self.prompt)


class GetRewardRequest(BaseModel):
    """``POST /get_reward``: OpenRLHF's remote reward-model payload.

    ``query`` holds full rendered sequences (prompt + response, decoded with special tokens);
    ``prompts`` and ``labels`` are accepted and not used by a reward model. Unknown keys are
    ignored, since forks of OpenRLHF send extra ones (``metas``, ``metadata``...).
    """

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    query: list[str]
    prompts: list[Any] | None = None
    labels: list[Any] | None = None


# -- response models (documentation and typed clients; the transport builds dicts) -------------


class NormalizationOut(BaseModel):
    mean: float
    std: float
    source: Literal["static", "running"]


class ModelOut(BaseModel):
    id: str
    revision: str
    normalization: NormalizationOut | None = Field(None, description="Only when the request asked to normalize.")


class ScoredOut(BaseModel):
    score: float = Field(description="Raw model output (no sigmoid).")
    scores: list[float] | None = Field(None, description="Every head output, for vector heads.")
    num_tokens: int
    truncated: bool
    normalized: float | None = Field(None, description="Only with normalize: true.")


class ScoreResponse(BaseModel):
    model: ModelOut
    results: list[ScoredOut | ErrorBody]


class CompareResponse(BaseModel):
    model: ModelOut
    scores: list[float]
    probabilities: list[float] = Field(description="softmax(scores): P(response i is best).")
    ranking: list[int] = Field(description="Response indices, best first.")


class GetRewardResponse(BaseModel):
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
