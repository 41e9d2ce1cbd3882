"""``rlhf-feedback bench``: one parser, a subcommand per measured piece."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from benchmarks import agreement_command, judge_command, reward_command

    bench = commands.add_parser(
        "bench",
        help="Measure throughput and latency (reward service vs in-process limit vs naive server; judge).",
        description="Reproducible benchmarks. Results go to JSON, a Markdown table and a PNG chart.",
    )
    kinds = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    reward_command.register(kinds)
    judge_command.register(kinds)
    agreement_command.register(kinds)
