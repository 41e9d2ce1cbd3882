"""Job and training commands (registered by :mod:`rlhf_feedback.cli`): ``label``, ``score``, ``train``."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rlhf_train.jobs import label, score
    from rlhf_train.ppo import command as ppo_command
    from rlhf_train.rm import command as rm_command

    label.register(commands)
    score.register(commands)
    train = commands.add_parser(
        "train",
        help="Train a reward model (rm) or a policy with PPO against the reward service (ppo).",
        description="Training jobs that consume what the services produce.",
    )
    trainers = train.add_subparsers(dest="trainer", metavar="TRAINER", required=True)
    rm_command.register(trainers)
    ppo_command.register(trainers)
