"""The reward engine (``RewardEngine``) on its own, over the deterministic ``FakeBackend``.

Covers readiness (loading off the loop, warm-up, failure, stop), whole-request validation with
codes and item indices, overload (RESOURCE_EXHAUSTED with a retry delay, before tokenizing),
deadlines, per-item failures beside scored neighbours, vector heads and ``--head-weights``,
normalisation (raw score kept, ``normalized`` added, ``model.normalization``), ``compare``
(softmax, ranking), ``score_each`` streaming order, shared-prompt group ids, and drain.

Synchronisation is by events: the fake's ``gate`` / ``entered`` and :class:`HeldFake`'s own,
and a poll only for the queue depth, which the engine exposes as a number.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from services.common.errors import INTERNAL_MESSAGE, ErrorCode, ServiceError
from services.common.lifecycle import EngineState
from services.reward.engine.results import ItemError, Limits, ModelRef, NormalizationInfo, ScoredItem
from services.reward.engine.service import EngineConfig, RewardEngine
from services.runtime.backends.fake import FakeBackend, fake_score
from services.runtime.batcher import BatcherConfig
from services.runtime.chat import ChatMessage
from services.runtime.items import EncodedItem, RewardInput
from tests.support.waiting import wait_until

MODEL = ModelRef("fake", "0" * 16, None)


def text(t: str) -> RewardInput:
    return RewardInput(text=t)


def score_of(t: str) -> float:
    """The fake model's score of a ``text`` item (its tokens are its UTF-8 bytes)."""
    return fake_score(list(t.encode()))


class HeldFake(FakeBackend):
    """Holds every batch that has an item starting with ``hold`` until ``release`` is set; records
    the thread each ``encode`` ran on."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.release = threading.Event()
        self.holding = threading.Event()
        self.encode_threads: list[str] = []

    def encode(self, inputs: Sequence[RewardInput]) -> list[EncodedItem]:
        self.encode_threads.append(threading.current_thread().name)
        return super().encode(inputs)

    def forward(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        if any(bytes(it.input_ids).startswith(b"hold") for it in batch):
            self.holding.set()
            assert self.release.wait(30)
        return super().forward(batch)


class SharingFake(FakeBackend):
    """A fake that, like a decoder with prefix sharing on, runs a group's common prefix once."""

    shares_prefixes = True

    def shared_prefix_len(self, items: Sequence[EncodedItem]) -> int:
        first = items[0].input_ids
        n = min(len(it.input_ids) for it in items)
        for i in range(n):
            if any(it.input_ids[i] != first[i] for it in items):
                return i
        return n


@dataclass
class Rig:
    engine: RewardEngine
    backend: FakeBackend

    def scored(self) -> list[EncodedItem]:
        """Every item that reached the model after the warm-up batch, in order."""
        return [it for batch in self.backend.batches[1:] for it in batch]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.engine.metrics.registry.get_sample_value(name, labels)


Factory = Callable[..., Awaitable[Rig]]


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Factory]:
    rigs: list[Rig] = []

    async def factory(
        backend: FakeBackend | None = None,
        *,
        start: bool = True,
        max_batch_tokens: int = 4096,
        max_queue_items: int = 64,
        max_items: int = 8,
        max_text_bytes: int = 1024,
        max_request_tokens: int = 65536,
        **config: Any,
    ) -> Rig:
        backend = backend or FakeBackend(gate=threading.Event())
        if backend.gate is not None:
            backend.gate.set()
        cfg = EngineConfig(
            batcher=BatcherConfig(max_batch_tokens=max_batch_tokens, max_wait_ms=0.0, max_queue_items=max_queue_items),
            limits=Limits(
                max_items_per_request=max_items,
                max_body_bytes=1 << 20,
                max_text_bytes=max_text_bytes,
                max_batch_tokens=max_batch_tokens,
                max_request_tokens=max_request_tokens,
            ),
            **config,
        )
        rig = Rig(RewardEngine(lambda: backend, cfg), backend)
        rigs.append(rig)
        if start:
            await rig.engine.start()
        return rig

    yield factory
    for rig in rigs:
        if rig.backend.gate is not None:
            rig.backend.gate.set()
        if isinstance(rig.backend, HeldFake):
            rig.backend.release.set()
        await rig.engine.stop()


async def refused(call: Awaitable[Any], code: ErrorCode) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        await call
    assert info.value.code is code, info.value
    return info.value


# -- readiness --------------------------------------------------------------------------------------


async def test_not_ready_before_start(make: Factory) -> None:
    rig = await make(start=False)
    engine = rig.engine
    assert (engine.state, engine.live, engine.ready) == (EngineState.STARTING, True, False)
    assert engine.queue_depth == 0
    err = await refused(engine.score([text("a")]), ErrorCode.UNAVAILABLE)
    assert err.message == "model is not ready yet"
    with pytest.raises(ServiceError) as info:
        _ = engine.info
    assert (info.value.code, info.value.message) == (ErrorCode.UNAVAILABLE, "model is still loading")
    assert rig.backend.batches == []


async def test_loading_runs_off_the_loop_and_ready_follows_the_warm_up() -> None:
    loading, loaded = threading.Event(), threading.Event()
    backend = FakeBackend()

    def load() -> FakeBackend:
        loading.set()
        assert loaded.wait(30)
        return backend

    engine = RewardEngine(load, EngineConfig())
    starting = asyncio.create_task(engine.start())
    await asyncio.to_thread(loading.wait, 30)
    # The loop runs (this line runs) while the loader blocks: loading is off the event loop.
    assert (engine.state, engine.ready, engine.live) == (EngineState.STARTING, False, True)
    assert engine.metrics.registry.get_sample_value("rlhf_reward_ready") == 0.0
    loaded.set()
    await starting
    try:
        assert (engine.state, engine.ready, engine.live) == (EngineState.READY, True, True)
        assert engine.metrics.registry.get_sample_value("rlhf_reward_ready") == 1.0
        assert len(backend.batches) == 1  # the warm-up batch ran before ready
        assert engine.info is backend.info
    finally:
        await engine.stop()


async def test_a_load_failure_is_failed_not_live() -> None:
    def load() -> FakeBackend:
        raise OSError("no such model folder")

    engine = RewardEngine(load, EngineConfig())
    with pytest.raises(OSError, match="no such model folder"):
        await engine.start()
    assert (engine.state, engine.live, engine.ready) == (EngineState.FAILED, False, False)
    err = await refused(engine.score([text("a")]), ErrorCode.UNAVAILABLE)
    assert err.message == "model is not ready yet"
    await engine.stop()


async def test_stopped_engine_refuses_work(make: Factory) -> None:
    rig = await make()
    await rig.engine.stop()
    assert (rig.engine.state, rig.engine.live, rig.engine.ready) == (EngineState.STOPPED, False, False)
    await refused(rig.engine.score([text("a")]), ErrorCode.UNAVAILABLE)


async def test_tokenization_runs_on_the_tokenizer_thread(make: Factory) -> None:
    rig = await make(HeldFake())
    await rig.engine.score([text("a"), text("b")])
    assert isinstance(rig.backend, HeldFake)
    assert rig.backend.encode_threads[-1].startswith("reward-tokenize")


# -- scoring ----------------------------------------------------------------------------------------


async def test_scores_are_the_raw_model_outputs_for_every_item_form(make: Factory) -> None:
    rig = await make()
    items = [
        text("<|im_start|>user\nhi<|im_end|>\n"),
        RewardInput(prompt="What is 2+2?", response=" 4"),
        RewardInput(prompt=(ChatMessage("system", "be nice"), ChatMessage("user", "hi")), response="hello!"),
        RewardInput(messages=(ChatMessage("user", "hi"), ChatMessage("assistant", "hello!"))),
    ]
    outcome = await rig.engine.score(items)
    assert outcome.model == MODEL
    want = [
        score_of("<|im_start|>user\nhi<|im_end|>\n"),
        score_of("What is 2+2? 4"),
        score_of("system:be nice\nuser:hi\nhello!"),
        score_of("user:hi\nassistant:hello!\n"),
    ]
    assert [r.score for r in outcome.results if isinstance(r, ScoredItem)] == want
    assert outcome.results[0] == ScoredItem(
        want[0], num_tokens=len("<|im_start|>user\nhi<|im_end|>\n"), truncated=False
    )
    assert all(isinstance(r, ScoredItem) and r.scores is None and r.normalized is None for r in outcome.results)
    assert rig.sample("rlhf_reward_items_total", outcome="ok") == 4
    assert rig.engine.lifecycle.in_flight == 0


async def test_truncated_items_are_flagged_and_counted(make: Factory) -> None:
    rig = await make(FakeBackend(max_length=8))
    outcome = await rig.engine.score([text("abcdefghij"), RewardInput(prompt="0123456789", response="xyz")])
    assert outcome.results == [
        ScoredItem(score_of("cdefghij"), num_tokens=8, truncated=True),
        ScoredItem(score_of("56789xyz"), num_tokens=8, truncated=True),  # the prompt loses its left end
    ]
    assert rig.sample("rlhf_reward_truncations_total") == 2


# -- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("items", "message", "item"),
    [
        pytest.param([], "inputs is empty: send at least one item", None, id="empty"),
        pytest.param([text("a")] * 5, "too many items: 5 > 4", None, id="too many"),
        pytest.param([text("a"), text("")], "text is empty", 1, id="empty text"),
        pytest.param([text("a"), text("a"), text("x" * 17)], "text of 17 bytes exceeds", 2, id="text too long"),
        pytest.param(
            [RewardInput(messages=(ChatMessage("robot", "beep"),))], "unknown role 'robot'", 0, id="unknown role"
        ),
        pytest.param([text("a"), RewardInput(prompt="p")], "a prompt item needs both", 1, id="half a pair"),
        # Passes the schema, then renders to nothing: found by the backend, still with its index.
        pytest.param([text("a"), RewardInput(prompt="", response="")], "item renders to no tokens", 1, id="no tokens"),
    ],
)
async def test_invalid_requests_are_rejected_whole(
    make: Factory, items: list[RewardInput], message: str, item: int | None
) -> None:
    rig = await make(max_items=4, max_text_bytes=16)
    err = await refused(rig.engine.score(items), ErrorCode.INVALID_ARGUMENT)
    assert err.message.startswith(message), err.message
    assert err.item == item
    assert err.http_status == 400
    assert rig.scored() == []  # nothing reached the model
    assert rig.engine.lifecycle.in_flight == 0


class NanFake(FakeBackend):
    """A model that gives NaN (or inf) for items starting with ``nan`` (``inf``)."""

    def forward(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        out = np.array(super().forward(batch), dtype=np.float32)
        for i, it in enumerate(batch):
            if bytes(it.input_ids).startswith(b"nan"):
                out[i, -1] = np.nan
            elif bytes(it.input_ids).startswith(b"inf"):
                out[i, 0] = np.inf
        return out


@pytest.mark.parametrize("num_labels", [1, 2])
async def test_a_non_finite_model_output_is_a_failed_item_never_a_number(make: Factory, num_labels: int) -> None:
    rig = await make(NanFake(gate=threading.Event(), num_labels=num_labels))
    out = await rig.engine.score([text("fine"), text("nan please"), text("inf too")])
    ok, nan, inf = out.results
    assert isinstance(ok, ScoredItem) and math.isfinite(ok.score)
    for r in (nan, inf):
        assert isinstance(r, ItemError) and r.code is ErrorCode.INTERNAL
        assert "not a finite number" in r.message
    assert rig.sample("rlhf_reward_items_total", outcome="internal") == 2


async def test_a_bug_in_tokenization_raises_and_the_engine_keeps_serving(make: Factory) -> None:
    rig = await make(FakeBackend(bug_text="explode"))
    with pytest.raises(RuntimeError):
        await rig.engine.score([text("fine"), text("explode")])
    assert rig.engine.lifecycle.in_flight == 0
    outcome = await rig.engine.score([text("fine")])
    assert outcome.results == [ScoredItem(score_of("fine"), 4, False)]


# -- overload and deadlines -------------------------------------------------------------------------


async def test_a_full_queue_is_resource_exhausted_at_once_with_a_retry_delay(make: Factory) -> None:
    # Each 3-token item is a batch of its own (budget 4); the model is held at the gate.
    rig = await make(max_batch_tokens=4, max_queue_items=4)
    gate = rig.backend.gate
    assert gate is not None
    gate.clear()
    rig.backend.entered.clear()
    running = asyncio.create_task(rig.engine.score([text("aaa")]))
    await asyncio.to_thread(rig.backend.entered.wait, 30)
    queued = asyncio.create_task(rig.engine.score([text(f"b{i:02}") for i in range(4)]))
    await wait_until(lambda: rig.engine.queue_depth == 3)  # one more is the batch waiting for the model

    err = await refused(rig.engine.score([text("c01"), text("c02")]), ErrorCode.RESOURCE_EXHAUSTED)
    assert err.message.startswith("server overloaded: 3 items queued")
    assert err.retry_after == pytest.approx(3 * 0.05)  # queued items x the starting estimate per item
    assert err.http_status == 429
    fits = asyncio.create_task(rig.engine.score([text("c03")]))  # 3 + 1 is exactly the limit
    await wait_until(lambda: rig.engine.queue_depth == 4)

    gate.set()
    assert (await running).results == [ScoredItem(score_of("aaa"), 3, False)]
    assert [r.score for r in (await queued).results if isinstance(r, ScoredItem)] == [
        score_of(f"b{i:02}") for i in range(4)
    ]
    assert (await fits).results == [ScoredItem(score_of("c03"), 3, False)]
    assert b"c01" not in {bytes(it.input_ids) for it in rig.scored()}


class CountingFake(FakeBackend):
    """Counts the items it tokenized; ``block`` holds every ``encode`` whose first text starts
    with "slow" until it is set."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.encoded = 0
        self.block = threading.Event()
        self.blocked = threading.Event()

    def encode(self, inputs: Sequence[RewardInput]) -> list[EncodedItem]:
        if inputs and (inputs[0].text or "").startswith("slow"):
            self.blocked.set()
            assert self.block.wait(30)
        self.encoded += len(inputs)
        return super().encode(inputs)


async def test_a_request_over_the_token_budget_is_refused_before_the_model(make: Factory) -> None:
    # Fake tokens are UTF-8 bytes, max_length 64: 40 items of 64 tokens are 2,560 tokens.
    backend = CountingFake(gate=threading.Event())
    rig = await make(backend, max_items=64, max_request_tokens=1000)
    before = len(rig.backend.batches)
    err = await refused(rig.engine.score([text("x" * 100)] * 40), ErrorCode.INVALID_ARGUMENT)
    assert "over --max-request-tokens 1000" in err.message and "1024 tokens" in err.message, err.message
    assert "first 16 of 40 items" in err.message, err.message
    assert len(rig.backend.batches) == before  # nothing reached the model
    assert backend.encoded == 1 + 16  # the warm-up, then only one chunk of 16 items: not all 40
    assert rig.engine.queue_depth == 0
    assert rig.sample("rlhf_reward_requests_over_token_budget_total") == 1
    # Exactly the budget is fine: 20 items of 50 tokens.
    ok = await rig.engine.score([text("y" * 50)] * 20)
    assert [r.num_tokens for r in ok.results if isinstance(r, ScoredItem)] == [50] * 20


async def test_items_being_tokenized_count_in_the_queue_depth_and_against_the_queue_limit(make: Factory) -> None:
    rig = await make(CountingFake(gate=threading.Event()), max_queue_items=10, max_items=8, tokenize_workers=2)
    backend = rig.backend
    assert isinstance(backend, CountingFake)
    slow = asyncio.create_task(rig.engine.score([text(f"slow{i}") for i in range(6)]))
    await asyncio.to_thread(backend.blocked.wait, 30)
    assert rig.engine.queue_depth == 6
    assert rig.sample("rlhf_reward_queue_depth") == 6
    err = await refused(rig.engine.score([text(f"c{i}") for i in range(5)]), ErrorCode.RESOURCE_EXHAUSTED)
    assert err.message.startswith("server overloaded: 6 items queued (limit 10)"), err.message
    # The second worker tokenizes another request while the first is held.
    assert (await rig.engine.score([text("fast")])).results == [ScoredItem(score_of("fast"), 4, False)]
    backend.block.set()
    assert len((await slow).results) == 6
    assert rig.engine.queue_depth == 0 and rig.sample("rlhf_reward_queue_depth") == 0


async def test_a_deadline_already_passed_is_refused_before_scoring(make: Factory) -> None:
    rig = await make()
    err = await refused(rig.engine.score([text("late")], deadline=time.monotonic() - 1), ErrorCode.DEADLINE_EXCEEDED)
    assert err.message == "deadline passed before scoring started"
    assert err.http_status == 504
    assert rig.scored() == []
    await refused(rig.engine.compare("p", ["a", "b"], deadline=time.monotonic() - 1), ErrorCode.DEADLINE_EXCEEDED)


async def test_a_deadline_passing_while_every_item_waits_fails_the_request(make: Factory) -> None:
    rig = await make(max_batch_tokens=4)
    gate = rig.backend.gate
    assert gate is not None
    gate.clear()
    rig.backend.entered.clear()
    running = asyncio.create_task(rig.engine.score([text("aaa")]))
    await asyncio.to_thread(rig.backend.entered.wait, 30)
    late = rig.engine.score([text("late1"), text("late2")], deadline=time.monotonic() + 0.2)
    await refused(late, ErrorCode.DEADLINE_EXCEEDED)
    assert rig.engine.lifecycle.in_flight == 1  # only the running request
    gate.set()
    assert (await running).results == [ScoredItem(score_of("aaa"), 3, False)]
    await rig.engine.score([text("after")])  # one model thread: every earlier batch has been handled
    assert [bytes(it.input_ids) for it in rig.scored()] == [b"aaa", b"after"]  # expired items never ran


async def test_an_item_past_the_deadline_is_an_item_error_beside_scored_neighbours(make: Factory) -> None:
    # "quick" (5 tokens) and "hold-me" (7 tokens, over the budget of 6) run as two batches;
    # the second is held in the model until after the deadline.
    backend = HeldFake()
    rig = await make(backend, max_batch_tokens=6)
    outcome = await rig.engine.score([text("quick"), text("hold-me")], deadline=time.monotonic() + 0.5)
    assert outcome.results == [
        ScoredItem(score_of("quick"), 5, False),
        ItemError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before the item was scored"),
    ]
    assert rig.sample("rlhf_reward_items_total", outcome="deadline_exceeded") == 1
    backend.release.set()


# -- per-item failures ------------------------------------------------------------------------------


def fails_on_boom(batch: Sequence[EncodedItem]) -> bool:
    return any(bytes(it.input_ids) == b"boom" for it in batch)


async def test_a_failed_batch_fails_only_its_items(make: Factory) -> None:
    rig = await make(FakeBackend(fail_when=fails_on_boom), max_batch_tokens=4)  # one item per batch
    outcome = await rig.engine.score([text("ok1"), text("boom"), text("ok2")])
    assert outcome.results == [
        ScoredItem(score_of("ok1"), 3, False),
        ItemError(ErrorCode.INTERNAL, INTERNAL_MESSAGE),  # the generic text, never the exception's
        ScoredItem(score_of("ok2"), 3, False),
    ]
    assert rig.sample("rlhf_reward_items_total", outcome="ok") == 2
    assert rig.sample("rlhf_reward_items_total", outcome="internal") == 1
    # Every item failing is still a result per item, not a request error.
    outcome = await rig.engine.score([text("boom")])
    assert outcome.results == [ItemError(ErrorCode.INTERNAL, INTERNAL_MESSAGE)]


# -- vector heads and normalisation -----------------------------------------------------------------


async def test_a_vector_head_reports_every_output_and_their_mean(make: Factory) -> None:
    rig = await make(FakeBackend(num_labels=3))
    (r,) = (await rig.engine.score([text("abc")])).results
    outputs = tuple(float(np.float32(score_of("abc") + k)) for k in range(3))  # the fake's: score + k
    assert isinstance(r, ScoredItem)
    assert r.scores == outputs
    assert r.score == pytest.approx(outputs[1], abs=1e-5)


async def test_head_weights_choose_the_scalar_score(make: Factory) -> None:
    rig = await make(FakeBackend(num_labels=3), head_weights=(0.0, 0.0, 1.0))
    (r,) = (await rig.engine.score([text("abc")])).results
    outputs = tuple(float(np.float32(score_of("abc") + k)) for k in range(3))
    assert isinstance(r, ScoredItem)
    assert r.score == outputs[2]
    assert r.scores == outputs


@pytest.mark.parametrize(
    ("num_labels", "weights", "message"),
    [
        (3, (1.0, 2.0), "--head-weights has 2 values but the model has 3 outputs"),
        (1, (1.0, 2.0), "--head-weights has 2 values but the model has 1 output"),
    ],
)
async def test_head_weights_of_the_wrong_length_fail_the_start(
    make: Factory, num_labels: int, weights: tuple[float, ...], message: str
) -> None:
    rig = await make(FakeBackend(num_labels=num_labels), start=False, head_weights=weights)
    with pytest.raises(ValueError) as info:
        await rig.engine.start()
    assert str(info.value) == message
    assert rig.engine.state is EngineState.FAILED


async def test_one_head_weight_on_a_scalar_head_changes_nothing(make: Factory) -> None:
    rig = await make(head_weights=(1.0,))
    assert (await rig.engine.score([text("abc")])).results == [ScoredItem(score_of("abc"), 3, False)]


async def test_static_normalisation_keeps_the_raw_score(make: Factory) -> None:
    rig = await make(normalize_mean=1.0, normalize_std=2.0)
    outcome = await rig.engine.score([text("abc"), text("xyz")], normalize=True)
    assert outcome.model == ModelRef("fake", "0" * 16, NormalizationInfo(1.0, 2.0, "static"))
    for r, t in zip(outcome.results, ["abc", "xyz"], strict=True):
        assert isinstance(r, ScoredItem)
        assert r.score == score_of(t)
        assert r.normalized == pytest.approx((score_of(t) - 1.0) / 2.0)
    plain = await rig.engine.score([text("abc")])
    assert plain.model == MODEL
    assert plain.results == [ScoredItem(score_of("abc"), 3, False)]


async def test_running_normalisation_uses_the_scores_seen_before_the_request(make: Factory) -> None:
    rig = await make()
    first = ["abc", "hello", "a longer text"]
    outcome = await rig.engine.score([text(t) for t in first], normalize=True)
    # Nothing seen yet: mean 0, std 1, so normalized == score.
    assert outcome.model.normalization == NormalizationInfo(0.0, 1.0, "running")
    assert [r.normalized for r in outcome.results if isinstance(r, ScoredItem)] == [score_of(t) for t in first]
    await rig.engine.score([text("unnormalised requests count too")])
    seen = [score_of(t) for t in [*first, "unnormalised requests count too"]]
    outcome = await rig.engine.score([text("xyz")], normalize=True)
    info = outcome.model.normalization
    assert info is not None and info.source == "running"
    assert info.mean == pytest.approx(statistics.fmean(seen))
    assert info.std == pytest.approx(statistics.stdev(seen))
    (r,) = outcome.results
    assert isinstance(r, ScoredItem) and r.score == score_of("xyz")
    assert r.normalized == pytest.approx((score_of("xyz") - info.mean) / info.std)


def test_a_static_std_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError, match="std must be a positive number"):
        RewardEngine(FakeBackend, EngineConfig(normalize_mean=0.0, normalize_std=0.0))


# -- compare ----------------------------------------------------------------------------------------


async def test_compare_is_a_softmax_over_the_raw_scores(make: Factory) -> None:
    rig = await make()
    responses = [" 4", " four", " 5", " 22"]
    outcome = await rig.engine.compare("What is 2+2?", responses)
    scores = [score_of("What is 2+2?" + r) for r in responses]
    assert len(set(scores)) == 4
    assert outcome.scores == scores
    total = sum(math.exp(s) for s in scores)
    assert outcome.probabilities == pytest.approx([math.exp(s) / total for s in scores], rel=1e-12)
    assert sum(outcome.probabilities) == pytest.approx(1.0)
    assert outcome.ranking == sorted(range(4), key=lambda i: -scores[i])
    assert outcome.model == MODEL


async def test_compare_ties_keep_the_order_given(make: Factory) -> None:
    rig = await make()
    outcome = await rig.engine.compare("p", ["same", "other", "same"])
    assert outcome.probabilities[0] == outcome.probabilities[2]
    best_first = 0 if score_of("psame") > score_of("pother") else 1
    assert outcome.ranking == ([0, 2, 1] if best_first == 0 else [1, 0, 2])


async def test_compare_with_messages_as_the_prompt(make: Factory) -> None:
    rig = await make()
    prompt = (ChatMessage("user", "hi"),)
    outcome = await rig.engine.compare(prompt, ["hello", "hey"])
    assert outcome.scores == [score_of("user:hi\nhello"), score_of("user:hi\nhey")]


async def test_compare_errors(make: Factory) -> None:
    rig = await make(FakeBackend(fail_when=fails_on_boom), max_items=4)
    err = await refused(rig.engine.compare("p", []), ErrorCode.INVALID_ARGUMENT)
    assert err.message == "responses is empty: send at least one response"
    err = await refused(rig.engine.compare("p", ["a"] * 5), ErrorCode.INVALID_ARGUMENT)
    assert err.message.startswith("too many items: 5 > 4")
    err = await refused(rig.engine.compare("", ["a", ""]), ErrorCode.INVALID_ARGUMENT)
    assert (err.message, err.item) == ("item renders to no tokens", 1)
    # A failed response fails the comparison (probabilities need every score), with the generic text.
    err = await refused(rig.engine.compare("bo", ["om"]), ErrorCode.INTERNAL)
    assert err.message == INTERNAL_MESSAGE


# -- streaming --------------------------------------------------------------------------------------


async def test_score_each_yields_each_batch_as_it_finishes(make: Factory) -> None:
    # Budget 6: items 0 and 2 (3 tokens each) make one batch, item 1 (12 tokens) runs alone, held.
    backend = HeldFake()
    rig = await make(backend, max_batch_tokens=6)
    items = [text("abc"), text("hold-abcdefg"), text("xyz")]
    stream = rig.engine.score_each(items)
    first = [await anext(stream), await anext(stream)]
    assert b"hold-abcdefg" not in {bytes(it.input_ids) for it in rig.scored()}  # item 1 has not run yet
    assert [(i, r) for i, r, _ in first] == [
        (0, ScoredItem(score_of("abc"), 3, False)),
        (2, ScoredItem(score_of("xyz"), 3, False)),
    ]
    await asyncio.to_thread(backend.holding.wait, 30)
    backend.release.set()
    i, r, model = await anext(stream)
    assert (i, r, model) == (1, ScoredItem(score_of("hold-abcdefg"), 12, False), MODEL)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert rig.engine.lifecycle.in_flight == 0


async def test_score_each_validates_before_the_first_result(make: Factory) -> None:
    rig = await make()
    stream = rig.engine.score_each([text("a"), text("")])
    with pytest.raises(ServiceError) as info:
        await anext(stream)
    assert (info.value.code, info.value.item) == (ErrorCode.INVALID_ARGUMENT, 1)


async def test_score_each_normalises_like_score(make: Factory) -> None:
    rig = await make(normalize_mean=2.0, normalize_std=4.0)
    got = [x async for x in rig.engine.score_each([text("abc")], normalize=True)]
    assert len(got) == 1
    _, r, model = got[0]
    assert model.normalization == NormalizationInfo(2.0, 4.0, "static")
    assert isinstance(r, ScoredItem) and r.normalized == pytest.approx((score_of("abc") - 2.0) / 4.0)


# -- shared-prompt groups ---------------------------------------------------------------------------


def groups_by_ids(rig: Rig) -> dict[bytes, int | None]:
    return {bytes(it.input_ids): it.group for it in rig.scored()}


async def test_items_sharing_a_prompt_get_one_group_id(make: Factory) -> None:
    rig = await make(SharingFake())
    u = ChatMessage("user", "same question")
    items = [
        RewardInput(prompt="P", response="a"),
        RewardInput(prompt="P", response="bb"),
        RewardInput(prompt="Q", response="c"),  # alone with its prompt: no group
        text("Pa-like text"),  # text has no prompt
        RewardInput(messages=(u, ChatMessage("assistant", "x"))),
        RewardInput(messages=(u, ChatMessage("assistant", "yy"))),
        RewardInput(messages=(ChatMessage("user", "one turn"),)),  # nothing before the last turn
        RewardInput(prompt="P", response="ccc"),
    ]
    outcome = await rig.engine.score(items)
    assert all(isinstance(r, ScoredItem) for r in outcome.results)
    g = groups_by_ids(rig)
    p_group = {g[b"Pa"], g[b"Pbb"], g[b"Pccc"]}
    m_group = {g[b"user:same question\nassistant:x\n"], g[b"user:same question\nassistant:yy\n"]}
    assert len(p_group) == 1 and len(m_group) == 1 and None not in p_group | m_group
    assert p_group != m_group
    assert g[b"Qc"] is None and g[b"Pa-like text"] is None and g[b"user:one turn\n"] is None
    # The same prompt in the next request is a new group.
    await rig.engine.score([RewardInput(prompt="P", response="d"), RewardInput(prompt="P", response="e")])
    g2 = groups_by_ids(rig)
    assert g2[b"Pd"] == g2[b"Pe"] and g2[b"Pd"] not in p_group | m_group


async def test_no_groups_for_a_backend_that_does_not_share(make: Factory) -> None:
    rig = await make()
    await rig.engine.score([RewardInput(prompt="P", response="a"), RewardInput(prompt="P", response="b")])
    assert [it.group for it in rig.scored()] == [None, None]


# -- drain ------------------------------------------------------------------------------------------


async def test_drain_refuses_new_work_and_lets_admitted_work_finish(make: Factory) -> None:
    rig = await make()
    gate = rig.backend.gate
    assert gate is not None
    gate.clear()
    rig.backend.entered.clear()
    running = asyncio.create_task(rig.engine.score([text("admitted")]))
    await asyncio.to_thread(rig.backend.entered.wait, 30)
    draining = asyncio.create_task(rig.engine.drain(60.0))
    await asyncio.sleep(0)  # drain() switches the state before it waits
    assert (rig.engine.state, rig.engine.ready, rig.engine.live) == (EngineState.DRAINING, False, True)
    assert rig.sample("rlhf_reward_ready") == 0.0
    err = await refused(rig.engine.score([text("new")]), ErrorCode.UNAVAILABLE)
    assert err.message == "server is draining; retry on another replica"
    assert not draining.done()
    gate.set()
    assert await draining is True
    assert (await running).results == [ScoredItem(score_of("admitted"), 8, False)]
    assert rig.sample("rlhf_reward_requests_in_flight") == 0.0


async def test_drain_gives_up_after_its_timeout(make: Factory) -> None:
    rig = await make()
    gate = rig.backend.gate
    assert gate is not None
    gate.clear()
    rig.backend.entered.clear()
    running = asyncio.create_task(rig.engine.score([text("slow")]))
    await asyncio.to_thread(rig.backend.entered.wait, 30)
    assert await rig.engine.drain(0.05) is False
    gate.set()
    assert (await running).results == [ScoredItem(score_of("slow"), 4, False)]
