"""Clients of the reward service: :class:`AsyncRewardClient` and its sync twin :class:`RewardClient`.

::

    from clients import RewardClient

    rm = RewardClient("grpc://reward-host:50051")          # or http://reward-host:8000, or a list
    scores = rm.score_pairs(prompts, completions)          # list[float | None], raw logits
    for i, why in scores.errors.items():                   # the reason for every None
        print(i, why.code, why.message)

Big inputs are cut into chunks (``chunk_size``, else the server's ``max_items_per_request``
capped at 512, and never more than half its ``max_body_bytes``), sent concurrently within
``max_concurrency`` (spread over the endpoints), retried under the one policy
(:mod:`clients.retry`), and put back in input order: every item gets exactly one result.

When some chunks fail after their retries and others succeed, the failed chunks' items are
``None`` with the chunk's error as their reason; when every chunk fails, the error is raised.
INVALID_ARGUMENT, UNAUTHENTICATED and PERMISSION_DENIED are raised at once whatever the rest did
(``InvalidRequestError.item`` is an index into the caller's inputs).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from clients._core import (
    Attempt,
    BaseCore,
    api_repr,
    close_sync,
    deadline_from,
    run_sync,
)
from clients.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    RlhfFeedbackError,
    ServerError,
)
from clients.types import (
    CompareResult,
    ItemError,
    Limits,
    ModelInfo,
    ModelRef,
    Normalization,
    Priority,
    Prompt,
    RewardItem,
    ScoreResults,
    _prompt_wire,
    item_to_wire,
)
from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import reward_pb2 as pb
from protos.rlhf.v1 import reward_pb2_grpc as pb_grpc

MAX_CHUNK_ITEMS = 512
_FATAL = (InvalidRequestError, AuthenticationError, PermissionDeniedError)


# -- wire helpers (HTTP JSON and protobuf) ----------------------------------------------------


def _model_from_json(d: Any) -> ModelRef:
    norm = d.get("normalization")
    n = Normalization(float(norm["mean"]), float(norm["std"]), str(norm["source"])) if norm else None
    return ModelRef(str(d["id"]), str(d.get("revision", "")), n)


def _model_from_pb(m: pb.ModelRef) -> ModelRef:
    n = None
    if m.HasField("normalization"):
        n = Normalization(m.normalization.mean, m.normalization.std, m.normalization.source)
    return ModelRef(m.id, m.revision, n)


def _conversation_pb(messages: Sequence[Any]) -> cpb.Conversation:
    return cpb.Conversation(messages=[cpb.Message(role=m["role"], content=m["content"]) for m in messages])


def _input_pb(w: dict[str, Any]) -> pb.RewardInput:
    if "text" in w:
        return pb.RewardInput(text=w["text"])
    if "messages" in w:
        return pb.RewardInput(messages=_conversation_pb(w["messages"]))
    p = w["prompt"]
    if isinstance(p, str):
        return pb.RewardInput(pair=pb.PromptResponse(prompt_text=p, response=w["response"]))
    return pb.RewardInput(pair=pb.PromptResponse(prompt_messages=_conversation_pb(p), response=w["response"]))


def _info_from_json(body: Any) -> ModelInfo:
    card = body["data"][0]
    lim = card["limits"]
    return ModelInfo(
        id=str(card["id"]),
        revision=str(card.get("revision", "")),
        architecture=str(card.get("architecture", "")),
        backend=str(card.get("backend", "")),
        dtype=str(card.get("dtype", "")),
        device=str(card.get("device", "")),
        max_length=int(card.get("max_length", 0)),
        num_labels=int(card.get("num_labels", 1)),
        label_names=tuple(card.get("label_names", ())),
        has_chat_template=bool(card.get("has_chat_template", False)),
        limits=Limits(
            int(lim["max_items_per_request"]),
            int(lim["max_body_bytes"]),
            int(lim["max_text_bytes"]),
            int(lim.get("max_batch_tokens", 0)),
            int(lim.get("max_request_tokens", 0)),
        ),
    )


def _info_from_pb(m: pb.ModelInfo) -> ModelInfo:
    lim = m.limits
    return ModelInfo(
        id=m.id,
        revision=m.revision,
        architecture=m.architecture,
        backend=m.backend,
        dtype=m.dtype,
        device=m.device,
        max_length=m.max_length,
        num_labels=m.num_labels,
        label_names=tuple(m.label_names),
        has_chat_template=m.has_chat_template,
        limits=Limits(
            lim.max_items_per_request,
            lim.max_body_bytes,
            lim.max_text_bytes,
            lim.max_batch_tokens,
            lim.max_request_tokens,
        ),
    )


@dataclass
class _Chunk:
    """One chunk's answer, indices local to the chunk."""

    model: ModelRef | None
    scores: list[float | None]
    errors: dict[int, ItemError]
    num_tokens: list[int | None]
    truncated: list[bool | None]
    normalized: list[float | None]
    vectors: list[tuple[float, ...] | None]

    @classmethod
    def empty(cls, n: int) -> _Chunk:
        return cls(None, [None] * n, {}, [None] * n, [None] * n, [None] * n, [None] * n)

    @classmethod
    def from_json(cls, body: Any, n: int) -> _Chunk:
        results = body["results"]
        if len(results) != n:
            raise ServerError(f"the server answered {len(results)} results for {n} items")
        out = cls.empty(n)
        out.model = _model_from_json(body["model"])
        for i, r in enumerate(results):
            if "score" in r and r["score"] is not None:
                out.scores[i] = float(r["score"])
                out.num_tokens[i] = int(r.get("num_tokens", 0))
                out.truncated[i] = bool(r.get("truncated", False))
                if r.get("normalized") is not None:
                    out.normalized[i] = float(r["normalized"])
                if r.get("scores"):
                    out.vectors[i] = tuple(float(v) for v in r["scores"])
            else:
                e = r.get("error") or {}
                out.errors[i] = ItemError(str(e.get("code", "INTERNAL")), str(e.get("message", "no score returned")))
        return out

    @classmethod
    def from_pb(cls, reply: pb.ScoreResponse, n: int) -> _Chunk:
        if len(reply.results) != n:
            raise ServerError(f"the server answered {len(reply.results)} results for {n} items")
        out = cls.empty(n)
        out.model = _model_from_pb(reply.model)
        for i, r in enumerate(reply.results):
            if r.HasField("score"):
                s = r.score
                out.scores[i] = s.score
                out.num_tokens[i] = s.num_tokens
                out.truncated[i] = s.truncated
                if s.HasField("normalized"):
                    out.normalized[i] = s.normalized
                if s.scores:
                    out.vectors[i] = tuple(s.scores)
            else:
                out.errors[i] = ItemError(r.error.code or "INTERNAL", r.error.message or "no score returned")
        return out


@dataclass(frozen=True)
class ChunkLimits:
    """What one request may carry: items, body bytes (roughly), and tokens after truncation."""

    max_items: int
    max_bytes: int | None = None
    max_tokens: int | None = None  # the server's --max-request-tokens
    max_length: int | None = None  # the server's truncation length: no item costs more


def token_bound(item: dict[str, Any], max_length: int | None) -> int:
    """A safe guess of an item's tokens after truncation: its UTF-8 bytes plus a few template
    tokens per message (a byte-level BPE token is at least one byte), at most ``max_length``."""
    texts: list[str] = []
    messages = 1
    for key in ("text", "response"):
        if isinstance(item.get(key), str):
            texts.append(item[key])
    for key in ("prompt", "messages"):
        value = item.get(key)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):
            messages += len(value)
            texts += [str(m.get("content", "")) for m in value if isinstance(m, dict)]
    bound = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) + 16 * messages
    return min(bound, max_length) if max_length else bound


def plan_chunks(items: Sequence[dict[str, Any]], limits: ChunkLimits) -> list[tuple[int, int]]:
    """Cut ``items`` into ``[start, end)`` spans within ``limits`` (a span holds at least one item)."""
    spans: list[tuple[int, int]] = []
    start, size, tokens = 0, 0, 0
    for i, item in enumerate(items):
        b = len(orjson.dumps(item)) + 1 if limits.max_bytes is not None else 0
        t = token_bound(item, limits.max_length) if limits.max_tokens else 0
        over_bytes = limits.max_bytes is not None and size + b > limits.max_bytes
        over_tokens = limits.max_tokens is not None and limits.max_tokens > 0 and tokens + t > limits.max_tokens
        if i > start and (i - start >= limits.max_items or over_bytes or over_tokens):
            spans.append((start, i))
            start, size, tokens = i, 0, 0
        size += b
        tokens += t
    if start < len(items):
        spans.append((start, len(items)))
    return spans


# -- the core --------------------------------------------------------------------------------------


class _RewardCore(BaseCore):
    def __init__(
        self,
        url: str | Sequence[str],
        *,
        api_key: str | None,
        timeout: float | None,
        max_retries: int,
        chunk_size: int | None,
        max_concurrency: int,
        priority: Priority,
        tls_ca: str | os.PathLike[str] | None,
    ) -> None:
        super().__init__(
            url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_concurrency=max_concurrency,
            tls_ca=tls_ca,
        )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        if priority not in ("online", "batch"):
            raise ValueError("priority is 'online' or 'batch'")
        self.chunk_size = chunk_size
        self.priority: Priority = priority
        self._info: ModelInfo | None = None

    # -- model info and chunking ----------------------------------------------------------------

    async def model_info(self, *, deadline: float | None = None) -> ModelInfo:
        async def attempt(at: Attempt) -> ModelInfo:
            if at.endpoint.kind == "http":
                body = await self.http_call(at, "GET", "/v1/models")
                try:
                    return _info_from_json(body)
                except (KeyError, IndexError, TypeError, ValueError) as exc:
                    raise ServerError(f"unexpected /v1/models answer: {exc!r}") from None
            stub = self.conns().stub(at.endpoint, pb_grpc.RewardServiceStub)
            return _info_from_pb(await self.grpc_call(at, stub.GetModelInfo, pb.GetModelInfoRequest()))

        info = await self.call(attempt, deadline=deadline)
        self._info = info
        return info

    async def _chunking(self, deadline: float | None) -> ChunkLimits:
        if self.chunk_size is not None:
            if self._info is None:
                return ChunkLimits(self.chunk_size)
            return ChunkLimits(
                self.chunk_size,
                self._info.limits.max_body_bytes // 2,
                self._info.limits.max_request_tokens or None,
                self._info.max_length or None,
            )
        info = self._info or await self.model_info(deadline=deadline)
        return ChunkLimits(
            max(1, min(info.limits.max_items_per_request, MAX_CHUNK_ITEMS)),
            max(1, info.limits.max_body_bytes // 2),
            info.limits.max_request_tokens or None,
            info.max_length or None,
        )

    # -- scoring --------------------------------------------------------------------------------

    async def _score_chunk(
        self, items: Sequence[dict[str, Any]], offset: int, *, normalize: bool, deadline: float | None, hint: int
    ) -> _Chunk:
        n = len(items)

        async def attempt(at: Attempt) -> _Chunk:
            if at.endpoint.kind == "http":
                body: dict[str, Any] = {"inputs": list(items), "priority": self.priority}
                if normalize:
                    body["normalize"] = True
                answer = await self.http_call(at, "POST", "/v1/score", body, offset=offset)
                try:
                    return _Chunk.from_json(answer, n)
                except (KeyError, IndexError, TypeError, ValueError) as exc:
                    raise ServerError(f"unexpected /v1/score answer: {exc!r}", request_id=at.ids.request_id) from None
            request = pb.ScoreRequest(
                inputs=[_input_pb(w) for w in items],
                priority=pb.PRIORITY_BATCH if self.priority == "batch" else pb.PRIORITY_ONLINE,
                normalize=normalize,
            )
            stub = self.conns().stub(at.endpoint, pb_grpc.RewardServiceStub)
            return _Chunk.from_pb(await self.grpc_call(at, stub.Score, request, offset=offset), n)

        return await self.call(attempt, deadline=deadline, hint=hint)

    async def score(self, inputs: Sequence[RewardItem], *, normalize: bool, deadline_s: float | None) -> ScoreResults:
        wire = _wire_items(inputs)
        if not wire:
            return ScoreResults([])
        deadline = deadline_from(deadline_s)
        spans = plan_chunks(wire, await self._chunking(deadline))
        gate = self.conns().gate  # shared by every call of this client in this loop

        async def run(k: int, start: int, end: int) -> _Chunk:
            async with gate:
                return await self._score_chunk(wire[start:end], start, normalize=normalize, deadline=deadline, hint=k)

        tasks = [asyncio.ensure_future(run(k, a, b)) for k, (a, b) in enumerate(spans)]
        outcomes = await _settle(tasks)
        if all(isinstance(o, BaseException) for o in outcomes):
            raise outcomes[0]  # nothing succeeded: the request failed

        results = ScoreResults([])
        errors: dict[int, ItemError] = {}
        num_tokens: list[int | None] = []
        truncated: list[bool | None] = []
        normalized: list[float | None] = []
        vectors: list[tuple[float, ...] | None] = []
        model: ModelRef | None = None
        for (start, end), outcome in zip(spans, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, RlhfFeedbackError)
                chunk = _Chunk.empty(end - start)
                reason = ItemError(outcome.code, outcome.message)
                chunk.errors = dict.fromkeys(range(end - start), reason)
            else:
                chunk = outcome
                if model is None:
                    model = chunk.model
                elif chunk.model is not None and (chunk.model.id, chunk.model.revision) != (model.id, model.revision):
                    raise ServerError(
                        f"the endpoints serve different models ({model.id}@{model.revision} and "
                        f"{chunk.model.id}@{chunk.model.revision}); scores of different models must not mix"
                    )
            results.extend(chunk.scores)
            errors.update({start + i: e for i, e in chunk.errors.items()})
            num_tokens += chunk.num_tokens
            truncated += chunk.truncated
            normalized += chunk.normalized
            vectors += chunk.vectors
        return ScoreResults(
            results,
            errors=errors,
            num_tokens=num_tokens,
            truncated=truncated,
            normalized=normalized if normalize else None,
            vectors=vectors,
            model=model,
        )

    async def compare(self, prompt: Prompt, responses: Sequence[str], *, deadline_s: float | None) -> CompareResult:
        try:
            prompt_wire = _prompt_wire(prompt)
        except TypeError as exc:
            raise InvalidRequestError(str(exc)) from None
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise InvalidRequestError(f"responses[{i}] must be a string", item=i)
        deadline = deadline_from(deadline_s)

        async def attempt(at: Attempt) -> CompareResult:
            if at.endpoint.kind == "http":
                body = await self.http_call(
                    at, "POST", "/v1/compare", {"prompt": prompt_wire, "responses": list(responses)}
                )
                try:
                    return CompareResult(
                        scores=[float(s) for s in body["scores"]],
                        probabilities=[float(p) for p in body["probabilities"]],
                        ranking=[int(r) for r in body["ranking"]],
                        model=_model_from_json(body["model"]) if body.get("model") else None,
                    )
                except (KeyError, TypeError, ValueError) as exc:
                    raise ServerError(f"unexpected /v1/compare answer: {exc!r}") from None
            request = pb.CompareRequest(responses=list(responses))
            if isinstance(prompt_wire, str):
                request.prompt_text = prompt_wire
            else:
                request.prompt_messages.CopyFrom(_conversation_pb(prompt_wire))
            stub = self.conns().stub(at.endpoint, pb_grpc.RewardServiceStub)
            reply = await self.grpc_call(at, stub.Compare, request)
            return CompareResult(
                scores=list(reply.scores),
                probabilities=list(reply.probabilities),
                ranking=list(reply.ranking),
                model=_model_from_pb(reply.model),
            )

        return await self.call(attempt, deadline=deadline)


def _wire_items(inputs: Sequence[RewardItem]) -> list[dict[str, Any]]:
    if isinstance(inputs, str | bytes | dict):
        raise TypeError("inputs is a sequence of items (e.g. [{'text': ...}]), not a single item")
    out = []
    for i, x in enumerate(inputs):
        try:
            out.append(item_to_wire(x))
        except (TypeError, ValueError) as exc:
            raise InvalidRequestError(f"inputs[{i}]: {exc}", item=i) from None
    return out


async def _settle(tasks: Sequence[asyncio.Future[Any]]) -> list[Any]:
    """Wait for every chunk; a fatal error (invalid input, auth, a bug) cancels the rest and is raised."""
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None and (isinstance(exc, _FATAL) or not isinstance(exc, RlhfFeedbackError)):
                    raise exc
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [t.exception() or t.result() for t in tasks]


# -- the twins -------------------------------------------------------------------------------------


class _RewardClientBase:
    """Constructor, pickling and repr shared by the twins (the behaviour lives in the core)."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float | None = 60,
        max_retries: int = 8,
        chunk_size: int | None = None,
        max_concurrency: int = 4,
        priority: Priority = "online",
        tls_ca: str | os.PathLike[str] | None = None,
    ) -> None:
        """A client of the reward service.

        ``url``: ``http(s)://host:port`` (HTTP/JSON), ``grpc(s)://host:port`` (gRPC),
        ``dns:///name:port`` (gRPC, round-robin over the name's addresses), or a list of them
        (retries move to the next one, chunks are spread over all). ``api_key`` defaults to
        ``RLHF_FEEDBACK_API_KEY``. ``timeout``: seconds per attempt. ``chunk_size``: items per
        request (default: the server's ``max_items_per_request``, at most 512).
        ``max_concurrency``: chunks in flight at once. ``priority``: ``"online"`` (a trainer
        waits) or ``"batch"`` (bulk work that yields to online work). ``tls_ca``: a CA bundle
        for ``https``/``grpcs`` with a private CA.
        """
        self._core = _RewardCore(
            url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            chunk_size=chunk_size,
            max_concurrency=max_concurrency,
            priority=priority,
            tls_ca=tls_ca,
        )

    def __repr__(self) -> str:
        return api_repr(type(self).__name__, self._core)

    @staticmethod
    def _pairs(prompts: Sequence[Prompt], responses: Sequence[str]) -> list[dict[str, Any]]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]


class AsyncRewardClient(_RewardClientBase):
    """Async client of the reward service (the sync twin is :class:`RewardClient`)."""

    async def score(
        self, inputs: Sequence[RewardItem], *, normalize: bool = False, deadline_s: float | None = None
    ) -> ScoreResults:
        """Raw score of each item, in order; ``None`` with a reason in ``.errors`` for a failed item."""
        return await self._core.score(inputs, normalize=normalize, deadline_s=deadline_s)

    async def score_texts(
        self, texts: Sequence[str], *, normalize: bool = False, deadline_s: float | None = None
    ) -> ScoreResults:
        """Score already rendered texts verbatim (``{"text": ...}`` items)."""
        return await self.score([{"text": t} for t in texts], normalize=normalize, deadline_s=deadline_s)

    async def score_pairs(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        *,
        normalize: bool = False,
        deadline_s: float | None = None,
    ) -> ScoreResults:
        """Score ``responses[i]`` to ``prompts[i]`` (a string or chat messages), rendered by the server."""
        return await self.score(self._pairs(prompts, responses), normalize=normalize, deadline_s=deadline_s)

    async def compare(
        self, prompt: Prompt, responses: Sequence[str], *, deadline_s: float | None = None
    ) -> CompareResult:
        """Scores of several responses to one prompt, P(i best) = softmax(scores), and the ranking."""
        return await self._core.compare(prompt, responses, deadline_s=deadline_s)

    async def model_info(self, *, deadline_s: float | None = None) -> ModelInfo:
        """The served model and the server's request limits."""
        return await self._core.model_info(deadline=deadline_from(deadline_s))

    async def aclose(self) -> None:
        """Close this event loop's connections (the client reopens them if used again)."""
        await self._core.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class RewardClient(_RewardClientBase):
    """Sync client of the reward service: the same core as :class:`AsyncRewardClient`, run on a
    private event-loop thread. Safe to call from several threads; picklable."""

    def score(
        self, inputs: Sequence[RewardItem], *, normalize: bool = False, deadline_s: float | None = None
    ) -> ScoreResults:
        """Raw score of each item, in order; ``None`` with a reason in ``.errors`` for a failed item."""
        return run_sync(self._core.score(inputs, normalize=normalize, deadline_s=deadline_s))

    def score_texts(
        self, texts: Sequence[str], *, normalize: bool = False, deadline_s: float | None = None
    ) -> ScoreResults:
        """Score already rendered texts verbatim (``{"text": ...}`` items)."""
        return self.score([{"text": t} for t in texts], normalize=normalize, deadline_s=deadline_s)

    def score_pairs(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        *,
        normalize: bool = False,
        deadline_s: float | None = None,
    ) -> ScoreResults:
        """Score ``responses[i]`` to ``prompts[i]`` (a string or chat messages), rendered by the server."""
        return self.score(self._pairs(prompts, responses), normalize=normalize, deadline_s=deadline_s)

    def compare(self, prompt: Prompt, responses: Sequence[str], *, deadline_s: float | None = None) -> CompareResult:
        """Scores of several responses to one prompt, P(i best) = softmax(scores), and the ranking."""
        return run_sync(self._core.compare(prompt, responses, deadline_s=deadline_s))

    def model_info(self, *, deadline_s: float | None = None) -> ModelInfo:
        """The served model and the server's request limits."""
        return run_sync(self._core.model_info(deadline=deadline_from(deadline_s)))

    def close(self) -> None:
        """Close the connections (the client reopens them if used again)."""
        close_sync(self._core)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncRewardClient", "RewardClient", "plan_chunks"]
