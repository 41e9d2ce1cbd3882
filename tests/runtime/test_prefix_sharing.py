"""Shared-prompt group scoring: a group's common token prefix runs once, scores stay exact.

Every score is compared with the unbatched ``transformers`` forward of the single unpadded
sequence and with the same backend without sharing. Tiny Llama (pad == eos and pad != eos,
left and right padding), tiny BERT (never shares), the batcher's unit rules (a group is
never split unless it alone is over the budget) and the engine's grouping and metric.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from services.reward.engine.service import EngineConfig, RewardEngine
from services.runtime.backends.layout import pad_rows
from services.runtime.backends.torch_backend import TorchRewardBackend, common_prefix_len
from services.runtime.batcher import Batcher, BatcherConfig
from services.runtime.chat import ChatMessage
from services.runtime.items import EncodedItem, RewardInput
from tests.support.tiny_models import CORPUS, make_tiny_llama

TOL = 1e-5
WORDS = " ".join(CORPUS[:6]).split()

torch.set_num_threads(1)


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


class Reference:
    """The unbatched forward: one unpadded sequence through ``AutoModelForSequenceClassification``."""

    def __init__(self, model_dir: Path) -> None:
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    @torch.inference_mode()
    def __call__(self, items: Sequence[EncodedItem]) -> np.ndarray:
        return np.asarray([float(self.model(input_ids=torch.tensor([it.input_ids])).logits[0, 0]) for it in items])


def grouped(items: Sequence[EncodedItem], group: int) -> list[EncodedItem]:
    return [dataclasses.replace(it, group=group) for it in items]


@pytest.fixture(scope="module")
def llama_pad_distinct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-pad"), pad_is_eos=False)


@pytest.fixture(params=["tiny_llama_dir", "llama_pad_distinct"])
def llama_dir(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue(request.param)
    return path


def mixed_batch(backend: TorchRewardBackend) -> list[EncodedItem]:
    """Two groups, a group of one, a group too short to share, and ungrouped items, interleaved."""
    long_prompt = words(12)
    g1 = grouped(
        backend.encode(
            [
                RewardInput(prompt=long_prompt, response=r)
                for r in (words(3, 40), words(6, 7), words(1, 2), words(6, 7), words(9, 11))
            ]
        ),
        group=1,
    )
    g2 = grouped(
        backend.encode(
            [
                RewardInput(prompt=(ChatMessage("system", "Be brief."), ChatMessage("user", words(8, 5))), response=r)
                for r in (words(2, 3), words(7, 30))
            ]
        ),
        group=2,
    )
    single = grouped(backend.encode([RewardInput(prompt=long_prompt, response=words(4))]), group=3)
    short = grouped(backend.encode([RewardInput(prompt="a", response=r) for r in ("dog", words(6))]), group=4)
    loose = backend.encode([RewardInput(text=words(n, n)) for n in (1, 7, 25)])
    assert not any(it.truncated for it in [*g1, *g2, *single, *short])
    return [g1[0], loose[0], g2[0], *single, g1[1], short[0], g1[2], loose[1], g2[1], g1[3], short[1], g1[4], loose[2]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_groups_score_like_the_unbatched_forward(llama_dir: Path, side: str) -> None:
    shared = TorchRewardBackend(llama_dir, device="cpu", padding_side=side)  # type: ignore[arg-type]
    plain = TorchRewardBackend(llama_dir, device="cpu", padding_side=side, prefix_sharing=False)  # type: ignore[arg-type]
    batch = mixed_batch(shared)
    plan = shared._plan(batch)
    assert plan is not None
    prefix_len, _, heads = plan
    # Groups 1 and 2 share (the template's header and the prompt), the rest run whole.
    assert len(heads) == 2
    g1 = [it for it in batch if it.group == 1]
    p1 = common_prefix_len([it.input_ids for it in g1])
    assert p1 >= 16 and p1 <= min(it.prompt_tokens for it in g1) + 1
    assert [p for p, it in zip(prefix_len, batch, strict=True) if it.group == 1] == [p1] * 5
    assert all(p == 0 for p, it in zip(prefix_len, batch, strict=True) if it.group not in (1, 2))

    got = shared.forward(batch)[:, 0]
    want = Reference(llama_dir)(batch)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(got, plain.forward(batch)[:, 0], atol=TOL, rtol=0)
    assert plain._plan(batch) is None
    # Identical responses score identically.
    assert got[batch.index(g1[1])] == pytest.approx(got[batch.index(g1[3])], abs=TOL)


def test_prefix_is_found_on_token_ids_not_strings(tiny_llama_dir: Path) -> None:
    """A response whose first token merges with the prompt's tail: the shared part is the
    common token prefix, one token shorter than the prompt's token count."""
    backend = TorchRewardBackend(tiny_llama_dir, device="cpu")
    tok = backend.tokenizer
    prompt = words(11)  # "... Reward models"
    merged = "ed over the dog"  # "models" + "ed" does not tokenize as "models" then "ed"
    items = grouped(backend.encode([RewardInput(text=prompt + r) for r in (merged, " and a fox", " then bread")]), 5)
    prompt_ids = tuple(tok(prompt, add_special_tokens=False)["input_ids"])
    assert items[0].input_ids[: len(prompt_ids)] != prompt_ids  # the boundary token merged
    lcp = common_prefix_len([it.input_ids for it in items])
    assert lcp < len(prompt_ids)
    assert backend.shared_prefix_len(items) == lcp
    np.testing.assert_allclose(backend.forward(items)[:, 0], Reference(tiny_llama_dir)(items), atol=TOL, rtol=0)


def test_read_position_inside_the_prefix_is_handled_exactly(tiny_llama_dir: Path) -> None:
    """pad == eos: trailing eos tokens are skipped by the head; the shared prefix stops before
    the earliest read position so every item still reads a position of its own suffix."""
    backend = TorchRewardBackend(tiny_llama_dir, device="cpu")
    eos = backend.pad_token_id
    assert eos is not None and eos == backend.tokenizer.eos_token_id
    base = backend.encode([RewardInput(text=words(20))])[0].input_ids
    seqs = [(*base, eos, eos), (*base, 7, eos, eos, eos), (*base[:-3], *(eos,) * 5), (*base, 9, 11)]
    items = grouped([EncodedItem(s, truncated=False) for s in seqs], 6)
    # The third item reads at len(base) - 4: the prefix must end before it.
    assert backend.read_position(seqs[2]) == len(base) - 4
    assert backend.shared_prefix_len(items) == len(base) - 4
    np.testing.assert_allclose(backend.forward(items)[:, 0], Reference(tiny_llama_dir)(items), atol=TOL, rtol=0)


def test_short_prefix_group_of_one_and_identical_items_do_not_break(tiny_llama_dir: Path) -> None:
    backend = TorchRewardBackend(tiny_llama_dir, device="cpu")
    same = grouped(backend.encode([RewardInput(prompt=words(20), response=words(5))] * 3), 7)
    assert backend.shared_prefix_len(same) == same[0].num_tokens - 1  # all but the read token
    assert backend.shared_prefix_len(same[:1]) == 0
    short = grouped(backend.encode([RewardInput(text="a b"), RewardInput(text="a c")]), 8)
    assert backend.shared_prefix_len(short) == 0
    np.testing.assert_allclose(backend.forward(same)[:, 0], Reference(tiny_llama_dir)(same), atol=TOL, rtol=0)


def test_encoders_never_share(tiny_bert_dir: Path) -> None:
    backend = TorchRewardBackend(tiny_bert_dir, device="cpu")
    assert not backend.shares_prefixes
    items = grouped(backend.encode([RewardInput(prompt=words(25), response=words(n)) for n in (2, 5)]), 9)
    assert backend.shared_prefix_len(items) == 0 and backend._plan(items) is None


def test_pad_rows_places_each_row_on_its_side() -> None:
    ids, mask, starts = pad_rows([(1, 2, 3), (4,), (5, 6)], 0, left=True)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 5, 6]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]] and starts.tolist() == [0, 2, 1]
    ids, mask, starts = pad_rows([(1, 2, 3), (4,)], 9, left=False)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and starts.tolist() == [0, 0]


# -- the batcher: groups travel as one unit ------------------------------------------------------


def lcp_rule(items: Sequence[EncodedItem]) -> int:
    """The backend's rule without a model: the common prefix, capped below the shortest item."""
    if len(items) < 2:
        return 0
    p = min(common_prefix_len([it.input_ids for it in items]), min(it.num_tokens for it in items) - 1)
    return p if p >= 4 else 0


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[EncodedItem]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(10)
        self.batches.append(list(batch))
        return np.asarray([[float(it.num_tokens)] for it in batch], np.float32)


class Observed:
    def __init__(self) -> None:
        self.saved = 0
        self.padded = 0
        self.real = 0

    def on_queue_depth(self, items: int) -> None:
        pass

    def on_batch(
        self,
        *,
        items: int,
        padded_tokens: int,
        real_tokens: int,
        queue_seconds: Sequence[float],
        prefix_tokens_saved: int = 0,
    ) -> None:
        self.saved += prefix_tokens_saved
        self.padded += padded_tokens
        self.real += real_tokens

    def on_inference(self, seconds: float) -> None:
        pass


def batch_cost(batch: Sequence[EncodedItem]) -> int:
    """What the backend runs: prefixes once (padded) plus every suffix (padded)."""
    by_group: dict[int, list[EncodedItem]] = {}
    for it in batch:
        if it.group is not None:
            by_group.setdefault(it.group, []).append(it)
    prefix = {g: lcp_rule(m) for g, m in by_group.items()}
    shared = [p for p in prefix.values() if p]
    suffix = [it.num_tokens - (prefix.get(it.group, 0) if it.group is not None else 0) for it in batch]
    return len(shared) * max(shared, default=0) + len(batch) * max(suffix)


def group_items(gid: int, prompt_len: int, suffixes: Sequence[int]) -> list[EncodedItem]:
    head = tuple(range(1000 + gid * 10, 1000 + gid * 10 + prompt_len))
    return [EncodedItem(head + tuple([i] * n), truncated=False, group=gid) for i, n in enumerate(suffixes, 1)]


async def run_batcher(rec: Recorder, obs: Observed, budget: int, items: list[EncodedItem]) -> list[float]:
    cfg = BatcherConfig(max_batch_tokens=budget, max_wait_ms=0.0, max_queue_items=1000)
    b = Batcher(rec, cfg, observer=obs, shared_prefix=lcp_rule)
    await b.start()
    rec.gate.clear()
    rec.entered.clear()
    (first,) = b.submit([EncodedItem((5,), truncated=False)])
    await asyncio.to_thread(rec.entered.wait, 10)
    futs = b.submit(items)
    rec.gate.set()
    await first
    rows = await asyncio.gather(*futs)
    await b.stop()
    return [float(r[0]) for r in rows]


async def test_a_group_is_never_split_across_batches_and_is_priced_as_it_runs() -> None:
    rng = np.random.default_rng(1)
    items: list[EncodedItem] = []
    for gid in range(12):
        # Responses of similar length (spread < prompt / 3): cutting the group never pays.
        items += group_items(gid, int(rng.integers(10, 30)), [int(x) for x in rng.integers(1, 4, size=4)])
        items += [EncodedItem(tuple([7] * int(n)), truncated=False) for n in rng.integers(1, 40, size=3)]
    rec, obs = Recorder(), Observed()
    out = await run_batcher(rec, obs, 160, items)
    assert out == [float(it.num_tokens) for it in items]
    batches = rec.batches[1:]
    for gid in range(12):
        holding = [i for i, bt in enumerate(batches) if any(it.group == gid for it in bt)]
        assert len(holding) == 1, (gid, holding)
    for bt in batches:
        assert batch_cost(bt) <= 160 or len(bt) == 1
    # Each group saved (G - 1) * P once; the observer's real tokens count the prefix once.
    expected_saved = sum(3 * lcp_rule([it for it in items if it.group == g]) for g in range(12))
    assert obs.saved == expected_saved
    assert obs.real == sum(it.num_tokens for it in items) + 1 - expected_saved
    assert obs.padded == sum(batch_cost(bt) for bt in batches) + 1


async def test_responses_of_very_different_lengths_are_cut_into_length_sorted_chunks() -> None:
    """Padding a 3-token suffix to 41 costs more than recomputing a 20-token prefix: the group is
    cut into [2, 3] and [40, 41] suffix chunks, each sharing the prefix (saving 20 tokens each)."""
    items = group_items(0, 20, [40, 2, 41, 3])
    rec, obs = Recorder(), Observed()
    out = await run_batcher(rec, obs, 1000, items)
    assert out == [float(it.num_tokens) for it in items]
    suffixes = [sorted(it.num_tokens - 20 for it in bt) for bt in rec.batches[1:]]
    assert suffixes == [[2, 3, 40, 41]]  # one batch (budget 1000); the chunks are two units
    assert obs.saved == 20 + 20
    # The batcher prices two prefix rows: 2 prefixes x 20 + 4 suffixes x 41.
    assert obs.padded == 2 * 20 + 4 * 41 + 1


async def test_a_group_over_the_budget_runs_as_chunks_that_each_fit() -> None:
    items = group_items(0, 20, [10] * 9)  # cost 20 + 9 * 10 = 110 > 64
    rec, obs = Recorder(), Observed()
    out = await run_batcher(rec, obs, 64, items)
    assert out == [30.0] * 9
    batches = rec.batches[1:]
    assert [len(bt) for bt in batches] == [4, 4, 1]  # 20 + 4 * 10 = 60 fits, 5 would not
    assert all(batch_cost(bt) <= 64 for bt in batches)
    assert obs.saved == 3 * 20 + 3 * 20  # the last chunk of one shares nothing


async def test_groups_whose_prefix_does_not_pay_sort_as_single_items() -> None:
    items = [EncodedItem(tuple([1, 2] + [3] * n), truncated=False, group=4) for n in (30, 1, 29, 2)]
    rec, obs = Recorder(), Observed()
    await run_batcher(rec, obs, 64, items)
    lengths = [[it.num_tokens for it in bt] for bt in rec.batches[1:]]
    # By length, not by group; the batch holding the oldest item (the 32-token one) runs first.
    assert lengths == [[31, 32], [3, 4]]
    assert obs.saved == 0


# -- the engine: groups by prompt, reports the saving ----------------------------------------------


async def engine_for(backend: TorchRewardBackend) -> RewardEngine:
    engine = RewardEngine(lambda: backend, EngineConfig())
    await engine.start()
    return engine


def saved(engine: RewardEngine) -> float:
    return engine.metrics.registry.get_sample_value("rlhf_reward_prefix_tokens_saved_total") or 0.0


async def test_engine_groups_a_requests_items_by_prompt_and_counts_saved_tokens(tiny_llama_dir: Path) -> None:
    backend = TorchRewardBackend(tiny_llama_dir, device="cpu")
    engine = await engine_for(backend)
    prompt_a, prompt_b = words(12), (ChatMessage("user", words(10, 9)),)
    inputs = [RewardInput(prompt=prompt_a, response=words(n, n)) for n in (2, 6, 9, 3)]
    inputs += [RewardInput(prompt=prompt_b, response=words(n)) for n in (4, 8)]
    inputs += [RewardInput(text=words(10)), RewardInput(prompt=words(5), response="dog")]
    outcome = await engine.score(inputs)
    enc = backend.encode(inputs)
    expected = 3 * backend.shared_prefix_len(enc[:4]) + 1 * backend.shared_prefix_len(enc[4:6])
    assert backend.shared_prefix_len(enc[:4]) >= 30 and not any(e.truncated for e in enc)
    assert saved(engine) == expected
    scores = [r.score for r in outcome.results]  # type: ignore[union-attr]
    np.testing.assert_allclose(scores, Reference(tiny_llama_dir)(enc), atol=TOL, rtol=0)

    before = saved(engine)
    responses = [words(n, 3 * n) for n in (1, 5, 9)]
    cmp = await engine.compare(prompt_a, responses)
    enc_cmp = backend.encode([RewardInput(prompt=prompt_a, response=r) for r in responses])
    assert saved(engine) - before == 2 * backend.shared_prefix_len(enc_cmp) > 0
    np.testing.assert_allclose(cmp.scores, Reference(tiny_llama_dir)(enc_cmp), atol=TOL, rtol=0)

    # Conversations sharing all but their last message are one prompt too.
    before = saved(engine)
    head = (ChatMessage("system", words(5)), ChatMessage("user", words(8, 4)))
    conv = [RewardInput(messages=(*head, ChatMessage("assistant", words(n)))) for n in (3, 7)]
    await engine.score(conv)
    assert saved(engine) - before == backend.shared_prefix_len(backend.encode(conv)) > 0
    await engine.stop()


async def test_engine_without_sharing_groups_nothing(tiny_llama_dir: Path, tiny_bert_dir: Path) -> None:
    for backend in (
        TorchRewardBackend(tiny_llama_dir, device="cpu", prefix_sharing=False),
        TorchRewardBackend(tiny_bert_dir, device="cpu"),
    ):
        engine = await engine_for(backend)
        await engine.score([RewardInput(prompt=words(12), response=words(n)) for n in (2, 6, 9)])
        assert saved(engine) == 0
        await engine.stop()
