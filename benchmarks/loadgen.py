"""The load generator: C concurrent asyncio clients, K items per request, over HTTP or gRPC.

Requests are cut from the item list in order (K items each; the last may be short) and pulled
by C clients from one queue until none is left, so every item is scored exactly once per run.
Request bodies are built before the clock starts; the clock runs from the first send to the
last answer. One warm-up request (not counted) goes first, so that connection set-up and the
server's first-shape costs stay out of the numbers.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

TRANSPORTS = ("http", "grpc")


@dataclass(frozen=True)
class Load:
    """``clients`` concurrent clients sending ``items`` items per request (written ``CxK``)."""

    clients: int
    items: int

    @property
    def name(self) -> str:
        return f"{self.clients}x{self.items}"

    @staticmethod
    def parse(text: str) -> Load:
        try:
            c, k = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"a load is CLIENTSxITEMS, e.g. 32x8; got {text!r}") from None
        if c < 1 or k < 1:
            raise ValueError(f"a load needs at least 1 client and 1 item per request; got {text!r}")
        return Load(c, k)


@dataclass
class RunResult:
    """One measured run against one server over one transport."""

    seconds: float
    requests: int
    samples: int
    real_tokens: int
    errors: int
    latencies: list[float] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)  # per item, in item order
    first_error: str | None = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000.0

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "requests": self.requests,
            "samples": self.samples,
            "real_tokens": self.real_tokens,
            "errors": self.errors,
            "samples_per_s": self.samples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "p50_ms": self.latency_ms(50),
            "p99_ms": self.latency_ms(99),
            "first_error": self.first_error,
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def chunks(items: Sequence[Any], k: int) -> list[tuple[int, list[Any]]]:
    """(offset, items) requests of ``k`` items each, in order."""
    return [(i, list(items[i : i + k])) for i in range(0, len(items), k)]


class _Transport:
    async def send(self, body: Any) -> list[dict[str, Any]]:
        """One request; returns per-item ``{"score", "num_tokens"}`` or ``{"error"}``."""
        raise NotImplementedError

    def build(self, items: list[dict[str, Any]]) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class _Http(_Transport):
    def __init__(self, base_url: str, clients: int, timeout: float) -> None:
        import httpx

        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        self.client = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout)

    def build(self, items: list[dict[str, Any]]) -> bytes:
        return orjson.dumps({"inputs": items})

    async def send(self, body: bytes) -> list[dict[str, Any]]:
        resp = await self.client.post("/v1/score", content=body, headers={"content-type": "application/json"})
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        results: list[dict[str, Any]] = orjson.loads(resp.content)["results"]
        return results

    async def aclose(self) -> None:
        await self.client.aclose()


class _Grpc(_Transport):
    def __init__(self, target: str, timeout: float) -> None:
        import grpc

        from protos.rlhf.v1 import reward_pb2_grpc as pb_grpc

        opts = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
        self.channel = grpc.aio.insecure_channel(target, options=opts)
        self.stub = pb_grpc.RewardServiceStub(self.channel)
        self.timeout = timeout

    def build(self, items: list[dict[str, Any]]) -> Any:
        from protos.rlhf.v1 import common_pb2 as cpb
        from protos.rlhf.v1 import reward_pb2 as pb

        def one(w: dict[str, Any]) -> Any:
            if "text" in w:
                return pb.RewardInput(text=w["text"])
            conv = cpb.Conversation(messages=[cpb.Message(role=m["role"], content=m["content"]) for m in w["prompt"]])
            return pb.RewardInput(pair=pb.PromptResponse(prompt_messages=conv, response=w["response"]))

        return pb.ScoreRequest(inputs=[one(w) for w in items])

    async def send(self, body: Any) -> list[dict[str, Any]]:
        reply = await self.stub.Score(body, timeout=self.timeout)
        out: list[dict[str, Any]] = []
        for r in reply.results:
            if r.WhichOneof("outcome") == "score":
                out.append({"score": r.score.score, "num_tokens": r.score.num_tokens})
            else:
                out.append({"error": {"code": r.error.code, "message": r.error.message}})
        return out

    async def aclose(self) -> None:
        await self.channel.close(None)


def _transport(transport: str, *, http_url: str, grpc_target: str | None, clients: int, timeout: float) -> _Transport:
    if transport == "http":
        return _Http(http_url, clients, timeout)
    if transport == "grpc":
        if grpc_target is None:
            raise ValueError("this server has no gRPC endpoint")
        return _Grpc(grpc_target, timeout)
    raise ValueError(f"unknown transport {transport!r}; expected one of {', '.join(TRANSPORTS)}")


async def run_load(
    items: Sequence[dict[str, Any]],
    load: Load,
    transport: str,
    *,
    http_url: str,
    grpc_target: str | None = None,
    requests: Sequence[tuple[int, list[dict[str, Any]]]] | None = None,
    timeout: float = 600.0,
) -> RunResult:
    """Score every item once with ``load.clients`` concurrent clients; ``requests`` overrides
    the cut into requests (the GRPO load sends one prompt's responses per request)."""
    reqs = list(requests) if requests is not None else chunks(items, load.items)
    tp = _transport(transport, http_url=http_url, grpc_target=grpc_target, clients=load.clients, timeout=timeout)
    try:
        built = [(off, len(chunk), tp.build(chunk)) for off, chunk in reqs]
        await tp.send(built[0][2])  # warm-up: connections, first shapes
        queue: asyncio.Queue[tuple[int, int, Any]] = asyncio.Queue()
        for entry in built:
            queue.put_nowait(entry)
        result = RunResult(0.0, len(built), 0, 0, 0, scores=[None] * len(items))

        async def client() -> None:
            while True:
                try:
                    off, n, body = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                sent = time.perf_counter()
                try:
                    answers = await tp.send(body)
                except Exception as exc:  # a failed request counts as n errors; the run goes on
                    result.errors += n
                    result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"[:300]
                    continue
                result.latencies.append(time.perf_counter() - sent)
                for i, a in enumerate(answers):
                    if "score" in a:
                        result.samples += 1
                        result.real_tokens += int(a["num_tokens"])
                        result.scores[off + i] = float(a["score"])
                    else:
                        result.errors += 1
                        result.first_error = result.first_error or str(a.get("error"))[:300]

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(load.clients)))
        result.seconds = time.perf_counter() - started
        return result
    finally:
        await tp.aclose()
