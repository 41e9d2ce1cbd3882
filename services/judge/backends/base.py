"""The judge backend interface: one LLM call in, one verdict out. No retries, no limits here.

Retries, rate limits, budgets, caching and position debiasing live in the engine; every
attempt the engine makes passes through its limiter, which is why SDK clients are built with
``max_retries=0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from services.judge.types import VerdictQuery, VerdictReply

# The longest judge prompt a provider backend is sent, in characters, unless --max-prompt-chars
# says otherwise: about 250k tokens at 4 characters per token, more than a 200k-token context
# holds. A backend that knows what its model can read (the local one) has its own
# ``max_prompt_chars``; the engine refuses longer prompts before calling any backend.
DEFAULT_MAX_PROMPT_CHARS = 1_000_000


@dataclass(frozen=True)
class BackendInfo:
    backend: str  # "openai", "anthropic", "openai-compatible", "local", "scripted"
    model: str  # passed to the provider as is
    snapshot: str  # what identifies the weights for the cache key (model name, or a weights hash)


class UpstreamError(Exception):
    """A provider call failed. ``retryable`` for 408/409/429/5xx/timeouts/connection errors;
    ``retry_after`` (seconds) from the provider's headers when it said; ``status`` when HTTP."""

    def __init__(
        self, message: str, *, retryable: bool, retry_after: float | None = None, status: int | None = None,
        rate_limited: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status
        self.rate_limited = rate_limited


class UnparseableReply(Exception):
    """The provider answered, but no verdict could be read from the reply."""

    def __init__(self, raw: str, reason: str) -> None:
        super().__init__(reason)
        self.raw = raw
        self.reason = reason


class JudgeBackend(Protocol):
    """A judge backend. It may also have ``max_prompt_chars`` (int): the longest prompt it can
    read, the engine's budget when ``--max-prompt-chars`` is unset."""

    info: BackendInfo

    def sampling_key(self) -> dict[str, object]:
        """Every sampling parameter that can change a reply (part of the cache key)."""
        ...

    async def verdict(self, query: VerdictQuery) -> VerdictReply:
        """One attempt. Raises :class:`UpstreamError` or :class:`UnparseableReply`."""
        ...

    async def aclose(self) -> None: ...
