"""``rlhf-feedback serve judge``: its parser and its runner."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.settings import SettingsError
from services.judge.settings import JudgeSettings


def register_serve(services: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    judge.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from services.common.logs import configure_logging
    from services.judge.server import serve_judge

    flags = {k: v for k, v in vars(args).items() if k in JudgeSettings.model_fields}
    try:
        settings = JudgeSettings.from_sources(flags)
        settings.engine_config()  # read --prices / --principles now: a bad file is a usage error
    except (SettingsError, ValueError, OSError) as exc:
        print(f"rlhf-feedback serve judge: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return asyncio.run(serve_judge(settings))
