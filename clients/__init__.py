"""Typed clients of the rlhf-feedback services (what a training job imports).

- :class:`RewardClient` / :class:`AsyncRewardClient`: the reward service (HTTP or gRPC, chosen by
  the URL), chunking, one retry policy, ``list[float | None]`` results with a reason per ``None``.
- :class:`JudgeClient` / :class:`AsyncJudgeClient`: the judge service (compare, rank, grade).
- The error tree (:mod:`clients.errors`) and the result types (:mod:`clients.types`).

Sync and async twins share one core and the same keyword-only signatures; every client pickles
(connections open lazily in the process that uses them).
"""

from clients.errors import (
    AuthenticationError,
    ConnectionFailedError,
    DeadlineExceededError,
    InvalidRequestError,
    OverloadedError,
    PermissionDeniedError,
    RlhfFeedbackError,
    ServerError,
    UnavailableError,
)
from clients.judge import AsyncJudgeClient, JudgeClient
from clients.retry import RetryPolicy
from clients.reward import AsyncRewardClient, RewardClient
from clients.types import (
    CompareResult,
    Conversation,
    Grade,
    ItemError,
    JudgeRef,
    Judgment,
    Limits,
    ModelInfo,
    ModelRef,
    Normalization,
    Pair,
    Ranking,
    ScoreResults,
    Text,
    Usage,
)

__all__ = [
    "AsyncJudgeClient",
    "AsyncRewardClient",
    "AuthenticationError",
    "CompareResult",
    "ConnectionFailedError",
    "Conversation",
    "DeadlineExceededError",
    "Grade",
    "InvalidRequestError",
    "ItemError",
    "JudgeClient",
    "JudgeRef",
    "Judgment",
    "Limits",
    "ModelInfo",
    "ModelRef",
    "Normalization",
    "OverloadedError",
    "Pair",
    "PermissionDeniedError",
    "Ranking",
    "RetryPolicy",
    "RewardClient",
    "RlhfFeedbackError",
    "ScoreResults",
    "ServerError",
    "Text",
    "UnavailableError",
    "Usage",
]
