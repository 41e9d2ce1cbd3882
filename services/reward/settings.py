"""Settings of the reward service: every ``serve reward`` flag, its env var and its help."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from services.common.settings import ServiceSettings
from services.reward.engine.results import Limits
from services.reward.engine.service import EngineConfig
from services.runtime.batcher import BatcherConfig
from services.runtime.device import Dtype
from services.runtime.tokenizers import DEFAULT_TOKENIZE_WORKERS

# OpenRLHF's `scores` (see services/reward/transports/openrlhf.py)
OpenRLHFScores = Literal["raw", "sigmoid"]


class RewardSettings(ServiceSettings):
    ENV_PREFIX: typing.ClassVar[str] = "RLHF_FEEDBACK_REWARD_"

    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 disables HTTP.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 disables gRPC.")
    model: Path | None = Field(
        None,
        description="A local Hugging Face sequence-classification checkpoint (a folder). "
        "Unset: the embedded default reward model (SmolLM2-135M-Instruct with a trained head).",
    )
    model_id: str | None = Field(None, description="Model id reported in responses (default: the folder name).")
    backend: Literal["torch", "onnx"] = Field(
        "torch",
        description="Inference backend: torch (any HF checkpoint) or onnx (a folder written by "
        "`rlhf-feedback export-onnx`; onnxruntime CPU, or CUDA with onnxruntime-gpu).",
    )
    dtype: Dtype = Field(
        "float32",
        description="Weights and compute dtype. float32 keeps scores equal to the unbatched forward (1e-5); "
        "bfloat16 is about 2x faster where the hardware computes it natively but a batched score then "
        "differs from the unbatched one by up to ~0.04. auto: bfloat16 where native (CUDA with bf16, a CPU "
        "with AVX-512 BF16 or AMX), float32 elsewhere. bfloat16 on a CPU without it is several times "
        "slower than float32 (a warning says so).",
    )
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (cuda when present).")
    threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: torch's choice).")
    max_length: int | None = Field(
        None,
        gt=0,
        description="Maximum tokens per item (default: the model's own maximum). "
        "Longer items lose prompt tokens from the left first and are flagged truncated.",
    )
    max_batch_tokens: int = Field(
        1024,
        gt=0,
        description="Token budget of one batch, counted padded (items x longest). An item longer than this runs "
        "alone. 1024 measured best on CPU (rlhf-feedback bench); raise it on a GPU (e.g. 16384-32768).",
    )
    max_request_tokens: int = Field(
        4096,
        gt=0,
        description="Most tokens one request may bring, counted after truncation and summed over its items; "
        "over it the request is refused (400) before it reaches the model, with the numbers. The default is "
        "about 3 s of the embedded model in float32 on 2 CPU cores (~1,300 tokens/s); raise it with "
        "--max-batch-tokens on a GPU. The project's clients split their requests to fit it.",
    )
    tokenize_workers: int = Field(
        DEFAULT_TOKENIZE_WORKERS,
        gt=0,
        le=64,
        description="Threads that render and tokenize requests (each with its own tokenizer copy), off the "
        "event loop and the model thread.",
    )
    max_wait_ms: float = Field(2.0, ge=0, description="How long the first queued item waits for company.")
    max_queue_items: int = Field(
        16384,
        gt=0,
        description="Admitted items waiting for a batch; beyond it requests get 429 "
        "/ RESOURCE_EXHAUSTED with a retry delay at once.",
    )
    sort_window_items: int = Field(
        1024, gt=0, description="How many of the oldest queued items are sorted by length when forming a batch."
    )
    prefix_sharing: bool = Field(
        True,
        description="Decoder models: run the common token prefix of a group of items (one prompt, several "
        "responses) once with the KV cache and only the suffixes per item. Scores are unchanged.",
    )
    head_weights: tuple[float, ...] | None = Field(
        None, description="Vector heads: comma-separated weights of the scalar score (default: the mean)."
    )
    normalize_mean: float | None = Field(
        None, description="Static normalisation mean (with --normalize-std); unset: running statistics."
    )
    normalize_std: float | None = Field(None, gt=0, description="Static normalisation standard deviation.")
    openrlhf_rule: str | None = Field(
        None,
        description="OpenRLHF's /get_reward: a rule mixed into each reward, as module:function (e.g. "
        "clients.integrations.rules:exact_match). It is called with query=, prompt=, label= (the sample's ground "
        "truth) and response= (the query without its prompt) and returns a number; the reward is then "
        "rm_weight * RM score + rule_weight * rule.",
    )
    openrlhf_rm_weight: float = Field(1.0, description="With --openrlhf-rule: the weight of the RM score.")
    openrlhf_rule_weight: float = Field(1.0, description="With --openrlhf-rule: the weight of the rule's value.")
    openrlhf_scores: OpenRLHFScores = Field(
        "raw",
        description="OpenRLHF's /get_reward: what `scores` (dynamic filtering, default range (0, 1)) carries: raw "
        "(the reward) or sigmoid (the reward squashed into (0, 1)). `rewards` are always raw. A request can "
        "override it with ?scores=raw|sigmoid on the URL.",
    )

    @field_validator("head_weights", mode="before")
    @classmethod
    def _split_weights(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(float(x) for x in v.split(",") if x.strip())
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RewardSettings:
        if (self.normalize_mean is None) != (self.normalize_std is None):
            raise ValueError("--normalize-mean and --normalize-std go together")
        if self.max_queue_items < self.max_items_per_request:
            raise ValueError("--max-queue-items must be at least --max-items-per-request")
        if self.http_port == 0 and self.grpc_port == 0:
            raise ValueError("both transports are disabled (--http-port 0 and --grpc-port 0)")
        return self

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            batcher=BatcherConfig(
                max_batch_tokens=self.max_batch_tokens,
                max_wait_ms=self.max_wait_ms,
                max_queue_items=self.max_queue_items,
                sort_window_items=self.sort_window_items,
            ),
            limits=Limits(
                max_items_per_request=self.max_items_per_request,
                max_body_bytes=self.max_body_bytes,
                max_text_bytes=self.max_text_bytes,
                max_batch_tokens=self.max_batch_tokens,
                max_request_tokens=self.max_request_tokens,
            ),
            tokenize_workers=self.tokenize_workers,
            head_weights=self.head_weights,
            normalize_mean=self.normalize_mean,
            normalize_std=self.normalize_std,
        )
