"""Wire models of the reward service's vLLM-compatible pooling API (``/classify``, ``/pooling``).

The shapes follow vLLM 0.33.0 (``vllm/entrypoints/pooling/{base,classify,pooling}/protocol.py``),
so that a client written for vLLM's pooling runner (verl's reward-model server mode among them)
works unchanged. vLLM's request models accept and ignore unknown keys (``extra="allow"``); so do
these (``extra="ignore"``), with strict types otherwise, like the rest of the service.

Every field vLLM declares is declared here. What the service can honour is honoured; what it
cannot is answered 400 by the transport (:func:`unsupported`), never silently ignored:

- ``input``: a string or a list of strings, each tokenized as vLLM does, ``tokenizer(text)`` with the
  tokenizer's special tokens unless ``add_special_tokens`` is false (then exactly a ``text`` item of
  ``/v1/score``: verbatim, nothing added); or token ids (``list[int]`` for one input, ``list[list[int]]``
  for several), scored exactly as given (an id outside the tokenizer's vocabulary is a 400; past
  the maximum length the first ids are dropped, as for text).
- ``messages``: one conversation, rendered with the reward model's chat template exactly like a
  ``messages`` item of ``/v1/score`` (no generation prompt, no special tokens added: vLLM's chat
  defaults).
- ``add_special_tokens``: default true for ``input`` strings, as in vLLM (a BOS for Llama-style
  tokenizers, [CLS] ... [SEP] for BERT-style ones; nothing for SmolLM2 or Qwen/ChatML tokenizers,
  whose scores then equal ``/v1/score``'s); false for ``messages`` (vLLM's chat default; true is
  refused: the chat template writes the special tokens).
- ``use_activation``: default on. Off: ``probs`` are the raw model outputs, exactly the ``/v1/score``
  scores (every head of a vector head). On: vLLM's default classifier activation, a sigmoid for one
  output and a softmax over the outputs for several.
- truncation: the service always keeps an item's last ``max_length`` tokens (``GET /v1/models``);
  ``truncate_prompt_tokens`` of ``-1`` or exactly that length (with ``truncation_side`` left out or
  ``"left"``) asks for the same thing and is accepted; any other cut is refused.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, JsonValue, RootModel, Tag, model_validator
from pydantic_core import PydanticCustomError

from services.common.errors import ServiceError, invalid
from services.reward.engine.results import ItemError, ScoredItem, ScoreOutcome
from services.runtime.chat import ChatMessage
from services.runtime.items import ModelInfo, RewardInput

# vLLM 0.33.0 serves ``/classify`` and ``/pooling`` (no ``/v1`` prefix); the ``/v1`` aliases are ours,
# for clients whose base URL ends in ``/v1``.
CLASSIFY_PATHS = ("/classify", "/v1/classify")
POOLING_PATHS = ("/pooling", "/v1/pooling")

# Union tags pydantic puts into error locations (dropped by the transport's parser).
REQUEST_TAGS = frozenset({"completion", "chat"})
INPUT_TAGS = frozenset({"text", "texts", "token_ids", "token_id_lists"})

_TEXTS_EXAMPLE: list[JsonValue] = ["<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"]
_MESSAGES_EXAMPLE: list[JsonValue] = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


def _removed_parameters(data: Any) -> Any:
    """vLLM 0.33 refuses these keys by name (``reject_removed_pooling_parameters``) rather than
    ignoring them; ``normalize`` also means something else on ``/v1/score`` here."""
    if isinstance(data, dict):
        if "normalize" in data:
            raise PydanticCustomError("removed_parameter", "Parameter `normalize` was removed; use `use_activation`")
        task = data.get("task")
        if task == "score":
            raise PydanticCustomError("removed_parameter", "`score` task was removed; use `classify` instead")
        if task == "encode":
            raise PydanticCustomError(
                "removed_parameter", "`encode` task was removed; use `token_embed` or `token_classify` instead"
            )
    return data


class _Lenient(BaseModel):
    """Strict types; unknown keys ignored, as vLLM's ``OpenAIBaseModel`` does."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class PoolingMessage(_Lenient):
    """One chat message (string content only: content parts are refused by the schema)."""

    role: str
    content: str


# -- request fields -----------------------------------------------------------------------------


class _Common(_Lenient):
    """vLLM's ``PoolingBasicRequestMixin`` and ``ClassifyRequestMixin``."""

    model: str | None = Field(None, description="Accepted and not checked (vLLM 0.33 does not check it either).")
    user: str | None = None
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = Field(
        None,
        description="-1 or the model's maximum length (both: keep the last max_length tokens, which the "
        "service always does); any other value is refused.",
    )
    padding: Literal["max_length", "do_not_pad"] | None = Field(None, description='Only "do_not_pad" is supported.')
    truncation_side: Literal["left", "right"] | None = Field(
        None, description='Only "left" (keep the last tokens) is supported.'
    )
    request_id: str | None = Field(None, description="Response id suffix when no X-Request-Id header is sent.")
    priority: int = Field(0, description="Only 0: the service has no per-request priorities on this route.")
    mm_processor_kwargs: dict[str, Any] | None = Field(None, description="Refused: text-only models.")
    cache_salt: str | None = Field(None, min_length=1, max_length=1024, description="Accepted; nothing is cached.")
    use_activation: bool | None = Field(
        None,
        description="Default true: sigmoid for one output, softmax over several. false: raw model outputs "
        "(the /v1/score scores).",
    )


def _input_kind(v: Any) -> str | None:
    if isinstance(v, str):
        return "text"
    if isinstance(v, list):
        first = v[0] if v else ""
        if isinstance(first, list):
            return "token_id_lists"
        if isinstance(first, int) and not isinstance(first, bool):
            return "token_ids"
        return "texts"
    return None


class _Completion(_Lenient):
    input: Annotated[
        Annotated[str, Tag("text")]
        | Annotated[list[str], Tag("texts")]
        | Annotated[list[int], Tag("token_ids")]
        | Annotated[list[list[int]], Tag("token_id_lists")],
        Discriminator(
            _input_kind,
            custom_error_type="input_type",
            custom_error_message="input must be a string, a list of strings, token ids or lists of token ids",
        ),
    ] = Field(
        description="A string, a list of strings, token ids or a list of token-id lists.", examples=[_TEXTS_EXAMPLE]
    )
    add_special_tokens: bool | None = Field(
        None,
        description="Strings: add the tokenizer's special tokens (BOS...) as vLLM does (default true); false "
        "scores them verbatim like /v1/score text items. Token ids are scored as given either way.",
    )


class _Chat(_Lenient):
    messages: list[PoolingMessage] = Field(examples=[_MESSAGES_EXAMPLE])
    add_generation_prompt: bool = Field(False, description="Only false.")
    continue_final_message: bool = Field(False, description="Only false.")
    add_special_tokens: bool = Field(False, description="Only false.")
    chat_template: str | None = Field(None, description="Refused: the reward model's own template is used.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Refused.")
    media_io_kwargs: dict[str, dict[str, Any]] | None = Field(None, description="Refused.")


class _Pooling(_Lenient):
    """vLLM's ``EmbedRequestMixin`` / ``EncodingRequestMixin`` fields and ``task``."""

    task: str | None = Field(None, description='Only "classify" (the task of a reward model).')
    dimensions: int | None = Field(None, description="Refused (as vLLM does).")
    encoding_format: Literal["float", "base64", "bytes", "bytes_only"] = Field(
        "float", description='"float" or "base64" (float32/float16); the bytes formats are refused.'
    )
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"


def _request_kind(v: Any) -> str | None:
    if isinstance(v, dict):
        has_input, has_messages = "input" in v, "messages" in v
        if has_input == has_messages:
            return None  # neither or both
        return "chat" if has_messages else "completion"
    if isinstance(v, _Chat):
        return "chat"
    if isinstance(v, _Completion):
        return "completion"
    return None


_KIND_ERROR = "a request has exactly one of input (a string or a list of strings) or messages"


class ClassificationCompletionRequest(_Common, _Completion):
    """``POST /classify`` with ``input``."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "reward", "input": _TEXTS_EXAMPLE, "use_activation": False}]}
    )


class ClassificationChatRequest(_Common, _Chat):
    """``POST /classify`` with ``messages`` (one conversation)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"messages": _MESSAGES_EXAMPLE}]})


class ClassificationRequest(
    RootModel[
        Annotated[
            Annotated[ClassificationCompletionRequest, Tag("completion")]
            | Annotated[ClassificationChatRequest, Tag("chat")],
            Discriminator(_request_kind, custom_error_type="request_type", custom_error_message=_KIND_ERROR),
        ]
    ]
):
    """``POST /classify``: vLLM 0.33's ``ClassificationRequest`` (completion or chat variant)."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        return _removed_parameters(data)


class PoolingCompletionRequest(_Common, _Pooling, _Completion):
    """``POST /pooling`` with ``input``."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"input": ["first text", "second text"], "use_activation": False}]}
    )


class PoolingChatRequest(_Common, _Pooling, _Chat):
    """``POST /pooling`` with ``messages`` (one conversation)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"messages": _MESSAGES_EXAMPLE}]})


class PoolingRequest(
    RootModel[
        Annotated[
            Annotated[PoolingCompletionRequest, Tag("completion")] | Annotated[PoolingChatRequest, Tag("chat")],
            Discriminator(_request_kind, custom_error_type="request_type", custom_error_message=_KIND_ERROR),
        ]
    ]
):
    """``POST /pooling``: vLLM 0.33's ``PoolingRequest`` (completion or chat variant; IO-processor
    plugin requests are not served)."""

    model_config = ConfigDict(frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        return _removed_parameters(data)


AnyVariant = ClassificationCompletionRequest | ClassificationChatRequest | PoolingCompletionRequest | PoolingChatRequest


# -- response models (documentation, typed clients and tests; the transport builds dicts) --------


class UsageInfo(BaseModel):
    """vLLM's ``UsageInfo`` as its pooling routes dump it."""

    prompt_tokens: int = Field(description="Tokens scored, after truncation, summed over the inputs.")
    total_tokens: int
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class ClassificationData(BaseModel):
    index: int
    label: str | None = Field(description="The model's label name of the largest output.")
    probs: list[float] = Field(description="Activated outputs, or raw ones with use_activation: false.")
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: UsageInfo

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "classify-2f1c0b6e0d1f4c51a6f7a2d1b5c3e9aa",
                    "object": "list",
                    "created": 1767225600,
                    "model": "smollm2-135m-rm",
                    "data": [{"index": 0, "label": "LABEL_0", "probs": [0.8125], "num_classes": 1}],
                    "usage": {
                        "prompt_tokens": 21,
                        "total_tokens": 21,
                        "completion_tokens": 0,
                        "prompt_tokens_details": None,
                        "completion_tokens_details": None,
                    },
                }
            ]
        }
    )


class PoolingResponseData(BaseModel):
    index: int
    object: str = "pooling"
    data: list[list[float]] | list[float] | str = Field(description="The outputs, or base64 of their bytes.")


class PoolingResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "pooling-2f1c0b6e0d1f4c51a6f7a2d1b5c3e9aa",
                    "object": "list",
                    "created": 1767225600,
                    "model": "smollm2-135m-rm",
                    "data": [{"index": 0, "object": "pooling", "data": [1.46875]}],
                    "usage": {
                        "prompt_tokens": 21,
                        "total_tokens": 21,
                        "completion_tokens": 0,
                        "prompt_tokens_details": None,
                        "completion_tokens_details": None,
                    },
                }
            ]
        }
    )


# -- request → engine ---------------------------------------------------------------------------


def ids_one(value: Any) -> bool:
    """``input`` is one input's token ids (``list[int]``), not a list of inputs."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], int)


def unsupported(req: AnyVariant, *, max_length: int, max_items: int) -> ServiceError | None:
    """The 400 for the first thing in ``req`` this service cannot honour, else None."""

    def refuse(message: str) -> ServiceError:
        return invalid(message)

    if isinstance(req, ClassificationCompletionRequest | PoolingCompletionRequest):
        if isinstance(req.input, list) and req.input and isinstance(req.input[0], list) and not all(req.input):
            return refuse("a token-id list is empty: send at least one id per input")
        if isinstance(req.input, list) and not req.input:
            return refuse("input is empty: send at least one string")
        if isinstance(req.input, list) and not ids_one(req.input) and len(req.input) > max_items:
            return refuse(
                f"too many inputs: {len(req.input)} > {max_items} per request; split the request "
                "(GET /v1/models reports the limits)"
            )
    else:
        if req.add_generation_prompt or req.continue_final_message:
            return refuse(
                "add_generation_prompt and continue_final_message are not supported: a reward model "
                "scores the whole conversation as it is"
            )
        if req.add_special_tokens:
            return refuse("add_special_tokens: true is not supported for messages (the chat template adds them)")
        if req.chat_template is not None or req.chat_template_kwargs or req.media_io_kwargs:
            return refuse(
                "chat_template, chat_template_kwargs and media_io_kwargs are not supported: messages are "
                "rendered with the reward model's own chat template"
            )
    t = req.truncate_prompt_tokens
    if t is not None and t != -1 and t != max_length:
        if t > max_length:
            return refuse(f"truncate_prompt_tokens={t} cannot be greater than the model's maximum length {max_length}")
        return refuse(
            f"truncate_prompt_tokens={t} is not supported: the service keeps the last {max_length} tokens "
            "(the model's maximum length); send -1, or cut the text yourself"
        )
    if req.truncation_side == "right":
        return refuse('truncation_side "right" is not supported: the service keeps the last tokens ("left")')
    if req.padding == "max_length":
        return refuse('padding "max_length" is not supported: inputs are scored unpadded ("do_not_pad")')
    if req.priority != 0:
        return refuse("priority must be 0: requests on this route run with the service's online priority")
    if req.mm_processor_kwargs:
        return refuse("mm_processor_kwargs is not supported: the reward model is text-only")
    if isinstance(req, PoolingCompletionRequest | PoolingChatRequest):
        if req.task is not None and req.task != "classify":
            return refuse(f"Unsupported task: {req.task!r}; supported tasks: ('classify',)")
        if req.dimensions is not None:
            return refuse("dimensions is currently not supported")
        if req.encoding_format not in ("float", "base64"):
            return refuse(f'encoding_format "{req.encoding_format}" is not supported: use "float" or "base64"')
        if req.encoding_format == "base64" and req.embed_dtype not in ("float32", "float16"):
            return refuse(f'embed_dtype "{req.embed_dtype}" is not supported: use "float32" or "float16"')
    return None


def engine_inputs(req: AnyVariant) -> list[RewardInput]:
    """The engine's items: one ``text`` item per input string (with the tokenizer's special tokens
    unless ``add_special_tokens`` is false, as vLLM), one ``token_ids`` item per id list (scored as
    given), or one ``messages`` item."""
    if isinstance(req, ClassificationChatRequest | PoolingChatRequest):
        return [RewardInput(messages=tuple(ChatMessage(role=m.role, content=m.content) for m in req.messages))]
    specials = req.add_special_tokens is not False
    value = req.input
    if isinstance(value, str):
        return [RewardInput(text=value, add_special_tokens=specials)]
    out: list[RewardInput] = []
    ids: list[int] = []
    for x in value:
        if isinstance(x, str):
            out.append(RewardInput(text=x, add_special_tokens=specials))
        elif isinstance(x, int):  # one input's token ids
            ids.append(x)
        else:
            out.append(RewardInput(token_ids=tuple(x)))
    return [RewardInput(token_ids=tuple(ids))] if ids else out


# -- engine → wire ------------------------------------------------------------------------------


def raw_outputs(r: ScoredItem) -> list[float]:
    """Every head's raw output: ``scores`` of a vector head, else the one ``score``."""
    return list(r.scores) if r.scores is not None else [r.score]


def activate(raw: Sequence[float]) -> list[float]:
    """vLLM 0.33's default classifier activation (``PoolerClassify``, ``activations.py``): sigmoid
    for a single output, softmax over the outputs for several. Computed in float64."""
    if len(raw) < 2:
        return [_sigmoid(v) for v in raw]
    x = np.asarray(raw, dtype=np.float64)
    e = np.exp(x - x.max())
    return [float(v) for v in e / e.sum()]


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)  # never overflows for x < 0
    return e / (1.0 + e)


def _usage(tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def _scored(outcome: ScoreOutcome) -> list[ScoredItem]:
    """vLLM has no per-item errors: a runtime failure of any item fails the request with its status."""
    out: list[ScoredItem] = []
    for i, r in enumerate(outcome.results):
        if isinstance(r, ItemError):
            raise ServiceError(r.code, f"input {i}: {r.message}", item=i)
        out.append(r)
    return out


def _label(info: ModelInfo, values: Sequence[float]) -> str | None:
    best = int(np.argmax(np.asarray(values)))
    return info.label_names[best] if best < len(info.label_names) else None


def classify_body(
    outcome: ScoreOutcome, info: ModelInfo, *, use_activation: bool, response_id: str, created: int
) -> dict[str, Any]:
    """vLLM's ``ClassificationResponse`` as ``model_dump()`` gives it."""
    data: list[dict[str, Any]] = []
    tokens = 0
    for i, r in enumerate(_scored(outcome)):
        probs = activate(raw_outputs(r)) if use_activation else raw_outputs(r)
        data.append({"index": i, "label": _label(info, probs), "probs": probs, "num_classes": len(probs)})
        tokens += r.num_tokens
    return {
        "id": response_id,
        "object": "list",
        "created": created,
        "model": outcome.model.id,
        "data": data,
        "usage": _usage(tokens),
    }


def _encode(values: list[float], embed_dtype: str, endianness: str) -> str:
    """vLLM's base64 encoding (``tensor2binary``): the values in ``embed_dtype``, in the byte order
    asked for (``native``: this machine's)."""
    order = {"native": "=", "little": "<", "big": ">"}[endianness]
    kind = "f4" if embed_dtype == "float32" else "f2"
    return base64.b64encode(np.asarray(values, dtype=np.dtype(order + kind)).tobytes()).decode("ascii")


def pooling_body(
    outcome: ScoreOutcome,
    *,
    use_activation: bool,
    response_id: str,
    created: int,
    encoding_format: str = "float",
    embed_dtype: str = "float32",
    endianness: str = "native",
) -> dict[str, Any]:
    """vLLM's ``PoolingResponse`` for the ``classify`` task: each item's outputs (activated unless
    ``use_activation`` is false) as floats or base64."""
    data: list[dict[str, Any]] = []
    tokens = 0
    for i, r in enumerate(_scored(outcome)):
        values = activate(raw_outputs(r)) if use_activation else raw_outputs(r)
        encoded: list[float] | str = _encode(values, embed_dtype, endianness) if encoding_format == "base64" else values
        data.append({"index": i, "object": "pooling", "data": encoded})
        tokens += r.num_tokens
    return {
        "id": response_id,
        "object": "list",
        "created": created,
        "model": outcome.model.id,
        "data": data,
        "usage": _usage(tokens),
    }
