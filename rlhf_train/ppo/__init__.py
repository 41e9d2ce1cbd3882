"""``rlhf-feedback train ppo``: PPO for causal LMs with rewards from the reward service.

``run_ppo(PPOConfig(...)) -> PPOSummary`` (:mod:`rlhf_train.ppo.trainer`) is the Python API;
:mod:`rlhf_train.ppo.command` is the command line around it. Imports are lazy so that
registering the command does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PPOConfig", "PPOSummary", "run_ppo"]


def __getattr__(name: str) -> Any:
    if name == "PPOConfig":
        from rlhf_train.ppo.config import PPOConfig

        return PPOConfig
    if name in ("PPOSummary", "run_ppo"):
        from rlhf_train.ppo import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
