"""``validate_inputs``: the semantic checks both reward transports share.

Every rule rejects the whole request with INVALID_ARGUMENT (HTTP 400), a message naming the
problem and, for a bad item, its index; the first bad item is the one reported. Texts are
verbatim: only ``""`` is empty, and sizes are UTF-8 bytes.
"""

from __future__ import annotations

import pytest

from services.common.errors import ErrorCode, ServiceError
from services.reward.engine.results import Limits
from services.reward.engine.validation import validate_inputs
from services.runtime.chat import ChatMessage
from services.runtime.items import RewardInput

LIMITS = Limits(max_items_per_request=3, max_body_bytes=1 << 20, max_text_bytes=8, max_batch_tokens=64)
OK = RewardInput(text="fine")
USER = ChatMessage("user", "hi")


def rejected(inputs: list[RewardInput], limits: Limits = LIMITS) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        validate_inputs(inputs, limits)
    err = info.value
    assert err.code is ErrorCode.INVALID_ARGUMENT
    assert err.http_status == 400
    return err


def test_valid_items_of_every_form_pass() -> None:
    validate_inputs(
        [
            RewardInput(text="x"),
            RewardInput(prompt="p", response="r"),
            RewardInput(prompt=(ChatMessage("system", "s"), USER), response="r"),
        ],
        LIMITS,
    )
    validate_inputs([RewardInput(messages=(USER, ChatMessage("assistant", "a")))], LIMITS)


def test_empty_request() -> None:
    err = rejected([])
    assert err.message == "inputs is empty: send at least one item"
    assert err.item is None


def test_too_many_items_names_both_numbers() -> None:
    validate_inputs([OK] * 3, LIMITS)  # exactly at the limit
    err = rejected([OK] * 4)
    assert err.message.startswith("too many items: 4 > 3 per request")
    assert "GET /v1/models" in err.message
    assert err.item is None


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(RewardInput(), id="no form"),
        pytest.param(RewardInput(text="t", messages=(USER,)), id="text+messages"),
        pytest.param(RewardInput(text="t", prompt="p", response="r"), id="text+pair"),
        pytest.param(RewardInput(text="t", response="r"), id="text+response"),
        pytest.param(RewardInput(messages=(USER,), prompt="p", response="r"), id="messages+pair"),
        pytest.param(RewardInput(text="t", token_ids=(1,)), id="text+token_ids"),
    ],
)
def test_an_item_is_exactly_one_form(item: RewardInput) -> None:
    err = rejected([OK, item])
    assert err.message == "an item is exactly one of {text}, {prompt, response}, {messages} or {token_ids}"
    assert err.item == 1


def test_token_ids_and_special_tokens() -> None:
    assert rejected([OK, RewardInput(token_ids=())]).message == "token_ids is empty"
    err = rejected([RewardInput(token_ids=(3, -2))])
    assert (err.message, err.item) == ("token id -2 is negative", 0)
    err = rejected([OK, RewardInput(messages=(USER,), add_special_tokens=True)])
    assert (err.message, err.item) == ("add_special_tokens applies to text items only", 1)
    validate_inputs([RewardInput(token_ids=(0, 5)), RewardInput(text="t", add_special_tokens=True)], LIMITS)


def test_only_the_empty_string_is_an_empty_text() -> None:
    err = rejected([OK, OK, RewardInput(text="")])
    assert (err.message, err.item) == ("text is empty", 2)
    validate_inputs([RewardInput(text=" "), RewardInput(text="\n"), RewardInput(text="\t ")], LIMITS)


def test_empty_messages() -> None:
    err = rejected([RewardInput(messages=())])
    assert (err.message, err.item) == ("messages is empty", 0)


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(RewardInput(prompt="p"), id="prompt only"),
        pytest.param(RewardInput(response="r"), id="response only"),
        pytest.param(RewardInput(prompt=(USER,)), id="prompt messages only"),
    ],
)
def test_a_prompt_item_needs_both_halves(item: RewardInput) -> None:
    err = rejected([item, OK])
    assert (err.message, err.item) == ("a prompt item needs both prompt and response", 0)


def test_empty_prompt_messages() -> None:
    err = rejected([OK, RewardInput(prompt=(), response="r")])
    assert (err.message, err.item) == ("prompt messages are empty", 1)


@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool"])
def test_known_roles_pass(role: str) -> None:
    validate_inputs([RewardInput(messages=(ChatMessage(role, "c"),))], LIMITS)
    validate_inputs([RewardInput(prompt=(ChatMessage(role, "c"),), response="r")], LIMITS)


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(RewardInput(messages=(USER, ChatMessage("robot", "beep"))), id="messages"),
        pytest.param(RewardInput(prompt=(ChatMessage("robot", "beep"),), response="r"), id="prompt messages"),
        pytest.param(RewardInput(messages=(ChatMessage("User", "hi"),)), id="roles are case-sensitive"),
    ],
)
def test_unknown_role(item: RewardInput) -> None:
    err = rejected([OK, OK, item])
    assert err.item == 2
    bad = item.messages[-1].role if item.messages else "robot"
    assert err.message == f"unknown role {bad!r}; expected one of ['assistant', 'system', 'tool', 'user']"


def test_text_size_is_counted_in_utf8_bytes() -> None:
    validate_inputs([RewardInput(text="x" * 8)], LIMITS)  # 8 bytes: at the limit
    validate_inputs([RewardInput(text="é" * 4)], LIMITS)  # 4 code points, 8 bytes
    err = rejected([RewardInput(text="x" * 9)])
    assert (err.message, err.item) == ("text of 9 bytes exceeds --max-text-bytes 8", 0)
    err = rejected([OK, RewardInput(text="é" * 5)])  # 5 code points, 10 bytes
    assert (err.message, err.item) == ("text of 10 bytes exceeds --max-text-bytes 8", 1)
    err = rejected([RewardInput(text="🙂🙂🙂")])  # 3 code points, 12 bytes
    assert err.message == "text of 12 bytes exceeds --max-text-bytes 8"


@pytest.mark.parametrize(
    "item",
    [
        pytest.param(RewardInput(prompt="x" * 9, response="r"), id="prompt"),
        pytest.param(RewardInput(prompt="p", response="x" * 9), id="response"),
        pytest.param(RewardInput(prompt=(ChatMessage("user", "x" * 9),), response="r"), id="prompt message"),
        pytest.param(RewardInput(messages=(USER, ChatMessage("assistant", "x" * 9))), id="message"),
    ],
)
def test_every_text_of_an_item_is_bounded(item: RewardInput) -> None:
    err = rejected([OK, item])
    assert (err.message, err.item) == ("text of 9 bytes exceeds --max-text-bytes 8", 1)


def test_the_limit_is_per_text_not_per_item() -> None:
    # Three texts of 8 bytes each: 24 bytes in the item, none over the limit.
    validate_inputs([RewardInput(prompt=(ChatMessage("user", "x" * 8),), response="y" * 8)], LIMITS)
    validate_inputs([RewardInput(messages=(ChatMessage("user", "x" * 8), ChatMessage("assistant", "y" * 8)))], LIMITS)


def test_the_first_bad_item_is_reported() -> None:
    err = rejected([OK, RewardInput(text=""), RewardInput(messages=())])
    assert (err.message, err.item) == ("text is empty", 1)


def test_the_item_count_is_checked_before_the_items() -> None:
    err = rejected([RewardInput(text="")] * 4)
    assert err.item is None and err.message.startswith("too many items")
