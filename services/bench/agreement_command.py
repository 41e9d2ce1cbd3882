"""``rlhf-feedback bench agreement`` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = kinds.add_parser("agreement", help="(not yet implemented)")
    p.set_defaults(run=lambda args: 2)
