"""A fake OpenAI chat-completions server (``POST /v1/chat/completions``), see :mod:`tests.support.fakes`.

``logprobs`` decides what a successful reply carries when the request asks for logprobs:

- ``"soft"``: every choice in ``top_logprobs`` with the policy's probabilities (times 0.98;
  filler tokens share the rest), so a backend that renormalises recovers the policy exactly;
- ``"one"``: only the chosen letter is in ``top_logprobs``, with filler tokens below it;
- ``"none"``: no logprobs at all (``"logprobs": null``), as many compatible servers do.

Requests with ``response_format`` JSON schema get ``{"rationale": ..., "verdict": ...}`` (the
choices are the schema's enum) with per-token logprobs; the verdict letter is its own token.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.support.fakes import (
    Call,
    FakeProvider,
    HttpError,
    Ok,
    Policy,
    PolicyInput,
    Reply,
    Script,
    Sleep,
    always_first,
    count_tokens,
    iter_fillers,
    message_text,
    pseudo_tokens,
    safe_log,
)

LogprobMode = Literal["soft", "one", "none"]
VERDICT_MASS = 0.98  # of the first position's probability, on the choices ("soft")


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


class FakeOpenAI(FakeProvider):
    """``with FakeOpenAI(policy=..., logprobs="soft", script=[...]) as srv: srv.base_url``."""

    def __init__(
        self,
        policy: Policy = always_first,
        *,
        logprobs: LogprobMode = "soft",
        script: Script = (),
        default: Ok | HttpError | Sleep | Reply | None = None,
        confidence: float = 0.9,
        choices: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(policy, script=script, default=default, confidence=confidence, choices=choices, seed=seed)
        self.logprobs = logprobs

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> Any:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}

        @app.post("/v1/chat/completions")
        async def completions(request: Request) -> JSONResponse:
            body = await request.json()
            call = self._next("/v1/chat/completions", body)
            status, payload, headers = await self._answer(call, body, call.behaviour)
            self._answered(call, status)
            return JSONResponse(payload, status_code=status, headers=headers)

        return app

    async def _answer(
        self, call: Call, body: Mapping[str, Any], behaviour: Any
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if isinstance(behaviour, Sleep):
            await self.sleep(behaviour.seconds)
            return await self._answer(call, body, behaviour.then)
        if isinstance(behaviour, HttpError):
            return behaviour.status, _error_body(behaviour), _error_headers(behaviour)
        prompt_tokens = sum(count_tokens(message_text(m.get("content"))) for m in body.get("messages", []))
        if isinstance(behaviour, Reply):
            return 200, self._completion(body, behaviour.text, None, prompt_tokens, count_tokens(behaviour.text)), {}
        return 200, self._policy_reply(body, prompt_tokens), {}

    def _policy_reply(self, body: Mapping[str, Any], prompt_tokens: int) -> dict[str, Any]:
        schema = _schema(body)
        choices = tuple(schema["properties"]["verdict"]["enum"]) if schema else self.choices
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        messages = tuple(body.get("messages", []))
        req = PolicyInput(messages, "\n".join(message_text(m.get("content")) for m in messages), choices, temperature)
        probs = self.distribution(req)
        verdict = self.pick(probs, sample=temperature > 0)
        want_logprobs = bool(body.get("logprobs")) and self.logprobs != "none"
        top_n = int(body.get("top_logprobs") or 0)
        verdict_top = self._top(probs, verdict, top_n)
        if schema:
            rationale = f"Response {verdict} follows the instructions better."
            pieces = ['{"', "rationale", '":', ' "', *pseudo_tokens(rationale), '",', ' "', "verdict", '":', ' "']
            positions = [_entry(t, 0.0) | {"top_logprobs": [_entry(t, 0.0)][:top_n]} for t in pieces]
            positions.append(_entry(verdict, safe_log(probs[verdict] * VERDICT_MASS)) | {"top_logprobs": verdict_top})
            positions.append(_entry('"}', 0.0) | {"top_logprobs": [_entry('"}', 0.0)][:top_n]})
            text = "".join(p["token"] for p in positions)
            assert json.loads(text)["verdict"] == verdict
        else:
            text = verdict
            positions = [_entry(verdict, safe_log(probs[verdict] * VERDICT_MASS)) | {"top_logprobs": verdict_top}]
        logprobs = {"content": positions, "refusal": None} if want_logprobs else None
        return self._completion(body, text, logprobs, prompt_tokens, len(positions))

    def _top(self, probs: Mapping[str, float], verdict: str, n: int) -> list[dict[str, Any]]:
        """``top_logprobs`` of the verdict position, most likely first, ``n`` at most."""
        entries: list[tuple[str, float]]
        if self.logprobs == "soft":
            entries = [(c, p * VERDICT_MASS) for c, p in probs.items()]
        else:  # "one": only the chosen letter is shown
            entries = [(verdict, probs[verdict] * VERDICT_MASS)]
        shown = min(p for _, p in entries)
        rest, fillers = 1.0 - sum(p for _, p in entries), iter_fillers()
        while len(entries) < max(n, 1) and rest > 1e-12:
            # Each filler below everything shown so far, so the smallest shown is a filler.
            p = min(rest / 2, shown * 0.5)
            entries.append((next(fillers), p))
            rest -= p
            shown = p
        entries.sort(key=lambda e: -e[1])
        return [_entry(t, safe_log(p)) for t, p in entries[:n]]

    def _completion(
        self, body: Mapping[str, Any], text: str, logprobs: Any, prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-fake-{len(self.calls)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": str(body.get("model", "fake-model")),
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": logprobs,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _schema(body: Mapping[str, Any]) -> dict[str, Any] | None:
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        schema = fmt.get("json_schema", {}).get("schema")
        if isinstance(schema, dict) and "verdict" in schema.get("properties", {}):
            return schema
    return None


def _error_body(err: HttpError) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_exceeded"}
    return {
        "error": {"message": err.message, "type": kind.get(err.status, "server_error"), "param": None, "code": None}
    }


def _error_headers(err: HttpError) -> dict[str, str]:
    headers = dict(err.headers)
    if err.retry_after is not None:
        headers["retry-after"] = f"{err.retry_after:g}" if math.isfinite(err.retry_after) else str(err.retry_after)
    if err.retry_after_ms is not None:
        headers["retry-after-ms"] = f"{err.retry_after_ms:g}"
    return headers
