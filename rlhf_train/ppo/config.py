"""The settings of one PPO run (:class:`PPOConfig`) and the errors the job reports."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class PPOError(Exception):
    """The job cannot go on; ``exit_code`` 2 for bad input, 1 for a failure while running."""

    exit_code = 1


class PPOInputError(PPOError):
    """Bad settings or input files (exit code 2)."""

    exit_code = 2


@dataclass(frozen=True)
class PPOConfig:
    """Everything a PPO run needs. Exactly one of ``reward_url`` / ``judge_url`` names the reward source.

    ``policy`` ``None`` means the embedded SmolLM2-135M-Instruct
    (:func:`services.runtime.default_model.backbone_dir`); ``ref_policy`` ``None`` means a frozen
    copy of the starting policy. ``log`` ``None`` means ``<out>/log.jsonl``.
    """

    prompts: Path
    out: Path
    reward_url: str | list[str] | None = None
    judge_url: str | list[str] | None = None
    policy: Path | None = None
    ref_policy: Path | None = None
    log: Path | None = None
    steps: int = 20
    batch_size: int = 8
    minibatch_size: int = 4
    ppo_epochs: int = 2
    lr: float = 1e-5
    kl_coef: float = 0.05
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    max_grad_norm: float = 1.0
    max_new_tokens: int = 64
    max_prompt_tokens: int = 512
    temperature: float = 1.0
    whiten_rewards: bool = False
    seed: int = 0
    threads: int | None = None
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    rubric: str | None = None
    api_key: str | None = None
    timeout: float = 120.0
    max_retries: int = 8
    max_empty_batches: int = 3
    quiet: bool = False

    @property
    def log_path(self) -> Path:
        return self.log if self.log is not None else self.out / "log.jsonl"

    def check(self) -> None:
        """Raise :class:`PPOInputError` naming the first setting that is out of range."""
        if (self.reward_url is None) == (self.judge_url is None):
            raise PPOInputError("give exactly one reward source: --reward-url or --judge-url")
        positive_ints = {
            "--steps": self.steps,
            "--batch-size": self.batch_size,
            "--minibatch-size": self.minibatch_size,
            "--ppo-epochs": self.ppo_epochs,
            "--max-new-tokens": self.max_new_tokens,
            "--max-prompt-tokens": self.max_prompt_tokens,
            "--keep-checkpoints": self.keep_checkpoints,
            "--max-empty-batches": self.max_empty_batches,
        }
        for flag, value in positive_ints.items():
            if value < 1:
                raise PPOInputError(f"{flag} must be at least 1 (got {value})")
        if self.save_every < 0:
            raise PPOInputError("--save-every must be >= 0 (0: save only at the end)")
        if self.threads is not None and self.threads < 1:
            raise PPOInputError("--threads must be at least 1")
        positive_floats = {
            "--lr": self.lr,
            "--temperature": self.temperature,
            "--cliprange": self.cliprange,
            "--cliprange-value": self.cliprange_value,
            "--max-grad-norm": self.max_grad_norm,
            "--timeout": self.timeout,
        }
        for flag, f in positive_floats.items():
            if not (math.isfinite(f) and f > 0):
                raise PPOInputError(f"{flag} must be a positive number (got {f})")
        for flag, f in {"--kl-coef": self.kl_coef, "--vf-coef": self.vf_coef}.items():
            if not (math.isfinite(f) and f >= 0):
                raise PPOInputError(f"{flag} must be >= 0 (got {f})")
        for flag, f in {"--gamma": self.gamma, "--lam": self.lam}.items():
            if not 0.0 <= f <= 1.0:
                raise PPOInputError(f"{flag} must be within [0, 1] (got {f})")
        if self.max_retries < 0:
            raise PPOInputError("--max-retries must be >= 0")

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON (paths as strings), stored with every checkpoint."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "api_key"}


__all__ = ["PPOConfig", "PPOError", "PPOInputError"]
