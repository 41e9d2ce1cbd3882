"""Settings of the judge service: every ``serve judge`` flag, its env var and its help.

API keys are not settings: the provider SDKs read their own environment variables
(``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``), so a key never shows up in a flag or a process list.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from services.common.settings import ServiceSettings
from services.judge.engine.config import DEFAULT_PRICES, JudgeEngineConfig
from services.runtime.device import Dtype

Backend = Literal["local", "openai", "anthropic", "openai-compatible"]
CACHE_FILE = "judge-cache.sqlite"


def default_cache_path() -> Path:
    """``<user cache dir>/judge-cache.sqlite`` (the cache dir of :func:`services.runtime.default_model.cache_dir`)."""
    from services.runtime.default_model import cache_dir

    return cache_dir() / CACHE_FILE


class JudgeSettings(ServiceSettings):
    ENV_PREFIX: typing.ClassVar[str] = "RLHF_FEEDBACK_JUDGE_"

    http_port: int = Field(8001, ge=0, le=65535, description="HTTP port; 0 disables HTTP.")
    grpc_port: int = Field(50052, ge=0, le=65535, description="gRPC port; 0 disables gRPC.")
    max_items_per_request: int = Field(128, gt=0, description="Most responses one rank request may carry.")
    max_prompt_chars: int | None = Field(
        None,
        gt=0,
        description="Longest judge prompt, in characters: all the messages one verdict sends, as rendered "
        "(template, prompt, responses, reference, rubric, principle). A request whose prompt would be longer is "
        "refused (400 / INVALID_ARGUMENT, with the sizes) before anything is tokenized or sent. Characters, not "
        "tokens: counted before any tokenizer runs, the same for every backend. Unset: what the backend can "
        "read: local, the model's maximum length x 16 characters per token (131072 for the embedded SmolLM2's "
        "8192 tokens); openai, anthropic, openai-compatible: 1000000 (about 250k tokens at 4 characters per "
        "token, more than a 200k-token context).",
    )

    # -- the backend -----------------------------------------------------------------------------
    backend: Backend = Field(
        "local",
        description="Where verdicts come from: local (a Hugging Face causal LM in process), openai, anthropic, "
        "or openai-compatible (the openai SDK against --base-url: vLLM, llama.cpp server, SGLang, Ollama). "
        "API keys come from OPENAI_API_KEY / ANTHROPIC_API_KEY.",
    )
    model: str | None = Field(
        None,
        description="Model name passed to the provider as is (required for openai, anthropic and "
        "openai-compatible); for local, a checkpoint folder (unset: the embedded SmolLM2-135M-Instruct).",
    )
    base_url: str | None = Field(None, description="Provider base URL (required for openai-compatible).")
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one provider call, in seconds.")
    samples: int | None = Field(
        None,
        ge=1,
        description="anthropic (no logprobs): the soft label is the vote share of K sampled verdicts; "
        "unset: a verbalised probability from one call.",
    )

    # -- cache -----------------------------------------------------------------------------------
    cache: str | None = Field(
        None,
        description="Verdict cache: a SQLite file path, or 'off'. Unset: judge-cache.sqlite in the user cache "
        "directory ($RLHF_FEEDBACK_CACHE, else $XDG_CACHE_HOME/rlhf-feedback, else ~/.cache/rlhf-feedback).",
    )

    # -- batch jobs (POST /v1/batches: the providers' batch APIs, at batch prices) -------------------
    batch_api: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Batch jobs through the provider's batch API (POST /v1/batches). auto: for openai and anthropic; "
        "on: also for openai-compatible (its server must speak OpenAI's files + batches API); off: refused.",
    )
    batch_store: str | None = Field(
        None,
        description="SQLite file of the batch jobs (provider batch ids, which requests are done), so that a "
        "restarted service resumes polling. Unset: beside the cache (judge-cache.batches.sqlite).",
    )
    batch_poll_s: float = Field(30.0, gt=0, description="Seconds between polls of the provider's unfinished batches.")
    batch_max_attempts: int = Field(
        3, ge=1, description="Submissions of one request (failed or expired ones are resubmitted) before it is failed."
    )
    batch_max_requests: int | None = Field(
        None,
        gt=0,
        description="Most requests in one provider batch (unset: the provider's limit, 50000 for OpenAI, 100000 for "
        "Anthropic; files are also kept under their size limits).",
    )
    batch_price_factor: float = Field(
        0.5, gt=0, le=1, description="Batch price / interactive price (both providers charge half)."
    )

    # -- rate control and budgets ------------------------------------------------------------------
    max_concurrency: int = Field(16, ge=1, description="Most provider calls at once (lowered on 429s, AIMD).")
    rpm: float | None = Field(
        None, gt=0, description="Provider requests per minute, retries included (unset: unlimited)."
    )
    tpm: float | None = Field(None, gt=0, description="Provider tokens per minute (unset: unlimited).")
    max_tokens_total: int | None = Field(
        None,
        gt=0,
        description="Token budget of this server's life; once spent, requests get 429 / RESOURCE_EXHAUSTED.",
    )
    prices: Path | None = Field(
        None,
        description='JSON price table, USD per 1M tokens: {"model": [input, output]} (or {"input", "output"} '
        "objects), matched by exact name else longest prefix; merged over the built-in table.",
    )
    max_queue_items: int = Field(
        10_000,
        gt=0,
        description="Provider calls admitted and not finished (waiting for the rate limiter or running; local: "
        "also verdicts waiting to be tokenized or batched); beyond it requests get 429 / RESOURCE_EXHAUSTED "
        "with a retry delay at once.",
    )
    max_retries: int = Field(
        4, ge=0, description="Retries of a provider call after 408/409/429/5xx/timeouts (jittered backoff)."
    )
    max_parse_retries: int = Field(2, ge=0, description="Re-asks after an unparseable reply before abstaining.")

    # -- protocol ----------------------------------------------------------------------------------
    rationale: bool = Field(False, description="Ask the judge to reason before its verdict.")
    clamp: tuple[float, float] = Field(
        (0.05, 0.95),
        description="LO,HI bounds of each verdict probability; applied only with --rationale.",
    )
    tie_margin: float = Field(0.05, ge=0, lt=0.5, description="|preference - 0.5| below this gives winner: null.")
    principles: Path | None = Field(
        None, description="A constitution: a text file with one principle per line (blank lines ignored)."
    )
    principle_mode: Literal["one", "ensemble"] = Field(
        "one",
        description="one: a single principle per item, chosen deterministically from the item; "
        "ensemble: --ensemble-k principles, verdicts averaged.",
    )
    ensemble_k: int = Field(3, ge=1, description="Principles per item with --principle-mode ensemble.")
    rank_max_pairs: int = Field(
        64, ge=1, description="rank: above this many pairs, judge a balanced sample of pairs instead of all."
    )
    template: str = Field(
        "default", description="Prompt template set (under services/judge/templates/) or a directory path."
    )
    seed: int = Field(0, description="Seed of the deterministic choices (order for 'single', principles, pairs).")

    # -- the local backend ---------------------------------------------------------------------------
    dtype: Dtype = Field(
        "float32",
        description="local: weights and compute dtype. auto: bfloat16 where the hardware computes it natively "
        "(CUDA with bf16, a CPU with AVX-512 BF16 or AMX), float32 elsewhere; bfloat16 on a CPU without it is "
        "several times slower than float32 (a warning says so).",
    )
    device: str = Field("auto", description="local: cpu, cuda, cuda:N, or auto (cuda when present).")
    threads: int | None = Field(None, gt=0, description="local: torch intra-op threads (default: torch's choice).")
    max_batch_tokens: int = Field(
        8192, gt=0, description="local: token budget of one batched forward pass (padded); a longer item runs alone."
    )

    @field_validator("clamp", mode="before")
    @classmethod
    def _split_clamp(cls, v: object) -> object:
        if isinstance(v, str):
            parts = [p.strip() for p in v.split(",")]
            if len(parts) != 2:
                raise ValueError("expected LO,HI")
            return (float(parts[0]), float(parts[1]))
        return v

    @field_validator("clamp")
    @classmethod
    def _clamp_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 1:
            raise ValueError("expected 0 <= LO < HI <= 1")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> JudgeSettings:
        if self.http_port == 0 and self.grpc_port == 0:
            raise ValueError("both transports are disabled (--http-port 0 and --grpc-port 0)")
        if self.backend != "local" and not self.model:
            raise ValueError(f"--backend {self.backend} needs --model (passed to the provider as is)")
        if self.backend == "openai-compatible" and not self.base_url:
            raise ValueError("--backend openai-compatible needs --base-url")
        return self

    # -- derived -----------------------------------------------------------------------------------

    def cache_path(self) -> Path | None:
        """The SQLite cache file, or None for ``--cache off``."""
        if self.cache is None or self.cache == "":
            return default_cache_path()
        if self.cache.strip().lower() == "off":
            return None
        return Path(self.cache).expanduser()

    def load_principles(self) -> tuple[str, ...]:
        if self.principles is None:
            return ()
        lines = self.principles.read_text(encoding="utf-8").splitlines()
        found = tuple(line.strip() for line in lines if line.strip())
        if not found:
            raise ValueError(f"--principles file {self.principles} holds no principle")
        return found

    def load_prices(self) -> dict[str, tuple[float, float]]:
        prices = dict(DEFAULT_PRICES)
        if self.prices is None:
            return prices
        data = json.loads(self.prices.read_text(encoding="utf-8"))
        if not isinstance(data, Mapping):
            raise ValueError(f'--prices {self.prices}: expected {{"model": [input, output], ...}}')
        for name, price in data.items():
            prices[str(name)] = _price(name, price)
        return prices

    def backend_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`services.judge.backends.factory.build_backend` (API keys: the SDKs' env vars)."""
        return {
            "model": self.model,
            "base_url": self.base_url,
            "timeout_s": self.timeout_s,
            "soft_mode": "verbalised" if self.samples is None else "samples",
            "samples": self.samples or 1,
            "dtype": self.dtype,
            "device": self.device,
            "threads": self.threads,
            "max_batch_tokens": self.max_batch_tokens,
            "max_queue_items": self.max_queue_items,
            "max_prompt_chars": self.max_prompt_chars,
        }

    def engine_config(self) -> JudgeEngineConfig:
        return JudgeEngineConfig(
            tie_margin=self.tie_margin,
            rationale=self.rationale,
            clamp=self.clamp,
            max_parse_retries=self.max_parse_retries,
            max_retries=self.max_retries,
            max_concurrency=self.max_concurrency,
            rpm=self.rpm,
            tpm=self.tpm,
            max_tokens_total=self.max_tokens_total,
            prices=self.load_prices(),
            max_queue_items=self.max_queue_items,
            principles=self.load_principles(),
            principle_mode=self.principle_mode,
            ensemble_k=self.ensemble_k,
            rank_max_pairs=self.rank_max_pairs,
            template=self.template,
            seed=self.seed,
            max_items_per_request=self.max_items_per_request,
            max_text_bytes=self.max_text_bytes,
            max_prompt_chars=self.max_prompt_chars,
        )


def _price(name: object, price: Any) -> tuple[float, float]:
    if isinstance(price, Mapping) and {"input", "output"} <= set(price):
        return (float(price["input"]), float(price["output"]))
    if isinstance(price, list | tuple) and len(price) == 2:
        return (float(price[0]), float(price[1]))
    raise ValueError(f"--prices: {name!r}: expected [input, output] USD per 1M tokens")
