"""The ``rlhf-feedback label`` and ``rlhf-feedback score`` commands (registered by :mod:`services.cli`)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rlhf_train.jobs import label, score

    label.register(commands)
    score.register(commands)
