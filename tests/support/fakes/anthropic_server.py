"""A fake Anthropic Messages server (``POST /v1/messages``), see :mod:`tests.support.fakes`.

The Messages API has no logprobs. The fake answers in one of two shapes:

- when the last user turn (or ``output_config.format``) asks for a JSON object with a
  ``"verdict"``, it answers JSON: ``verdict`` = the most probable choice, ``probability`` = its
  probability under the policy (when ``"probability"`` is asked for), ``rationale`` (when asked);
- otherwise a bare letter, sampled from the policy's distribution when the temperature is > 0
  (the API's default is 1.0), so k calls give vote shares near the policy's probabilities.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

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
    message_text,
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class FakeAnthropic(FakeProvider):
    """``with FakeAnthropic(policy=..., script=[...]) as srv: AsyncAnthropic(base_url=srv.base_url)``."""

    def __init__(
        self,
        policy: Policy = always_first,
        *,
        script: Script = (),
        default: Ok | HttpError | Sleep | Reply | None = None,
        confidence: float = 0.9,
        choices: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(policy, script=script, default=default, confidence=confidence, choices=choices, seed=seed)

    def app(self) -> Any:
        app = FastAPI()

        @app.post("/v1/messages")
        async def messages(request: Request) -> JSONResponse:
            body = await request.json()
            call = self._next("/v1/messages", body)
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
            headers = dict(behaviour.headers)
            if behaviour.retry_after is not None:
                headers["retry-after"] = f"{behaviour.retry_after:g}"
            if behaviour.retry_after_ms is not None:
                headers["retry-after-ms"] = f"{behaviour.retry_after_ms:g}"
            kind = _ERROR_TYPES.get(behaviour.status, "api_error")
            return behaviour.status, {"type": "error", "error": {"type": kind, "message": behaviour.message}}, headers
        messages = tuple(body.get("messages", []))
        system = body.get("system")
        texts = ([message_text(system)] if system else []) + [message_text(m.get("content")) for m in messages]
        prompt_tokens = sum(count_tokens(t) for t in texts)
        if isinstance(behaviour, Reply):
            return 200, self._message(body, behaviour.text, prompt_tokens), {}
        last_user = next((message_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        schema = ((body.get("output_config") or {}).get("format") or {}).get("schema") or {}
        props = schema.get("properties", {}) if isinstance(schema, Mapping) else {}
        wants_json = "verdict" in props or '"verdict"' in last_user
        choices = tuple(props["verdict"]["enum"]) if "verdict" in props else self.choices
        temperature = float(body["temperature"]) if body.get("temperature") is not None else 1.0
        req = PolicyInput(messages, "\n".join(texts), choices, temperature)
        probs = self.distribution(req)
        if wants_json:
            verdict = self.pick(probs, sample=False)
            obj: dict[str, Any] = {}
            if "rationale" in props or '"rationale"' in last_user:
                obj["rationale"] = f"Response {verdict} follows the instructions better."
            obj["verdict"] = verdict
            if "probability" in props or '"probability"' in last_user:
                obj["probability"] = round(probs[verdict], 6)
            text = json.dumps(obj)
        else:
            text = self.pick(probs, sample=temperature > 0)
        return 200, self._message(body, text, prompt_tokens), {}

    def _message(self, body: Mapping[str, Any], text: str, prompt_tokens: int) -> dict[str, Any]:
        return {
            "id": f"msg_fake_{len(self.calls)}",
            "type": "message",
            "role": "assistant",
            "model": str(body.get("model", "claude-fake")),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": count_tokens(text)},
        }
