"""Fake LLM providers on loopback, for exercising the real ``openai`` / ``anthropic`` SDKs.

Usage::

    from tests.support.fakes import FakeOpenAI, FakeAnthropic, RateLimit, HttpError, Sleep, Reply
    from tests.support.fakes import always_first, always_better

    with FakeOpenAI(policy=always_better(), script=[RateLimit(retry_after=0.5), HttpError(500)]) as srv:
        backend = OpenAIBackend("gpt-fake", base_url=srv.base_url, api_key="sk-test")
        ...                     # calls 1 and 2 fail as scripted, later calls answer
        srv.calls               # [Call(index, t, path, body, behaviour, status), ...]

Each server is a FastAPI app run by uvicorn on ``127.0.0.1`` (a free port) in a background
thread. ``srv.base_url`` is what the SDK's ``base_url`` wants (``.../v1`` for OpenAI, the root
for Anthropic).

**Policy** (what the fake model believes): a callable ``policy(req: PolicyInput) -> str |
Mapping[str, float]``: a choice (given probability ``confidence``, default 0.9, the rest spread
evenly) or a full distribution over ``req.choices``. Built in: :func:`always_first`,
:func:`always_better` (the response carrying the ``good`` marker beats the one carrying the
``bad`` marker, by their order in the prompt), :func:`fixed`. The reply's verdict is the
most probable choice, or a sample from the distribution when the request's temperature is > 0
(Anthropic: its default, 1.0) and the reply is a bare letter (k-samples mode); the server's
``seed`` makes samples reproducible.

**Behaviours**, one per call: ``script`` is a list consumed in order (then ``default``, which is
:class:`Ok`), or a callable ``index -> Behaviour`` (see :func:`random_faults`):
:class:`Ok`, :class:`HttpError` (any status, ``retry_after`` / ``retry_after_ms`` / extra
headers), :func:`RateLimit` (429 with ``retry-after``), :class:`Sleep` (wait, then behave as
``then``: a slow reply, or a timeout when longer than the client's timeout), :class:`Reply`
(answer 200 with exactly this text and no logprobs: garbage, invalid JSON).

**Call log**: ``srv.calls`` lists every request with its arrival time (``time.monotonic()``,
comparable with the test's own clock), body, behaviour and status. ``srv.clear()`` empties it
and ``srv.set_script(...)`` replaces what is left of the script.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Behaviour",
    "Call",
    "FakeAnthropic",
    "FakeOpenAI",
    "HttpError",
    "Ok",
    "Policy",
    "PolicyInput",
    "RateLimit",
    "Reply",
    "Sleep",
    "always_better",
    "always_first",
    "fixed",
    "random_faults",
]


# -- behaviours --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ok:
    """Answer normally, following the policy."""


@dataclass(frozen=True)
class HttpError:
    """Answer with an HTTP error in the provider's error format."""

    status: int
    retry_after: float | None = None  # seconds, as the ``retry-after`` header
    retry_after_ms: float | None = None  # as the ``retry-after-ms`` header
    headers: Mapping[str, str] = field(default_factory=dict)
    message: str = "fake provider error"


def RateLimit(retry_after: float | None = 1.0, **kwargs: Any) -> HttpError:  # reads as a behaviour
    """429 with a ``retry-after`` header (seconds; None for no header)."""
    return HttpError(429, retry_after=retry_after, message="rate limit reached (fake)", **kwargs)


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds`` first (a slow reply; a timeout when the client gives up sooner)."""

    seconds: float
    then: Ok | HttpError | Reply = field(default_factory=Ok)


@dataclass(frozen=True)
class Reply:
    """Answer 200 with exactly this text and no logprobs (malformed replies)."""

    text: str


Behaviour = Ok | HttpError | Sleep | Reply
Script = Sequence[Behaviour] | Callable[[int], Behaviour]


def random_faults(rate: float, kinds: Sequence[Behaviour], *, seed: int = 0) -> Callable[[int], Behaviour]:
    """A script where each call fails with probability ``rate`` (a kind drawn at random)."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def pick(_index: int) -> Behaviour:
        with lock:
            return rng.choice(list(kinds)) if rng.random() < rate else Ok()

    return pick


# -- policies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyInput:
    """What a policy sees: the request's messages, their text joined, and the choices."""

    messages: tuple[Mapping[str, Any], ...]
    text: str
    choices: tuple[str, ...]
    temperature: float


Policy = Callable[[PolicyInput], "str | Mapping[str, float]"]


def always_first(req: PolicyInput) -> str:
    """The first choice (``A``: the response shown first), whatever the content."""
    return req.choices[0]


def always_better(good: str = "[GOOD]", bad: str = "[BAD]") -> Policy:
    """Pairwise: the choice of the response that carries ``good`` (the responses appear in the
    prompt in choice order, so ``good`` before ``bad`` means the first choice). Grades: the top
    choice when ``good`` appears, the bottom one otherwise. No marker: the first choice."""

    def policy(req: PolicyInput) -> str:
        g, b = req.text.find(good), req.text.find(bad)
        if len(req.choices) != 2:
            return req.choices[-1] if g >= 0 else req.choices[0]
        if g >= 0 and b >= 0:
            return req.choices[0] if g < b else req.choices[1]
        return req.choices[0]

    return policy


def fixed(probs: Mapping[str, float]) -> Policy:
    """Always the same distribution."""
    return lambda req: dict(probs)


# -- the shared machinery ----------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    index: int
    t: float  # time.monotonic() when the request arrived
    path: str
    body: Mapping[str, Any]
    behaviour: Behaviour
    status: int | None = None  # filled when answered; None while in flight or if abandoned


class FakeProvider:
    """Server thread, script and call log shared by :class:`FakeOpenAI` and :class:`FakeAnthropic`."""

    default_choices: tuple[str, ...] = ("A", "B")

    def __init__(
        self,
        policy: Policy = always_first,
        *,
        script: Script = (),
        default: Behaviour | None = None,
        confidence: float = 0.9,
        choices: Sequence[str] | None = None,
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.confidence = confidence
        self.choices = tuple(choices) if choices else self.default_choices
        self.default: Behaviour = default or Ok()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._calls: list[Call] = []
        self._script: Script = ()
        self._cursor = 0
        self.set_script(script)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._server: Any = None
        self.port = 0

    # -- script and log ---------------------------------------------------------------------------

    def set_script(self, script: Script) -> None:
        with self._lock:
            self._script = script if callable(script) else list(script)
            self._cursor = 0

    def _next(self, path: str, body: Mapping[str, Any]) -> Call:
        with self._lock:
            index = len(self._calls)
            if callable(self._script):
                behaviour = self._script(index)
            elif self._cursor < len(self._script):
                behaviour = self._script[self._cursor]
                self._cursor += 1
            else:
                behaviour = self.default
            call = Call(index, time.monotonic(), path, body, behaviour)
            self._calls.append(call)
            return call

    def _answered(self, call: Call, status: int) -> None:
        with self._lock:
            self._calls[call.index] = Call(call.index, call.t, call.path, call.body, call.behaviour, status)

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()

    # -- model ------------------------------------------------------------------------------------

    def distribution(self, req: PolicyInput) -> dict[str, float]:
        out = self.policy(req)
        if isinstance(out, str):
            if out not in req.choices:
                raise ValueError(f"policy chose {out!r}, not one of {req.choices}")
            rest = (1.0 - self.confidence) / max(1, len(req.choices) - 1)
            return {c: (self.confidence if c == out else rest) for c in req.choices}
        probs = {c: float(out.get(c, 0.0)) for c in req.choices}
        total = sum(probs.values())
        return {c: p / total for c, p in probs.items()}

    def pick(self, probs: Mapping[str, float], *, sample: bool) -> str:
        if not sample:
            return max(probs, key=lambda c: probs[c])
        with self._lock:
            r = self._rng.random()
        acc = 0.0
        for c, p in probs.items():
            acc += p
            if r < acc:
                return c
        return list(probs)[-1]

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake up when the server closes (so shutdown never waits on a timeout test)."""
        end = time.monotonic() + seconds
        while not self._closing.is_set() and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(0.05, left))

    # -- server -----------------------------------------------------------------------------------

    def app(self) -> Any:
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeProvider:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake provider did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._closing.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- helpers for the wire formats --------------------------------------------------------------


def message_text(content: Any) -> str:
    """A message's text, whether content is a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


def pseudo_tokens(text: str) -> list[str]:
    """Split text into token-like pieces (a word with its leading space, or one symbol)."""
    return re.findall(r" ?\w+| ?[^\w\s]|\s+", text)


def count_tokens(text: str) -> int:
    return max(1, len(pseudo_tokens(text)))


def safe_log(p: float) -> float:
    return math.log(p) if p > 0 else -9999.0


def iter_fillers() -> Iterator[str]:
    """Tokens that are not verdicts, for the tail of ``top_logprobs``."""
    yield from ("The", "**", "Response", "I", " The", "Both", "Neither", "\n", "Based", "After")
    n = 0
    while True:
        n += 1
        yield f"tok{n}"


# Re-exported for convenience; imported last to avoid a cycle.
from tests.support.fakes.anthropic_server import FakeAnthropic  # noqa: E402
from tests.support.fakes.openai_server import FakeOpenAI  # noqa: E402
