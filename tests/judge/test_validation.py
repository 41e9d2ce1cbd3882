"""The judge's request validation (services/judge/engine/validation.py): each rule, with its exact
error (code, message, item, HTTP status), and that both transports answer it identically."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
import httpx
import pytest
import pytest_asyncio

from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import judge_pb2 as pb
from protos.rlhf.v1 import judge_pb2_grpc as pb_grpc
from services.common.errors import ErrorCode, ServiceError
from services.judge.backends.scripted import ScriptedBackend
from services.judge.engine import JudgeEngineConfig
from services.judge.engine.validation import validate_compare, validate_grade, validate_rank
from services.judge.transports.grpc import compare_from_grpc, create_grpc_server, grade_from_grpc
from services.judge.transports.http import create_http_app
from services.judge.types import CompareInput, GradeInput, RankInput
from services.runtime.chat import ChatMessage
from tests.support.judge import judge_engine, judge_settings

MAX_ITEMS, MAX_TEXT = 4, 8
LIMITS = JudgeEngineConfig(max_items_per_request=MAX_ITEMS, max_text_bytes=MAX_TEXT).limits
ROLE_ERROR = "message role must be one of ['system', 'user', 'assistant'], not {!r}"


def rejected(check: Callable[[], object], message: str, *, item: int | None = None, status: int = 400) -> None:
    with pytest.raises(ServiceError) as info:
        check()
    err = info.value
    assert err.code is ErrorCode.INVALID_ARGUMENT
    assert err.message == message
    assert err.item == item
    assert err.http_status == status


def compare(**kw: Any) -> Callable[[], None]:
    fields: dict[str, Any] = {"prompt": "p", "responses": ("a", "b"), **kw}
    return lambda: validate_compare(CompareInput(**fields), LIMITS)


def rank(**kw: Any) -> Callable[[], None]:
    fields: dict[str, Any] = {"prompt": "p", "responses": ("a", "b", "c"), **kw}
    return lambda: validate_rank(RankInput(**fields), LIMITS)


def grade(**kw: Any) -> Callable[[], None]:
    fields: dict[str, Any] = {"prompt": "p", "response": "r", **kw}
    return lambda: validate_grade(GradeInput(**fields), LIMITS)


# -- what the API's schema states: 422 over HTTP -------------------------------------------------


@pytest.mark.parametrize("responses", [("a",), ("a", "b", "c")])
def test_compare_needs_exactly_two_responses(responses: tuple[str, ...]) -> None:
    rejected(compare(responses=responses), f"compare needs exactly 2 responses, got {len(responses)}", status=422)


def test_compare_protocol_is_one_of_two() -> None:
    rejected(compare(protocol="triple"), "protocol must be 'both_orders' or 'single', not 'triple'", status=422)
    compare(protocol="single")()
    compare(protocol="both_orders")()


def test_rank_needs_at_least_two_responses() -> None:
    rejected(rank(responses=("a",)), "rank needs at least 2 responses, got 1", status=422)
    rejected(rank(responses=()), "rank needs at least 2 responses, got 0", status=422)
    rank(responses=("a", "b"))()


@pytest.mark.parametrize("scale", [(5, 1), (5, 5), (1, 10), (-1, 3)])
def test_grade_scale_within_the_digit_bounds(scale: tuple[int, int]) -> None:
    lo, hi = scale
    message = f"scale must satisfy 0 <= lo < hi <= 9 (grades are single digits), got [{lo}, {hi}]"
    rejected(grade(scale=scale), message, status=422)


@pytest.mark.parametrize("scale", [(1.5, 5), (True, 5), (1, 2, 3), (1,)])
def test_grade_scale_is_two_integers(scale: Any) -> None:
    rejected(grade(scale=scale), "scale must be two integers [lo, hi]", status=422)


def test_grade_scale_bounds_are_inclusive() -> None:
    grade(scale=(0, 9))()
    grade(scale=(8, 9))()


def test_schema_rules_come_before_the_other_rules() -> None:
    # an empty prompt is a 400 on its own; with one response only, the schema violation wins
    rejected(compare(prompt="", responses=("a",)), "compare needs exactly 2 responses, got 1", status=422)
    scale_error = "scale must satisfy 0 <= lo < hi <= 9 (grades are single digits), got [3, 2]"
    rejected(grade(prompt="", scale=(3, 2)), scale_error, status=422)


def test_size_limits_come_before_the_value_rules() -> None:
    wizard = (ChatMessage("wizard", "x"),)
    too_long = "responses[1] is 9 bytes, over --max-text-bytes 8"
    rejected(compare(prompt=wizard, responses=("a", "x" * 9)), too_long, item=1)
    rejected(grade(rubric="", prompt="p" * 9), "prompt is 9 bytes, over --max-text-bytes 8")
    rejected(rank(principles=("",), responses=("a",) * 5), "5 responses exceed --max-items-per-request 4; "
             "GET /v1/models reports the limits")  # fmt: skip


# -- the values: 400 -----------------------------------------------------------------------------


def test_prompt_rules() -> None:
    rejected(compare(prompt=""), "prompt is empty")
    rejected(rank(prompt=()), "prompt has no messages")
    rejected(grade(prompt=(ChatMessage("user", "q"), ChatMessage("wizard", "x"))), ROLE_ERROR.format("wizard"))
    rejected(compare(prompt=(ChatMessage("tool", "x"),)), ROLE_ERROR.format("tool"))  # no tool turns for a judge
    rejected(compare(prompt=(ChatMessage("user", cast(str, 5)),)), "message content must be a string")
    # texts are used verbatim: whitespace is not empty, an empty message content is allowed
    compare(prompt=" ")()
    compare(prompt=(ChatMessage("system", ""), ChatMessage("user", "q"), ChatMessage("assistant", "a")))()


def test_rubric_reference_and_principles_are_absent_or_non_empty() -> None:
    rejected(compare(rubric=""), "rubric is empty (leave it out for the default criteria)")
    rejected(grade(reference=""), "reference is empty (leave it out for no reference)")
    rejected(rank(principles=("be kind", "")), "principles must be non-empty strings")
    rejected(compare(principles=(cast(str, None),)), "principles must be non-empty strings")
    compare(rubric="r", reference="ref", principles=("be kind",))()


def test_responses_must_be_strings_and_may_be_empty() -> None:
    rejected(rank(responses=("a", "b", cast(str, 3))), "responses[2] must be a string", item=2)
    rejected(grade(response=cast(str, None)), "response must be a string")
    compare(responses=("", "b"))()  # an empty response is judged, not rejected
    grade(response="")()


def test_at_most_max_items_per_request_responses() -> None:
    rejected(
        rank(responses=("a",) * (MAX_ITEMS + 1)),
        f"{MAX_ITEMS + 1} responses exceed --max-items-per-request {MAX_ITEMS}; GET /v1/models reports the limits",
    )
    rank(responses=("a",) * MAX_ITEMS)()
    one = JudgeEngineConfig(max_items_per_request=1).limits
    with pytest.raises(ServiceError) as info:
        validate_compare(CompareInput("p", ("a", "b")), one)
    assert info.value.message.startswith("2 responses exceed --max-items-per-request 1;")


@pytest.mark.parametrize(
    ("check", "what", "item"),
    [
        (lambda t: compare(prompt=t), "prompt", None),
        (lambda t: compare(prompt=(ChatMessage("user", "q"), ChatMessage("user", t))), "prompt[1].content", None),
        (lambda t: rank(rubric=t), "rubric", None),
        (lambda t: grade(reference=t), "reference", None),
        (lambda t: compare(principles=("ok", t)), "principles[1]", None),
        (lambda t: compare(responses=("a", t)), "responses[1]", 1),
        (lambda t: rank(responses=(t, "b")), "responses[0]", 0),
        (lambda t: grade(response=t), "response", None),
    ],
)
def test_every_text_is_bounded_in_utf8_bytes(
    check: Callable[[str], Callable[[], None]], what: str, item: int | None
) -> None:
    check("x" * MAX_TEXT)()  # at the limit: fine
    rejected(check("x" * (MAX_TEXT + 1)), f"{what} is 9 bytes, over --max-text-bytes {MAX_TEXT}", item=item)
    # bytes, not characters: 5 × "é" is 5 characters and 10 bytes
    rejected(check("é" * 5), f"{what} is 10 bytes, over --max-text-bytes {MAX_TEXT}", item=item)
    # a lone surrogate (possible in a JSON body) counts as its 3 bytes instead of crashing the check
    rejected(check("\ud800" * 3), f"{what} is 9 bytes, over --max-text-bytes {MAX_TEXT}", item=item)


def test_a_valid_request_passes_every_check() -> None:
    prompt = (ChatMessage("system", "Brief."), ChatMessage("user", "Capital?"))
    validate_compare(CompareInput(prompt, ("Paris", "Lyon"), rubric="r", reference="ref", protocol="single"), LIMITS)
    validate_rank(RankInput("p", ("a", "b", "c", "d"), principles=("kind",)), LIMITS)
    validate_grade(GradeInput("p", "r", scale=(1, 9)), LIMITS)


# -- the engine runs it; both transports get the same answer -------------------------------------

LONG = "x" * (MAX_TEXT + 1)
WIZARD = [{"role": "wizard", "content": "x"}]
WIZARD_PB = cpb.Conversation(messages=[cpb.Message(role="wizard", content="x")])

# (HTTP route, JSON body, gRPC method, message, HTTP status, item)
SAME_ANSWER = [
    ("/v1/compare", {"prompt": "p", "responses": ["a"]}, "Compare",
     pb.JudgeCompareRequest(prompt_text="p", responses=["a"]), 422, None),
    ("/v1/compare", {"prompt": WIZARD, "responses": ["a", "b"]}, "Compare",
     pb.JudgeCompareRequest(prompt_messages=WIZARD_PB, responses=["a", "b"]), 400, None),
    ("/v1/compare", {"prompt": "p", "responses": ["a", LONG]}, "Compare",
     pb.JudgeCompareRequest(prompt_text="p", responses=["a", LONG]), 400, 1),
    ("/v1/rank", {"prompt": "p", "responses": ["a"] * (MAX_ITEMS + 1)}, "Rank",
     pb.JudgeRankRequest(prompt_text="p", responses=["a"] * (MAX_ITEMS + 1)), 400, None),
    ("/v1/rank", {"prompt": "p", "responses": ["a", "b"], "rubric": ""}, "Rank",
     pb.JudgeRankRequest(prompt_text="p", responses=["a", "b"], rubric=""), 400, None),
    ("/v1/grade", {"prompt": "p", "response": "r", "scale": [3, 2]}, "Grade",
     pb.JudgeGradeRequest(prompt_text="p", response="r", scale=pb.Scale(lo=3, hi=2)), 422, None),
    ("/v1/grade", {"prompt": "p", "response": "r", "principles": [""]}, "Grade",
     pb.JudgeGradeRequest(prompt_text="p", response="r", principles=[""]), 400, None),
]  # fmt: skip


def test_grpc_requests_are_translated_for_validation() -> None:
    """An unknown protocol enum value and an unset prompt reach the client as INVALID_ARGUMENT too."""
    unknown = pb.JudgeCompareRequest(prompt_text="p", responses=["a", "b"], protocol=7)  # type: ignore[arg-type]
    rejected(
        lambda: validate_compare(compare_from_grpc(unknown), LIMITS),
        "protocol must be 'both_orders' or 'single', not '<enum value 7>'",
        status=422,
    )
    rejected(
        lambda: compare_from_grpc(pb.JudgeCompareRequest(responses=["a", "b"])),
        "prompt is not set: send prompt_text or prompt_messages",
    )
    single = compare_from_grpc(
        pb.JudgeCompareRequest(prompt_messages=WIZARD_PB, responses=["a", "b"], protocol=pb.PROTOCOL_SINGLE, rubric="")
    )
    assert single == CompareInput((ChatMessage("wizard", "x"),), ("a", "b"), rubric="", protocol="single")
    rejected(lambda: validate_compare(single, LIMITS), ROLE_ERROR.format("wizard"))
    graded = grade_from_grpc(pb.JudgeGradeRequest(prompt_text="p", response="r", reference="ref"))
    assert graded == GradeInput("p", "r", reference="ref", scale=(1, 5))
    assert grade_from_grpc(pb.JudgeGradeRequest(prompt_text="p", scale=pb.Scale(lo=0, hi=9))).scale == (0, 9)


@pytest_asyncio.fixture
async def both() -> AsyncIterator[tuple[httpx.AsyncClient, pb_grpc.JudgeServiceStub, ScriptedBackend]]:
    backend = ScriptedBackend()
    settings = judge_settings(max_text_bytes=MAX_TEXT, max_items_per_request=MAX_ITEMS)
    engine = judge_engine(backend, settings)
    handle = create_grpc_server(engine, settings, api_key=None, health_poll_interval=60.0)
    port = await handle.start(port=0)
    await engine.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    app = create_http_app(engine, settings, api_key=None)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://judge.test")
    try:
        yield http, pb_grpc.JudgeServiceStub(channel), backend
    finally:
        await http.aclose()
        await channel.close(None)
        await handle.stop(0)
        await engine.stop()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("path", "body", "method", "request_pb", "status", "item"), SAME_ANSWER)
async def test_both_transports_answer_with_the_same_error(
    both: tuple[httpx.AsyncClient, pb_grpc.JudgeServiceStub, ScriptedBackend],
    path: str,
    body: dict[str, Any],
    method: str,
    request_pb: Any,
    status: int,
    item: int | None,
) -> None:
    http, stub, backend = both
    r = await http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error.get("item") == item
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, method)(request_pb)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    prefix = "" if item is None else f"item {item}: "
    assert info.value.details() == prefix + error["message"]
    assert backend.call_count == 0
