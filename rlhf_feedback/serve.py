"""``rlhf-feedback serve reward`` and ``serve judge``: their parsers and their runners.

The flags come from each service's settings class (one declaration for flag, environment
variable and help); a bad value is a usage error (exit 2) before anything loads.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from services.common.settings import SettingsError
from services.judge.settings import JudgeSettings
from services.reward.settings import RewardSettings


def register(services: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reward = services.add_parser(
        "reward",
        help="Serve a reward model over HTTP and gRPC with dynamic batching.",
        description="Serve a reward model (any local Hugging Face sequence-classification checkpoint, "
        "or the embedded default) over HTTP (/v1/score, /v1/compare, /get_reward) and gRPC "
        "(rlhf.v1.RewardService). Every flag also reads an environment variable, shown in its help.",
    )
    RewardSettings.add_arguments(reward)
    reward.set_defaults(run=run_reward)
    judge = services.add_parser(
        "judge",
        help="Serve an LLM judge (compare, rank, grade) over HTTP and gRPC.",
        description="Serve an AI judge for RLAIF: compare two responses (both orders, soft labels), rank "
        "several (Bradley-Terry) or grade one against a rubric, asking a local Hugging Face model (default: "
        "the embedded SmolLM2-135M-Instruct), OpenAI, Anthropic or any OpenAI-compatible server. HTTP "
        "(/v1/compare, /v1/rank, /v1/grade) and gRPC (rlhf.v1.JudgeService). API keys come from "
        "OPENAI_API_KEY / ANTHROPIC_API_KEY. Every flag also reads an environment variable, shown in its help.",
    )
    JudgeSettings.add_arguments(judge)
    judge.set_defaults(run=run_judge)


def _configure_logging(level: str) -> None:
    # The servers log to stderr, one line per event; a library user configures logging themselves.
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _usage_error(service: str, exc: Exception) -> int:
    print(f"rlhf-feedback serve {service}: {exc}", file=sys.stderr)
    return 2


def run_reward(args: argparse.Namespace) -> int:
    from services.reward.server import serve_reward

    flags = {k: v for k, v in vars(args).items() if k in RewardSettings.model_fields}
    try:
        settings = RewardSettings.from_sources(flags)
    except SettingsError as exc:
        return _usage_error("reward", exc)
    if settings.backend == "onnx":
        from services.reward.loading import check_onnx_settings

        try:
            check_onnx_settings(settings)
        except (ValueError, OSError) as exc:  # before loading anything: one line, not a logged traceback
            return _usage_error("reward", exc)
    _configure_logging(settings.log_level)
    return asyncio.run(serve_reward(settings))


def run_judge(args: argparse.Namespace) -> int:
    from services.judge.server import serve_judge

    flags = {k: v for k, v in vars(args).items() if k in JudgeSettings.model_fields}
    try:
        settings = JudgeSettings.from_sources(flags)
        settings.engine_config()  # read --prices / --principles now: a bad file is a usage error
    except (SettingsError, ValueError, OSError) as exc:
        return _usage_error("judge", exc)
    _configure_logging(settings.log_level)
    return asyncio.run(serve_judge(settings))
