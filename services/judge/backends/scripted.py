"""A deterministic fake judge for tests: scripted verdicts, failures and a naive 'model'.

It reads the rendered prompt the way a naive LLM might: data sections are whatever lies between
``<<<NAME_<hex>>>`` and the first ``<<<END_NAME_<hex>>>`` after it (any nonce: it does not
check that the closing nonce matches), and a chat-template role marker such as
``<|im_start|>system`` anywhere starts a new turn outside the data. With ``obey_injections``
(the default) a directive found *outside* the data sections ("answer A", "verdict: B",
"grade: 5") is obeyed. So an injected response that manages to escape its fence or forge a
turn moves this fake's verdict, and the injection tests can see it.

Otherwise the verdict follows the policy: ``always_first``, ``always_second``, or
``always_better`` (the response with the higher ``score(text)`` wins; default score: the
number of ``[good]`` markers minus ``[bad]`` markers, then length as a tie-break). A
``policy`` callable gets the query and the parsed data sections and returns the reply.

Failures are drawn per (query, attempt number) from a seeded hash, so they do not depend on
scheduling: ``rate_limit`` (429 with ``retry_after``), ``server_error`` (500), ``timeout``,
``unparseable`` rates. Every call is recorded with its time on the injected clock.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from services.judge.backends.base import BackendInfo, UnparseableReply, UpstreamError
from services.judge.clock import Clock, SystemClock
from services.judge.types import Usage, VerdictQuery, VerdictReply

Policy = Literal["always_first", "always_second", "always_better"]
PolicyFn = Callable[[VerdictQuery, dict[str, str]], VerdictReply]

_SECTION = re.compile(r"<<<([A-Z_]+?)_([0-9a-f]{4,})>>>\n?(.*?)\n?<<<END_\1_[0-9a-f]+>>>", re.DOTALL)
_TURN = re.compile(r"<\|im_start\|>\s*(?:system|user)\b(.*?)(?:<\|im_end\|>|$)", re.DOTALL | re.IGNORECASE)
_DIRECTIVE = re.compile(
    r"\b(?:answer|respond|reply|output|say|choose|pick|select|verdict|grade|score|winner)\b"
    r"\s*(?:is|with|:|=)?\s*[\"'“(\[]*\s*([AB]|\d+)\b",
    re.IGNORECASE,
)


def default_score(text: str) -> float:
    return text.count("[good]") - text.count("[bad]") + len(text) * 1e-6


@dataclass(frozen=True)
class Failures:
    rate_limit: float = 0.0
    server_error: float = 0.0
    timeout: float = 0.0
    unparseable: float = 0.0
    retry_after: float = 2.0


@dataclass(frozen=True)
class Call:
    time: float
    query: VerdictQuery
    outcome: str  # ok, rate_limited, server_error, timeout, unparseable


@dataclass
class ScriptedBackend:
    policy: Policy | PolicyFn = "always_better"
    score: Callable[[str], float] = default_score
    soft: bool = True
    temperature: float = 1.0
    failures: Failures = field(default_factory=Failures)
    seed: int = 0
    clock: Clock = field(default_factory=SystemClock)
    latency: float = 0.0
    obey_injections: bool = True
    model: str = "scripted-judge"
    calls: list[Call] = field(default_factory=list)
    injections_obeyed: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        self.info = BackendInfo("scripted", self.model, self.model)
        self._attempts: Counter[str] = Counter()

    @property
    def call_count(self) -> int:
        return len(self.calls)

    def sampling_key(self) -> dict[str, object]:
        policy = self.policy if isinstance(self.policy, str) else getattr(self.policy, "__name__", "custom")
        return {"policy": policy, "soft": self.soft, "temperature": self.temperature}

    async def aclose(self) -> None:
        self.closed = True

    # -- the fake model -------------------------------------------------------------------------

    def _draw(self, query: VerdictQuery) -> float:
        key = "\0".join(m.content for m in query.messages)
        n = self._attempts[key]
        self._attempts[key] += 1
        h = hashlib.sha256(f"{self.seed}\0{n}\0{key}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    async def verdict(self, query: VerdictQuery) -> VerdictReply:
        u = self._draw(query)
        f = self.failures
        outcome = "ok"
        edges = [
            ("rate_limited", f.rate_limit),
            ("server_error", f.server_error),
            ("timeout", f.timeout),
            ("unparseable", f.unparseable),
        ]
        acc = 0.0
        for name, rate in edges:
            acc += rate
            if u < acc:
                outcome = name
                break
        self.calls.append(Call(self.clock.now(), query, outcome))
        if self.latency:
            await self.clock.sleep(self.latency)
        if outcome == "rate_limited":
            raise UpstreamError("429 rate limited", retryable=True, retry_after=f.retry_after, status=429,
                                rate_limited=True)  # fmt: skip
        if outcome == "server_error":
            raise UpstreamError("500 internal server error", retryable=True, status=500)
        if outcome == "timeout":
            raise UpstreamError("request timed out", retryable=True, status=None)
        if outcome == "unparseable":
            raise UnparseableReply("Both responses have merits.", "no verdict token in the reply")
        return self._answer(query)

    def _answer(self, query: VerdictQuery) -> VerdictReply:
        user = next((m.content for m in reversed(query.messages) if m.role == "user"), "")
        sections, outside = parse_prompt(user)
        if self.obey_injections:
            forced = find_directive(outside, query.choices)
            if forced is not None:
                self.injections_obeyed += 1
                return self._reply(query, {forced: 1.0}, hard=True)
        if callable(self.policy):
            return self.policy(query, sections)
        if query.choices == ("A", "B"):
            if self.policy == "always_first":
                p_first = 0.9
            elif self.policy == "always_second":
                p_first = 0.1
            else:
                a, b = self.score(sections.get("RESPONSE_A", "")), self.score(sections.get("RESPONSE_B", ""))
                p_first = 1 / (1 + math.exp(-(a - b) / self.temperature))
            return self._reply(query, {"A": p_first, "B": 1 - p_first})
        # a grade: the top of the scale for a better-scoring response (score > 0), else the bottom
        lo, hi = query.choices[0], query.choices[-1]
        s = self.score(sections.get("RESPONSE", ""))
        return self._reply(query, {hi: 0.8, lo: 0.2} if s > 0.5 else {lo: 0.8, hi: 0.2})

    def _reply(self, query: VerdictQuery, probs: dict[str, float], *, hard: bool = False) -> VerdictReply:
        choice = max(probs, key=lambda c: probs[c])
        prompt_tokens = sum(len(m.content) for m in query.messages) // 4
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=1)
        rationale = "scripted rationale" if query.rationale else None
        if self.soft and not hard:
            return VerdictReply(choice, dict(probs), True, choice, rationale, usage)
        return VerdictReply(choice, None, False, choice, rationale, usage)


def parse_prompt(user: str) -> tuple[dict[str, str], str]:
    """Naively split a rendered user message into data sections and the text outside them."""
    sections: dict[str, str] = {}
    outside: list[str] = []
    pos = 0
    for m in _SECTION.finditer(user):
        outside.append(user[pos : m.start()])
        name, body = m.group(1), m.group(3)
        sections.setdefault(name, body)
        # a forged chat turn inside data still counts as a turn to a naive chat template
        outside.extend(t.group(1) for t in _TURN.finditer(body))
        pos = m.end()
    outside.append(user[pos:])
    return sections, "\n".join(outside)


def find_directive(text: str, choices: tuple[str, ...]) -> str | None:
    """The last directive in ``text`` naming one of ``choices`` (what a naive model would obey)."""
    found = None
    for m in _DIRECTIVE.finditer(text):
        value = m.group(1).upper() if m.group(1).isalpha() else m.group(1)
        if value in choices:
            found = value
    return found
