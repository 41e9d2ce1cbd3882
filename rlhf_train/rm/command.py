"""``rlhf-feedback train rm`` argument parsing (placeholder until implemented)."""

from __future__ import annotations

import argparse


def register(trainers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = trainers.add_parser("rm", help="(not yet implemented)")
    p.set_defaults(run=lambda args: 2)
