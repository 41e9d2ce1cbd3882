"""OpenRLHF's remote reward model: the exact payload its trainer posts to ``--reward.remote_url``.

Read in OpenRLHF: ``openrlhf/utils/remote_rm_utils.py`` (``request_api_wrapper`` posts
``{"query", "prompts", "labels"}`` as JSON, ``raise_for_status()``, retries 5 times) and
``openrlhf/trainer/ppo_utils/experience_maker.py`` (queries are
``tokenizer.batch_decode(remove_pad_token(sequences, attention_mask), skip_special_tokens=False)``;
it reads ``rewards``, ``scores`` and each list of ``extra_logs``). OpenRLHF pins CUDA-only
dependencies, so the payload is rebuilt here the way its experience maker builds it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from clients.integrations.openrlhf import remote_url
from services.reward.engine.service import RewardEngine
from services.reward.settings import RewardSettings
from services.reward.transports.http import create_http_app
from services.runtime.backends.torch_backend import TorchRewardBackend
from tests.support.servers import BOOM, BackgroundLoop, RewardServer, start_reward_server
from tests.support.tiny_causal import make_tiny_causal_llama

CONVERSATIONS = [
    ([{"role": "user", "content": "How do I bake bread?"}], "Mix flour, water, salt and yeast."),
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
    (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
        "Hi!",
    ),
]


def openrlhf_payload(policy_dir: Path) -> dict[str, Any]:
    """The body OpenRLHF's PPO trainer posts for a micro-batch: prompts rendered with the policy's
    chat template (``--data.apply_chat_template``), tokenized left-padded without special tokens,
    responses ending in eos and right-padded, then the padding removed and everything decoded with
    its special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    prompts = [tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) for msgs, _ in CONVERSATIONS]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", add_special_tokens=False, padding=True)
    responses = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, r in CONVERSATIONS]
    width = max(len(r) for r in responses)
    resp_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in responses])
    resp_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses])
    sequences = torch.cat([enc["input_ids"], resp_ids], dim=1)
    attention_mask = torch.cat([enc["attention_mask"], resp_mask], dim=1)
    unpadded = [seq[mask.bool()].tolist() for seq, mask in zip(sequences, attention_mask, strict=True)]
    queries = tok.batch_decode(unpadded, skip_special_tokens=False)
    return {"query": queries, "prompts": prompts, "labels": ["bread", None, ""]}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_llama(tmp_path_factory.mktemp("policy"))


@pytest.fixture
async def http(tiny_llama_dir: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TorchRewardBackend]]:
    """The reward service's HTTP app over the tiny Llama reward model, in process."""
    backend = TorchRewardBackend(tiny_llama_dir, device="cpu")
    settings = RewardSettings(max_batch_tokens=512, max_wait_ms=5)
    engine = RewardEngine(lambda: backend, settings.engine_config())
    await engine.start()
    app = create_http_app(engine, settings, api_key=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rm") as client:
        yield client, backend
    await engine.stop()


async def test_get_reward_with_openrlhfs_payload(
    http: tuple[httpx.AsyncClient, TorchRewardBackend], policy_dir: Path, tiny_llama_dir: Path
) -> None:
    client, _ = http
    payload = openrlhf_payload(policy_dir)
    # what OpenRLHF decodes: the whole ChatML conversation with its special tokens, no padding
    assert payload["query"][1] == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>"
    )
    assert not any("<pad>" in q for q in payload["query"])

    # exactly what requests.post(url, json=data, headers={"Content-Type": "application/json"}) sends
    resp = await client.post("/get_reward", json=payload, headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    n = len(payload["query"])
    assert isinstance(body["rewards"], list) and len(body["rewards"]) == n
    assert isinstance(body["scores"], list) and len(body["scores"]) == n
    assert all(isinstance(v, list) and len(v) == n for v in body["extra_logs"].values())  # concatenated per chunk
    assert all(isinstance(x, int | float) for v in body["extra_logs"].values() for x in v)
    assert all(isinstance(r, float) for r in body["rewards"])

    # the rewards are the service's raw scores of the same texts, scored verbatim as text items
    score = await client.post("/v1/score", json={"inputs": [{"text": q} for q in payload["query"]]})
    assert score.status_code == 200, score.text
    want = [r["score"] for r in score.json()["results"]]
    assert body["rewards"] == pytest.approx(want, abs=1e-6)
    assert body["scores"] == pytest.approx(want, abs=1e-6)

    # ... which is what transformers gives for the unpadded sequence, special tokens as tokens
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_dir).eval()
    ids = tok(payload["query"][0], add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    with torch.inference_mode():
        ref = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    assert body["rewards"][0] == pytest.approx(ref, abs=1e-5)


async def test_get_reward_accepts_the_older_and_forked_payloads(
    http: tuple[httpx.AsyncClient, TorchRewardBackend],
) -> None:
    client, _ = http
    queries = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>"]
    only_query = await client.post("/get_reward", json={"query": queries})  # releases before prompts/labels
    forked = await client.post(
        "/get_reward", json={"query": queries, "prompts": ["x"], "labels": [None], "metadata": [{"k": 1}]}
    )
    assert only_query.status_code == forked.status_code == 200
    assert only_query.json()["rewards"] == forked.json()["rewards"]


@pytest.fixture(scope="module")
def failing_service() -> Iterator[RewardServer]:
    bg = BackgroundLoop()
    srv = start_reward_server(bg, fail_on_boom=True)
    yield srv
    srv.stop()
    bg.close()


def test_a_failed_item_fails_the_request_never_a_zero(failing_service: RewardServer) -> None:
    url = remote_url(failing_service.url("http"))
    ok = httpx.post(url, json={"query": ["fine"], "prompts": ["p"], "labels": [None]}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["rewards"]) == 1
    bad = httpx.post(url, json={"query": [BOOM], "prompts": ["p"], "labels": [None]}, timeout=30)
    assert bad.status_code >= 500  # OpenRLHF's raise_for_status() retries; no made-up reward
    assert "rewards" not in bad.json()
    invalid = httpx.post(url, json={"prompts": ["p"]}, timeout=30)  # no query
    assert invalid.status_code in (400, 422)


def test_remote_url_helper() -> None:
    assert remote_url("http://rm:8000") == "http://rm:8000/get_reward"
    assert remote_url("https://rm.example/") == "https://rm.example/get_reward"
    assert remote_url("http://rm:8000/get_reward") == "http://rm:8000/get_reward"
    with pytest.raises(ValueError, match="http"):
        remote_url("grpc://rm:50051")
