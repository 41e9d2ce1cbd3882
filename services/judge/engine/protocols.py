"""The judging protocols: how a compare, a rank or a grade becomes verdict queries, and how the
verdicts become its result.

- **compare** ``both_orders`` asks (a, b) and (b, a) and averages P(a better) after undoing the
  flip (position debiasing; ``consistent`` says whether both orders picked the same side);
  ``single`` asks one order, chosen from a hash of the pair, so the same pair is always asked the
  same physical way round. ``winner`` is None inside the tie margin ``|p - 0.5| < tie_margin``.
- **rank** judges every pair in both orders (a balanced sample of pairs above ``rank_max_pairs``)
  and fits Bradley-Terry log-strengths; pairs that abstained are left out of the fit.
- **grade** takes the expected grade under the verdict distribution over the scale's digits (the
  parsed digit when the judge gave no probabilities) and maps it to [0, 1].
- **principles** (the request's, else the server's constitution): one per item, chosen from a
  hash of the item, or an ensemble of ``ensemble_k`` whose verdicts are averaged.

Soft labels: a verdict's distribution over its choices, renormalised; a hard label (no
probabilities) makes the result ``soft: false``. With a rationale each verdict probability is
clamped to ``clamp``. Items are hashed order-free, so compare(a, b), compare(b, a) and rank share
their provider calls (and cache entries).

When a verdict behind a result fails, the result stands for the worst failure
(:func:`worst_failure`): an :class:`Abstain`, or ``DEADLINE_EXCEEDED`` when the deadline passed
before any work was done.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import ErrorCode, ServiceError
from services.judge.backends.base import JudgeBackend
from services.judge.engine.config import JudgeEngineConfig
from services.judge.engine.prompts import TemplateSet, escape_data, prompt_json, sha256_hex
from services.judge.engine.ranking import bradley_terry, pairs_to_judge, ranking_from_scores
from services.judge.engine.verdicts import CallOutcome, Failure, Verdict, VerdictCaller
from services.judge.metrics import JudgeMetrics
from services.judge.types import (
    Abstain,
    CompareInput,
    CompareResult,
    GradeInput,
    GradeResult,
    JudgePrompt,
    JudgeRef,
    RankInput,
    RankResult,
    Usage,
    VerdictQuery,
    VerdictReply,
)

__all__ = ["PairJudgment", "Protocols", "worst_failure"]

Pair = tuple[int, int]
_NONCE_STANDIN = "0" * 16  # an item's nonce is 16 hex digits (see judge_pair)


@dataclass(frozen=True)
class PairJudgment:
    """P(first given response better) over the orders and principles judged for one pair."""

    preference: float
    consistent: bool
    soft: bool
    cached: bool
    usage: Usage
    rationale: str | None


def worst_failure(results: Sequence[Verdict | PairJudgment | Failure]) -> Failure:
    """One failure standing for ``results`` (verdicts, pair judgments, failures), at least one failed.

    The first failure that is not a deadline (it says more about the judge than running out of
    time), else the first one; the usage of every result; ``worked`` when any provider call was
    attempted or any result succeeded (so a deadline is partial work, an abstain, not a 504).
    """
    failures = [r for r in results if isinstance(r, Failure)]
    usage = sum((r.usage for r in results), Usage())
    worst = next((f for f in failures if f.kind != "deadline"), failures[0])
    worked = any(f.worked for f in failures) or len(failures) < len(results)
    return Failure(worst.kind, worst.reason, usage, worked)


class Protocols:
    """The three protocols over one :class:`VerdictCaller`; the engine admits, then calls these."""

    def __init__(
        self, config: JudgeEngineConfig, templates: TemplateSet, metrics: JudgeMetrics, verdicts: VerdictCaller
    ) -> None:
        self.config = config
        self.templates = templates
        self.metrics = metrics
        self.verdicts = verdicts

    # -- planning: how many provider calls a request makes (admission counts them first) -----------

    def principle_count(self, requested: tuple[str, ...]) -> int:
        """How many principles each item is judged by (1 without principles)."""
        pool = requested or self.config.principles
        if not pool or self.config.principle_mode == "one":
            return 1
        return min(self.config.ensemble_k, len(pool))

    def compare_calls(self, req: CompareInput) -> int:
        """Provider calls of a compare: one per order and principle."""
        orders = 2 if req.protocol == "both_orders" else 1
        return orders * self.principle_count(req.principles)

    def grade_calls(self, req: GradeInput) -> int:
        """Provider calls of a grade: one per principle."""
        return self.principle_count(req.principles)

    def rank_pairs(self, req: RankInput) -> list[Pair]:
        """The pairs rank judges (all, or a balanced sample seeded by the request's content)."""
        seed_hash = sha256_hex({"kind": "rank", "prompt": prompt_json(req.prompt), "texts": sorted(req.responses)})
        return pairs_to_judge(len(req.responses), self.config.rank_max_pairs, int(seed_hash[:8], 16) ^ self.config.seed)

    def rank_calls(self, req: RankInput, pairs: Sequence[Pair]) -> int:
        """Provider calls of a rank over ``pairs``: both orders of each, per principle."""
        return 2 * len(pairs) * self.principle_count(req.principles)

    def longest_prompt_chars(self, req: CompareInput | RankInput | GradeInput) -> int:
        """Characters of the longest prompt ``req`` can send (all its messages, as rendered).

        Every verdict query of a request shares its prompt, reference and rubric and differs only
        in its principle and its one or two responses, and a rendered prompt only grows with each
        of them: so the query with the longest (escaped) principle and responses is rendered, once,
        and measured (a nonce of the real length stands in for the item's).
        """
        pool = req.principles or self.config.principles
        principle = max(pool, key=lambda p: len(escape_data(p))) if pool else None
        criteria = self.templates.criteria(req.rubric, principle, nonce=_NONCE_STANDIN)
        if isinstance(req, GradeInput):
            messages = self.templates.grade(
                prompt=req.prompt, response=req.response, reference=req.reference, criteria=criteria,
                scale=req.scale, nonce=_NONCE_STANDIN, rationale=self.config.rationale,
            )  # fmt: skip
        else:
            by_size = sorted(req.responses, key=lambda r: len(escape_data(r)), reverse=True)
            messages = self.templates.pairwise(
                prompt=req.prompt, first=by_size[0], second=by_size[1], reference=req.reference, criteria=criteria,
                nonce=_NONCE_STANDIN, rationale=self.config.rationale,
            )  # fmt: skip
        return sum(len(m.content) for m in messages)

    # -- the protocols ----------------------------------------------------------------------------

    async def compare(
        self, backend: JudgeBackend, judge: JudgeRef, req: CompareInput, deadline: float | None
    ) -> CompareResult | Abstain:
        """P(responses[0] better than responses[1]); ``winner`` None inside the tie margin."""
        a, b = req.responses
        out = await self.judge_pair(backend, req, a, b, protocol=req.protocol, deadline=deadline)
        if isinstance(out, Failure):
            return self.abstain(out, judge)
        p = out.preference
        winner = None if abs(p - 0.5) < self.config.tie_margin else (0 if p > 0.5 else 1)
        return CompareResult(
            preference=p, winner=winner, consistent=out.consistent, soft=out.soft, judge=judge,
            usage=out.usage, cached=out.cached, rationale=out.rationale,
        )  # fmt: skip

    async def rank(
        self, backend: JudgeBackend, judge: JudgeRef, req: RankInput, pairs: Sequence[Pair], deadline: float | None
    ) -> RankResult | Abstain:
        """Bradley-Terry log-strengths from pairwise judgments in both orders; ranking best first.

        Pairs whose judgment abstained are left out of the fit; when that leaves some response
        in no judged pair, the whole rank abstains (standing for the worst failure).
        """
        results = await asyncio.gather(
            *(
                self.judge_pair(backend, req, req.responses[i], req.responses[j], protocol="both_orders",
                                deadline=deadline)
                for i, j in pairs
            )
        )  # fmt: skip
        n = len(req.responses)
        outcomes: list[tuple[int, int, float]] = []
        covered: set[int] = set()
        judged: list[PairJudgment] = []
        for (i, j), r in zip(pairs, results, strict=True):
            if isinstance(r, PairJudgment):
                outcomes.append((i, j, r.preference))
                covered.update((i, j))
                judged.append(r)
        if len(covered) < n:
            return self.abstain(worst_failure(results), judge)
        for r in results:
            if isinstance(r, Failure):
                self.metrics.on_abstain(r.kind)
        scores = bradley_terry(n, outcomes)
        return RankResult(
            scores=scores,
            ranking=ranking_from_scores(scores),
            judge=judge,
            usage=sum((r.usage for r in results), Usage()),
            cached=all(r.cached for r in judged),
            consistent_rate=sum(r.consistent for r in judged) / len(judged),
        )

    async def grade(
        self, backend: JudgeBackend, judge: JudgeRef, req: GradeInput, deadline: float | None
    ) -> GradeResult | Abstain:
        """The expected grade on ``scale`` (hard choice without probabilities), mapped to [0, 1]."""
        lo, hi = req.scale
        item_hash = sha256_hex({"kind": "grade", "prompt": prompt_json(req.prompt), "response": req.response,
                                "rubric": req.rubric, "reference": req.reference, "scale": [lo, hi]})  # fmt: skip
        nonce = sha256_hex(["nonce", item_hash])[:16]
        choices = tuple(str(v) for v in range(lo, hi + 1))
        rationale = self.config.rationale

        async def one(principle: str | None) -> CallOutcome:
            messages = self.templates.grade(
                prompt=req.prompt, response=req.response, reference=req.reference,
                criteria=self.templates.criteria(req.rubric, principle, nonce=nonce), scale=(lo, hi), nonce=nonce,
                rationale=rationale,
            )  # fmt: skip
            query = VerdictQuery(messages, choices, rationale, 512 if rationale else 8)
            meta = {"kind": "grade", "rubric": req.rubric, "principle": principle, "reference": req.reference}
            return await self.verdicts.verdict(backend, query, meta, deadline)

        outcomes = await asyncio.gather(*(one(p) for p in self._principles(req.principles, item_hash)))
        verdicts = [o for o in outcomes if isinstance(o, Verdict)]
        if len(verdicts) < len(outcomes):
            return self.abstain(worst_failure(outcomes), judge)
        values = [_expected_grade(v.reply, choices) for v in verdicts]
        raw = sum(x for x, _ in values) / len(values)
        return GradeResult(
            score=(raw - lo) / (hi - lo), raw=raw, soft=all(s for _, s in values), judge=judge,
            usage=sum((o.usage for o in outcomes), Usage()), cached=all(v.cached for v in verdicts),
            rationale=_rationales(verdicts),
        )  # fmt: skip

    def abstain(self, failure: Failure, judge: JudgeRef | None) -> Abstain:
        """The result standing for ``failure``: DEADLINE_EXCEEDED when no work was done, else an abstain."""
        if failure.kind == "deadline" and not failure.worked:
            raise ServiceError(ErrorCode.DEADLINE_EXCEEDED, "deadline passed before a judgment was made")
        self.metrics.on_abstain(failure.kind)
        return Abstain(reason=failure.reason, judge=judge, usage=failure.usage)

    # -- one pair ---------------------------------------------------------------------------------

    async def judge_pair(
        self,
        backend: JudgeBackend,
        req: CompareInput | RankInput,
        a: str,
        b: str,
        *,
        protocol: str,
        deadline: float | None,
    ) -> PairJudgment | Failure:
        """P(a better than b), two of ``req``'s responses, over the principles chosen for the pair and
        the orders of ``protocol``."""
        item_hash = _pair_hash(req.prompt, a, b, req.rubric, req.reference)
        nonce = sha256_hex(["nonce", item_hash])[:16]
        if protocol == "both_orders":
            orders = [False, True]  # flipped?
        else:
            # One order, chosen from the item hash; the same physical order whichever way round
            # the caller passed the pair.
            lo_first = int(sha256_hex(["order", self.config.seed, item_hash])[:8], 16) % 2 == 0
            orders = [(a > b) == lo_first] if a != b else [False]
        plan = [(p, flipped) for p in self._principles(req.principles, item_hash) for flipped in orders]

        async def one(principle: str | None, flipped: bool) -> CallOutcome:
            first, second = (b, a) if flipped else (a, b)
            query = self._pair_query(req.prompt, first, second, req.rubric, req.reference, principle, nonce)
            meta = {"kind": "pairwise", "rubric": req.rubric, "principle": principle,
                    "order": "sorted" if first <= second else "reversed", "reference": req.reference}  # fmt: skip
            return await self.verdicts.verdict(backend, query, meta, deadline)

        outcomes = await asyncio.gather(*(one(p, f) for p, f in plan))
        verdicts = [o for o in outcomes if isinstance(o, Verdict)]
        if len(verdicts) < len(outcomes):
            return worst_failure(outcomes)
        return self._pair_judgment([f for _, f in plan], verdicts, both_orders=protocol == "both_orders")

    def _pair_query(
        self,
        prompt: JudgePrompt,
        first: str,
        second: str,
        rubric: str | None,
        reference: str | None,
        principle: str | None,
        nonce: str,
    ) -> VerdictQuery:
        rationale = self.config.rationale
        messages = self.templates.pairwise(
            prompt=prompt, first=first, second=second, reference=reference,
            criteria=self.templates.criteria(rubric, principle, nonce=nonce), nonce=nonce, rationale=rationale,
        )  # fmt: skip
        return VerdictQuery(messages=messages, choices=("A", "B"), rationale=rationale,
                            max_tokens=512 if rationale else 8)  # fmt: skip

    def _pair_judgment(self, flips: Sequence[bool], verdicts: Sequence[Verdict], *, both_orders: bool) -> PairJudgment:
        """The verdicts of one pair (``flips[k]``: verdict k saw the pair swapped) as P(a better)."""
        per_call: list[float] = []  # P(a better) per call, after undoing the flip
        soft = True
        for flipped, v in zip(flips, verdicts, strict=True):
            p_first, is_soft = _p_first(v.reply)
            soft = soft and is_soft
            if self.config.rationale:
                lo, hi = self.config.clamp
                p_first = min(hi, max(lo, p_first))
            if p_first != 0.5:
                self.metrics.on_first_position(p_first > 0.5)
            per_call.append(1 - p_first if flipped else p_first)
        if both_orders:
            for k in range(0, len(per_call), 2):
                self.metrics.on_consistency(_side(per_call[k]) == _side(per_call[k + 1]))
        return PairJudgment(
            # mean over orders within each principle, then over principles (same thing: equal counts)
            preference=sum(per_call) / len(per_call),
            consistent=len({_side(p) for p in per_call}) == 1,
            soft=soft,
            cached=all(v.cached for v in verdicts),
            usage=sum((v.usage for v in verdicts), Usage()),
            rationale=_rationales(verdicts),
        )

    def _principles(self, requested: tuple[str, ...], item_hash: str) -> list[str | None]:
        """The principles one item is judged by, chosen from its hash ([None]: the default criteria)."""
        pool = requested or self.config.principles
        if not pool:
            return [None]
        rng = random.Random(f"{self.config.seed}:{item_hash}")
        if self.config.principle_mode == "one":
            return [pool[rng.randrange(len(pool))]]
        k = min(self.config.ensemble_k, len(pool))
        return list(rng.sample(list(pool), k))


def _pair_hash(prompt: JudgePrompt, x: str, y: str, rubric: str | None, reference: str | None) -> str:
    """Order-independent: compare(a, b), compare(b, a) and rank share their calls (and cache)."""
    lo, hi = sorted((x, y))
    return sha256_hex({"kind": "pairwise", "prompt": prompt_json(prompt), "texts": [lo, hi],
                       "rubric": rubric, "reference": reference})  # fmt: skip


# -- verdict maths ------------------------------------------------------------------------------


def _dist(reply: VerdictReply, choices: Sequence[str]) -> tuple[dict[str, float], bool]:
    """The verdict distribution over ``choices`` (renormalised), and whether it is soft."""
    if reply.probs is not None:
        mass = {c: max(0.0, float(reply.probs.get(c, 0.0))) for c in choices}
        total = sum(mass.values())
        if total > 0:
            return {c: m / total for c, m in mass.items()}, reply.soft
    return {c: (1.0 if c == reply.choice else 0.0) for c in choices}, False


def _p_first(reply: VerdictReply) -> tuple[float, bool]:
    dist, soft = _dist(reply, ("A", "B"))
    return dist["A"], soft


def _expected_grade(reply: VerdictReply, choices: tuple[str, ...]) -> tuple[float, bool]:
    dist, soft = _dist(reply, choices)
    return sum(int(c) * p for c, p in dist.items()), soft


def _side(p: float) -> int:
    return (p > 0.5) - (p < 0.5)


def _rationales(verdicts: Sequence[Verdict]) -> str | None:
    texts = [v.reply.rationale for v in verdicts if v.reply.rationale]
    return "\n\n".join(texts) if texts else None
