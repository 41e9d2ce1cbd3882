"""The ``rlhf-feedback`` command line: one entry point; each command registers its own parser.

To add a command, give its module a ``register(commands)`` (top level) or
``register_serve(services)`` (under ``serve``) and add one line below.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from services import __version__


def _build_parser() -> argparse.ArgumentParser:
    from rlhf_train import commands as job_commands
    from services.bench import command as bench_command
    from services.judge import commands as judge_commands
    from services.judge import eval_command
    from services.reward import commands as reward_commands
    from services.reward import export_onnx

    parser = argparse.ArgumentParser(
        prog="rlhf-feedback",
        description="Scoring infrastructure for RLHF: a batched reward-model service and an LLM judge "
        "service, with clients for TRL, OpenRLHF and verl.",
    )
    parser.add_argument("--version", action="version", version=f"rlhf-feedback {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="Run a service.", description="Run a service.")
    services = serve.add_subparsers(dest="service", metavar="SERVICE", required=True)
    reward_commands.register_serve(services)
    judge_commands.register_serve(services)
    # (label, score, ... register here)
    job_commands.register(commands)
    eval_command.register(commands)
    bench_command.register(commands)
    export_onnx.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
