"""Anthropic Messages API through the official ``anthropic`` SDK (``AsyncAnthropic``, ``max_retries=0``).

The Messages API returns no logprobs, so a soft label comes from one of two modes (the
``mode`` argument; :meth:`AnthropicBackend.sampling_key` says which):

- ``"verbalised"`` (default, one call): the model is asked for a JSON object
  ``{"verdict": <choice>, "probability": <0..1, that the verdict is right>}``. The verdict gets
  that probability and the other choices share the rest evenly. Without a usable probability
  the verdict is a hard label (``soft=False``).
- ``"samples"`` (``samples`` = k calls, made concurrently): each call answers the template's own
  one-letter question at the sampling temperature (the API's default, 1.0, unless
  ``temperature`` is set); the probabilities are the vote shares among the replies that parse.
  Fewer than half parseable raises :class:`UnparseableReply`. One ``verdict()`` then makes
  ``calls_per_verdict`` = k provider calls; the engine's limiter should count them all.

With ``rationale`` the JSON also carries ``"rationale"`` (asked for first). ``temperature`` is
sent only when set (some models accept no sampling parameters), through ``extra_body``.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from services.judge.backends._common import parse_choice, parse_json_object, upstream_error_for_status
from services.judge.backends.base import DEFAULT_MAX_PROMPT_CHARS, BackendInfo, UnparseableReply, UpstreamError
from services.judge.types import Usage, VerdictQuery, VerdictReply
from services.runtime.chat import ChatMessage

if TYPE_CHECKING:
    from anthropic import AsyncAnthropic

SoftMode = Literal["verbalised", "samples"]
JSON_MIN_TOKENS = 64  # room for {"verdict": "A", "probability": 0.85}


def json_instruction(choices: Sequence[str], *, rationale: bool, probability: bool) -> str:
    """The instruction appended to the last user turn when a JSON verdict is wanted."""
    options = ", ".join(f'"{c}"' for c in choices)
    fields = []
    if rationale:
        fields.append('"rationale": <your reasoning, briefly>')
    fields.append(f'"verdict": <one of {options}>')
    if probability:
        fields.append('"probability": <a number from 0 to 1: the probability that your verdict is right>')
    text = "\n\nAnswer with only a JSON object, no other text, of the form {" + ", ".join(fields) + "}."
    if probability:
        text += " Give an honest, calibrated probability."
    return text


def verbalised_probs(verdict: str, probability: float, choices: Sequence[str]) -> dict[str, float]:
    """P(verdict) = probability, the rest spread evenly over the other choices."""
    p = min(1.0, max(0.0, probability))
    others = [c for c in choices if c != verdict]
    probs = {c: ((1.0 - p) / len(others) if others else 0.0) for c in choices}
    probs[verdict] = p if others else 1.0
    return probs


def _probability(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        p = float(str(value).strip().rstrip("%")) / (100.0 if str(value).strip().endswith("%") else 1.0)
    except ValueError:
        return None
    if not math.isfinite(p):
        return None
    if 1.0 < p <= 100.0:  # a percentage without the sign
        p /= 100.0
    return p if 0.0 <= p <= 1.0 else None


class AnthropicBackend:
    """``mode="verbalised"`` (one call) or ``mode="samples"`` (``samples`` calls, vote shares)."""

    max_prompt_chars = DEFAULT_MAX_PROMPT_CHARS  # the engine's prompt budget unless --max-prompt-chars

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout_s: float = 60.0,
        mode: SoftMode = "verbalised",
        samples: int = 5,
        temperature: float | None = None,
        max_tokens: int | None = None,
        client: AsyncAnthropic | None = None,
    ) -> None:
        if not model:
            raise ValueError("the anthropic backend needs a model name (--model)")
        if mode not in ("verbalised", "samples"):
            raise ValueError(f"mode must be 'verbalised' or 'samples', not {mode!r}")
        if mode == "samples" and samples < 1:
            raise ValueError("samples must be at least 1")
        self.info = BackendInfo(backend="anthropic", model=model, snapshot=model)
        self.model = model
        self.base_url = base_url
        self.timeout_s = float(timeout_s)
        self.mode: SoftMode = mode
        self.samples = int(samples)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.calls_per_verdict = self.samples if mode == "samples" else 1
        if client is None:
            import anthropic

            try:
                client = anthropic.AsyncAnthropic(
                    api_key=api_key, base_url=base_url, timeout=self.timeout_s, max_retries=0
                )
            except anthropic.AnthropicError as exc:
                raise ValueError(f"the anthropic backend needs an API key: set ANTHROPIC_API_KEY ({exc})") from None
        self.client = client

    def sampling_key(self) -> dict[str, object]:
        key: dict[str, object] = {
            "backend": "anthropic",
            "model": self.model,
            "base_url": self.base_url,
            "soft_labels": "verbalised probability" if self.mode == "verbalised" else "k samples",
            "mode": self.mode,
            "temperature": self.temperature if self.temperature is not None else "provider default",
            "max_tokens": self.max_tokens if self.max_tokens is not None else "query",
        }
        if self.mode == "samples":
            key["samples"] = self.samples
        return key

    # -- one call ---------------------------------------------------------------------------------

    async def _call(self, messages: Sequence[ChatMessage], max_tokens: int) -> tuple[str, Usage]:
        import anthropic

        system = "\n\n".join(m.content for m in messages if m.role == "system")
        kwargs: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "messages": [{"role": m.role, "content": m.content} for m in messages if m.role != "system"],
            "timeout": self.timeout_s,
        }
        if system:
            kwargs["system"] = system
        if self.temperature is not None:
            kwargs["extra_body"] = {"temperature": self.temperature}
        try:
            message = await self.client.messages.create(**kwargs)
        except anthropic.APIStatusError as exc:
            raise upstream_error_for_status(
                "anthropic", exc.status_code, _error_message(exc), exc.response.headers
            ) from None
        except anthropic.APITimeoutError:
            raise UpstreamError(f"anthropic: no answer within {self.timeout_s:g}s", retryable=True) from None
        except anthropic.APIConnectionError as exc:
            raise UpstreamError(f"anthropic: connection failed: {exc}", retryable=True) from None
        except anthropic.APIResponseValidationError as exc:
            raise UnparseableReply(str(exc.body)[:2000], "the response does not match the API schema") from None
        except TypeError as exc:  # the SDK's way of saying it has no credentials
            if "authentication" not in str(exc):
                raise
            raise UpstreamError(
                f"anthropic: no credentials (set ANTHROPIC_API_KEY or pass an API key): {exc}", retryable=False
            ) from None
        text = "".join(getattr(b, "text", "") for b in message.content if getattr(b, "type", None) == "text")
        u = message.usage
        usage = Usage(
            prompt_tokens=int(getattr(u, "input_tokens", 0) or 0),
            completion_tokens=int(getattr(u, "output_tokens", 0) or 0),
            calls=1,
        )
        return text, usage

    def _budget(self, query: VerdictQuery, *, json_reply: bool) -> int:
        n = self.max_tokens if self.max_tokens is not None else query.max_tokens
        return max(n, JSON_MIN_TOKENS) if json_reply else n

    # -- verdicts -------------------------------------------------------------------------------

    async def verdict(self, query: VerdictQuery) -> VerdictReply:
        if self.mode == "verbalised":
            return await self._verbalised(query)
        return await self._samples(query)

    async def _verbalised(self, query: VerdictQuery) -> VerdictReply:
        messages = _with_instruction(
            query, json_instruction(query.choices, rationale=query.rationale, probability=True)
        )
        text, usage = await self._call(messages, self._budget(query, json_reply=True))
        verdict, obj = _json_verdict(text, query.choices)
        rationale = obj.get("rationale") if isinstance(obj.get("rationale"), str) else None
        p = _probability(obj.get("probability"))
        if p is None:
            return VerdictReply(choice=verdict, probs=None, soft=False, raw=text, rationale=rationale, usage=usage)
        probs = verbalised_probs(verdict, p, query.choices)
        return VerdictReply(choice=verdict, probs=probs, soft=True, raw=text, rationale=rationale, usage=usage)

    async def _samples(self, query: VerdictQuery) -> VerdictReply:
        if query.rationale:
            messages = _with_instruction(query, json_instruction(query.choices, rationale=True, probability=False))
            budget = self._budget(query, json_reply=True)
        else:
            messages, budget = query.messages, self._budget(query, json_reply=False)
        tasks = [asyncio.ensure_future(self._call(messages, budget)) for _ in range(self.samples)]
        try:
            replies = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        usage = sum((u for _, u in replies), Usage())
        votes: Counter[str] = Counter()
        rationales: dict[str, str] = {}
        for text, _ in replies:
            if query.rationale:
                try:
                    verdict, obj = _json_verdict(text, query.choices)
                except UnparseableReply:
                    continue
                if isinstance(obj.get("rationale"), str):
                    rationales.setdefault(verdict, obj["rationale"])
            else:
                parsed = parse_choice(text, query.choices)
                if parsed is None:
                    continue
                verdict = parsed
            votes[verdict] += 1
        raw = "\n".join(text for text, _ in replies)
        parsed_n = sum(votes.values())
        if parsed_n == 0 or 2 * parsed_n < len(replies):
            raise UnparseableReply(raw, f"only {parsed_n} of {len(replies)} samples gave a verdict")
        probs = {c: votes[c] / parsed_n for c in query.choices}
        best = max(query.choices, key=lambda c: (votes[c], -query.choices.index(c)))
        return VerdictReply(choice=best, probs=probs, soft=True, raw=raw, rationale=rationales.get(best), usage=usage)

    async def aclose(self) -> None:
        await self.client.close()


def _with_instruction(query: VerdictQuery, instruction: str) -> tuple[ChatMessage, ...]:
    """The query's messages with ``instruction`` appended to the last user turn (or as a new one)."""
    messages = list(query.messages)
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].role == "user":
            messages[i] = replace(messages[i], content=messages[i].content + instruction)
            return tuple(messages)
    return (*messages, ChatMessage("user", instruction.strip()))


def _json_verdict(text: str, choices: Sequence[str]) -> tuple[str, Mapping[str, Any]]:
    obj = parse_json_object(text)
    if obj is None:
        raise UnparseableReply(text, "the reply is not a JSON object")
    verdict = obj.get("verdict")
    if not isinstance(verdict, str) or verdict.strip() not in choices:
        raise UnparseableReply(text, f"the JSON verdict is not one of {list(choices)}")
    return verdict.strip(), obj


def _error_message(exc: Any) -> str:
    message = getattr(exc, "api_message", None)
    if message:
        return str(message)
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])
    return str(getattr(exc, "message", None) or exc)
