"""The judge engine's settings and limits: one frozen object; ``serve judge``'s settings map each field to a flag."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from services.judge.backends.base import DEFAULT_MAX_PROMPT_CHARS

PrincipleMode = Literal["one", "ensemble"]

# Grade verdicts are single tokens: the digits 0..9.
GRADE_SCALE_BOUNDS = (0, 9)

# USD per 1M tokens (input, output). Matched by exact name, else by the longest prefix
# ("gpt-4o-2024-08-06" → "gpt-4o"); unknown models and the local backend cost 0.
DEFAULT_PRICES: Mapping[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-3-5-sonnet": (3.00, 15.00),
    "claude-3-7-sonnet": (3.00, 15.00),
    "claude-3-haiku": (0.25, 1.25),
    "claude-3-opus": (15.00, 75.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-opus-4": (15.00, 75.00),
    "claude-haiku-4": (1.00, 5.00),
}


@dataclass(frozen=True)
class JudgeEngineConfig:
    """Everything the judge engine does between transport and backend.

    - ``tie_margin``: ``|p - 0.5| < tie_margin`` → ``winner: null``.
    - ``rationale``: ask the judge to reason before its verdict (off by default).
    - ``clamp``: (lo, hi) bounds for each verdict probability; applied only with ``rationale``.
    - ``max_parse_retries``: re-asks after an unparseable reply before abstaining.
    - ``max_retries``: re-tries after a retryable provider failure (429/5xx/timeouts), full jitter.
    - ``max_concurrency``: most provider calls at once (the AIMD ceiling; 429s halve the live limit).
    - ``rpm``: provider calls per minute: at most rpm/6 in any 10 s window, bursts of max(1, rpm/60).
    - ``tpm``: provider tokens per minute (estimated before a call, corrected by reported usage).
    - ``max_tokens_total``: token budget of this server's life; once spent, RESOURCE_EXHAUSTED.
    - ``prices``: USD per 1M (input, output) tokens per model name (prefix match).
    - ``max_queue_items``: most provider calls admitted and unfinished; past it, RESOURCE_EXHAUSTED.
    - ``principles``: the constitution (used when a request carries none).
    - ``principle_mode``: ``one`` principle per item (chosen from a hash of the item) or an
      ``ensemble`` of ``ensemble_k`` principles whose verdicts are averaged.
    - ``rank_max_pairs``: above N(N-1)/2 > this, rank judges a balanced sample of pairs.
    - ``template``: a template set under ``services/judge/templates/`` or a directory path.
    - ``seed``: seeds retry jitter and the deterministic choices (order for ``single``, principles, pair samples).
    - ``backoff_base_s`` / ``backoff_max_s``: full-jitter backoff: uniform(0, min(max, base * 2**attempt)).
    - ``call_timeout_s``: the engine's own bound on one provider call (None: the backend's timeout).
    - ``max_items_per_request``: most responses one request may carry (``--max-items-per-request``).
    - ``max_text_bytes``: longest single text (prompt, message, response, rubric, reference,
      principle) in UTF-8 bytes (``--max-text-bytes``).
    - ``max_prompt_chars``: longest rendered judge prompt, in characters (``--max-prompt-chars``);
      None: the backend's own ``max_prompt_chars``, else :data:`DEFAULT_MAX_PROMPT_CHARS`.
    """

    tie_margin: float = 0.05
    rationale: bool = False
    clamp: tuple[float, float] = (0.05, 0.95)
    max_parse_retries: int = 2
    max_retries: int = 4
    max_concurrency: int = 16
    rpm: float | None = None
    tpm: float | None = None
    max_tokens_total: int | None = None
    prices: Mapping[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    max_queue_items: int = 10_000
    principles: tuple[str, ...] = ()
    principle_mode: PrincipleMode = "one"
    ensemble_k: int = 3
    rank_max_pairs: int = 64
    template: str = "default"
    seed: int = 0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    call_timeout_s: float | None = None
    max_items_per_request: int = 128
    max_text_bytes: int = 256 * 2**10
    max_prompt_chars: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.tie_margin < 0.5:
            raise ValueError("tie_margin must be in [0, 0.5)")
        lo, hi = self.clamp
        if not 0 <= lo < hi <= 1:
            raise ValueError("clamp must be (lo, hi) with 0 <= lo < hi <= 1")
        for name in ("max_parse_retries", "max_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        for name in ("rpm", "tpm"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0 (or None for unlimited)")
        if self.max_tokens_total is not None and self.max_tokens_total <= 0:
            raise ValueError("max_tokens_total must be > 0 (or None for unlimited)")
        if self.max_queue_items < 1:
            raise ValueError("max_queue_items must be >= 1")
        if self.principle_mode not in ("one", "ensemble"):
            raise ValueError("principle_mode must be 'one' or 'ensemble'")
        if self.ensemble_k < 1:
            raise ValueError("ensemble_k must be >= 1")
        if any(not p for p in self.principles):
            raise ValueError("principles must be non-empty strings")
        if self.rank_max_pairs < 1:
            raise ValueError("rank_max_pairs must be >= 1")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff must be >= 0")
        for name in ("max_items_per_request", "max_text_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError("max_prompt_chars must be >= 1 (or None for the backend's default)")

    @property
    def limits(self) -> JudgeLimits:
        """The limits this configuration enforces (what ``/v1/models`` reports, with the transport's)."""
        return JudgeLimits(
            max_items_per_request=self.max_items_per_request,
            max_text_bytes=self.max_text_bytes,
            max_prompt_chars=self.max_prompt_chars or DEFAULT_MAX_PROMPT_CHARS,
            max_queue_items=self.max_queue_items,
            max_concurrency=self.max_concurrency,
            rpm=self.rpm,
            tpm=self.tpm,
            max_tokens_total=self.max_tokens_total,
            rank_max_pairs=self.rank_max_pairs,
            grade_scale_bounds=GRADE_SCALE_BOUNDS,
        )


@dataclass(frozen=True)
class JudgeLimits:
    """The judge engine's limits: what its validation and admission enforce, and ``/v1/models`` reports."""

    max_items_per_request: int
    max_text_bytes: int
    max_queue_items: int
    max_concurrency: int
    rpm: float | None
    tpm: float | None
    max_tokens_total: int | None
    rank_max_pairs: int
    grade_scale_bounds: tuple[int, int]  # a scale [lo, hi] needs bounds[0] <= lo < hi <= bounds[1]
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS  # the rendered judge prompt, in characters


def price_for(prices: Mapping[str, tuple[float, float]], model: str) -> tuple[float, float]:
    """(input, output) USD per 1M tokens for ``model``: exact name, else the longest matching prefix."""
    if model in prices:
        return prices[model]
    best = ""
    for name in prices:
        if model.startswith(name) and len(name) > len(best):
            best = name
    return prices[best] if best else (0.0, 0.0)
