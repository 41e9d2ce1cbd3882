"""The ``rlhf-feedback`` command line: one entry point, subcommands per job."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from services import __version__


def _build_parser() -> argparse.ArgumentParser:
    from services.reward.settings import RewardSettings

    parser = argparse.ArgumentParser(
        prog="rlhf-feedback",
        description="Scoring infrastructure for RLHF: a batched reward-model service (and, in time, "
        "an LLM judge service) with clients for TRL, OpenRLHF and verl.",
    )
    parser.add_argument("--version", action="version", version=f"rlhf-feedback {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="Run a service.", description="Run a service.")
    services = serve.add_subparsers(dest="service", metavar="SERVICE", required=True)
    reward = services.add_parser(
        "reward",
        help="Serve a reward model over HTTP and gRPC with dynamic batching.",
        description="Serve a reward model (any local Hugging Face sequence-classification checkpoint, "
        "or the embedded default) over HTTP (/v1/score, /v1/compare, /get_reward) and gRPC "
        "(rlhf.v1.RewardService). Every flag also reads an environment variable, shown in its help.",
    )
    RewardSettings.add_arguments(reward)
    reward.set_defaults(run=_run_serve_reward)
    return parser


def _run_serve_reward(args: argparse.Namespace) -> int:
    from services.common.settings import SettingsError
    from services.reward.server import serve_reward
    from services.reward.settings import RewardSettings

    flags = {k: v for k, v in vars(args).items() if k in RewardSettings.model_fields}
    try:
        settings = RewardSettings.from_sources(flags)
    except SettingsError as exc:
        print(f"rlhf-feedback serve reward: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve_reward(settings))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
