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
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import reward_pb2 as pb
from protos.rlhf.v1 import reward_pb2_grpc as pb_grpc
from services.reward.engine.service import RewardEngine
from services.reward.settings import RewardSettings
from services.reward.transports.grpc import create_grpc_server
from services.reward.transports.http import create_http_app
from services.runtime.backends.torch_backend import TorchRewardBackend
from tests.support.tiny_models import CORPUS

TOL = 1e-5

WORDS = " ".join(CORPUS[:6]).split()


def text_of(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def json_items() -> list[dict[str, Any]]:
    """Items of every form, from 1 token to well past the maximum (96 / 64 positions)."""
    items: list[dict[str, Any]] = [{"text": "a"}, {"text": "dog"}]
    items += [{"text": text_of(n)} for n in (2, 5, 11, 23, 40, 70, 120)]
    items += [{"text": "  leading and trailing spaces stay  \n"}]
    items += [{"prompt": text_of(n), "response": text_of(m)} for n, m in ((1, 1), (3, 9), (20, 4), (60, 5), (2, 90))]
    items += [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text_of(6)}],
            "response": text_of(7),
        },
        {"messages": [{"role": "user", "content": text_of(4)}, {"role": "assistant", "content": text_of(12)}]},
        {"messages": [{"role": "user", "content": text_of(80)}, {"role": "assistant", "content": text_of(3)}]},
    ]
    return items


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


class Reference:
    """The unbatched forward, with the contract's rendering written out independently."""

    def __init__(self, model_dir: Path) -> None:
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.max_len = min(self.tok.model_max_length, self.model.config.max_position_embeddings)
        self.templated = bool(self.tok.chat_template)

    def encode(self, item: dict[str, Any]) -> dict[str, list[int]]:
        tok = self.tok
        if "text" in item:
            return dict(tok(item["text"], add_special_tokens=False))
        if self.templated:
            prompt = item.get("prompt")
            conv = item.get("messages") or (
                [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
            ) + [{"role": "assistant", "content": item["response"]}]
            return dict(tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False))
        if "messages" in item:
            return dict(tok("".join(f"{m['role']}: {m['content']}\n" for m in item["messages"])))
        prompt = item["prompt"]
        if not isinstance(prompt, str):
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in prompt)
        return dict(tok(prompt, item["response"]))

    @torch.inference_mode()
    def score(self, ids: list[int], token_type_ids: list[int] | None) -> float:
        kw = {"input_ids": torch.tensor([ids])}
        if token_type_ids is not None:
            kw["token_type_ids"] = torch.tensor([token_type_ids])
        return float(self.model(**kw).logits[0, 0])


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


def check(ref: Reference, item: dict[str, Any], score: float, num_tokens: int, truncated: bool) -> None:
    enc = ref.encode(item)
    ids = enc["input_ids"]
    tt = enc.get("token_type_ids")
    if len(ids) <= ref.max_len:
        assert not truncated and num_tokens == len(ids)
        assert abs(score - ref.score(ids, tt)) <= TOL, item
    else:
        # Past the maximum: flagged, cut to the maximum; score equals the unbatched forward of the
        # kept ids, which end exactly where the full rendering ends (the response is kept).
        assert truncated and num_tokens == ref.max_len


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
