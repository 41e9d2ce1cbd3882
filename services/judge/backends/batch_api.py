"""The providers' batch endpoints (OpenAI's Batch API, Anthropic's Message Batches) for the judge backends.

A batch request must be exactly what the interactive backend would send, and its result must be
read exactly as the interactive backend reads a reply (so logprob soft labels, verbalised
probabilities and hard labels come out identical). Neither is re-implemented here: the loaded
backend is copied with its SDK client swapped for

- a **recorder** (:func:`ProviderBatches.plan`): ``backend.verdict(query)`` builds its request
  and hands it to ``client.chat.completions.create`` / ``client.messages.create``, which records
  the keyword arguments instead of calling the provider;
- a **replayer** (:func:`ProviderBatches.parse`): the same ``verdict`` gets the batch result
  (an SDK ``ChatCompletion`` / ``Message``) as the SDK's answer, and parses it its own way.

Limits (provider documentation, 2025): OpenAI, 50,000 requests and 200 MB per input file, a 24 h
completion window; Anthropic, 100,000 requests and 256 MB per batch, results kept 29 days. The
chunk sizes below stay under them.

Finding a batch created just before a crash (the create answer lost): OpenAI batches carry our
chunk id in ``metadata``, so :meth:`OpenAIBatches.find` lists recent batches and matches it.
Anthropic batches carry no metadata: :meth:`AnthropicBatches.find` adopts the one batch created
since the intent was recorded with the same number of requests that no job knows; when there is
none or several it finds nothing (the chunk is then submitted again: the window in which that can
happen is one ``create`` call, and a duplicate costs money, never correctness).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from services.judge.backends.base import JudgeBackend
from services.judge.types import VerdictQuery, VerdictReply

__all__ = [
    "BatchState",
    "ItemResult",
    "ProviderBatches",
    "batch_support",
]

# Conservative chunk limits (requests, bytes of the JSONL file / request body).
OPENAI_MAX_REQUESTS = 50_000
OPENAI_MAX_BYTES = 190 * 2**20
ANTHROPIC_MAX_REQUESTS = 100_000
ANTHROPIC_MAX_BYTES = 240 * 2**20
CHUNK_METADATA_KEY = "rlhf_feedback_chunk"
# A batch found by listing must have been created at most this long before the recorded intent
# (clock skew between this host and the provider).
RECONCILE_SKEW_S = 300.0


@dataclass(frozen=True)
class BatchState:
    """One provider batch as last polled: ``ended`` when it will change no more (results readable)."""

    batch_id: str
    status: str
    ended: bool
    counts: Mapping[str, int] = field(default_factory=dict)
    files: tuple[str | None, ...] = ()  # OpenAI: output and error file ids


@dataclass(frozen=True)
class ItemResult:
    """One request's result: the SDK response object, or an error with whether a retry may help."""

    response: Any = None
    error: str | None = None
    retryable: bool = True


class _Captured(Exception):
    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.kwargs = kwargs


class _Endpoint:
    """Stands in for ``client.chat.completions`` / ``client.messages``: ``create`` records or replays."""

    def __init__(self, replies: list[Any] | None) -> None:
        self._replies = replies

    async def create(self, **kwargs: Any) -> Any:
        if self._replies is None:
            raise _Captured(kwargs)
        return self._replies.pop(0)


class _FakeClient:
    def __init__(self, replies: list[Any] | None) -> None:
        endpoint = _Endpoint(replies)
        self.messages = endpoint  # anthropic
        self.chat = type("_Chat", (), {"completions": endpoint})()  # openai

    async def close(self) -> None:
        return None


def _with_client(backend: JudgeBackend, client: _FakeClient) -> Any:
    twin = copy.copy(backend)
    twin.client = client  # type: ignore[attr-defined]  # both SDK backends keep their client here
    return twin


class ProviderBatches(Protocol):
    """One provider's batch endpoint, driven by the engine's batch manager."""

    name: str
    max_requests: int
    max_bytes: int
    calls_per_verdict: int

    async def plan(self, query: VerdictQuery) -> list[dict[str, Any]]: ...

    def line_bytes(self, custom_id: str, params: Mapping[str, Any]) -> int: ...

    async def create(self, tag: str, items: Sequence[tuple[str, Mapping[str, Any]]]) -> str: ...

    async def find(self, tag: str, since: float, n: int, known: set[str]) -> str | None: ...

    async def state(self, batch_id: str) -> BatchState: ...

    async def results(self, state: BatchState) -> dict[str, ItemResult]: ...

    async def parse(self, query: VerdictQuery, responses: list[Any]) -> VerdictReply: ...


class _Common:
    """Request recording and result replaying through the loaded backend."""

    name = ""
    max_requests = 0
    max_bytes = 0

    def __init__(self, backend: JudgeBackend) -> None:
        self.backend = backend
        self.client: Any = backend.client  # type: ignore[attr-defined]
        self.calls_per_verdict = max(1, int(getattr(backend, "calls_per_verdict", 1)))

    def _clean(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        params = {k: v for k, v in kwargs.items() if k not in ("timeout", "extra_body", "extra_headers")}
        params.update(kwargs.get("extra_body") or {})  # what the SDK would have merged into the body
        return json.loads(json.dumps(params))  # plain JSON: what is stored is what is sent

    async def plan(self, query: VerdictQuery) -> list[dict[str, Any]]:
        """The request bodies the interactive backend sends for ``query`` (one per provider call)."""
        try:
            await _with_client(self.backend, _FakeClient(None)).verdict(query)
        except _Captured as cap:
            return [self._clean(cap.kwargs)] * self.calls_per_verdict
        raise RuntimeError("the backend answered without calling its client")  # pragma: no cover

    async def parse(self, query: VerdictQuery, responses: list[Any]) -> VerdictReply:
        """The verdict the interactive backend reads from ``responses`` (raises UnparseableReply)."""
        reply: VerdictReply = await _with_client(self.backend, _FakeClient(list(responses))).verdict(query)
        return reply

    def line_bytes(self, custom_id: str, params: Mapping[str, Any]) -> int:
        return len(json.dumps({"custom_id": custom_id, "params": params})) + 64


class OpenAIBatches(_Common):
    """``files.create(purpose="batch")`` + ``batches.create`` (``/v1/chat/completions``, 24 h window)."""

    name = "openai"
    max_requests = OPENAI_MAX_REQUESTS
    max_bytes = OPENAI_MAX_BYTES

    async def create(self, tag: str, items: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        lines = [
            json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": params})
            for cid, params in items
        ]
        data = ("\n".join(lines) + "\n").encode("utf-8")
        uploaded = await self.client.files.create(file=(f"{tag}.jsonl", data), purpose="batch")
        batch = await self.client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={CHUNK_METADATA_KEY: tag},
        )
        return str(batch.id)

    async def find(self, tag: str, since: float, n: int, known: set[str]) -> str | None:
        async for batch in self.client.batches.list(limit=100):
            if float(batch.created_at) < since - RECONCILE_SKEW_S:
                break  # newest first: older ones cannot be ours
            if (batch.metadata or {}).get(CHUNK_METADATA_KEY) == tag:
                return str(batch.id)
        return None

    async def state(self, batch_id: str) -> BatchState:
        b = await self.client.batches.retrieve(batch_id)
        counts = b.request_counts
        return BatchState(
            batch_id=batch_id,
            status=str(b.status),
            ended=b.status in ("completed", "expired", "failed", "cancelled"),
            counts={
                "total": int(getattr(counts, "total", 0) or 0),
                "completed": int(getattr(counts, "completed", 0) or 0),
                "failed": int(getattr(counts, "failed", 0) or 0),
            },
            files=(b.output_file_id, b.error_file_id),
        )

    async def results(self, state: BatchState) -> dict[str, ItemResult]:
        from openai.types.chat import ChatCompletion

        out: dict[str, ItemResult] = {}
        for file_id in state.files:
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for raw in content.text.splitlines():
                if not raw.strip():
                    continue
                line = json.loads(raw)
                cid = str(line.get("custom_id"))
                response = line.get("response") or {}
                error = line.get("error")
                status = int(response.get("status_code") or 0)
                if status == 200 and not error:
                    # construct(): the SDK's own lenient reading of an answer (no validation), as for a live reply
                    out[cid] = ItemResult(ChatCompletion.construct(**response["body"]))
                    continue
                message = ""
                if isinstance(error, Mapping):
                    message = f"{error.get('code') or 'error'}: {error.get('message') or ''}"
                else:
                    body_err = (response.get("body") or {}).get("error") or {}
                    message = f"HTTP {status}: {body_err.get('message') or 'request failed'}"
                retryable = status == 0 or status in (408, 409, 429) or status >= 500
                out[cid] = ItemResult(error=f"openai batch: {message}", retryable=retryable)
        return out


class AnthropicBatches(_Common):
    """``messages.batches.create`` / ``retrieve`` / ``results`` (matched by ``custom_id``)."""

    name = "anthropic"
    max_requests = ANTHROPIC_MAX_REQUESTS
    max_bytes = ANTHROPIC_MAX_BYTES

    async def create(self, tag: str, items: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
        batch = await self.client.messages.batches.create(
            requests=[{"custom_id": cid, "params": dict(params)} for cid, params in items]
        )
        return str(batch.id)

    async def find(self, tag: str, since: float, n: int, known: set[str]) -> str | None:
        candidates: list[str] = []
        async for batch in self.client.messages.batches.list(limit=100):
            created = batch.created_at.timestamp() if isinstance(batch.created_at, datetime) else 0.0
            if created < since - RECONCILE_SKEW_S:
                break
            c = batch.request_counts
            total = sum(
                int(getattr(c, k, 0) or 0) for k in ("processing", "succeeded", "errored", "canceled", "expired")
            )
            if total == n and batch.id not in known and created >= since - RECONCILE_SKEW_S:
                candidates.append(str(batch.id))
        return candidates[0] if len(candidates) == 1 else None

    async def state(self, batch_id: str) -> BatchState:
        b = await self.client.messages.batches.retrieve(batch_id)
        c = b.request_counts
        counts = {k: int(getattr(c, k, 0) or 0) for k in ("processing", "succeeded", "errored", "canceled", "expired")}
        return BatchState(batch_id, str(b.processing_status), b.processing_status == "ended", counts)

    async def results(self, state: BatchState) -> dict[str, ItemResult]:
        out: dict[str, ItemResult] = {}
        async for item in await self.client.messages.batches.results(state.batch_id):
            result = item.result
            kind = getattr(result, "type", "")
            if kind == "succeeded":
                out[item.custom_id] = ItemResult(result.message)
            elif kind == "errored":
                err = getattr(getattr(result, "error", None), "error", None)
                etype = str(getattr(err, "type", "api_error"))
                msg = str(getattr(err, "message", "") or "")
                retryable = etype not in ("invalid_request_error", "authentication_error", "permission_error")
                out[item.custom_id] = ItemResult(error=f"anthropic batch: {etype}: {msg}", retryable=retryable)
            else:  # expired, canceled
                out[item.custom_id] = ItemResult(error=f"anthropic batch: request {kind}")
        return out


def batch_support(backend: JudgeBackend, *, compatible: bool = False) -> ProviderBatches | str:
    """The batch endpoint of ``backend``, or why it has none.

    ``compatible``: the openai-compatible backend's server also speaks OpenAI's files + batches
    API (``--batch-api on``); most (vLLM, llama.cpp) do not.
    """
    from services.judge.backends.anthropic_backend import AnthropicBackend
    from services.judge.backends.openai_backend import OpenAIBackend

    if isinstance(backend, OpenAIBackend):
        if backend.info.backend == "openai-compatible" and not compatible:
            return (
                "the openai-compatible backend's server may not speak OpenAI's batch API; start the judge with "
                "--batch-api on if it does"
            )
        return OpenAIBatches(backend)
    if isinstance(backend, AnthropicBackend):
        return AnthropicBatches(backend)
    return f"the {backend.info.backend} backend has no provider batch API (openai and anthropic have)"
