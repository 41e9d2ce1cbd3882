"""OpenAI chat completions, and any server that speaks them (vLLM, llama.cpp, SGLang, Ollama).

One :meth:`OpenAIBackend.verdict` is one HTTP call (the SDK's own retries are off:
``max_retries=0``; the engine retries through its limiter).

Soft labels come from the logprobs of the verdict token (DESIGN.md, "Soft labels from
logprobs"): at the first generated token that is a choice (``A``/``B`` after stripping
whitespace; the first non-blank token if none is), the probabilities of the choices among
``top_logprobs`` are summed per choice (``"A"`` and ``" A"`` both count) and renormalised over
the choices. A choice missing from ``top_logprobs`` is bounded by the smallest logprob shown
there. If no choice is shown at all, or the provider returns no logprobs, the reply text is
parsed and its letter is a hard label (``soft=False``). A reply with no readable verdict
raises :class:`UnparseableReply`.

Rationale queries use structured output (``response_format`` JSON schema
``{"rationale": str, "verdict": enum}``); the soft label is read at the token where the
verdict's value starts when the provider returns logprobs for it, else it is hard.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from services.judge.backends._common import (
    as_dicts,
    parse_choice,
    parse_json_object,
    upstream_error_for_status,
    verdict_schema,
)
from services.judge.backends.base import DEFAULT_MAX_PROMPT_CHARS, BackendInfo, UnparseableReply, UpstreamError
from services.judge.types import Usage, VerdictQuery, VerdictReply

if TYPE_CHECKING:
    from openai import AsyncOpenAI

BackendName = Literal["openai", "openai-compatible"]
MaxTokensParam = Literal["max_tokens", "max_completion_tokens"]

# Servers that speak the OpenAI API without checking keys (vLLM, llama.cpp) still need the SDK
# to send one.
PLACEHOLDER_KEY = "EMPTY"


# -- soft labels from logprobs (pure functions, tested directly) --------------------------------


def choice_probs(
    alternatives: Sequence[tuple[str, float]], choices: Sequence[str], *, prefix: str = ""
) -> dict[str, float] | None:
    """A distribution over ``choices`` from one position's ``(token, logprob)`` alternatives.

    A token counts for choice ``c`` when, after removing ``prefix`` (text the position's token
    carries before the verdict, such as a JSON quote) and surrounding whitespace, and cutting
    at a closing quote, it equals ``c``; duplicates (``"A"``, ``" A"``) are summed. Choices
    not shown are bounded by the smallest logprob shown. None when no choice is shown.
    """
    seen: dict[str, float] = {}  # token -> logprob, each distinct token once
    for token, logprob in alternatives:
        if token not in seen and logprob is not None and math.isfinite(logprob):
            seen[token] = logprob
    if not seen:
        return None
    mass = {c: 0.0 for c in choices}
    found: set[str] = set()
    for token, logprob in seen.items():
        if prefix:
            if not token.startswith(prefix):
                continue
            token = token[len(prefix) :]
        candidate = token.split('"', 1)[0].strip()
        if candidate in mass:
            mass[candidate] += math.exp(logprob)
            found.add(candidate)
    if not found:
        return None
    floor = math.exp(min(seen.values()))
    for c in choices:
        if c not in found:
            mass[c] = floor
    total = sum(mass.values())
    if not total > 0:
        return None
    return {c: mass[c] / total for c in choices}


def _alternatives(position: Any) -> list[tuple[str, float]]:
    """The sampled token and its ``top_logprobs`` at one position of ``logprobs.content``."""
    alts = [(str(position.token), float(position.logprob))]
    alts.extend((str(t.token), float(t.logprob)) for t in (position.top_logprobs or []))
    return alts


def first_verdict_probs(content: Sequence[Any], choices: Sequence[str]) -> dict[str, float] | None:
    """Soft label at the first generated token that is a choice (else the first non-blank one)."""
    index = next((i for i, p in enumerate(content) if str(p.token).strip() in choices), None)
    if index is None:
        index = next((i for i, p in enumerate(content) if str(p.token).strip()), None)
    if index is None:
        return None
    return choice_probs(_alternatives(content[index]), choices)


_VERDICT_VALUE = re.compile(r'"verdict"\s*:\s*"')


def structured_verdict_probs(content: Sequence[Any], choices: Sequence[str]) -> dict[str, float] | None:
    """Soft label at the token where the JSON ``"verdict"`` value starts, if it can be found."""
    text = "".join(str(p.token) for p in content)
    matches = list(_VERDICT_VALUE.finditer(text))
    if not matches:
        return None
    value_start = matches[-1].end()
    offset = 0
    for position in content:
        token = str(position.token)
        end = offset + len(token)
        if offset <= value_start < end:
            return choice_probs(_alternatives(position), choices, prefix=text[offset:value_start])
        offset = end
    return None


# -- the backend ---------------------------------------------------------------------------------


class OpenAIBackend:
    """Chat completions through the official ``openai`` SDK (``AsyncOpenAI``, ``max_retries=0``).

    ``base_url`` makes it the ``openai-compatible`` backend (the name follows unless given).
    ``max_tokens=None`` uses each query's ``max_tokens``. ``max_tokens_param`` picks the request
    field: OpenAI deprecated ``max_tokens`` for ``max_completion_tokens``; compatible servers
    mostly know ``max_tokens`` (the defaults follow that). ``top_logprobs=0`` asks for none.
    """

    max_prompt_chars = DEFAULT_MAX_PROMPT_CHARS  # the engine's prompt budget unless --max-prompt-chars

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        name: BackendName | None = None,
        timeout_s: float = 60.0,
        temperature: float = 0.0,
        top_logprobs: int = 20,
        max_tokens: int | None = None,
        max_tokens_param: MaxTokensParam | None = None,
        seed: int | None = None,
        client: AsyncOpenAI | None = None,
    ) -> None:
        if not model:
            raise ValueError("the openai backends need a model name (--model)")
        if not 0 <= top_logprobs <= 20:
            raise ValueError("top_logprobs must be between 0 and 20")
        name = name or ("openai-compatible" if base_url else "openai")
        if name == "openai-compatible" and not base_url and client is None:
            raise ValueError("the openai-compatible backend needs --base-url (e.g. http://127.0.0.1:8080/v1)")
        self.info = BackendInfo(backend=name, model=model, snapshot=model)
        self.model = model
        self.base_url = base_url
        self.timeout_s = float(timeout_s)
        self.temperature = float(temperature)
        self.top_logprobs = int(top_logprobs)
        self.max_tokens = max_tokens
        self.max_tokens_param: MaxTokensParam = max_tokens_param or (
            "max_tokens" if name == "openai-compatible" else "max_completion_tokens"
        )
        self.seed = seed
        self.calls_per_verdict = 1
        if client is None:
            import openai

            if api_key is None and name == "openai-compatible":
                api_key = os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_KEY
            try:
                client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=self.timeout_s, max_retries=0)
            except openai.OpenAIError as exc:
                raise ValueError(
                    f"the {name} backend needs an API key: set OPENAI_API_KEY or pass one ({exc})"
                ) from None
        self.client = client

    def sampling_key(self) -> dict[str, object]:
        return {
            "backend": self.info.backend,
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "top_logprobs": self.top_logprobs,
            "max_tokens": self.max_tokens if self.max_tokens is not None else "query",
            "seed": self.seed,
            "soft_labels": "logprobs",
            "rationale_format": "json_schema",
        }

    def _request(self, query: VerdictQuery) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": as_dicts(query.messages),
            "temperature": self.temperature,
            self.max_tokens_param: self.max_tokens if self.max_tokens is not None else query.max_tokens,
            "timeout": self.timeout_s,
        }
        if self.top_logprobs > 0:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = self.top_logprobs
        if self.seed is not None:
            kwargs["seed"] = self.seed
        if query.rationale:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "verdict",
                    "strict": True,
                    "schema": verdict_schema(query.choices, rationale=True),
                },
            }
        return kwargs

    async def verdict(self, query: VerdictQuery) -> VerdictReply:
        import openai

        try:
            response = await self.client.chat.completions.create(**self._request(query))
        except openai.APIStatusError as exc:
            raise upstream_error_for_status(
                self.info.backend, exc.status_code, _error_message(exc), exc.response.headers
            ) from None
        except openai.APITimeoutError:
            raise UpstreamError(f"{self.info.backend}: no answer within {self.timeout_s:g}s", retryable=True) from None
        except openai.APIConnectionError as exc:
            raise UpstreamError(f"{self.info.backend}: connection failed: {exc}", retryable=True) from None
        except openai.APIResponseValidationError as exc:
            raise UnparseableReply(str(exc.body)[:2000], "the response does not match the API schema") from None
        return reply_from_completion(response, query)

    async def aclose(self) -> None:
        await self.client.close()


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"])
    return str(getattr(exc, "message", None) or exc)


def reply_from_completion(response: Any, query: VerdictQuery) -> VerdictReply:
    """Read one verdict from a ``ChatCompletion`` (the rules are in the module docstring)."""
    usage = _usage(getattr(response, "usage", None))
    if not response.choices:
        raise UnparseableReply("", "the response has no choices")
    choice = response.choices[0]
    message = choice.message
    text = message.content
    if text is None:
        refusal = getattr(message, "refusal", None)
        raise UnparseableReply(refusal or "", "refusal" if refusal else "empty reply")
    logprobs = getattr(choice, "logprobs", None)
    content = list(getattr(logprobs, "content", None) or [])
    choices = query.choices

    if query.rationale:
        obj = parse_json_object(text)
        if obj is None:
            raise UnparseableReply(text, "the reply is not a JSON object")
        verdict = obj.get("verdict")
        if not isinstance(verdict, str) or verdict.strip() not in choices:
            raise UnparseableReply(text, f"the JSON verdict is not one of {list(choices)}")
        rationale = obj.get("rationale")
        rationale = rationale if isinstance(rationale, str) else None
        probs = structured_verdict_probs(content, choices) if content else None
        return VerdictReply(
            choice=verdict.strip(), probs=probs, soft=probs is not None, raw=text, rationale=rationale, usage=usage
        )

    parsed = parse_choice(text, choices)
    probs = first_verdict_probs(content, choices) if content else None
    if probs is not None:
        best = parsed or max(probs, key=lambda c: probs[c])
        return VerdictReply(choice=best, probs=probs, soft=True, raw=text, usage=usage)
    if parsed is None:
        raise UnparseableReply(text, f"no verdict among {list(choices)} in the reply")
    return VerdictReply(choice=parsed, probs=None, soft=False, raw=text, usage=usage)


def _usage(usage: Any) -> Usage:
    if usage is None:
        return Usage(calls=1)
    return Usage(
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        calls=1,
    )
