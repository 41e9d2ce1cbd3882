"""The flags ``label`` and ``score`` share: two resumable jobs that send the rows of a file to a service.

Each job adds its service URL, ``--input`` and ``--output`` with :func:`add_service_io`, then its
own flags, then the request and run flags with :func:`add_request_flags`, so ``--help`` lists them
in that order. Every flag but ``--restart`` and ``--quiet`` also reads the job's environment
variable (:class:`~rlhf_train.cli_env.EnvDefaults`); those two stay off unless given, so that a
variable left in an environment never deletes a job's progress.
"""

from __future__ import annotations

import argparse

from rlhf_train.cli_env import EnvDefaults, add_api_key, add_required

MAX_RETRIES = 8


def add_service_io(
    p: argparse.ArgumentParser, env: EnvDefaults, *, service: str, service_help: str, input_help: str, output_help: str
) -> None:
    """``--<service>`` (the service URL), ``--input`` and ``--output``: each required unless its variable is set."""
    add_required(p, env, f"--{service}", help=service_help)
    add_required(p, env, "--input", help=input_help)
    add_required(p, env, "--output", help=output_help)


def add_request_flags(
    p: argparse.ArgumentParser, env: EnvDefaults, *, request: str, timeout: float, failed: str, outputs: str
) -> None:
    """``--api-key``, ``--timeout``, ``--max-retries``, ``--restart`` and ``--quiet``.

    The help texts name the job's ``request`` ("judge"), what ``failed`` ("its row counts") and
    the ``outputs`` a restart deletes; ``timeout`` is the default seconds per attempt.
    """
    add_api_key(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=float(env("timeout", timeout)),
        help=f"Seconds one {request} request may take (per attempt).",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=int(env("max_retries", MAX_RETRIES)),
        help=f"Retries of a request on overload / unavailability before {failed} as failed.",
    )
    p.add_argument(
        "--restart", action="store_true", help=f"Ignore (delete) earlier progress and {outputs}; start over."
    )
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
