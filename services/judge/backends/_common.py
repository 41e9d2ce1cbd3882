"""Helpers shared by the provider backends: error mapping, rate-limit headers, reply parsing.

Nothing here imports a provider SDK: the backends pass status codes and headers in.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from services.judge.backends.base import UpstreamError
from services.runtime.chat import ChatMessage

# 408 request timeout, 409 conflict (lock contention), 429 rate limited, 5xx (529 overloaded).
RETRYABLE_STATUSES = frozenset({408, 409, 429})


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


# -- rate-limit headers ------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _parse_duration(value: str) -> float | None:
    """OpenAI's ``x-ratelimit-reset-*`` values: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"0.5s"``, or seconds."""
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value.replace(" ", ""):
        return _parse_timestamp(value)
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


def _parse_timestamp(value: str) -> float | None:
    """An RFC 3339 timestamp (Anthropic's ``anthropic-ratelimit-*-reset``) as seconds from now."""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() - time.time()


def _seconds(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return max(0.0, value)


def retry_after_from_headers(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the provider asked us to wait, from (first that is present):

    ``retry-after-ms``; ``retry-after`` (seconds or an HTTP date); the reset time of an
    exhausted limit (``x-ratelimit-reset-requests`` / ``-tokens`` for OpenAI,
    ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-reset`` for Anthropic),
    else the earliest reset of any limit. None when the headers say nothing.
    """
    if not headers:
        return None
    h = {str(k).lower(): str(v) for k, v in headers.items()}
    if "retry-after-ms" in h:
        try:
            return _seconds(float(h["retry-after-ms"]) / 1000.0)
        except ValueError:
            pass
    if "retry-after" in h:
        raw = h["retry-after"].strip()
        try:
            return _seconds(float(raw))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(raw) if raw else None
            if parsed is not None:
                return _seconds(parsed.timestamp() - time.time())
    exhausted: list[float] = []
    resets: list[float] = []
    for name, value in h.items():
        limit: str | None = None
        if name.startswith("x-ratelimit-reset-"):
            limit = name.removeprefix("x-ratelimit-reset-")
            remaining = h.get(f"x-ratelimit-remaining-{limit}")
            seconds = _parse_duration(value)
        elif name.startswith("anthropic-ratelimit-") and name.endswith("-reset"):
            limit = name.removeprefix("anthropic-ratelimit-").removesuffix("-reset")
            remaining = h.get(f"anthropic-ratelimit-{limit}-remaining")
            seconds = _parse_timestamp(value)
        else:
            continue
        seconds = _seconds(seconds)
        if seconds is None:
            continue
        resets.append(seconds)
        if remaining is not None and remaining.strip() in ("0", "0.0"):
            exhausted.append(seconds)
    if exhausted:
        return max(exhausted)
    return min(resets) if resets else None


def upstream_error_for_status(
    provider: str, status: int, message: str, headers: Mapping[str, str] | None
) -> UpstreamError:
    """One :class:`UpstreamError` for an HTTP error answer of a provider."""
    retryable = is_retryable_status(status)
    return UpstreamError(
        f"{provider} answered HTTP {status}: {message}"[:500],
        retryable=retryable,
        retry_after=retry_after_from_headers(headers) if retryable else None,
        status=status,
        rate_limited=status == 429,
    )


# -- messages ----------------------------------------------------------------------------------


def as_dicts(messages: Iterable[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


# -- reply parsing -----------------------------------------------------------------------------

_WRAPPERS = " \t\r\n*_`'\"()[]{}<>.:;,!"
_KEYWORDS = r"(?:final\s+verdict|verdict|answer|choice|winner|grade|score|rating)"


def parse_choice(text: str, choices: Sequence[str]) -> str | None:
    """The verdict a free-text reply states, or None.

    Accepts a bare choice wrapped in markup (``A``, ``**B**``, ``(A).``), a choice followed by
    punctuation or a line break (``A. Because...``), or the last ``Verdict: X`` / ``Answer: X``
    style statement. A choice merely mentioned inside prose is not a verdict.
    """
    stripped = text.strip(_WRAPPERS)
    if stripped in choices:
        return stripped
    alternatives = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    lead = re.match(rf"^[\s*_`'\"(\[]*({alternatives})(?:[\s*_`'\")\]]*(?:[.:;,)\n]|$))", text)
    if lead:
        return lead.group(1)
    stated = re.findall(
        rf"{_KEYWORDS}\s*(?:is)?\s*[:=\-]?\s*[*_`'\"(\[]*\s*({alternatives})(?![\w])", text, flags=re.IGNORECASE
    )
    if stated:
        return str(stated[-1])
    return None


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in a reply: the whole text, a fenced block, or the outermost ``{...}``."""
    candidates = [text.strip()]
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, flags=re.DOTALL)
    if fence:
        candidates.append(fence.group(1).strip())
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    for cand in candidates:
        try:
            obj = json.loads(cand)
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def verdict_schema(choices: Sequence[str], *, rationale: bool, probability: bool = False) -> dict[str, Any]:
    """JSON schema of a structured verdict: ``{"rationale"?, "verdict", "probability"?}``.

    The rationale comes first so that the model reasons before it commits to a verdict.
    """
    props: dict[str, Any] = {}
    if rationale:
        props["rationale"] = {"type": "string"}
    props["verdict"] = {"type": "string", "enum": list(choices)}
    if probability:
        props["probability"] = {"type": "number"}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def normalise(probs: Mapping[str, float]) -> dict[str, float]:
    total = sum(probs.values())
    if not (total > 0 and math.isfinite(total)):
        raise ValueError("no probability mass on the choices")
    return {k: v / total for k, v in probs.items()}
