"""Semantic checks shared by both transports; a violation rejects the whole request."""

from __future__ import annotations

from collections.abc import Sequence

from services.common.errors import invalid
from services.reward.engine.results import Limits
from services.runtime.chat import ROLES, ChatMessage
from services.runtime.items import RewardInput


def validate_inputs(inputs: Sequence[RewardInput], limits: Limits) -> None:
    """Raise INVALID_ARGUMENT (with the item index) for the first bad item."""
    if not inputs:
        raise invalid("inputs is empty: send at least one item")
    if len(inputs) > limits.max_items_per_request:
        raise invalid(
            f"too many items: {len(inputs)} > {limits.max_items_per_request} per request; "
            "split the request (GET /v1/models reports the limits)"
        )
    for i, item in enumerate(inputs):
        _validate_item(item, i, limits.max_text_bytes)


def _validate_item(item: RewardInput, i: int, max_bytes: int) -> None:
    forms = [
        item.text is not None,
        item.messages is not None,
        item.prompt is not None or item.response is not None,
        item.token_ids is not None,
    ]
    if sum(forms) != 1:
        raise invalid("an item is exactly one of {text}, {prompt, response}, {messages} or {token_ids}", item=i)
    if item.add_special_tokens and item.text is None:
        raise invalid("add_special_tokens applies to text items only", item=i)
    if item.token_ids is not None:
        if not item.token_ids:
            raise invalid("token_ids is empty", item=i)
        if min(item.token_ids) < 0:
            raise invalid(f"token id {min(item.token_ids)} is negative", item=i)
    elif item.text is not None:
        if item.text == "":
            raise invalid("text is empty", item=i)
        _check_text(item.text, i, max_bytes)
    elif item.messages is not None:
        if not item.messages:
            raise invalid("messages is empty", item=i)
        _check_messages(item.messages, i, max_bytes)
    else:
        if item.prompt is None or item.response is None:
            raise invalid("a prompt item needs both prompt and response", item=i)
        if isinstance(item.prompt, str):
            _check_text(item.prompt, i, max_bytes)
        else:
            if not item.prompt:
                raise invalid("prompt messages are empty", item=i)
            _check_messages(item.prompt, i, max_bytes)
        _check_text(item.response, i, max_bytes)


def _check_messages(messages: Sequence[ChatMessage], i: int, max_bytes: int) -> None:
    for m in messages:
        if m.role not in ROLES:
            raise invalid(f"unknown role {m.role!r}; expected one of {sorted(ROLES)}", item=i)
        _check_text(m.content, i, max_bytes)


def _check_text(text: str, i: int, max_bytes: int) -> None:
    # Cheap bound first: a str of n code points has between n and 4n UTF-8 bytes.
    if len(text) * 4 <= max_bytes:
        return
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > max_bytes:
        raise invalid(f"text of {size} bytes exceeds --max-text-bytes {max_bytes}", item=i)
