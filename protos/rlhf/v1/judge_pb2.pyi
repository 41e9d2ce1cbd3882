from protos.rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JudgeProtocol(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROTOCOL_UNSPECIFIED: _ClassVar[JudgeProtocol]
    PROTOCOL_BOTH_ORDERS: _ClassVar[JudgeProtocol]
    PROTOCOL_SINGLE: _ClassVar[JudgeProtocol]
PROTOCOL_UNSPECIFIED: JudgeProtocol
PROTOCOL_BOTH_ORDERS: JudgeProtocol
PROTOCOL_SINGLE: JudgeProtocol

class JudgeRef(_message.Message):
    __slots__ = ("backend", "model", "template_hash")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_HASH_FIELD_NUMBER: _ClassVar[int]
    backend: str
    model: str
    template_hash: str
    def __init__(self, backend: _Optional[str] = ..., model: _Optional[str] = ..., template_hash: _Optional[str] = ...) -> None: ...

class JudgeUsage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cost_usd", "calls")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    calls: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost_usd: _Optional[float] = ..., calls: _Optional[int] = ...) -> None: ...

class Abstain(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class JudgeCompareRequest(_message.Message):
    __slots__ = ("prompt_text", "prompt_messages", "responses", "rubric", "reference", "protocol", "principles", "request_id")
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PRINCIPLES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt_text: str
    prompt_messages: _common_pb2.Conversation
    responses: _containers.RepeatedScalarFieldContainer[str]
    rubric: str
    reference: str
    protocol: JudgeProtocol
    principles: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, prompt_text: _Optional[str] = ..., prompt_messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., responses: _Optional[_Iterable[str]] = ..., rubric: _Optional[str] = ..., reference: _Optional[str] = ..., protocol: _Optional[_Union[JudgeProtocol, str]] = ..., principles: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class Comparison(_message.Message):
    __slots__ = ("preference", "winner", "consistent", "rationale", "soft")
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    WINNER_FIELD_NUMBER: _ClassVar[int]
    CONSISTENT_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    preference: float
    winner: int
    consistent: bool
    rationale: str
    soft: bool
    def __init__(self, preference: _Optional[float] = ..., winner: _Optional[int] = ..., consistent: _Optional[bool] = ..., rationale: _Optional[str] = ..., soft: _Optional[bool] = ...) -> None: ...

class JudgeCompareResponse(_message.Message):
    __slots__ = ("comparison", "abstain", "judge", "usage", "cached")
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    comparison: Comparison
    abstain: Abstain
    judge: JudgeRef
    usage: JudgeUsage
    cached: bool
    def __init__(self, comparison: _Optional[_Union[Comparison, _Mapping]] = ..., abstain: _Optional[_Union[Abstain, _Mapping]] = ..., judge: _Optional[_Union[JudgeRef, _Mapping]] = ..., usage: _Optional[_Union[JudgeUsage, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

class JudgeCompareStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: JudgeCompareResponse
    error: _common_pb2.Error
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[JudgeCompareResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.Error, _Mapping]] = ...) -> None: ...

class JudgeRankRequest(_message.Message):
    __slots__ = ("prompt_text", "prompt_messages", "responses", "rubric", "reference", "principles")
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPLES_FIELD_NUMBER: _ClassVar[int]
    prompt_text: str
    prompt_messages: _common_pb2.Conversation
    responses: _containers.RepeatedScalarFieldContainer[str]
    rubric: str
    reference: str
    principles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt_text: _Optional[str] = ..., prompt_messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., responses: _Optional[_Iterable[str]] = ..., rubric: _Optional[str] = ..., reference: _Optional[str] = ..., principles: _Optional[_Iterable[str]] = ...) -> None: ...

class Ranking(_message.Message):
    __slots__ = ("scores", "ranking", "consistent_rate")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    CONSISTENT_RATE_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    ranking: _containers.RepeatedScalarFieldContainer[int]
    consistent_rate: float
    def __init__(self, scores: _Optional[_Iterable[float]] = ..., ranking: _Optional[_Iterable[int]] = ..., consistent_rate: _Optional[float] = ...) -> None: ...

class JudgeRankResponse(_message.Message):
    __slots__ = ("ranking", "abstain", "judge", "usage", "cached")
    RANKING_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    ranking: Ranking
    abstain: Abstain
    judge: JudgeRef
    usage: JudgeUsage
    cached: bool
    def __init__(self, ranking: _Optional[_Union[Ranking, _Mapping]] = ..., abstain: _Optional[_Union[Abstain, _Mapping]] = ..., judge: _Optional[_Union[JudgeRef, _Mapping]] = ..., usage: _Optional[_Union[JudgeUsage, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

class Scale(_message.Message):
    __slots__ = ("lo", "hi")
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    lo: int
    hi: int
    def __init__(self, lo: _Optional[int] = ..., hi: _Optional[int] = ...) -> None: ...

class JudgeGradeRequest(_message.Message):
    __slots__ = ("prompt_text", "prompt_messages", "response", "rubric", "reference", "scale", "principles")
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RUBRIC_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    PRINCIPLES_FIELD_NUMBER: _ClassVar[int]
    prompt_text: str
    prompt_messages: _common_pb2.Conversation
    response: str
    rubric: str
    reference: str
    scale: Scale
    principles: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt_text: _Optional[str] = ..., prompt_messages: _Optional[_Union[_common_pb2.Conversation, _Mapping]] = ..., response: _Optional[str] = ..., rubric: _Optional[str] = ..., reference: _Optional[str] = ..., scale: _Optional[_Union[Scale, _Mapping]] = ..., principles: _Optional[_Iterable[str]] = ...) -> None: ...

class Grade(_message.Message):
    __slots__ = ("score", "raw", "rationale", "soft")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    SOFT_FIELD_NUMBER: _ClassVar[int]
    score: float
    raw: float
    rationale: str
    soft: bool
    def __init__(self, score: _Optional[float] = ..., raw: _Optional[float] = ..., rationale: _Optional[str] = ..., soft: _Optional[bool] = ...) -> None: ...

class JudgeGradeResponse(_message.Message):
    __slots__ = ("grade", "abstain", "judge", "usage", "cached")
    GRADE_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    grade: Grade
    abstain: Abstain
    judge: JudgeRef
    usage: JudgeUsage
    cached: bool
    def __init__(self, grade: _Optional[_Union[Grade, _Mapping]] = ..., abstain: _Optional[_Union[Abstain, _Mapping]] = ..., judge: _Optional[_Union[JudgeRef, _Mapping]] = ..., usage: _Optional[_Union[JudgeUsage, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

class GetJudgeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JudgeLimits(_message.Message):
    __slots__ = ("max_items_per_request", "max_body_bytes", "max_text_bytes", "max_queue_items", "max_concurrency", "rpm", "tpm", "max_tokens_total", "rank_max_pairs", "grade_scale_bounds", "max_prompt_chars")
    MAX_ITEMS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_BODY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    RPM_FIELD_NUMBER: _ClassVar[int]
    TPM_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RANK_MAX_PAIRS_FIELD_NUMBER: _ClassVar[int]
    GRADE_SCALE_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    max_items_per_request: int
    max_body_bytes: int
    max_text_bytes: int
    max_queue_items: int
    max_concurrency: int
    rpm: float
    tpm: float
    max_tokens_total: int
    rank_max_pairs: int
    grade_scale_bounds: Scale
    max_prompt_chars: int
    def __init__(self, max_items_per_request: _Optional[int] = ..., max_body_bytes: _Optional[int] = ..., max_text_bytes: _Optional[int] = ..., max_queue_items: _Optional[int] = ..., max_concurrency: _Optional[int] = ..., rpm: _Optional[float] = ..., tpm: _Optional[float] = ..., max_tokens_total: _Optional[int] = ..., rank_max_pairs: _Optional[int] = ..., grade_scale_bounds: _Optional[_Union[Scale, _Mapping]] = ..., max_prompt_chars: _Optional[int] = ...) -> None: ...

class JudgeInfo(_message.Message):
    __slots__ = ("judge", "limits")
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    judge: JudgeRef
    limits: JudgeLimits
    def __init__(self, judge: _Optional[_Union[JudgeRef, _Mapping]] = ..., limits: _Optional[_Union[JudgeLimits, _Mapping]] = ...) -> None: ...
