"""Settings: one frozen, typed object per service, flags and env vars from one declaration.

Each field of a settings class is at once a command-line flag (``--max-batch-tokens``), an
environment variable (``RLHF_FEEDBACK_REWARD_MAX_BATCH_TOKENS``, or ``RLHF_FEEDBACK_<NAME>`` for
fields shared by every service) and its ``--help`` text (the field's description). Precedence:
flag, then environment, then default. Nothing is read at import time.
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SHARED_PREFIX = "RLHF_FEEDBACK_"
S = TypeVar("S", bound="ServiceSettings")


def shared(default: Any, description: str, **kw: Any) -> Any:
    """A field whose env var is ``RLHF_FEEDBACK_<NAME>`` for every service (TLS, auth, logging)."""
    return Field(default, description=description, json_schema_extra={"shared": True}, **kw)


class ServiceSettings(BaseModel):
    """Fields every server has. Subclasses set ``ENV_PREFIX`` and their port defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    ENV_PREFIX: typing.ClassVar[str] = SHARED_PREFIX

    host: str = Field("127.0.0.1", description="Address to listen on (the container sets 0.0.0.0).")
    http_port: int = Field(0, ge=0, le=65535, description="HTTP port; 0 disables HTTP.")
    grpc_port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 disables gRPC.")
    api_key_file: Path | None = shared(
        None,
        "File holding the API key clients must send as 'Authorization: Bearer KEY' "
        "(health and metrics stay open). The key itself may come from RLHF_FEEDBACK_API_KEY.",
    )
    api_key: str | None = shared(None, "The API key itself (prefer --api-key-file: flags show up in process lists).")
    tls_cert: Path | None = shared(None, "PEM certificate chain; with --tls-key, serve TLS.")
    tls_key: Path | None = shared(None, "PEM private key for --tls-cert.")
    drain_seconds: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM: readiness goes false, new work is refused, and "
        "admitted work gets this long to finish before the process exits.",
    )
    max_body_bytes: int = Field(64 * 2**20, gt=0, description="Largest request body (HTTP) or message (gRPC).")
    max_items_per_request: int = Field(4096, gt=0, description="Most items one request may carry.")
    max_text_bytes: int = Field(
        256 * 2**10, gt=0, description="Longest single text, in UTF-8 bytes; longer is rejected."
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="HTTP: a request's line and headers must arrive within this long (counted from the "
        "connection's start, or from the first byte of a later request); else 408 and the connection "
        "is closed. A new connection that sends nothing is closed after this long too.",
    )
    http_body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="HTTP: a request body may pause at most this long between two reads, and once this "
        "long has passed it must have averaged at least --http-body-min-rate; else 408 and the "
        "connection is closed.",
    )
    http_body_min_rate: int = Field(
        1024,
        ge=0,
        description="HTTP: slowest average rate, in bytes per second, at which a request body may arrive "
        "after its first --http-body-timeout-s (a client trickling a body is cut off; 0: only the pause "
        "limit applies).",
    )
    http_keep_alive_s: int = Field(
        65,
        ge=1,
        description="HTTP: close a keep-alive connection idle this many seconds between requests (above the "
        "30 s of the bundled nginx and the 60 s of common load balancers, so that they close first).",
    )
    http_max_connections: int = Field(
        1024,
        gt=0,
        description="HTTP: most open connections; a request on a connection beyond them is answered 503 "
        "(UNAVAILABLE, Retry-After) and its connection closed.",
    )
    grpc_max_connection_age_s: float = Field(
        300.0, gt=0, description="Close gRPC connections after this long so load balancers can rebalance."
    )
    log_level: Literal["debug", "info", "warning", "error"] = shared("info", "Log level.")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        return self

    def resolved_api_key(self) -> str | None:
        """The API key from --api-key-file or RLHF_FEEDBACK_API_KEY (file wins), or None."""
        if self.api_key_file is not None:
            key = self.api_key_file.read_text(encoding="utf-8").strip()
            if not key:
                raise ValueError(f"API key file {self.api_key_file} is empty")
            return key
        return self.api_key or None

    # -- flags and env vars from the same declaration --------------------------------------

    @classmethod
    def env_var(cls, name: str) -> str:
        info = cls.model_fields[name]
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        prefix = SHARED_PREFIX if extra.get("shared") else cls.ENV_PREFIX
        return prefix + name.upper()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one ``--flag`` per field; help shows the default and the env var."""
        for name, info in cls.model_fields.items():
            flag = "--" + name.replace("_", "-")
            default = info.default
            shown = "unset" if default is None else default
            help_text = f"{info.description} [default: {shown}; env: {cls.env_var(name)}]"
            kind = _unwrap_optional(info.annotation)
            choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
            if kind is bool:
                parser.add_argument(
                    flag,
                    dest=name,
                    action=argparse.BooleanOptionalAction,
                    default=argparse.SUPPRESS,
                    help=help_text,
                )
            else:
                parser.add_argument(
                    flag,
                    dest=name,
                    default=argparse.SUPPRESS,
                    help=help_text,
                    choices=choices,
                    metavar=None if choices else name.upper(),
                )

    @classmethod
    def from_sources(
        cls: type[S], flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> S:
        """Build the settings from parsed flags (only those given) over env vars over defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            env = environ.get(cls.env_var(name))
            if env is not None and env != "":
                values[name] = env
        values.update(flags or {})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise SettingsError(_explain(cls, exc)) from None


class SettingsError(ValueError):
    """Bad flag or environment value; the message names the flag and the env var."""


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _explain(cls: type[ServiceSettings], exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = err.get("loc") or ()
        if loc and isinstance(loc[0], str) and loc[0] in cls.model_fields:
            name = loc[0]
            lines.append(f"--{name.replace('_', '-')} / {cls.env_var(name)}: {err['msg']}")
        else:
            lines.append(str(err["msg"]))
    return "invalid settings:\n  " + "\n  ".join(lines)
