"""An emulated LLM provider for the judge benchmark: OpenAI's chat completions with a strict RPM.

``python -m benchmarks.judge_provider_server --port 9000 --rpm 600 --latency-ms 300``

- ``POST /v1/chat/completions``: after ``--latency-ms``, a one-letter verdict (``A`` or ``B``)
  with ``logprobs`` / ``top_logprobs`` for both letters. Deterministic: the probability of ``A``
  is a hash of the messages, so the same request always gets the same answer.
- Rate limit, checked when a request arrives: at most ``rpm * window_s / 60`` accepted requests
  in any sliding window of ``--window-s`` seconds (default 60: plain requests per minute; 10
  emulates a provider that enforces its RPM in 10-second slices). Over it, an immediate 429 with
  ``retry-after`` / ``retry-after-ms`` (when the oldest accepted request leaves the window) and
  OpenAI's error body. Rejected requests do not count against the limit.
- ``GET /stats``: wall-clock (``time.time()``) arrival times of accepted and rejected requests;
  ``POST /reset`` clears them and the limiter. ``GET /v1/models`` lists the one model.

Not part of the service: a stand-in for a real provider, so the judge's limiter can be measured.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# At module level: FastAPI resolves the handlers' (string) annotations in this module's globals.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

MODEL = "emulated-judge"


@dataclass
class ProviderState:
    """The limiter and the log; one per server, used from its event loop only."""

    rpm: float
    latency_s: float
    window_s: float = 60.0
    accepted: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    _window: deque[float] = field(default_factory=deque)

    @property
    def capacity(self) -> int:
        """Accepted requests allowed in any window of ``window_s`` seconds."""
        return max(1, math.floor(self.rpm * self.window_s / 60.0))

    def admit(self, now: float) -> float | None:
        """None when a request arriving at ``now`` is accepted, else seconds until one would be."""
        while self._window and self._window[0] <= now - self.window_s:
            self._window.popleft()
        if len(self._window) >= self.capacity:
            self.rejected.append(now)
            return self._window[0] + self.window_s - now
        self._window.append(now)
        self.accepted.append(now)
        return None

    def reset(self) -> None:
        self.accepted.clear()
        self.rejected.clear()
        self._window.clear()


def p_first(messages: Sequence[Any]) -> float:
    """P(``A``) for these messages: a hash mapped to [0.05, 0.95] (deterministic)."""
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).digest()
    return 0.05 + 0.9 * int.from_bytes(digest[:8], "big") / float(1 << 64)


def _entry(token: str, p: float) -> dict[str, Any]:
    return {"token": token, "logprob": math.log(p), "bytes": list(token.encode())}


def completion(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completion answer to ``body`` (a verdict letter, logprobs when asked)."""
    messages = body.get("messages") or []
    pa = p_first(messages)
    probs = {"A": pa * 0.98, "B": (1 - pa) * 0.98}  # the rest on a filler token
    letter = "A" if pa >= 0.5 else "B"
    logprobs = None
    if body.get("logprobs"):
        top = sorted([*probs.items(), ("\n", 0.02)], key=lambda kv: -kv[1])[
            : max(1, int(body.get("top_logprobs") or 1))
        ]
        logprobs = {
            "content": [_entry(letter, probs[letter]) | {"top_logprobs": [_entry(t, p) for t, p in top]}],
            "refusal": None,
        }
    prompt_tokens = sum(len(str(m.get("content", ""))) // 4 for m in messages if isinstance(m, dict))
    return {
        "id": f"chatcmpl-emulated-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(body.get("model", MODEL)),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": letter, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1, "total_tokens": prompt_tokens + 1},
    }


def build_app(state: ProviderState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> JSONResponse:
        wait = state.admit(time.time())
        if wait is not None:
            wait = max(wait, 0.001)
            return JSONResponse(
                {
                    "error": {
                        "message": f"Rate limit reached: {state.capacity} requests per {state.window_s:g}s",
                        "type": "requests",
                        "param": None,
                        "code": "rate_limit_exceeded",
                    }
                },
                status_code=429,
                headers={"retry-after": f"{math.ceil(wait)}", "retry-after-ms": f"{wait * 1000:.0f}"},
            )
        body = await request.json()
        await asyncio.sleep(state.latency_s)
        return JSONResponse(completion(body))

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {
            "rpm": state.rpm,
            "window_s": state.window_s,
            "capacity": state.capacity,
            "latency_s": state.latency_s,
            "accepted": state.accepted,
            "rejected": state.rejected,
        }

    @app.post("/reset")
    async def reset() -> dict[str, Any]:
        state.reset()
        return {"ok": True}

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.judge_provider_server",
        description="An emulated OpenAI-compatible provider with fixed latency and a strict RPM (for bench judge).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on.")
    parser.add_argument("--port", type=int, required=True, help="Port to listen on.")
    parser.add_argument("--rpm", type=float, default=600.0, help="Accepted requests per minute.")
    parser.add_argument("--latency-ms", type=float, default=300.0, help="Time to answer an accepted request.")
    parser.add_argument(
        "--window-s", type=float, default=60.0, help="Sliding window the RPM is enforced over (rpm*window/60 in it)."
    )
    args = parser.parse_args(argv)
    if args.rpm <= 0 or args.latency_ms < 0 or args.window_s <= 0:
        parser.error("--rpm and --window-s must be > 0, --latency-ms >= 0")
    import uvicorn

    state = ProviderState(rpm=args.rpm, latency_s=args.latency_ms / 1000.0, window_s=args.window_s)
    uvicorn.run(build_app(state), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
