"""Fake batch endpoints for the real ``openai`` / ``anthropic`` SDKs: OpenAI's files + batches API and
Anthropic's message batches, beside the interactive fakes (:mod:`tests.support.fakes`).

Each request of a batch is answered by the very code that answers the interactive endpoint (the
same policy, the same logprobs, the same token counts), so a batch run and an interactive run of
the same queries get the same replies. What a batch does is scripted with :class:`BatchScript`:

- ``hold``: while set, batches stay ``in_progress`` (a test kills its clients meanwhile);
- ``polls_to_end``: a batch ends at its n-th retrieve (default 1: at the first poll after creation);
- ``expire``: the indices (in creation order) of batches that expire: the first ``expire_done``
  fraction of their requests have results, the rest are ``batch_expired`` / ``expired``;
- ``fail_rate``: that fraction of distinct requests (chosen by a hash of the request body, so the
  same ones whatever the batching) fail the first time they are seen (HTTP 500 / ``api_error``)
  and succeed when submitted again.

``srv.creates`` lists every batch created (what the test counts: no batch twice);
``srv.batch_requests`` counts every request submitted in a batch, by custom_id.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.support.fakes import Ok
from tests.support.fakes.anthropic_server import FakeAnthropic
from tests.support.fakes.openai_server import FakeOpenAI


@dataclass
class BatchScript:
    hold: threading.Event = field(default_factory=threading.Event)
    polls_to_end: int = 1
    expire: set[int] = field(default_factory=set)
    expire_done: float = 0.5
    fail_rate: float = 0.0


@dataclass
class _Batch:
    id: str
    index: int
    created: float
    requests: list[dict[str, Any]]  # {"custom_id", "body"}
    metadata: dict[str, str]
    polls: int = 0
    ended: bool = False
    expired: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)  # per request: {"custom_id", "ok": payload} | error


class _BatchMixin:
    """The bookkeeping shared by both fakes; ``_reply(body)`` is the interactive answer."""

    script: BatchScript

    def _init_batches(self, script: BatchScript | None) -> None:
        self.script = script or BatchScript()
        self._blk = threading.Lock()
        self._batches: dict[str, _Batch] = {}
        self.creates: list[str] = []
        self.batch_requests: Counter[str] = Counter()
        self._seen_bodies: set[str] = set()

    def _new_batch(self, prefix: str, requests: list[dict[str, Any]], metadata: dict[str, str]) -> _Batch:
        with self._blk:
            index = len(self.creates)
            b = _Batch(f"{prefix}{index:04d}", index, time.time(), requests, metadata)
            self._batches[b.id] = b
            self.creates.append(b.id)
            for r in requests:
                self.batch_requests[r["custom_id"]] += 1
            return b

    def _fails(self, body: dict[str, Any]) -> bool:
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        first = digest not in self._seen_bodies
        self._seen_bodies.add(digest)
        return first and int(digest[:8], 16) / 0xFFFFFFFF < self.script.fail_rate

    async def _poll(self, batch_id: str) -> _Batch | None:
        with self._blk:
            b = self._batches.get(batch_id)
            if b is None or b.ended:
                return b
            b.polls += 1
            if self.script.hold.is_set() or b.polls < self.script.polls_to_end:
                return b
            b.ended = True
            b.expired = b.index in self.script.expire
            todo = list(b.requests)
        keep = int(len(todo) * self.script.expire_done) if b.expired else len(todo)
        results = []
        for k, r in enumerate(todo):
            if k >= keep:
                results.append({"custom_id": r["custom_id"], "expired": True})
            elif self._fails(r["body"]):
                results.append({"custom_id": r["custom_id"], "failed": True})
            else:
                results.append({"custom_id": r["custom_id"], "ok": await self._reply(r["body"])})
        b.results = results
        return b

    async def _reply(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _listed(self) -> list[_Batch]:
        with self._blk:
            return sorted(self._batches.values(), key=lambda b: -b.index)


class FakeOpenAIBatches(_BatchMixin, FakeOpenAI):
    """:class:`FakeOpenAI` plus ``/v1/files`` and ``/v1/batches``."""

    def __init__(self, *args: Any, batch_script: BatchScript | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_batches(batch_script)
        self._files: dict[str, bytes] = {}

    async def _reply(self, body: dict[str, Any]) -> dict[str, Any]:
        _, payload, _ = await self._answer(None, body, Ok())  # type: ignore[arg-type]
        return payload

    def _file(self, data: bytes) -> str:
        with self._blk:
            fid = f"file-{len(self._files):04d}"
            self._files[fid] = data
            return fid

    def _batch_json(self, b: _Batch) -> dict[str, Any]:
        status = "in_progress" if not b.ended else ("expired" if b.expired else "completed")
        out = [r for r in b.results if "ok" in r]
        bad = [r for r in b.results if "ok" not in r]
        output_file = error_file = None
        if b.ended and not getattr(b, "_files_made", False):
            lines = [
                json.dumps(
                    {
                        "id": f"req_{i}",
                        "custom_id": r["custom_id"],
                        "response": {"status_code": 200, "request_id": f"r{i}", "body": r["ok"]},
                        "error": None,
                    }
                )
                for i, r in enumerate(out)
            ]
            errors = []
            for i, r in enumerate(bad):
                if r.get("expired"):
                    errors.append(
                        json.dumps(
                            {
                                "id": f"err_{i}",
                                "custom_id": r["custom_id"],
                                "response": None,
                                "error": {
                                    "code": "batch_expired",
                                    "message": "This request could not "
                                    "be executed before the completion window expired.",
                                },
                            }
                        )
                    )
                else:
                    errors.append(
                        json.dumps(
                            {
                                "id": f"err_{i}",
                                "custom_id": r["custom_id"],
                                "response": {
                                    "status_code": 500,
                                    "request_id": f"e{i}",
                                    "body": {"error": {"message": "fake server error", "type": "server_error"}},
                                },
                                "error": None,
                            }
                        )
                    )
            b._out = self._file(("\n".join(lines) + "\n").encode()) if lines else None  # type: ignore[attr-defined]
            b._err = self._file(("\n".join(errors) + "\n").encode()) if errors else None  # type: ignore[attr-defined]
            b._files_made = True  # type: ignore[attr-defined]
        if b.ended:
            output_file, error_file = b._out, b._err  # type: ignore[attr-defined]
        return {
            "id": b.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": None,
            "input_file_id": "file-in",
            "completion_window": "24h",
            "status": status,
            "output_file_id": output_file,
            "error_file_id": error_file,
            "created_at": int(b.created),
            "expires_at": int(b.created) + 86400,
            "metadata": b.metadata,
            "request_counts": {"total": len(b.requests), "completed": len(out), "failed": len(bad)},
        }

    def app(self) -> Any:
        app: FastAPI = super().app()

        @app.post("/v1/files")
        async def upload(request: Request) -> JSONResponse:
            raw = await request.body()
            head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
            msg = email.parser.BytesParser().parsebytes(head + raw)
            data = b""
            for part in msg.walk():
                if part.get_param("name", header="content-disposition") == "file":
                    payload = part.get_payload(decode=True)
                    data = payload if isinstance(payload, bytes) else b""
            fid = self._file(data)
            return JSONResponse(
                {
                    "id": fid,
                    "object": "file",
                    "bytes": len(data),
                    "created_at": int(time.time()),
                    "filename": "batch.jsonl",
                    "purpose": "batch",
                    "status": "processed",
                }
            )

        @app.get("/v1/files/{file_id}/content")
        async def content(file_id: str) -> Response:
            return Response(self._files[file_id], media_type="application/octet-stream")

        @app.post("/v1/batches")
        async def create(request: Request) -> JSONResponse:
            body = await request.json()
            lines = [json.loads(x) for x in self._files[body["input_file_id"]].decode().splitlines() if x.strip()]
            b = self._new_batch(
                "batch_",
                [{"custom_id": x["custom_id"], "body": x["body"]} for x in lines],
                dict(body.get("metadata") or {}),
            )
            return JSONResponse(self._batch_json(b))

        @app.get("/v1/batches/{batch_id}")
        async def retrieve(batch_id: str) -> JSONResponse:
            b = await self._poll(batch_id)
            if b is None:
                return JSONResponse({"error": {"message": "no such batch", "type": "invalid_request_error"}}, 404)
            return JSONResponse(self._batch_json(b))

        @app.get("/v1/batches")
        async def listing(limit: int = 20, after: str | None = None) -> JSONResponse:
            batches = self._listed()
            if after is not None:
                ids = [b.id for b in batches]
                batches = batches[ids.index(after) + 1 :] if after in ids else []
            page = batches[:limit]
            data = [self._batch_json(b) for b in page]
            return JSONResponse(
                {
                    "object": "list",
                    "data": data,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                    "has_more": len(batches) > limit,
                }
            )

        return app


class FakeAnthropicBatches(_BatchMixin, FakeAnthropic):
    """:class:`FakeAnthropic` plus ``/v1/messages/batches``."""

    def __init__(self, *args: Any, batch_script: BatchScript | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_batches(batch_script)

    async def _reply(self, body: dict[str, Any]) -> dict[str, Any]:
        _, payload, _ = await self._answer(None, body, Ok())  # type: ignore[arg-type]
        return payload

    def _batch_json(self, b: _Batch) -> dict[str, Any]:
        counts = Counter(
            "succeeded" if "ok" in r else ("expired" if r.get("expired") else "errored") for r in b.results
        )
        created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(b.created)) + f".{int(b.created % 1 * 1e6):06d}Z"
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": "ended" if b.ended else "in_progress",
            "request_counts": {
                "processing": 0 if b.ended else len(b.requests),
                "succeeded": counts["succeeded"],
                "errored": counts["errored"],
                "canceled": 0,
                "expired": counts["expired"],
            },
            "created_at": created,
            "expires_at": created,
            "ended_at": created if b.ended else None,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{b.id}/results" if b.ended else None,
        }

    def app(self) -> Any:
        app: FastAPI = super().app()

        @app.post("/v1/messages/batches")
        async def create(request: Request) -> JSONResponse:
            body = await request.json()
            b = self._new_batch(
                "msgbatch_", [{"custom_id": r["custom_id"], "body": r["params"]} for r in body["requests"]], {}
            )
            return JSONResponse(self._batch_json(b))

        @app.get("/v1/messages/batches/{batch_id}")
        async def retrieve(batch_id: str) -> JSONResponse:
            b = await self._poll(batch_id)
            if b is None:
                return JSONResponse({"type": "error", "error": {"type": "not_found_error", "message": "no"}}, 404)
            return JSONResponse(self._batch_json(b))

        @app.get("/v1/messages/batches/{batch_id}/results")
        async def results(batch_id: str) -> Response:
            b = self._batches[batch_id]
            lines = []
            for r in b.results:
                if "ok" in r:
                    result: dict[str, Any] = {"type": "succeeded", "message": r["ok"]}
                elif r.get("expired"):
                    result = {"type": "expired"}
                else:
                    result = {
                        "type": "errored",
                        "error": {"type": "error", "error": {"type": "api_error", "message": "fake error"}},
                    }
                lines.append(json.dumps({"custom_id": r["custom_id"], "result": result}))
            return Response(("\n".join(lines) + "\n").encode(), media_type="application/binary")

        @app.get("/v1/messages/batches")
        async def listing(limit: int = 20, after_id: str | None = None) -> JSONResponse:
            batches = self._listed()
            if after_id is not None:
                ids = [b.id for b in batches]
                batches = batches[ids.index(after_id) + 1 :] if after_id in ids else []
            page = batches[:limit]
            data = [self._batch_json(b) for b in page]
            return JSONResponse(
                {
                    "data": data,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                    "has_more": len(batches) > limit,
                }
            )

        return app
