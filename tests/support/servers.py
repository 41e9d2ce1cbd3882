"""Servers on loopback for client tests, run in a background thread with their own event loop.

- :class:`BackgroundLoop`: an event loop in a thread, so that a sync client blocking the test's
  thread cannot starve the servers it calls; :func:`start_uvicorn` / :func:`stop_uvicorn` serve a
  FastAPI app on a free loopback port in it.
- :func:`start_reward_server`: the real reward service (engine over the FakeBackend, HTTP through
  uvicorn plus a grpc.aio server); :class:`RewardServer` knows the score each item must get.
- :class:`FakeReward`: a tiny fake reward server (HTTP only) that scores ``len(response)`` and
  fails on command, for the trainer integrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.common.serving import uvicorn_server
from services.reward.engine.service import RewardEngine
from services.reward.settings import RewardSettings
from services.reward.transports.grpc import create_grpc_server
from services.reward.transports.http import create_http_app
from services.runtime.backends.fake import FakeBackend, fake_score
from services.runtime.chat import ChatMessage
from services.runtime.items import EncodedItem, RewardInput

T = TypeVar("T")
BOOM = "boom"  # a text the main server's model fails on (its batch gets per-item INTERNAL errors)


# -- a loop in a thread ---------------------------------------------------------------------------


class BackgroundLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_uvicorn(app: Any) -> tuple[Any, asyncio.Task[None], int]:
    server = uvicorn_server(app, host="127.0.0.1", port=0, log_level="warning", ssl=None)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    port = int(server.servers[0].sockets[0].getsockname()[1])
    return server, task, port


async def stop_uvicorn(server: Any, task: asyncio.Task[None]) -> None:
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 5)


# -- the real reward service ----------------------------------------------------------------------


def to_engine(w: dict[str, Any]) -> RewardInput:
    def msgs(ms: Sequence[dict[str, str]]) -> tuple[ChatMessage, ...]:
        return tuple(ChatMessage(role=m["role"], content=m["content"]) for m in ms)

    if "text" in w:
        return RewardInput(text=w["text"])
    if "messages" in w:
        return RewardInput(messages=msgs(w["messages"]))
    p = w["prompt"]
    return RewardInput(prompt=p if isinstance(p, str) else msgs(p), response=w["response"])


def _fails_on_boom(batch: Sequence[EncodedItem]) -> bool:
    return any(bytes(it.input_ids) == BOOM.encode() for it in batch)


@dataclass
class RewardServer:
    bg: BackgroundLoop
    engine: RewardEngine
    backend: FakeBackend
    gate: threading.Event
    http_port: int
    grpc_port: int
    _stop: Callable[[], Coroutine[Any, Any, None]]

    def url(self, transport: str) -> str:
        return f"http://127.0.0.1:{self.http_port}" if transport == "http" else f"grpc://127.0.0.1:{self.grpc_port}"

    def expected(self, item: Any) -> float:
        from clients.types import item_to_wire

        return fake_score(self.backend.encode([to_engine(item_to_wire(item))])[0].input_ids)

    def requests(self, transport: str, status: str | None = None) -> float:
        """Requests to Score so far (with ``status``: only those that ended so)."""
        total = 0.0
        for metric in self.engine.metrics.registry.collect():
            for s in metric.samples:
                if s.name != "rlhf_reward_requests_total" or s.labels.get("transport") != transport:
                    continue
                if (s.labels.get("method") or "").lower() != "score":
                    continue
                if status is None or s.labels.get("status") == status:
                    total += s.value
        return total

    def stop(self) -> None:
        self.gate.set()
        self.bg.run(self._stop())


def start_reward_server(
    bg: BackgroundLoop, *, fail_on_boom: bool = False, num_labels: int = 1, **settings: Any
) -> RewardServer:
    """The real service over the fake backend (``num_labels`` > 1: a vector head), HTTP and gRPC."""
    gate = threading.Event()
    gate.set()
    backend = FakeBackend(
        max_length=64, gate=gate, fail_when=_fails_on_boom if fail_on_boom else None, num_labels=num_labels
    )
    cfg = RewardSettings.model_validate({"host": "127.0.0.1", "max_wait_ms": 1.0, **settings})
    engine = RewardEngine(lambda: backend, cfg.engine_config())

    async def up() -> RewardServer:
        await engine.start()
        server, task, http_port = await start_uvicorn(create_http_app(engine, cfg, api_key=None))
        handle = create_grpc_server(engine, cfg, api_key=None)
        grpc_port = await handle.start(port=0)

        async def down() -> None:
            await handle.stop(0)
            await stop_uvicorn(server, task)
            await engine.stop()

        return RewardServer(bg, engine, backend, gate, http_port, grpc_port, down)

    return bg.run(up())


def metadata_dict(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v if isinstance(v, str) else v.decode() for k, v in context.invocation_metadata() or ()}


# -- a fake reward server for the trainer integrations ---------------------------------------------


def _response_of(item: dict[str, Any]) -> str:
    if "response" in item:
        return str(item["response"])
    if "text" in item:
        return str(item["text"])
    return str(item["messages"][-1]["content"])


class FakeReward:
    """A reward server that scores ``len(response)``, fails items whose response contains
    ``FAIL`` (per-item error), answers 500 when one contains ``HTTP500`` and 400 for ``HTTP400``;
    it records every /v1/score body."""

    def __init__(self, bg: BackgroundLoop) -> None:
        self.bg = bg
        self.bodies: list[dict[str, Any]] = []
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> Any:
            limits = {
                "max_items_per_request": 64,
                "max_body_bytes": 1 << 20,
                "max_text_bytes": 1 << 16,
                "max_batch_tokens": 4096,
            }
            return {"data": [{"id": "fake-rm", "revision": "r1", "limits": limits}]}

        @app.post("/v1/score")
        async def score(request: Request) -> Any:
            body = await request.json()
            self.bodies.append(body)
            responses = [_response_of(x) for x in body["inputs"]]
            if any("HTTP500" in r for r in responses):
                return JSONResponse({"error": {"code": "INTERNAL", "message": "bug"}}, status_code=500)
            if any("HTTP400" in r for r in responses):
                return JSONResponse({"error": {"code": "INVALID_ARGUMENT", "message": "bad item"}}, status_code=400)
            results = [
                {"error": {"code": "DEADLINE_EXCEEDED", "message": "too slow"}}
                if "FAIL" in r
                else {"score": float(len(r)), "num_tokens": len(r), "truncated": False}
                for r in responses
            ]
            return {"model": {"id": "fake-rm", "revision": "r1"}, "results": results}

        self.server, self.task, self.port = bg.run(start_uvicorn(app))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.bg.run(stop_uvicorn(self.server, self.task))
