from protos.rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_ONLINE: _ClassVar[Priority]
    PRIORITY_BATCH: _ClassVar[Priority]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_ONLINE: Priority
PRIORITY_BATCH: Priority

class PromptResponse(_message.Message):
    __slots__ = ("prompt_text", "prompt_messages", "response")
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt_text: str
    prompt_messages: _common_pb2.Conversation
    response: str
    def __init__(self, prompt_text: _Optional[str] = ..., prompt_messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., response: _Optional[str] = ...) -> None: ...

class RewardInput(_message.Message):
    __slots__ = ("text", "pair", "messages")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PAIR_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    text: str
    pair: PromptResponse
    messages: _common_pb2.Conversation
    def __init__(self, text: _Optional[str] = ..., pair: _Optional[_Union[PromptResponse, _Mapping]] = ..., messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("inputs", "priority", "normalize", "request_id")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[RewardInput]
    priority: Priority
    normalize: bool
    request_id: str
    def __init__(self, inputs: _Optional[_Iterable[_Union[RewardInput, _Mapping]]] = ..., priority: _Optional[_Union[Priority, str]] = ..., normalize: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class Score(_message.Message):
    __slots__ = ("score", "scores", "num_tokens", "truncated", "normalized")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    score: float
    scores: _containers.RepeatedScalarFieldContainer[float]
    num_tokens: int
    truncated: bool
    normalized: float
    def __init__(self, score: _Optional[float] = ..., scores: _Optional[_Iterable[float]] = ..., num_tokens: _Optional[int] = ..., truncated: _Optional[bool] = ..., normalized: _Optional[float] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("score", "error")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    score: Score
    error: _common_pb2.Error
    def __init__(self, score: _Optional[_Union[Score, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class Normalization(_message.Message):
    __slots__ = ("mean", "std", "source")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    source: str
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("id", "revision", "normalization")
    ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    revision: str
    normalization: Normalization
    def __init__(self, id: _Optional[str] = ..., revision: _Optional[str] = ..., normalization: _Optional[_Union[Normalization, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model", "results")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("request_id", "index", "result", "model")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    result: ItemResult
    model: ModelRef
    def __init__(self, request_id: _Optional[str] = ..., index: _Optional[int] = ..., result: _Optional[_Union[ItemResult, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("prompt_text", "prompt_messages", "responses")
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    prompt_text: str
    prompt_messages: _common_pb2.Conversation
    responses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt_text: _Optional[str] = ..., prompt_messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., responses: _Optional[_Iterable[str]] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("model", "scores", "probabilities", "ranking")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    scores: _containers.RepeatedScalarFieldContainer[float]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    ranking: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., scores: _Optional[_Iterable[float]] = ..., probabilities: _Optional[_Iterable[float]] = ..., ranking: _Optional[_Iterable[int]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_items_per_request", "max_body_bytes", "max_text_bytes", "max_batch_tokens", "max_request_tokens")
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_BODY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_items_per_request: int
    max_body_bytes: int
    max_text_bytes: int
    max_batch_tokens: int
    max_request_tokens: int
    def __init__(self, max_items_per_request: _Optional[int] = ..., max_body_bytes: _Optional[int] = ..., max_text_bytes: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_request_tokens: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "revision", "architecture", "backend", "dtype", "device", "max_length", "num_labels", "label_names", "has_chat_template", "limits")
    ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_LABELS_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    revision: str
    architecture: str
    backend: str
    dtype: str
    device: str
    max_length: int
    num_labels: int
    label_names: _containers.RepeatedScalarFieldContainer[str]
    has_chat_template: bool
    limits: Limits
    def __init__(self, id: _Optional[str] = ..., revision: _Optional[str] = ..., architecture: _Optional[str] = ..., backend: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., max_length: _Optional[int] = ..., num_labels: _Optional[int] = ..., label_names: _Optional[_Iterable[str]] = ..., has_chat_template: _Optional[bool] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...
