"""The chat vocabulary every part of the project speaks: messages and prompts.

Both services, training and the offline tools exchange conversations as tuples of
:class:`ChatMessage`; wire formats (JSON bodies, protobuf messages) are turned into them with
:func:`as_messages` / :func:`as_prompt`, which take anything with ``role`` and ``content``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


Prompt = str | tuple[ChatMessage, ...]


class _RoleContent(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


def as_messages(messages: Iterable[_RoleContent]) -> tuple[ChatMessage, ...]:
    """Chat messages from wire objects (a pydantic model, a protobuf message) with role and content."""
    return tuple(ChatMessage(m.role, m.content) for m in messages)


def as_prompt(prompt: str | Iterable[_RoleContent]) -> Prompt:
    """A prompt from its wire form: a string stays a string, messages become chat messages."""
    return prompt if isinstance(prompt, str) else as_messages(prompt)
