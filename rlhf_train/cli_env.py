"""Flags that read environment variables: the one helper every offline command uses.

Every flag of ``label``, ``score``, ``train rm``, ``train ppo``, ``judge-eval`` and ``bench judge``
also reads an environment variable ``<PREFIX><FLAG>`` (``RLHF_FEEDBACK_LABEL_MAX_RETRIES`` for
``label --max-retries``), declared where the flag is (DESIGN: "Every flag has an environment
variable declared in the same place"). A variable sets the flag's default, so the flag itself
still wins, and argparse converts a text default with the flag's ``type``: a bad value exits 2
like a bad flag. The API key is shared by the commands that call a service:
``RLHF_FEEDBACK_API_KEY``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

API_KEY_ENV = "RLHF_FEEDBACK_API_KEY"
TRUE_WORDS = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class EnvDefaults:
    """The defaults one command's flags take from the environment: ``env("max_retries", 8)`` is
    ``$<prefix>MAX_RETRIES`` if set (as text), else 8."""

    prefix: str  # e.g. "RLHF_FEEDBACK_LABEL_"

    def variable(self, name: str) -> str:
        """The variable of flag ``name`` (``"max_retries"`` or ``"max-retries"``)."""
        return self.prefix + name.replace("-", "_").upper()

    def __call__(self, name: str, default: Any) -> Any:
        """The variable's text when it is set, else ``default``."""
        return os.environ.get(self.variable(name), default)

    def flag(self, name: str) -> bool:
        """A switch's default: true when the variable says 1, true, yes or on (any case, spaces around)."""
        return str(self(name, "")).strip().lower() in TRUE_WORDS


def add_required(parser: argparse._ActionsContainer, env: EnvDefaults, flag: str, **kwargs: Any) -> argparse.Action:
    """``--flag``, required unless its variable is set (the variable's value is then the default)."""
    value = env(flag.removeprefix("--"), None)
    return parser.add_argument(flag, default=value, required=value is None, **kwargs)


def add_api_key(parser: argparse._ActionsContainer) -> argparse.Action:
    """``--api-key``, default ``$RLHF_FEEDBACK_API_KEY``: one variable for every command that calls a service."""
    return parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"Sent as 'Authorization: Bearer KEY' (default: {API_KEY_ENV}).",
    )
