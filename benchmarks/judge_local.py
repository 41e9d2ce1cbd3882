"""The local judge's protocol vs generate-then-parse, on the same model, pairs and prompts.

Two ways to get a both-orders verdict per pair out of one causal LM:

- **protocol** (what ``serve judge --backend local`` runs): :class:`JudgeEngine` with the
  :class:`LocalBackend` in process, ``compare(protocol="both_orders")`` for every pair submitted
  at once, so the backend's token-budget batcher runs many verdicts per forward pass, and each
  verdict is read from the next-token log-probabilities of ``A``/``B`` (one forward, no decoding).
- **generate** (the usual baseline): one pair at a time, for each order Hugging Face
  ``model.generate(max_new_tokens=8, do_sample=False)`` on the same rendered chat prompt, and the
  letter parsed from the text (the first ``A`` or ``B`` not inside a word).

Both use the judge's own template rendering: the generate side builds the queries with the
engine's template set and nonce rule, and the run checks that they are exactly the queries the
engine sent (``same_prompts``). Agreement is reported per verdict (the protocol's most likely
letter vs the generated letter, same prompt) and per pair (winners, ties included).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.judge.backends.base import UpstreamError
from services.judge.backends.local_backend import Dtype, LocalBackend
from services.judge.engine.config import JudgeEngineConfig
from services.judge.engine.prompts import prompt_json, sha256_hex
from services.judge.engine.service import JudgeEngine
from services.judge.types import CompareInput, CompareResult, VerdictQuery, VerdictReply
from services.runtime.chat import ChatMessage

MAX_NEW_TOKENS = 8
# A letter not inside a word: "A", " B.", "RESPONSE_A_" count; "Both", "Bread" do not.
_LETTER = re.compile(r"(?<![A-Za-z0-9])([AB])(?![A-Za-z0-9])")

Messages = tuple[ChatMessage, ...]
MessagesKey = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class JudgePair:
    """One pair to judge: the conversation so far and two candidate final replies."""

    prompt: Messages | str
    a: str
    b: str
    source: str = ""


class BenchInputError(ValueError):
    """The benchmark cannot run with these inputs (message says what to fix)."""


def load_hh_pairs(data_dir: Path, n: int, *, seed: int = 0) -> list[JudgePair]:
    """``n`` HH-RLHF test pairs (both files), a seeded sample; chosen first."""
    from rlhf_train.hh_rlhf import load_pairs

    try:
        pairs, _skipped = load_pairs(data_dir)
    except FileNotFoundError as exc:
        raise BenchInputError(str(exc)) from None
    if n > len(pairs):
        raise BenchInputError(f"--pairs {n}: only {len(pairs)} HH-RLHF pairs in {data_dir}")
    picked = random.Random(seed).sample(pairs, n)
    return [JudgePair(p.prompt, p.chosen, p.rejected, f"{p.source}:{p.index}") for p in picked]


def parse_letter(text: str) -> str | None:
    """The generate baseline's parser: the first ``A`` or ``B`` in the reply not inside a word
    (underscores and punctuation separate: SmolLM2 often answers ``<<<RESPONSE_A_``)."""
    m = _LETTER.search(text)
    return m.group(1) if m else None


def _key(messages: Sequence[ChatMessage]) -> MessagesKey:
    return tuple((m.role, m.content) for m in messages)


class _RecordingBackend:
    """The local backend, unchanged, noting each verdict the engine asked for (for agreement)."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.info = inner.info
        self.calls_per_verdict = inner.calls_per_verdict
        self.replies: dict[MessagesKey, VerdictReply] = {}

    def sampling_key(self) -> dict[str, object]:
        return self.inner.sampling_key()

    async def warmup(self) -> None:
        await self.inner.warmup()

    async def verdict(self, query: VerdictQuery) -> VerdictReply:
        reply = await self.inner.verdict(query)
        self.replies[_key(query.messages)] = reply
        return reply

    async def aclose(self) -> None:
        await self.inner.aclose()


def order_queries(engine: JudgeEngine, pair: JudgePair) -> tuple[VerdictQuery, VerdictQuery]:
    """The two verdict queries the engine sends for ``pair`` with both_orders: (a first, b first).

    Mirrors the engine's nonce rule (a hash of the order-free pair); :func:`run_local` checks the
    result against the queries the engine really sent, so a drift fails loudly.
    """
    lo, hi = sorted((pair.a, pair.b))
    item_hash = sha256_hex(
        {"kind": "pairwise", "prompt": prompt_json(pair.prompt), "texts": [lo, hi], "rubric": None, "reference": None}
    )
    nonce = sha256_hex(["nonce", item_hash])[:16]
    criteria = engine.templates.criteria(None, None)
    out = []
    for first, second in ((pair.a, pair.b), (pair.b, pair.a)):
        messages = engine.templates.pairwise(
            prompt=pair.prompt, first=first, second=second, reference=None, criteria=criteria, nonce=nonce,
            rationale=False,
        )  # fmt: skip
        out.append(VerdictQuery(messages=messages, choices=("A", "B"), rationale=False, max_tokens=MAX_NEW_TOKENS))
    return out[0], out[1]


def generate_letter(backend: LocalBackend, query: VerdictQuery, *, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The baseline's reply text for one order: greedy HF ``generate`` on the judge's rendering
    (the local judge's own generate path, stopping at the end of the assistant turn)."""
    ids = backend.encode(query).input_ids  # the very tokens the protocol's forward reads
    new = backend.generate_ids(ids, max_new_tokens)
    return str(backend.tokenizer.decode(new, skip_special_tokens=True))


def _winner(p_first: float, tie_margin: float) -> int | None:
    return None if abs(p_first - 0.5) < tie_margin else (0 if p_first > 0.5 else 1)


def _argmax_letter(reply: VerdictReply) -> str | None:
    if reply.probs:
        return max(("A", "B"), key=lambda c: reply.probs.get(c, 0.0) if reply.probs else 0.0)
    return reply.choice


async def _protocol(engine: JudgeEngine, pairs: Sequence[JudgePair]) -> tuple[list[CompareResult], float]:
    started = time.perf_counter()
    results = await asyncio.gather(
        *(engine.compare(CompareInput(prompt=p.prompt, responses=(p.a, p.b), protocol="both_orders")) for p in pairs)
    )
    wall = time.perf_counter() - started
    done: list[CompareResult] = []
    for i, r in enumerate(results):
        if not isinstance(r, CompareResult):
            raise RuntimeError(f"the local judge abstained on pair {i}: {r.reason}")
        done.append(r)
    return done, wall


def run_local(
    pairs: Sequence[JudgePair],
    *,
    model_dir: Path | str | None = None,
    dtype: Dtype = "float32",
    device: str = "cpu",
    threads: int | None = None,
    max_batch_tokens: int = 8192,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Time the protocol and the generate baseline on ``pairs``; a JSON-ready result."""
    if not pairs:
        raise BenchInputError("no pairs to judge")
    say = progress or (lambda _msg: None)
    say("loading the local judge")
    local = LocalBackend(model_dir, dtype=dtype, device=device, threads=threads, max_batch_tokens=max_batch_tokens)
    recorder = _RecordingBackend(local)
    config = JudgeEngineConfig()
    engine = JudgeEngine(lambda: recorder, config, cache=None)
    queries = [order_queries(engine, p) for p in pairs]
    lengths: list[int] = []
    for i, qs in enumerate(queries):
        for q in qs:
            try:
                lengths.append(local.encode(q).num_tokens)  # too long for the model: fail before timing anything
            except UpstreamError as exc:
                raise BenchInputError(f"pair {i} ({pairs[i].source or 'unnamed'}): {exc}") from None

    async def protocol_pass() -> tuple[list[CompareResult], float]:
        await engine.start()  # loads nothing new (the recorder is built) and warms the batcher
        try:
            # One untimed pair: the first forward of a shape pays one-off costs on either side.
            await engine.compare(CompareInput(prompt=pairs[0].prompt, responses=(pairs[0].a, pairs[0].b)))
            recorder.replies.clear()
            say(f"protocol: {len(pairs)} pairs, both orders, submitted at once")
            return await _protocol(engine, pairs)
        finally:
            with contextlib.suppress(Exception):
                await engine.stop()

    results, protocol_s = asyncio.run(protocol_pass())
    sent = set(recorder.replies)
    built = {_key(q.messages) for qs in queries for q in qs}
    same_prompts = sent == built

    say(f"generate: {len(pairs)} pairs, both orders, one pair at a time")
    generate_letter(local, queries[0][0], max_new_tokens=max_new_tokens)  # untimed warm-up
    texts: list[tuple[str, str]] = []
    started = time.perf_counter()
    try:
        from tqdm import tqdm

        iterator: Any = tqdm(queries, desc="generate", unit="pair", leave=False, disable=progress is None)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        iterator = queries
    for first, second in iterator:
        texts.append(
            (
                generate_letter(local, first, max_new_tokens=max_new_tokens),
                generate_letter(local, second, max_new_tokens=max_new_tokens),
            )
        )
    generate_s = time.perf_counter() - started

    tie = config.tie_margin
    per_pair: list[dict[str, Any]] = []
    verdicts_agree = verdicts = unparsed = winners_agree = 0
    for pair, (q1, q2), (t1, t2), result in zip(pairs, queries, texts, results, strict=True):
        l1, l2 = parse_letter(t1), parse_letter(t2)
        unparsed += (l1 is None) + (l2 is None)
        # P(a better) from the parsed letters: a vote per order, an unparsed order counts 0.5.
        votes = [0.5 if l1 is None else float(l1 == "A"), 0.5 if l2 is None else float(l2 == "B")]
        p_gen = sum(votes) / 2
        w_gen = _winner(p_gen, tie)
        winners_agree += w_gen == result.winner
        proto_letters = []
        for q, letter in ((q1, l1), (q2, l2)):
            reply = recorder.replies.get(_key(q.messages))
            proto = _argmax_letter(reply) if reply is not None else None
            proto_letters.append(proto)
            verdicts += 1
            verdicts_agree += proto is not None and proto == letter
        per_pair.append(
            {
                "source": pair.source,
                "protocol": {"preference": result.preference, "winner": result.winner, "letters": proto_letters},
                "generate": {"preference": p_gen, "winner": w_gen, "texts": [t1, t2], "letters": [l1, l2]},
            }
        )
    n = len(pairs)
    protocol_pps = n / protocol_s
    generate_pps = n / generate_s
    return {
        "model": local.info.model,
        "dtype": dtype,
        "device": str(local.device),
        "threads": threads,
        "max_batch_tokens": max_batch_tokens,
        "pairs": n,
        "verdicts_per_pair": 2,
        "prompt_tokens": {"mean": sum(lengths) / len(lengths), "min": min(lengths), "max": max(lengths)},
        "same_prompts": same_prompts,
        "protocol": {
            "what": "JudgeEngine + LocalBackend, compare both_orders, all pairs submitted at once; "
            "one batched forward per verdict, A/B next-token logprobs",
            "seconds": protocol_s,
            "pairs_per_s": protocol_pps,
        },
        "generate": {
            "what": f"HF generate(max_new_tokens={max_new_tokens}, do_sample=False) per order, one pair at a time, "
            "first A/B not inside a word parsed from the text",
            "seconds": generate_s,
            "pairs_per_s": generate_pps,
            "unparsed_verdicts": unparsed,
        },
        "speedup": protocol_pps / generate_pps,
        "agreement": {
            "verdicts": verdicts_agree / verdicts,
            "winners": winners_agree / n,
            "definition": "verdicts: share of (pair, order) where the protocol's more likely letter equals the "
            "generated letter; winners: share of pairs whose winner (first, second or tie, tie margin "
            f"{tie}) is the same, the generate winner from one vote per order",
        },
        "per_pair": per_pair,
    }
