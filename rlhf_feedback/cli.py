"""The ``rlhf-feedback`` command line: one entry point wiring every command.

This package sits on top of everything: the services (``serve``), the jobs and training
(``label``, ``score``, ``train``, ``judge-eval``), the benchmarks (``bench``) and the ONNX export.
Nothing imports it back. To add a command, give its module a ``register(commands)`` and add one
line below.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rlhf_feedback import __version__


def _build_parser() -> argparse.ArgumentParser:
    from benchmarks import command as bench_command
    from rlhf_feedback import export_onnx, serve
    from rlhf_train import commands as job_commands
    from rlhf_train.eval import command as eval_command

    parser = argparse.ArgumentParser(
        prog="rlhf-feedback",
        description="Scoring infrastructure for RLHF: a batched reward-model service and an LLM judge "
        "service, with clients for TRL, OpenRLHF and verl.",
    )
    parser.add_argument("--version", action="version", version=f"rlhf-feedback {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve_parser = commands.add_parser("serve", help="Run a service.", description="Run a service.")
    serve.register(serve_parser.add_subparsers(dest="service", metavar="SERVICE", required=True))
    job_commands.register(commands)  # label, score, train
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
