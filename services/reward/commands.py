"""``rlhf-feedback serve reward``: its parser and its runner."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.settings import SettingsError
from services.reward.settings import RewardSettings


def register_serve(services: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reward = services.add_parser(
        "reward",
        help="Serve a reward model over HTTP and gRPC with dynamic batching.",
        description="Serve a reward model (any local Hugging Face sequence-classification checkpoint, "
        "or the embedded default) over HTTP (/v1/score, /v1/compare, /get_reward) and gRPC "
        "(rlhf.v1.RewardService). Every flag also reads an environment variable, shown in its help.",
    )
    RewardSettings.add_arguments(reward)
    reward.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from services.common.logs import configure_logging
    from services.reward.server import serve_reward

    flags = {k: v for k, v in vars(args).items() if k in RewardSettings.model_fields}
    try:
        settings = RewardSettings.from_sources(flags)
    except SettingsError as exc:
        print(f"rlhf-feedback serve reward: {exc}", file=sys.stderr)
        return 2
    if settings.backend == "onnx":
        from services.reward.loading import check_onnx_settings

        try:
            check_onnx_settings(settings)
        except (ValueError, OSError) as exc:  # before loading anything: one line, not a logged traceback
            print(f"rlhf-feedback serve reward: {exc}", file=sys.stderr)
            return 2
    configure_logging(settings.log_level)
    return asyncio.run(serve_reward(settings))
