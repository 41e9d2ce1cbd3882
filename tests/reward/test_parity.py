"""Parity: every score through HTTP and gRPC equals the unbatched ``transformers`` forward.

Tiny Llama (pad == eos, the case where a batched last-token head easily reads the wrong
position) and tiny BERT, batches mixing lengths from 1 token to past the model maximum,
several requests in flight at once so items of different requests share batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import reward_pb2 as pb
from protos.rlhf.v1 import reward_pb2_grpc as pb_grpc
from services.reward.engine.service import RewardEngine
from services.reward.settings import RewardSettings
from services.reward.transports.grpc import create_grpc_server
from services.reward.transports.http import create_http_app
from services.runtime.backends.torch_backend import TorchRewardBackend
from tests.support.parity import TOL, Reference, check, json_items, text_of


def to_pb(item: dict[str, Any]) -> pb.RewardInput:
    def conv(msgs: list[dict[str, str]]) -> cpb.Conversation:
        return cpb.Conversation(messages=[cpb.Message(role=m["role"], content=m["content"]) for m in msgs])

    if "text" in item:
        return pb.RewardInput(text=item["text"])
    if "messages" in item:
        return pb.RewardInput(messages=conv(item["messages"]))
    prompt = item["prompt"]
    pair = (
        pb.PromptResponse(prompt_text=prompt, response=item["response"])
        if isinstance(prompt, str)
        else pb.PromptResponse(prompt_messages=conv(prompt), response=item["response"])
    )
    return pb.RewardInput(pair=pair)


@dataclass
class Stack:
    engine: RewardEngine
    http: httpx.AsyncClient
    grpc: pb_grpc.RewardServiceStub
    backend: TorchRewardBackend


@pytest.fixture(params=["tiny_llama_dir", "tiny_bert_dir"])
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    model_dir: Path = request.getfixturevalue(request.param)
    backend = TorchRewardBackend(model_dir, device="cpu")
    # A small budget and a wait window so that items of concurrent requests share batches.
    settings = RewardSettings(max_batch_tokens=512, max_wait_ms=20)
    engine = RewardEngine(lambda: backend, settings.engine_config())
    await engine.start()
    app = create_http_app(engine, settings, api_key=None)
    handle = create_grpc_server(engine, settings, api_key=None)
    port = await handle.start(port=0)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield Stack(engine, http, pb_grpc.RewardServiceStub(channel), backend)
    await handle.stop(0)
    await engine.stop()


async def test_http_and_grpc_scores_equal_unbatched_transformers(stack: Stack) -> None:
    ref = Reference(Path(stack.backend.tokenizer.name_or_path))
    items = json_items()
    # Three copies in different orders, in flight together: every batch composition differs.
    orders = [items, items[::-1], items[1::2] + items[::2]]
    http_calls = [stack.http.post("/v1/score", json={"inputs": o}) for o in orders]
    grpc_calls = [stack.grpc.Score(pb.ScoreRequest(inputs=[to_pb(i) for i in o])) for o in orders]
    responses = await asyncio.gather(*http_calls, *grpc_calls)
    truncated_seen = 0
    for order, resp in zip(orders * 2, responses, strict=True):
        if isinstance(resp, httpx.Response):
            assert resp.status_code == 200, resp.text
            results = [(r["score"], r["num_tokens"], r["truncated"]) for r in resp.json()["results"]]
        else:
            results = [(r.score.score, r.score.num_tokens, r.score.truncated) for r in resp.results]
        for item, (score, n, trunc) in zip(order, results, strict=True):
            check(ref, item, score, n, trunc)
            truncated_seen += trunc
    assert truncated_seen > 0, "the test must include items past the maximum"
    # One item repeated in a batch beside longer items: every copy scores the same (within TOL).
    copies = [r["score"] for r in await http_calls_again(stack, items[5])]
    assert max(copies) - min(copies) <= TOL


async def http_calls_again(stack: Stack, item: dict[str, Any]) -> list[dict[str, Any]]:
    resp = await stack.http.post("/v1/score", json={"inputs": [item] * 5 + [{"text": text_of(60)}] * 3})
    results: list[dict[str, Any]] = resp.json()["results"][:5]
    return results


async def test_truncated_items_keep_the_response_and_score_like_their_kept_ids(stack: Stack) -> None:
    backend = stack.backend
    ref = Reference(Path(backend.tokenizer.name_or_path))
    long_prompt = {"prompt": text_of(150), "response": text_of(3)}
    long_text = {"text": text_of(150)}
    for item in (long_prompt, long_text):
        full = ref.encode(item)["input_ids"]
        (enc,) = backend.encode([_input(item)])
        assert enc.truncated and enc.num_tokens == ref.max_len
        if ref.templated or "text" in item:
            assert list(enc.input_ids) == full[-ref.max_len :]  # the end is kept, the prompt cut from the left
        resp = await stack.http.post("/v1/score", json={"inputs": [item]})
        score = resp.json()["results"][0]["score"]
        assert (
            abs(score - ref.score(list(enc.input_ids), list(enc.token_type_ids) if enc.token_type_ids else None)) <= TOL
        )


def _input(item: dict[str, Any]) -> Any:
    from services.runtime.items import RewardInput

    if "text" in item:
        return RewardInput(text=item["text"])
    return RewardInput(prompt=item["prompt"], response=item["response"])


async def test_left_and_right_padding_give_identical_scores(tiny_llama_dir: Path) -> None:
    from services.runtime.items import RewardInput

    inputs = [RewardInput(text=text_of(n)) for n in (1, 7, 30, 3)]
    right = TorchRewardBackend(tiny_llama_dir, device="cpu", padding_side="right")
    left = TorchRewardBackend(tiny_llama_dir, device="cpu", padding_side="left")
    a = right.forward(right.encode(inputs))
    b = left.forward(left.encode(inputs))
    assert abs(a - b).max() <= TOL
    # And the batch equals each item alone.
    alone = [right.forward(right.encode([x]))[0, 0] for x in inputs]
    assert max(abs(float(a[i, 0]) - float(alone[i])) for i in range(len(inputs))) <= TOL
