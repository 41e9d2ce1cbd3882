"""``rlhf-feedback bench judge`` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = kinds.add_parser("judge", help="(not yet implemented)")
    p.set_defaults(run=lambda args: 2)
