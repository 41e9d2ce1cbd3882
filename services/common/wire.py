"""Wire models both services' HTTP APIs share: a chat message, a prompt (string or messages) and
the error body.

Parsed strictly (``strict=True``: a number where a string belongs is an error, never coerced;
``extra="forbid"``: unknown keys are errors). The engines get them as
:class:`services.runtime.chat.ChatMessage` through :func:`services.runtime.chat.as_prompt`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from services.common.errors import ErrorCode

# Discriminator tags appear in pydantic error locations; the transports strip them so that an
# error names the field the client wrote (``prompt[0].role``), not the union member.
PROMPT_TAGS = frozenset({"str", "messages"})


class StrictModel(BaseModel):
    """A request model: strict types, no unknown keys, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Message(StrictModel):
    """One chat message. Roles are checked by the engine (unknown role: 400 with the item index)."""

    role: str
    content: str


def _prompt_kind(v: Any) -> str | None:
    if isinstance(v, str):
        return "str"
    if isinstance(v, list | tuple):
        return "messages"
    return None


PromptWire = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[Message], Tag("messages")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="prompt must be a string or a list of {role, content} messages",
    ),
]


class ErrorDetail(BaseModel):
    code: str = Field(description=f"The error table's code: {', '.join(c.value for c in ErrorCode)}.")
    message: str
    item: int | None = Field(None, description="Index of the offending input item, when one caused it.")


class ErrorBody(BaseModel):
    """Every error response: ``{"error": {"code", "message", "item"?}}``."""

    error: ErrorDetail
