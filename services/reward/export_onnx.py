"""``rlhf-feedback export-onnx`` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("export-onnx", help="(not yet implemented)")
    p.set_defaults(run=lambda args: 2)
