"""vLLM's pooling API on the reward service: ``POST /classify``, ``/pooling`` and their ``/v1`` aliases.

- In process over the fake backend: raw ``probs`` equal the ``/v1/score`` scores, activation is vLLM's
  (sigmoid for one output, softmax for several), every request form, every refusal with its code.
- The response parses with a mirror of vLLM 0.33.0's response models (field for field from
  ``vllm/entrypoints/pooling/{classify,pooling}/protocol.py`` and ``UsageInfo``), and with vLLM's own
  models where vLLM imports (it does not here: its modules need vLLM's dependencies).
- verl 0.9.1's own reward-model client (``RewardLoopWorker.compute_score_disrm``, vLLM mode) against a
  live service on loopback; real models (tiny Llama, the embedded default) for the 1e-6 equality.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from pydantic import BaseModel, ConfigDict

from services.reward.engine.service import RewardEngine
from services.reward.pooling_schemas import ClassificationResponse, PoolingResponse
from services.reward.settings import RewardSettings
from services.reward.transports.http import create_http_app
from services.reward.transports.pooling import POOLING_DOCUMENTED, POOLING_ROUTE_NAMES
from services.runtime.backends.base import RewardBackend
from services.runtime.backends.fake import FakeBackend
from services.runtime.items import EncodedItem
from tests.support.errors import assert_error
from tests.support.servers import BackgroundLoop, start_reward_server, start_uvicorn, stop_uvicorn

MAX_ITEMS = 8
MAX_BODY = 2**20
TEXTS = ["The quick brown fox.", "How do I bake bread?", "Paris is the capital of France.", "a"]
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


# -- vLLM 0.33.0's response shapes, mirrored field for field (stricter: unknown keys are errors) --------


class _Mirror(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class VllmUsageInfo(_Mirror):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class VllmClassificationData(_Mirror):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class VllmClassificationResponse(_Mirror):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[VllmClassificationData]
    usage: VllmUsageInfo


class VllmPoolingResponseData(_Mirror):
    index: int
    object: str = "pooling"
    data: list[list[float]] | list[float] | str


class VllmPoolingResponse(_Mirror):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[VllmPoolingResponseData]
    usage: VllmUsageInfo


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


# -- the service in process --------------------------------------------------------------------------


@dataclass
class Svc:
    engine: RewardEngine
    client: httpx.AsyncClient

    async def scores(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        r = await self.client.post("/v1/score", json={"inputs": items})
        assert r.status_code == 200, r.text
        results: list[dict[str, Any]] = r.json()["results"]
        return results

    async def raw(self, items: list[dict[str, Any]]) -> list[list[float]]:
        """Every head's raw output per item, as /v1/score reports it."""
        return [r.get("scores", [r["score"]]) for r in await self.scores(items)]


Factory = Callable[..., Awaitable[Svc]]


async def _serve(backend: RewardBackend, api_key: str | None = None, **settings: Any) -> tuple[Svc, Any]:
    cfg = RewardSettings.model_validate(
        {"max_items_per_request": MAX_ITEMS, "max_body_bytes": MAX_BODY, "max_wait_ms": 1.0, **settings}
    )
    engine = RewardEngine(lambda: backend, cfg.engine_config())
    await engine.start()
    app = create_http_app(engine, cfg, api_key=api_key)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://reward.test")
    return Svc(engine, client), app


@pytest_asyncio.fixture
async def make_svc() -> AsyncIterator[Factory]:
    made: list[Svc] = []

    async def make(*, num_labels: int = 1, api_key: str | None = None, fail_when: Any = None, **settings: Any) -> Svc:
        backend = FakeBackend(max_length=64, num_labels=num_labels, fail_when=fail_when)
        svc, _ = await _serve(backend, api_key, **settings)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        await svc.client.aclose()
        await svc.engine.stop()


@pytest_asyncio.fixture
async def svc(make_svc: Factory) -> Svc:
    return await make_svc()


# -- use_activation: raw scores, sigmoid, softmax ------------------------------------------------------


@pytest.mark.parametrize("path", ["/classify", "/v1/classify"])
async def test_classify_raw_probs_are_the_v1_score_scores(svc: Svc, path: str) -> None:
    expected = await svc.scores([{"text": t} for t in TEXTS])
    r = await svc.client.post(path, json={"model": "anything", "input": TEXTS, "use_activation": False})
    assert r.status_code == 200, r.text
    body = VllmClassificationResponse.model_validate(r.json())
    ClassificationResponse.model_validate(r.json())
    assert [d.index for d in body.data] == [0, 1, 2, 3]
    assert [d.probs for d in body.data] == [[e["score"]] for e in expected]  # the same float32 values, exactly
    assert all(d.num_classes == 1 and d.label == "LABEL_0" for d in body.data)
    assert body.model == "fake" and body.object == "list" and body.id.startswith("classify-")
    tokens = sum(e["num_tokens"] for e in expected)
    assert body.usage == VllmUsageInfo(prompt_tokens=tokens, total_tokens=tokens, completion_tokens=0)
    # raw logits really are outside (0, 1): no activation was applied
    assert any(not 0 < d.probs[0] < 1 for d in body.data)


async def test_token_ids_are_scored_as_given(svc: Svc) -> None:
    # the fake backend's tokenizer is UTF-8 bytes: the ids of a text are its bytes
    ids = [list(t.encode()) for t in TEXTS]
    expected = await svc.scores([{"text": t} for t in TEXTS])
    for payload in ({"input": ids}, {"input": ids, "add_special_tokens": True}):  # ids are never changed
        r = await svc.client.post("/classify", json={**payload, "use_activation": False})
        assert r.status_code == 200, r.text
        assert [d["probs"] for d in r.json()["data"]] == [[e["score"]] for e in expected]
    one = await svc.client.post("/pooling", json={"input": ids[0], "use_activation": False})  # one list[int]
    assert one.status_code == 200, one.text
    assert [d["data"] for d in one.json()["data"]] == [[expected[0]["score"]]]
    assert one.json()["usage"]["prompt_tokens"] == len(ids[0])


async def test_classify_default_activation_is_the_sigmoid_of_the_scores(svc: Svc) -> None:
    raw = await svc.raw([{"text": t} for t in TEXTS])
    for extra in ({}, {"use_activation": True}, {"use_activation": None}):
        r = await svc.client.post("/classify", json={"input": TEXTS, **extra})
        assert r.status_code == 200, r.text
        probs = [d["probs"] for d in r.json()["data"]]
        assert probs == [[pytest.approx(sigmoid(row[0]), abs=1e-6)] for row in raw]
        assert all(0 < p[0] < 1 for p in probs)


async def test_vector_head_raw_outputs_and_softmax(make_svc: Factory) -> None:
    svc = await make_svc(num_labels=3)
    raw = await svc.raw([{"text": t} for t in TEXTS])
    assert all(len(row) == 3 for row in raw)

    r = await svc.client.post("/classify", json={"input": TEXTS, "use_activation": False})
    data = VllmClassificationResponse.model_validate(r.json()).data
    assert [d.probs for d in data] == raw
    assert all(d.num_classes == 3 for d in data)
    # the fake model's third head is always the largest
    assert [d.label for d in data] == ["LABEL_2"] * len(TEXTS)

    r = await svc.client.post("/classify", json={"input": TEXTS})
    data = VllmClassificationResponse.model_validate(r.json()).data
    for d, row in zip(data, raw, strict=True):
        assert d.probs == pytest.approx(softmax(row), abs=1e-6)
        assert sum(d.probs) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("path", ["/pooling", "/v1/pooling"])
async def test_pooling_returns_the_same_outputs(make_svc: Factory, path: str) -> None:
    svc = await make_svc(num_labels=2)
    raw = await svc.raw([{"text": t} for t in TEXTS])
    r = await svc.client.post(path, json={"input": TEXTS, "use_activation": False, "task": "classify"})
    assert r.status_code == 200, r.text
    body = VllmPoolingResponse.model_validate(r.json())
    PoolingResponse.model_validate(r.json())
    assert body.id.startswith("pooling-")
    assert [(d.index, d.object, d.data) for d in body.data] == [(i, "pooling", row) for i, row in enumerate(raw)]

    r = await svc.client.post(path, json={"input": TEXTS})
    for d, row in zip(r.json()["data"], raw, strict=True):
        assert d["data"] == pytest.approx(softmax(row), abs=1e-6)


@pytest.mark.parametrize(("dtype", "endianness", "np_dtype"), [("float32", "little", "<f4"), ("float16", "big", ">f2")])
async def test_pooling_base64(make_svc: Factory, dtype: str, endianness: str, np_dtype: str) -> None:
    svc = await make_svc(num_labels=2)
    raw = await svc.raw([{"text": t} for t in TEXTS])
    payload = {
        "input": TEXTS,
        "use_activation": False,
        "encoding_format": "base64",
        "embed_dtype": dtype,
        "endianness": endianness,
    }
    r = await svc.client.post("/pooling", json=payload)
    assert r.status_code == 200, r.text
    for d, row in zip(VllmPoolingResponse.model_validate(r.json()).data, raw, strict=True):
        assert isinstance(d.data, str)
        decoded = np.frombuffer(base64.b64decode(d.data), dtype=np_dtype)
        assert decoded.tolist() == np.asarray(row, dtype=np_dtype).tolist()


# -- request forms ---------------------------------------------------------------------------------


async def test_a_single_string_is_one_item(svc: Svc) -> None:
    (expected,) = await svc.scores([{"text": TEXTS[0]}])
    r = await svc.client.post("/classify", json={"input": TEXTS[0], "use_activation": False})
    assert r.status_code == 200, r.text
    (d,) = r.json()["data"]
    assert d == {"index": 0, "label": "LABEL_0", "probs": [expected["score"]], "num_classes": 1}


async def test_messages_score_like_a_messages_item(svc: Svc) -> None:
    (expected,) = await svc.scores([{"messages": CONVERSATION}])
    for path in ("/classify", "/pooling"):
        r = await svc.client.post(path, json={"messages": CONVERSATION, "use_activation": False})
        assert r.status_code == 200, r.text
        (d,) = r.json()["data"]
        assert d.get("probs", d.get("data")) == [expected["score"]]
        assert r.json()["usage"]["prompt_tokens"] == expected["num_tokens"]


async def test_vllm_fields_that_change_nothing_are_accepted(svc: Svc) -> None:
    expected = await svc.raw([{"text": t} for t in TEXTS])
    payload = {
        "model": "/models/Skywork-Reward",  # verl sends its local model path; vLLM 0.33 does not check it
        "input": TEXTS,
        "use_activation": False,
        "user": "u1",
        "truncate_prompt_tokens": -1,
        "truncation_side": "left",
        "padding": "do_not_pad",
        "priority": 0,
        "cache_salt": "salt",
        "add_special_tokens": False,
        "some_future_field": {"x": 1},  # vLLM ignores unknown keys
    }
    r = await svc.client.post("/classify", json=payload)
    assert r.status_code == 200, r.text
    assert [d["probs"] for d in r.json()["data"]] == expected
    # the model's own maximum length is the same cut as -1
    r = await svc.client.post("/classify", json={"input": TEXTS, "truncate_prompt_tokens": 64})
    assert r.status_code == 200, r.text


async def test_response_id_follows_vllm(svc: Svc) -> None:
    r = await svc.client.post("/classify", json={"input": "x", "request_id": "abc"})
    assert r.json()["id"] == "classify-abc"
    r = await svc.client.post("/classify", json={"input": "x", "request_id": "abc"}, headers={"X-Request-Id": "hdr-1"})
    assert r.json()["id"] == "classify-hdr-1"
    assert r.headers["x-request-id"] == "hdr-1"
    r = await svc.client.post("/pooling", json={"input": "x"})
    assert r.json()["id"] == f"pooling-{r.headers['x-request-id']}"


# -- refusals --------------------------------------------------------------------------------------

BAD_400 = [
    ({"input": []}, "input is empty", None),
    ({"input": [""]}, "text is empty", 0),
    ({"input": ["ok", ""]}, "text is empty", 1),
    ({"input": ["x"] * (MAX_ITEMS + 1)}, "too many inputs", None),
    ({"input": [[1, 2], []]}, "a token-id list is empty", None),
    ({"input": [5, -1]}, "token id -1 is negative", 0),
    ({"input": [[5], [2, -3]]}, "token id -3 is negative", 1),
    ({"input": "x", "truncate_prompt_tokens": 8}, "truncate_prompt_tokens=8 is not supported", None),
    ({"input": "x", "truncate_prompt_tokens": 65}, "cannot be greater than", None),
    ({"input": "x", "truncation_side": "right"}, 'truncation_side "right"', None),
    ({"input": "x", "padding": "max_length"}, 'padding "max_length"', None),
    ({"input": "x", "priority": 1}, "priority must be 0", None),
    ({"input": "x", "mm_processor_kwargs": {"a": 1}}, "mm_processor_kwargs", None),
    ({"messages": CONVERSATION, "add_generation_prompt": True}, "add_generation_prompt", None),
    ({"messages": CONVERSATION, "continue_final_message": True}, "continue_final_message", None),
    ({"messages": CONVERSATION, "chat_template": "{{ x }}"}, "chat_template", None),
    ({"messages": CONVERSATION, "add_special_tokens": True}, "add_special_tokens", None),
    ({"messages": []}, "messages is empty", 0),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role", 0),
]


@pytest.mark.parametrize(("payload", "says", "item"), BAD_400)
async def test_what_cannot_be_honoured_is_a_400(svc: Svc, payload: dict[str, Any], says: str, item: int | None) -> None:
    for path in ("/classify", "/pooling"):
        r = await svc.client.post(path, json=payload)
        assert_error(r, 400, "INVALID_ARGUMENT", item=item, says=says)


POOLING_ONLY_400 = [
    ({"input": "x", "task": "embed"}, "Unsupported task: 'embed'"),
    ({"input": "x", "task": "token_classify"}, "Unsupported task"),
    ({"input": "x", "dimensions": 8}, "dimensions is currently not supported"),
    ({"input": "x", "encoding_format": "bytes"}, 'encoding_format "bytes"'),
    ({"input": "x", "encoding_format": "base64", "embed_dtype": "bfloat16"}, 'embed_dtype "bfloat16"'),
]


@pytest.mark.parametrize(("payload", "says"), POOLING_ONLY_400)
async def test_pooling_refusals(svc: Svc, payload: dict[str, Any], says: str) -> None:
    assert_error(await svc.client.post("/pooling", json=payload), 400, "INVALID_ARGUMENT", says=says)


BAD_422 = [
    ({"input": 5}, "input: input must be a string", None),
    ({"input": ["ok", 1]}, "input[1]: Input should be a valid string", 1),
    ({"input": "x", "use_activation": "yes"}, "use_activation", None),
    ({"input": "x", "truncate_prompt_tokens": -2}, "truncate_prompt_tokens", None),
    ({}, "exactly one of input", None),
    ({"input": "x", "messages": CONVERSATION}, "exactly one of input", None),
    ({"input": "x", "normalize": True}, "`normalize` was removed; use `use_activation`", None),
    ({"input": "x", "task": "score"}, "`score` task was removed", None),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, "messages[0].content", None),
]


@pytest.mark.parametrize(("payload", "says", "item"), BAD_422)
async def test_schema_errors_are_422(svc: Svc, payload: dict[str, Any], says: str, item: int | None) -> None:
    for path in ("/classify", "/v1/pooling"):
        assert_error(await svc.client.post(path, json=payload), 422, "INVALID_ARGUMENT", item=item, says=says)


async def test_service_limits_apply(make_svc: Factory) -> None:
    svc = await make_svc(api_key="sesame", max_request_tokens=20)
    auth = {"Authorization": "Bearer sesame"}
    assert_error(await svc.client.post("/classify", json={"input": "x"}), 401, "UNAUTHENTICATED")
    r = await svc.client.post("/classify", json={"input": ["0123456789"] * 3}, headers=auth)
    assert_error(r, 400, "INVALID_ARGUMENT", says="--max-request-tokens 20")
    r = await svc.client.post("/classify", json={"input": "x"}, headers={**auth, "X-Request-Timeout": "soon"})
    assert_error(r, 400, "INVALID_ARGUMENT", says="X-Request-Timeout")
    big = {"input": ["y" * 1000] * (MAX_BODY // 1000 + 1)}
    assert_error(await svc.client.post("/classify", json=big, headers=auth), 413, "INVALID_ARGUMENT")
    assert_error(await svc.client.post("/classify", content=b"{nope", headers=auth), 400, "INVALID_ARGUMENT")
    r = await svc.client.post("/classify", json={"input": "x"}, headers=auth)
    assert r.status_code == 200, r.text


async def test_a_failed_item_fails_the_request(make_svc: Factory) -> None:
    def boom(batch: list[EncodedItem]) -> bool:
        return any(bytes(it.input_ids) == b"boom" for it in batch)

    svc = await make_svc(fail_when=boom, max_batch_tokens=4)  # one item per batch: only "boom" fails
    r = await svc.client.post("/classify", json={"input": ["fine", "boom"]})
    assert_error(r, 500, "INTERNAL", item=1)


async def test_documented_routes_and_metric_labels() -> None:
    assert set(POOLING_DOCUMENTED) == {"/classify", "/v1/classify", "/pooling", "/v1/pooling"}
    assert POOLING_ROUTE_NAMES == {
        "/classify": "classify",
        "/v1/classify": "classify",
        "/pooling": "pooling",
        "/v1/pooling": "pooling",
    }
    for method, request, shapes in POOLING_DOCUMENTED.values():
        assert method == "post" and request is not None
        for model in (request, *shapes):
            assert model.model_json_schema(mode="validation" if model is request else "serialization")


def test_vllms_own_response_models_where_they_import() -> None:
    """vLLM is not installed here (0.33.0's sources, put on sys.path, stop at ``import msgspec``, the
    first of its runtime dependencies); where it imports, the service's answers must validate with
    its own response model."""
    protocol = pytest.importorskip("vllm.entrypoints.pooling.classify.protocol", reason="vLLM is not installed")
    sample = ClassificationResponse.model_json_schema()["examples"][0]
    protocol.ClassificationResponse.model_validate(sample)


# -- real models -------------------------------------------------------------------------------------


async def _check_equal_to_score(svc: Svc, texts: list[str]) -> None:
    raw = await svc.raw([{"text": t} for t in texts])
    r = await svc.client.post("/classify", json={"input": texts, "use_activation": False})
    assert r.status_code == 200, r.text
    got = [d["probs"] for d in r.json()["data"]]
    assert np.allclose(np.asarray(got), np.asarray(raw), rtol=0, atol=1e-6), (got, raw)
    r = await svc.client.post("/classify", json={"input": texts})
    got = [d["probs"][0] for d in r.json()["data"]]
    assert got == pytest.approx([sigmoid(row[0]) for row in raw], abs=1e-6)
    (msg_raw,) = await svc.raw([{"messages": CONVERSATION}])
    r = await svc.client.post("/classify", json={"messages": CONVERSATION, "use_activation": False})
    assert r.json()["data"][0]["probs"] == pytest.approx(msg_raw, abs=1e-6)


@pytest.mark.slow
async def test_tiny_llama_classify_equals_score(tiny_llama_dir: Path) -> None:
    from services.runtime.backends.torch_backend import TorchRewardBackend

    svc, _ = await _serve(TorchRewardBackend(tiny_llama_dir, device="cpu"))
    try:
        await _check_equal_to_score(svc, TEXTS)
        # token ids of the same texts, tokenized as /v1/score tokenizes a text item: the same scores
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
        expected = await svc.scores([{"text": t} for t in TEXTS])
        r = await svc.client.post("/classify", json={"input": ids, "use_activation": False})
        assert r.status_code == 200, r.text
        assert [d["probs"][0] for d in r.json()["data"]] == pytest.approx([e["score"] for e in expected], abs=1e-6)
        outside = await svc.client.post("/classify", json={"input": [[1, len(tok)]]})
        assert outside.status_code == 400 and "outside the vocabulary" in outside.json()["error"]["message"]
        assert outside.json()["error"]["item"] == 0
    finally:
        await svc.client.aclose()
        await svc.engine.stop()


@pytest.mark.slow  # converts the packaged GGUF once (~30 s cold); a few seconds with a warm cache
async def test_embedded_default_model_classify_equals_score() -> None:
    from services.runtime import default_model
    from services.runtime.backends.torch_backend import TorchRewardBackend

    try:
        model_dir = default_model.default_model_dir()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"the embedded default model is not available here: {exc}")
    svc, _ = await _serve(TorchRewardBackend(model_dir, dtype="float32", device="cpu"))
    try:
        await _check_equal_to_score(svc, TEXTS[:3])
    finally:
        await svc.client.aclose()
        await svc.engine.stop()


# -- verl 0.9.1's reward-model server mode, its own code, against a live service ----------------------


@pytest.fixture(scope="module")
def bg() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


def _verl_worker(model_dir: Path, address: str) -> Any:
    """verl's ``RewardLoopWorker`` with just what ``compute_score_disrm`` reads: its ``__init__``
    needs a Ray cluster and a reward manager, which the vLLM request path does not use."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    worker = object.__new__(RewardLoopWorker)
    worker.config = OmegaConf.create(
        {"reward": {"reward_model": {"rollout": {"name": "vllm"}, "model_path": str(model_dir)}}}
    )
    worker.reward_router_address = address
    worker.input_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    worker.reward_model_tokenizer = worker.input_tokenizer
    return worker


def _verl_sample(tokenizer: Any, prompt: list[dict[str, str]], response: str) -> Any:
    """One rollout as verl's DataProto holds it: the chat prompt, right-padded response ids ending in
    EOS, the attention mask over prompt + response."""
    import torch
    from verl.protocol import DataProto

    ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    width, prompt_len = 24, 8
    responses = torch.full((1, width), tokenizer.pad_token_id, dtype=torch.long)
    responses[0, : len(ids)] = torch.tensor(ids)
    mask = torch.zeros((1, prompt_len + width), dtype=torch.long)
    mask[0, :prompt_len] = 1
    mask[0, prompt_len : prompt_len + len(ids)] = 1
    raw_prompt = np.empty(1, dtype=object)
    raw_prompt[0] = prompt
    return DataProto.from_dict(
        tensors={"responses": responses, "attention_mask": mask}, non_tensors={"raw_prompt": raw_prompt}
    )


@pytest.mark.slow
def test_verl_reward_model_server_mode_gets_the_raw_score(bg: BackgroundLoop, tiny_llama_dir: Path) -> None:
    pytest.importorskip("verl.experimental.reward_loop.reward_loop", reason="verl is not installed")
    from services.runtime.backends.torch_backend import TorchRewardBackend

    async def up() -> tuple[Svc, Any, Any, int]:
        svc, app = await _serve(TorchRewardBackend(tiny_llama_dir, device="cpu"))
        server, task, port = await start_uvicorn(app)
        return svc, server, task, port

    svc, server, task, port = bg.run(up())
    try:
        worker = _verl_worker(tiny_llama_dir, f"127.0.0.1:{port}")
        prompt = CONVERSATION[:1]
        for response in ("Paris.", "The capital of France is Paris, of course."):
            data = _verl_sample(worker.input_tokenizer, prompt, response)
            out = asyncio.run(worker.compute_score_disrm(data[-1:]))
            # what verl renders: the RM's chat template over prompt + response (no BOS to strip here)
            rendered = worker.reward_model_tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": response}], tokenize=False
            )
            (expected,) = bg.run(svc.raw([{"text": rendered}]))
            assert out == {"reward_score": pytest.approx(expected[0], abs=1e-6)}
    finally:
        bg.run(stop_uvicorn(server, task))
        bg.run(svc.client.aclose())
        bg.run(svc.engine.stop())


@pytest.mark.slow
def test_verl_client_against_the_fake_backed_server(bg: BackgroundLoop, tiny_llama_dir: Path) -> None:
    """The loopback reward server of tests/support (fake model): verl's call gets exactly the score
    /v1/score gives the same rendered text, and a 4xx is raised at once (verl does not retry it)."""
    pytest.importorskip("verl.experimental.reward_loop.reward_loop", reason="verl is not installed")
    import aiohttp

    srv = start_reward_server(bg, max_items_per_request=MAX_ITEMS)
    try:
        worker = _verl_worker(tiny_llama_dir, f"127.0.0.1:{srv.http_port}")
        data = _verl_sample(worker.input_tokenizer, CONVERSATION[:1], "Paris.")
        out = asyncio.run(worker.compute_score_disrm(data[-1:]))
        rendered = worker.reward_model_tokenizer.apply_chat_template(
            [CONVERSATION[0], {"role": "assistant", "content": "Paris."}], tokenize=False
        )
        assert out == {"reward_score": srv.expected({"text": rendered})}

        with pytest.raises(aiohttp.ClientResponseError) as err:
            asyncio.run(worker._post_request({"model": "m", "input": [], "use_activation": False}, "classify"))
        assert err.value.status == 400
    finally:
        srv.stop()
