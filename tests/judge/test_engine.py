"""Judge engine protocols against the scripted fake, in virtual time (FakeClock)."""

from __future__ import annotations

import asyncio
import math

import pytest

from services.common.errors import ErrorCode, ServiceError
from services.judge.backends.base import UnparseableReply
from services.judge.backends.scripted import Failures, ScriptedBackend, parse_prompt
from services.judge.engine import FakeClock, JudgeEngine, JudgeEngineConfig
from services.judge.engine.ranking import bradley_terry, pairs_to_judge
from services.judge.metrics import JudgeMetrics
from services.judge.types import (
    Abstain,
    CompareInput,
    CompareResult,
    GradeInput,
    GradeResult,
    RankInput,
    RankResult,
    Usage,
    VerdictQuery,
    VerdictReply,
)
from services.runtime.chat import ChatMessage

GOOD, BAD = "[good] Paris is the capital of France.", "[bad] It is Lyon."


async def make(backend: ScriptedBackend, clock: FakeClock, **cfg: object) -> JudgeEngine:
    engine = JudgeEngine(lambda: backend, JudgeEngineConfig(**cfg), clock=clock)  # type: ignore[arg-type]
    await engine.start()
    return engine


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def metric(engine: JudgeEngine, name: str, labels: dict[str, str] | None = None) -> float:
    value = engine.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def test_always_first_provider_both_orders_gives_half_and_inconsistent(clock: FakeClock) -> None:
    backend = ScriptedBackend(policy="always_first", clock=clock)
    engine = await make(backend, clock)
    r = await engine.compare(CompareInput("Capital of France?", (GOOD, BAD)))
    assert isinstance(r, CompareResult)
    assert r.preference == pytest.approx(0.5) and r.winner is None and r.consistent is False
    assert backend.call_count == 2 and r.usage.calls == 2 and not r.cached
    assert metric(engine, "rlhf_judge_position_consistency_total", {"outcome": "inconsistent"}) == 1
    assert metric(engine, "rlhf_judge_first_position_total", {"outcome": "first"}) == 2


async def test_always_better_provider_gives_right_preference_and_consistent(clock: FakeClock) -> None:
    engine = await make(ScriptedBackend(clock=clock), clock)
    expected = 1 / (1 + math.exp(-2.0))  # scripted: sigmoid of the score gap (markers +1 / -1)
    for responses, p, winner in (((GOOD, BAD), expected, 0), ((BAD, GOOD), 1 - expected, 1)):
        r = await engine.compare(CompareInput("Capital of France?", responses))
        assert isinstance(r, CompareResult)
        assert r.preference == pytest.approx(p, abs=1e-5) and r.winner == winner
        assert r.consistent is True and r.soft is True
        assert r.confidence == pytest.approx(abs(2 * r.preference - 1))
    assert metric(engine, "rlhf_judge_position_consistency_total", {"outcome": "consistent"}) == 2


async def test_single_protocol_maps_back_in_both_orders(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock, soft=False)
    engine = await make(backend, clock)
    shown_first: set[str] = set()
    # many pairs, so both physical orders get chosen; each must be mapped back to the truth
    for k in range(16):
        good, bad = f"[good] answer {k}", f"[bad] answer {k}"
        for responses, winner in (((good, bad), 0), ((bad, good), 1)):
            before = backend.call_count
            r = await engine.compare(CompareInput("Q?", responses, protocol="single"))
            assert isinstance(r, CompareResult)
            assert r.winner == winner and r.preference == (1.0 if winner == 0 else 0.0)
            assert r.soft is False and r.consistent is True
            if backend.call_count > before:
                sections, _ = parse_prompt(backend.calls[-1].query.messages[1].content)
                shown_first.add("good" if "[good]" in sections["RESPONSE_A"] else "bad")
    assert shown_first == {"good", "bad"}
    # one call per comparison
    assert backend.call_count == 32


async def test_tie_margin(clock: FakeClock) -> None:
    # scores differ by 0.1 → p = sigmoid(0.1) ≈ 0.525: inside the default margin 0.05, outside 0.01
    def score(text: str) -> float:
        return 0.1 if "x" in text else 0.0

    for margin, winner in ((0.05, None), (0.01, 0)):
        engine = await make(ScriptedBackend(clock=clock, score=score), clock, tie_margin=margin)
        r = await engine.compare(CompareInput("Q?", ("x", "y")))
        assert isinstance(r, CompareResult)
        assert r.preference == pytest.approx(1 / (1 + math.exp(-0.1)))
        assert r.winner == winner


async def test_rationale_clamps_probabilities(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock, soft=False)  # hard 0/1 verdicts
    engine = await make(backend, clock, rationale=True, clamp=(0.1, 0.8))
    r = await engine.compare(CompareInput("Q?", (GOOD, BAD)))
    assert isinstance(r, CompareResult)
    # per call: P(A) clamped to [0.1, 0.8]: order ab 1 → 0.8, order ba 0 → 0.1 (P(a) = 0.9); mean 0.85
    assert r.preference == pytest.approx(0.85) and r.winner == 0
    assert r.rationale is not None and "scripted rationale" in r.rationale
    assert all(c.query.rationale for c in backend.calls)
    assert "explain your reasoning" in backend.calls[0].query.messages[1].content
    # without a rationale the clamp is not applied
    engine = await make(ScriptedBackend(clock=clock, soft=False), clock, clamp=(0.1, 0.8))
    r = await engine.compare(CompareInput("Q?", (GOOD, BAD)))
    assert isinstance(r, CompareResult) and r.preference == 1.0 and r.rationale is None


async def test_grade_expected_value_and_hard_choice(clock: FakeClock) -> None:
    def policy(query: VerdictQuery, sections: dict[str, str]) -> VerdictReply:
        assert query.choices == ("1", "2", "3", "4", "5")
        # unnormalised mass on two grades: 4 (0.3) and 5 (0.1) → renormalised 0.75 / 0.25
        return VerdictReply("4", {"4": 0.3, "5": 0.1, "x": 0.6}, True, "4", usage=Usage(100, 1))

    engine = await make(ScriptedBackend(policy=policy, clock=clock), clock)
    r = await engine.grade(GradeInput("Q?", "an answer"))
    assert isinstance(r, GradeResult)
    assert r.raw == pytest.approx(4.25) and r.score == pytest.approx((4.25 - 1) / 4) and r.soft

    def hard(query: VerdictQuery, sections: dict[str, str]) -> VerdictReply:
        return VerdictReply("7", None, False, "7")

    engine = await make(ScriptedBackend(policy=hard, clock=clock), clock)
    r = await engine.grade(GradeInput("Q?", "an answer", scale=(0, 9)))
    assert isinstance(r, GradeResult) and r.raw == 7 and r.score == pytest.approx(7 / 9) and not r.soft


async def test_grade_reference_template(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock)
    engine = await make(backend, clock)
    await engine.grade(GradeInput("Q?", "[good] a", reference="the reference"))
    user = backend.calls[-1].query.messages[1].content
    sections, _ = parse_prompt(user)
    assert sections["REFERENCE"] == "the reference" and sections["RESPONSE"] == "[good] a"
    await engine.compare(CompareInput("Q?", ("a", "b"), reference="ref two"))
    assert parse_prompt(backend.calls[-1].query.messages[1].content)[0]["REFERENCE"] == "ref two"


async def test_rank_recovers_known_order(clock: FakeClock) -> None:
    texts = tuple(f"answer {'[good]' * k}" for k in (2, 0, 4, 1, 3))  # quality = number of markers
    engine = await make(ScriptedBackend(clock=clock), clock)
    r = await engine.rank(RankInput("Q?", texts))
    assert isinstance(r, RankResult)
    assert r.ranking == [2, 4, 0, 3, 1]
    assert r.consistent_rate == 1.0 and r.usage.calls == 2 * 10
    assert sorted(r.scores, reverse=True) == [r.scores[i] for i in r.ranking]


async def test_rank_balanced_sample_for_large_n(clock: FakeClock) -> None:
    n = 12
    texts = tuple(f"r{k} " + "[good]" * k for k in range(n))
    backend = ScriptedBackend(clock=clock)
    engine = await make(backend, clock, rank_max_pairs=24)
    r = await engine.rank(RankInput("Q?", texts))
    assert isinstance(r, RankResult)
    assert backend.call_count == 2 * 24  # 24 pairs (n * 2 offsets), both orders
    assert r.ranking == list(range(n - 1, -1, -1))
    pairs = pairs_to_judge(n, 24, seed=3)
    counts = [sum(i in p for p in pairs) for i in range(n)]
    assert set(counts) == {4}


def test_bradley_terry_defined_when_one_wins_everything() -> None:
    scores = bradley_terry(3, [(0, 1, 1.0), (0, 2, 1.0), (1, 2, 1.0)])
    assert all(math.isfinite(s) for s in scores) and scores[0] > scores[1] > scores[2]
    assert sum(scores) == pytest.approx(0.0, abs=1e-9)
    # soft outcomes: P(0 beats 1) = 0.7 alone → θ0 - θ1 ≈ logit(0.7) (the prior is tiny)
    s = bradley_terry(2, [(0, 1, 0.7)])
    assert s[0] - s[1] == pytest.approx(math.log(0.7 / 0.3), rel=0.01)


async def test_principles_one_is_deterministic_and_ensemble_averages(clock: FakeClock) -> None:
    principles = ("Prefer the more honest response.", "Prefer the more concise response.", "Prefer kindness.")
    backend = ScriptedBackend(clock=clock)
    engine = await make(backend, clock, principles=principles)
    await engine.compare(CompareInput("Q?", (GOOD, BAD)))
    used = {p for p in principles for c in backend.calls if p in c.query.messages[1].content}
    assert len(used) == 1
    # the same item (either order) gets the same principle; calls come from the cache-free single run
    await engine.compare(CompareInput("Q?", (BAD, GOOD)))
    used2 = {p for p in principles for c in backend.calls[2:] if p in c.query.messages[1].content}
    assert used2 == used

    seen: list[str] = []

    def policy(query: VerdictQuery, sections: dict[str, str]) -> VerdictReply:
        user = query.messages[1].content
        p = next(p for p in principles if p in user)
        seen.append(p)
        first_good = "[good]" in sections["RESPONSE_A"]
        strength = {principles[0]: 0.9, principles[1]: 0.6, principles[2]: 0.75}[p]
        pa = strength if first_good else 1 - strength
        return VerdictReply("A" if pa > 0.5 else "B", {"A": pa, "B": 1 - pa}, True, "")

    engine = await make(ScriptedBackend(policy=policy, clock=clock), clock, principles=principles,
                        principle_mode="ensemble", ensemble_k=3)  # fmt: skip
    r = await engine.compare(CompareInput("Q?", (GOOD, BAD)))
    assert isinstance(r, CompareResult)
    assert r.preference == pytest.approx((0.9 + 0.6 + 0.75) / 3) and r.usage.calls == 6
    assert sorted(set(seen)) == sorted(principles)
    # request principles override the configured ones
    seen.clear()
    r = await engine.compare(CompareInput("Q2?", (GOOD, BAD), principles=(principles[1],)))
    assert isinstance(r, CompareResult) and r.preference == pytest.approx(0.6) and set(seen) == {principles[1]}


async def test_unparseable_retried_then_abstain(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock, failures=Failures(unparseable=1.0))
    engine = await make(backend, clock, max_parse_retries=2)
    r = await engine.compare(CompareInput("Q?", (GOOD, BAD), protocol="single"))
    assert isinstance(r, Abstain)
    assert r.reason.startswith("unparseable: ") and r.usage.calls == 3 and r.judge is not None
    assert backend.call_count == 3  # 1 + 2 re-asks, never a default label
    assert metric(engine, "rlhf_judge_abstentions_total", {"reason": "unparseable"}) == 1
    assert metric(engine, "rlhf_judge_upstream_requests_total", {"status": "unparseable"}) == 3

    # a reply that names none of the choices is unparseable too
    def wrong(query: VerdictQuery, sections: dict[str, str]) -> VerdictReply:
        return VerdictReply("C", None, False, "C")

    engine = await make(ScriptedBackend(policy=wrong, clock=clock), clock, max_parse_retries=1)
    g = await engine.grade(GradeInput("Q?", "a"))
    assert isinstance(g, Abstain) and g.reason.startswith("unparseable") and g.usage.calls == 2


async def test_upstream_failure_after_retries_is_abstain(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock, failures=Failures(server_error=1.0))
    engine = await make(backend, clock, max_retries=3)
    r = await engine.compare(CompareInput("Q?", (GOOD, BAD)))
    assert isinstance(r, Abstain) and r.reason.startswith("upstream: 500")
    assert backend.call_count == 2 * 4  # both orders, 1 + 3 retries each
    assert metric(engine, "rlhf_judge_upstream_requests_total", {"status": "error_500"}) == 8


async def test_budget_exhaustion_answers_resource_exhausted(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock, model="gpt-4o-mini")
    engine = await make(backend, clock, max_tokens_total=500)
    r = await engine.compare(CompareInput("Q?", (GOOD, BAD)))  # ~2 x 330 tokens: over the budget after
    assert isinstance(r, CompareResult)
    assert r.usage.prompt_tokens > 0 and r.usage.cost_usd == pytest.approx(
        (r.usage.prompt_tokens * 0.15 + r.usage.completion_tokens * 0.60) / 1e6
    )
    assert metric(engine, "rlhf_judge_cost_usd_total") == pytest.approx(r.usage.cost_usd)
    with pytest.raises(ServiceError) as exc:
        await engine.compare(CompareInput("Q?", ("x", "y")))
    assert exc.value.code is ErrorCode.RESOURCE_EXHAUSTED and "budget" in exc.value.message


async def test_queue_full_answers_resource_exhausted_with_retry_after(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock, latency=5.0)
    engine = await make(backend, clock, max_queue_items=3, max_concurrency=1, rpm=60)
    first = asyncio.create_task(engine.compare(CompareInput("Q?", (GOOD, BAD))))  # 2 calls queued
    await asyncio.sleep(0)
    assert engine.queue_depth == 2
    with pytest.raises(ServiceError) as exc:
        await engine.compare(CompareInput("Q2?", (GOOD, BAD)))  # 2 more would make 4 > 3
    assert exc.value.code is ErrorCode.RESOURCE_EXHAUSTED and exc.value.retry_after is not None
    assert exc.value.retry_after >= 1
    single = await engine.compare(CompareInput("Q3?", (GOOD, BAD), protocol="single"))  # 1 fits
    assert isinstance(single, CompareResult)
    assert isinstance(await first, CompareResult) and engine.queue_depth == 0


async def test_deadline(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock, latency=10.0)
    engine = await make(backend, clock, max_concurrency=1)
    # passed already → DEADLINE_EXCEEDED
    with pytest.raises(ServiceError) as exc:
        await engine.compare(CompareInput("Q?", (GOOD, BAD)), deadline=clock.now() - 1)
    assert exc.value.code is ErrorCode.DEADLINE_EXCEEDED
    # room for one 10 s call but not two (concurrency 1): the first order ran → partial → Abstain
    r = await engine.compare(CompareInput("Q?", (GOOD, BAD)), deadline=clock.now() + 15)
    assert isinstance(r, Abstain) and r.reason.startswith("deadline")
    # rate-limited wait that would pass the deadline: give up at once, no call made → DEADLINE_EXCEEDED
    backend2 = ScriptedBackend(clock=clock)
    engine2 = await make(backend2, clock, rpm=6)  # 1 call per 10 s
    assert isinstance(await engine2.compare(CompareInput("Q?", ("a", "b")), deadline=None), CompareResult)
    start = clock.now()
    with pytest.raises(ServiceError) as exc:
        await engine2.compare(CompareInput("Q2?", ("a", "b"), protocol="single"), deadline=start + 3)
    assert exc.value.code is ErrorCode.DEADLINE_EXCEEDED and clock.now() == start  # no waiting in vain


async def test_validation(clock: FakeClock) -> None:
    engine = await make(ScriptedBackend(clock=clock), clock)
    bad = [
        lambda: engine.compare(CompareInput("", ("a", "b"))),
        lambda: engine.compare(CompareInput((), ("a", "b"))),
        lambda: engine.compare(CompareInput((ChatMessage("robot", "hi"),), ("a", "b"))),
        lambda: engine.compare(CompareInput("Q", ("a",))),  # type: ignore[arg-type]
        lambda: engine.compare(CompareInput("Q", ("a", "b"), protocol="triple")),  # type: ignore[arg-type]
        lambda: engine.compare(CompareInput("Q", ("a", "b"), rubric="")),
        lambda: engine.compare(CompareInput("Q", ("a", "b"), reference="")),
        lambda: engine.compare(CompareInput("Q", ("a", "b"), principles=("",))),
        lambda: engine.rank(RankInput("Q", ("a",))),
        lambda: engine.grade(GradeInput("Q", "a", scale=(5, 5))),
        lambda: engine.grade(GradeInput("Q", "a", scale=(1, 10))),
    ]
    for make_call in bad:
        with pytest.raises(ServiceError) as exc:
            await make_call()
        assert exc.value.code is ErrorCode.INVALID_ARGUMENT
    # empty responses are judged, not rejected; messages prompts work
    prompt = (ChatMessage("system", "Be brief."), ChatMessage("user", "Capital of France?"))
    assert isinstance(await engine.compare(CompareInput(prompt, ("", "[good] Paris"))), CompareResult)
    assert isinstance(await engine.grade(GradeInput(prompt, "")), GradeResult)


async def test_lifecycle_and_info(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock)
    engine = JudgeEngine(lambda: backend, JudgeEngineConfig(), clock=clock, metrics=JudgeMetrics())
    assert not engine.ready and engine.live
    with pytest.raises(ServiceError) as exc:
        await engine.compare(CompareInput("Q", ("a", "b")))
    assert exc.value.code is ErrorCode.UNAVAILABLE
    await engine.start()
    assert engine.ready and metric(engine, "rlhf_judge_ready") == 1
    assert engine.info.backend == "scripted" and len(engine.info.template_hash) == 12
    assert engine.limits.max_queue_items == 10_000 and engine.limits.grade_scale_bounds == (0, 9)
    assert await engine.drain(1.0) is True and not engine.ready
    with pytest.raises(ServiceError) as exc:
        await engine.compare(CompareInput("Q", ("a", "b")))
    assert exc.value.code is ErrorCode.UNAVAILABLE
    await engine.stop()
    assert backend.closed and not engine.live


async def test_single_flight_shares_one_call(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock, latency=1.0)
    engine = await make(backend, clock)
    results = await asyncio.gather(*(engine.compare(CompareInput("Q?", (GOOD, BAD))) for _ in range(5)))
    assert backend.call_count == 2
    prefs = {r.preference for r in results if isinstance(r, CompareResult)}
    assert len(prefs) == 1 and len(results) == 5
    assert sum(r.usage.calls for r in results) == 2  # charged once


def test_config_validation() -> None:
    for kwargs in ({"tie_margin": 0.5}, {"clamp": (0.9, 0.1)}, {"max_concurrency": 0}, {"rpm": 0},
                   {"principle_mode": "all"}, {"principles": ("",)}):  # fmt: skip
        with pytest.raises(ValueError):
            JudgeEngineConfig(**kwargs)


async def test_slow_provider_call_times_out_and_is_retried(clock: FakeClock) -> None:
    backend = ScriptedBackend(clock=clock, latency=10.0)
    engine = await make(backend, clock, call_timeout_s=2.0, max_retries=1)
    start = clock.now()
    r = await engine.compare(CompareInput("Q?", (GOOD, BAD), protocol="single"))
    assert isinstance(r, Abstain) and r.reason.startswith("upstream: provider call timed out")
    assert backend.call_count == 2 and clock.now() - start < 10  # never waited for the slow reply
    assert metric(engine, "rlhf_judge_upstream_requests_total", {"status": "timeout"}) == 2


async def test_rank_leaves_out_abstained_pairs_or_abstains(clock: FakeClock) -> None:
    def policy(query: VerdictQuery, sections: dict[str, str]) -> VerdictReply:
        a, b = sections["RESPONSE_A"], sections["RESPONSE_B"]
        if "[broken]" in a + b and ("x" in a + b or "[all]" in a + b):
            raise UnparseableReply("?", "no verdict")
        pa = 0.8 if a.count("[good]") > b.count("[good]") else 0.2
        return VerdictReply("A" if pa > 0.5 else "B", {"A": pa, "B": 1 - pa}, True, "")

    engine = await make(ScriptedBackend(policy=policy, clock=clock), clock, max_parse_retries=0)
    # only the pair ([broken], x) fails: every response is still in a judged pair
    r = await engine.rank(RankInput("Q?", ("[good][good][broken]", "[good]", "x")))
    assert isinstance(r, RankResult) and r.ranking == [0, 1, 2] and r.usage.calls == 6
    # every pair with the [broken][all] response fails: it can't be ranked → abstain
    a = await engine.rank(RankInput("Q?", ("[broken][all]", "[good]", "y")))
    assert isinstance(a, Abstain) and a.reason.startswith("unparseable")
