"""Every check of a judge request, in one place: the engine runs them once per request.

Both transports only translate (JSON or protobuf → :class:`CompareInput`, :class:`RankInput`,
:class:`GradeInput`) and the engine validates what they built, so HTTP and gRPC reject exactly the
same requests with the same messages. A violation rejects the whole request with
INVALID_ARGUMENT before any work:

- what the API's schema states (exactly two responses for compare, at least two for rank, the
  protocol's values, a scale inside ``grade_scale_bounds``): HTTP 422, like the JSON type
  errors the HTTP models report;
- everything else (an empty prompt, an unknown role, an empty rubric, reference or principle,
  over ``max_items_per_request`` responses, a text over ``max_text_bytes`` UTF-8 bytes, a judge
  prompt over ``max_prompt_chars``): HTTP 400.

The prompt budget is checked here on the request's own texts, before anything is escaped or
rendered: the longest prompt the request can make (its prompt, its two longest responses or its
one response, its reference, rubric and longest principle) holds at least their characters,
so a request whose texts alone are over ``max_prompt_chars`` is refused at once, with every
counted text's size in the message. The engine then checks the exact size of that longest
prompt, rendered (template, fences and escaping included), before any backend call.

A request breaking several rules gets the first in this order: the schema rules, the size limits,
then the values (an oversize response is reported before an unknown role in the prompt). An
error caused by one response carries its index as ``item``. An empty response is a legitimate
(bad) candidate: it is judged, not rejected. Texts are never stripped: only ``""`` is empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import invalid
from services.judge.engine.config import JudgeLimits
from services.judge.types import CompareInput, GradeInput, JudgePrompt, RankInput

__all__ = ["PROTOCOLS", "ROLES", "validate_compare", "validate_grade", "validate_rank"]

ROLES = ("system", "user", "assistant")
PROTOCOLS = ("both_orders", "single")

# The API's schema states these; HTTP answers them as it answers a JSON type error.
_SCHEMA = 422


def validate_compare(req: CompareInput, limits: JudgeLimits) -> None:
    """Raise INVALID_ARGUMENT for the first rule ``req`` breaks."""
    if len(req.responses) != 2:
        raise invalid(f"compare needs exactly 2 responses, got {len(req.responses)}", http_status=_SCHEMA)
    if req.protocol not in PROTOCOLS:
        raise invalid(f"protocol must be 'both_orders' or 'single', not {req.protocol!r}", http_status=_SCHEMA)
    _check(_Texts(req.prompt, req.rubric, req.reference, req.principles, responses=req.responses), limits)


def validate_rank(req: RankInput, limits: JudgeLimits) -> None:
    """Raise INVALID_ARGUMENT for the first rule ``req`` breaks."""
    if len(req.responses) < 2:
        raise invalid(f"rank needs at least 2 responses, got {len(req.responses)}", http_status=_SCHEMA)
    _check(_Texts(req.prompt, req.rubric, req.reference, req.principles, responses=req.responses), limits)


def validate_grade(req: GradeInput, limits: JudgeLimits) -> None:
    """Raise INVALID_ARGUMENT for the first rule ``req`` breaks."""
    _scale(req.scale, limits.grade_scale_bounds)
    _check(_Texts(req.prompt, req.rubric, req.reference, req.principles, response=(req.response,)), limits)


@dataclass(frozen=True)
class _Texts:
    """The texts of one request: those every request has, and its responses or its one response."""

    prompt: JudgePrompt
    rubric: str | None
    reference: str | None
    principles: Sequence[str]
    responses: Sequence[str] = ()  # compare, rank
    response: tuple[str] | tuple[()] = ()  # grade: its one response


def _check(t: _Texts, limits: JudgeLimits) -> None:
    # In this order, so that a request breaking several rules gets the same error as it always
    # did: the types (only a Python caller can get them wrong), the sizes, then the values.
    _types(t)
    _sizes(t, limits)
    _prompt_budget(t, limits)
    _values(t)


def _types(t: _Texts) -> None:
    if not isinstance(t.prompt, str) and any(not isinstance(m.content, str) for m in t.prompt):
        raise invalid("message content must be a string")
    if any(not isinstance(p, str) for p in t.principles):
        raise invalid("principles must be non-empty strings")
    for i, r in enumerate(t.responses):
        if not isinstance(r, str):
            raise invalid(f"responses[{i}] must be a string", item=i)
    if any(not isinstance(r, str) for r in t.response):
        raise invalid("response must be a string")


def _sizes(t: _Texts, limits: JudgeLimits) -> None:
    if isinstance(t.prompt, str):
        _text("prompt", t.prompt, limits)
    else:
        for i, m in enumerate(t.prompt):
            _text(f"prompt[{i}].content", m.content, limits)
    if t.rubric is not None:
        _text("rubric", t.rubric, limits)
    if t.reference is not None:
        _text("reference", t.reference, limits)
    for i, p in enumerate(t.principles):
        _text(f"principles[{i}]", p, limits)
    if len(t.responses) > limits.max_items_per_request:
        raise invalid(
            f"{len(t.responses)} responses exceed --max-items-per-request {limits.max_items_per_request}; "
            "GET /v1/models reports the limits"
        )
    for i, r in enumerate(t.responses):
        _text(f"responses[{i}]", r, limits, item=i)
    for r in t.response:
        _text("response", r, limits)


def _prompt_budget(t: _Texts, limits: JudgeLimits) -> None:
    # len() only: the check must cost nothing next to what it prevents (escaping, rendering,
    # tokenizing or sending megabytes).
    if isinstance(t.prompt, str):
        counted = [("prompt", len(t.prompt))]
    else:
        # as the template renders messages: "role: content" blocks, a blank line between them
        size = sum(len(str(m.role)) + 2 + len(m.content) for m in t.prompt) + 2 * max(0, len(t.prompt) - 1)
        counted = [(f"prompt ({len(t.prompt)} messages)", size)]
    if t.response:
        counted.append(("response", len(t.response[0])))
    else:
        # a pairwise prompt holds two responses: the two longest are the worst case
        longest = sorted(range(len(t.responses)), key=lambda i: len(t.responses[i]), reverse=True)[:2]
        counted.extend((f"responses[{i}]", len(t.responses[i])) for i in sorted(longest))
    if t.reference is not None:
        counted.append(("reference", len(t.reference)))
    if t.rubric is not None:
        counted.append(("rubric", len(t.rubric)))
    if t.principles:
        i = max(range(len(t.principles)), key=lambda k: len(t.principles[k]))
        counted.append((f"principles[{i}]", len(t.principles[i])))
    total = sum(n for _, n in counted)
    if total > limits.max_prompt_chars:
        sizes = ", ".join(f"{name} {n}" for name, n in counted)
        raise invalid(
            f"the judge prompt would be over --max-prompt-chars {limits.max_prompt_chars}: its texts alone are "
            f"{total} characters ({sizes})"
        )


def _values(t: _Texts) -> None:
    if isinstance(t.prompt, str):
        if t.prompt == "":
            raise invalid("prompt is empty")
    else:
        if len(t.prompt) == 0:
            raise invalid("prompt has no messages")
        for m in t.prompt:
            if m.role not in ROLES:
                raise invalid(f"message role must be one of {list(ROLES)}, not {m.role!r}")
    if t.rubric == "":
        raise invalid("rubric is empty (leave it out for the default criteria)")
    if t.reference == "":
        raise invalid("reference is empty (leave it out for no reference)")
    if any(p == "" for p in t.principles):
        raise invalid("principles must be non-empty strings")


def _scale(scale: tuple[int, int], bounds: tuple[int, int]) -> None:
    if len(scale) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in scale):
        raise invalid("scale must be two integers [lo, hi]", http_status=_SCHEMA)
    lo, hi = scale
    blo, bhi = bounds
    if not blo <= lo < hi <= bhi:
        raise invalid(
            f"scale must satisfy {blo} <= lo < hi <= {bhi} (grades are single digits), got [{lo}, {hi}]",
            http_status=_SCHEMA,
        )


def _text(what: str, text: str, limits: JudgeLimits, *, item: int | None = None) -> None:
    # Cheap bound first: a str of n code points has at most 4n UTF-8 bytes.
    if len(text) * 4 <= limits.max_text_bytes:
        return
    # surrogatepass: a JSON body may carry a lone surrogate ("\ud800"); count it, don't crash on it.
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_text_bytes:
        raise invalid(f"{what} is {size} bytes, over --max-text-bytes {limits.max_text_bytes}", item=item)
