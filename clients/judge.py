"""Clients of the judge service: :class:`AsyncJudgeClient` and its sync twin :class:`JudgeClient`.

::

    from clients import JudgeClient

    judge = JudgeClient("http://judge-host:8001")           # or grpc://judge-host:50052
    j = judge.compare("Say hi", "Hi!", "Go away.")
    if j.preference is None:
        print("no judgment:", j.abstain_reason)
    else:
        print(j.preference, j.winner, j.consistent)

An abstain is a result (``preference``/``score``/``scores`` None and ``abstain_reason`` set), not
an exception. Transport failures go through the one retry policy (:mod:`clients.retry`); judge
calls carry an ``Idempotency-Key`` reused across retries, and the service caches judgments, so a
retry after a lost answer does not pay twice. :meth:`AsyncJudgeClient.compare_many` turns a
failed item into a :class:`~clients.types.Judgment` with ``error`` set (its neighbours go on);
only UNAUTHENTICATED / PERMISSION_DENIED stop the whole batch.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from clients._core import Attempt, BaseCore, api_repr, close_sync, deadline_from, run_sync
from clients.errors import (
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    RlhfFeedbackError,
    ServerError,
)
from clients.types import Grade, ItemError, JudgeRef, Judgment, Prompt, Ranking, Usage, _prompt_wire
from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import judge_pb2 as jpb
from protos.rlhf.v1 import judge_pb2_grpc as jpb_grpc

JudgeProtocol = Literal["both_orders", "single"]
CompareItem = Mapping[str, Any] | Sequence[Any]

_PROTOCOLS = {"both_orders": jpb.PROTOCOL_BOTH_ORDERS, "single": jpb.PROTOCOL_SINGLE}


# -- HTTP JSON → results --------------------------------------------------------------------------


def _ref_json(d: Any) -> JudgeRef | None:
    if not isinstance(d, Mapping):
        return None
    return JudgeRef(str(d.get("backend", "")), str(d.get("model", "")), str(d.get("template_hash", "")))


def _usage_json(d: Any) -> Usage:
    if not isinstance(d, Mapping):
        return Usage()
    return Usage(
        int(d.get("prompt_tokens", 0)),
        int(d.get("completion_tokens", 0)),
        float(d.get("cost_usd", 0.0)),
        int(d.get("calls", 0)),
    )


def _abstain_json(d: Mapping[str, Any]) -> str | None:
    a = d.get("abstain")
    if a is None:
        return None
    return str(a.get("reason", "")) if isinstance(a, Mapping) else str(a)


def judgment_from_json(d: Any) -> Judgment:
    common: dict[str, Any] = {
        "judge": _ref_json(d.get("judge")),
        "usage": _usage_json(d.get("usage")),
        "cached": bool(d.get("cached", False)),
    }
    reason = _abstain_json(d)
    if reason is not None:
        return Judgment(None, abstain_reason=reason, **common)
    winner = d.get("winner")
    return Judgment(
        float(d["preference"]),
        winner=int(winner) if winner is not None else None,
        consistent=bool(d["consistent"]) if d.get("consistent") is not None else None,
        soft=bool(d["soft"]) if d.get("soft") is not None else None,
        rationale=d.get("rationale"),
        **common,
    )


def ranking_from_json(d: Any) -> Ranking:
    common: dict[str, Any] = {
        "judge": _ref_json(d.get("judge")),
        "usage": _usage_json(d.get("usage")),
        "cached": bool(d.get("cached", False)),
    }
    reason = _abstain_json(d)
    if reason is not None:
        return Ranking(None, None, abstain_reason=reason, **common)
    rate = d.get("consistent_rate")
    return Ranking(
        [float(s) for s in d["scores"]],
        [int(r) for r in d["ranking"]],
        consistent_rate=float(rate) if rate is not None else None,
        **common,
    )


def grade_from_json(d: Any) -> Grade:
    common: dict[str, Any] = {
        "judge": _ref_json(d.get("judge")),
        "usage": _usage_json(d.get("usage")),
        "cached": bool(d.get("cached", False)),
    }
    reason = _abstain_json(d)
    if reason is not None:
        return Grade(None, abstain_reason=reason, **common)
    return Grade(
        float(d["score"]),
        raw=float(d["raw"]) if d.get("raw") is not None else None,
        soft=bool(d["soft"]) if d.get("soft") is not None else None,
        rationale=d.get("rationale"),
        **common,
    )


# -- protobuf → results ---------------------------------------------------------------------------


def _common_pb(reply: Any) -> dict[str, Any]:
    judge = None
    if reply.HasField("judge"):
        judge = JudgeRef(reply.judge.backend, reply.judge.model, reply.judge.template_hash)
    u = reply.usage
    usage = Usage(u.prompt_tokens, u.completion_tokens, u.cost_usd, u.calls)
    return {"judge": judge, "usage": usage, "cached": reply.cached}


def judgment_from_pb(reply: jpb.JudgeCompareResponse) -> Judgment:
    common = _common_pb(reply)
    if reply.WhichOneof("outcome") != "comparison":
        return Judgment(None, abstain_reason=reply.abstain.reason or "abstained", **common)
    c = reply.comparison
    return Judgment(
        c.preference,
        winner=c.winner if c.HasField("winner") else None,
        consistent=c.consistent,
        soft=c.soft,
        rationale=c.rationale if c.HasField("rationale") else None,
        **common,
    )


def ranking_from_pb(reply: jpb.JudgeRankResponse) -> Ranking:
    common = _common_pb(reply)
    if reply.WhichOneof("outcome") != "ranking":
        return Ranking(None, None, abstain_reason=reply.abstain.reason or "abstained", **common)
    r = reply.ranking
    return Ranking(list(r.scores), list(r.ranking), consistent_rate=r.consistent_rate, **common)


def grade_from_pb(reply: jpb.JudgeGradeResponse) -> Grade:
    common = _common_pb(reply)
    if reply.WhichOneof("outcome") != "grade":
        return Grade(None, abstain_reason=reply.abstain.reason or "abstained", **common)
    g = reply.grade
    return Grade(g.score, raw=g.raw, soft=g.soft, rationale=g.rationale if g.HasField("rationale") else None, **common)


def _set_prompt(request: Any, prompt: str | list[dict[str, str]]) -> None:
    if isinstance(prompt, str):
        request.prompt_text = prompt
    else:
        request.prompt_messages.CopyFrom(
            cpb.Conversation(messages=[cpb.Message(role=m["role"], content=m["content"]) for m in prompt])
        )


# -- the core ----------------------------------------------------------------------------------------


def _request_body(
    prompt: Prompt, *, rubric: str | None, reference: str | None, principles: Sequence[str] | None
) -> dict[str, Any]:
    try:
        body: dict[str, Any] = {"prompt": _prompt_wire(prompt)}
    except TypeError as exc:
        raise InvalidRequestError(str(exc)) from None
    if rubric is not None:
        body["rubric"] = rubric
    if reference is not None:
        body["reference"] = reference
    if principles:
        body["principles"] = list(principles)
    return body


def compare_request(
    prompt: Prompt,
    a: str,
    b: str,
    *,
    rubric: str | None = None,
    reference: str | None = None,
    protocol: JudgeProtocol = "both_orders",
    principles: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One batch-job request, ``{"compare": body}``, with the very body :meth:`AsyncJudgeClient.compare` posts."""
    body = _request_body(prompt, rubric=rubric, reference=reference, principles=principles)
    body["responses"] = [a, b]
    body["protocol"] = protocol
    return {"compare": body}


def rank_request(
    prompt: Prompt,
    responses: Sequence[str],
    *,
    rubric: str | None = None,
    reference: str | None = None,
    principles: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One batch-job request, ``{"rank": body}``, with the very body :meth:`AsyncJudgeClient.rank` posts."""
    body = _request_body(prompt, rubric=rubric, reference=reference, principles=principles)
    body["responses"] = list(responses)
    return {"rank": body}


def grade_request(
    prompt: Prompt,
    response: str,
    *,
    rubric: str | None = None,
    reference: str | None = None,
    scale: tuple[int, int] = (1, 5),
    principles: Sequence[str] | None = None,
) -> dict[str, Any]:
    """One batch-job request, ``{"grade": body}``, with the very body :meth:`AsyncJudgeClient.grade` posts."""
    body = _request_body(prompt, rubric=rubric, reference=reference, principles=principles)
    body["response"] = response
    body["scale"] = [int(scale[0]), int(scale[1])]
    return {"grade": body}


class _JudgeCore(BaseCore):
    def _body(
        self,
        prompt: Prompt,
        *,
        rubric: str | None,
        reference: str | None,
        principles: Sequence[str] | None,
    ) -> dict[str, Any]:
        return _request_body(prompt, rubric=rubric, reference=reference, principles=principles)

    async def batch_create(
        self, requests: Sequence[Mapping[str, Any]], *, idempotency_key: str, deadline: float | None
    ) -> dict[str, Any]:
        body = {"idempotency_key": idempotency_key, "requests": list(requests)}

        async def attempt(at: Attempt) -> dict[str, Any]:
            if at.endpoint.kind != "http":
                raise InvalidRequestError("the judge's batch API is HTTP only: pass an http(s):// judge URL")
            return dict(await self.http_call(at, "POST", "/v1/batches", body))

        # Retrying is safe: the idempotency key makes the service return the job it already has.
        return await self.call(attempt, deadline=deadline)

    async def batch_status(self, batch_id: str, *, deadline: float | None) -> dict[str, Any]:
        async def attempt(at: Attempt) -> dict[str, Any]:
            if at.endpoint.kind != "http":
                raise InvalidRequestError("the judge's batch API is HTTP only: pass an http(s):// judge URL")
            return dict(await self.http_call(at, "GET", f"/v1/batches/{batch_id}"))

        return await self.call(attempt, deadline=deadline)

    def _pb_common(self, request: Any, body: Mapping[str, Any]) -> Any:
        _set_prompt(request, body["prompt"])
        if "rubric" in body:
            request.rubric = body["rubric"]
        if "reference" in body:
            request.reference = body["reference"]
        request.principles.extend(body.get("principles", ()))
        return request

    async def _post(self, at: Attempt, path: str, body: Mapping[str, Any], parse: Any) -> Any:
        answer = await self.http_call(at, "POST", path, body)
        try:
            return parse(answer)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ServerError(f"unexpected {path} answer: {exc!r}", request_id=at.ids.request_id) from None

    async def compare(
        self,
        prompt: Prompt,
        a: str,
        b: str,
        *,
        rubric: str | None,
        reference: str | None,
        protocol: JudgeProtocol,
        principles: Sequence[str] | None,
        deadline: float | None,
        hint: int = 0,
    ) -> Judgment:
        if protocol not in _PROTOCOLS:
            raise InvalidRequestError(f"protocol is 'both_orders' or 'single', not {protocol!r}")
        if not isinstance(a, str) or not isinstance(b, str):
            raise InvalidRequestError("the two responses must be strings")
        body = self._body(prompt, rubric=rubric, reference=reference, principles=principles)
        body["responses"] = [a, b]
        body["protocol"] = protocol

        async def attempt(at: Attempt) -> Judgment:
            if at.endpoint.kind == "http":
                return await self._post(at, "/v1/compare", body, judgment_from_json)
            request = self._pb_common(jpb.JudgeCompareRequest(responses=[a, b], protocol=_PROTOCOLS[protocol]), body)
            stub = self.conns().stub(at.endpoint, jpb_grpc.JudgeServiceStub)
            return judgment_from_pb(await self.grpc_call(at, stub.Compare, request))

        return await self.call(attempt, deadline=deadline, hint=hint)

    async def compare_many(
        self, items: Sequence[CompareItem], *, concurrency: int | None, deadline_s: float | None
    ) -> list[Judgment]:
        deadline = deadline_from(deadline_s)
        gate = asyncio.Semaphore(concurrency or self.max_concurrency)
        parsed = [_compare_item(x, i) for i, x in enumerate(items)]

        async def one(k: int, kw: dict[str, Any]) -> Judgment:
            async with gate:
                try:
                    return await self.compare(**kw, deadline=deadline, hint=k)
                except (AuthenticationError, PermissionDeniedError):
                    raise
                except RlhfFeedbackError as err:
                    return Judgment(None, error=ItemError(err.code, err.message))

        tasks = [asyncio.ensure_future(one(k, kw)) for k, kw in enumerate(parsed)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for t in tasks:
                t.cancel()

    async def rank(
        self,
        prompt: Prompt,
        responses: Sequence[str],
        *,
        rubric: str | None,
        reference: str | None,
        principles: Sequence[str] | None,
        deadline: float | None,
    ) -> Ranking:
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise InvalidRequestError(f"responses[{i}] must be a string", item=i)
        body = self._body(prompt, rubric=rubric, reference=reference, principles=principles)
        body["responses"] = list(responses)

        async def attempt(at: Attempt) -> Ranking:
            if at.endpoint.kind == "http":
                return await self._post(at, "/v1/rank", body, ranking_from_json)
            request = self._pb_common(jpb.JudgeRankRequest(responses=list(responses)), body)
            stub = self.conns().stub(at.endpoint, jpb_grpc.JudgeServiceStub)
            return ranking_from_pb(await self.grpc_call(at, stub.Rank, request))

        return await self.call(attempt, deadline=deadline)

    async def grade(
        self,
        prompt: Prompt,
        response: str,
        *,
        rubric: str | None,
        reference: str | None,
        scale: tuple[int, int],
        principles: Sequence[str] | None,
        deadline: float | None,
    ) -> Grade:
        if not isinstance(response, str):
            raise InvalidRequestError("response must be a string")
        lo, hi = scale
        body = self._body(prompt, rubric=rubric, reference=reference, principles=principles)
        body["response"] = response
        body["scale"] = [int(lo), int(hi)]

        async def attempt(at: Attempt) -> Grade:
            if at.endpoint.kind == "http":
                return await self._post(at, "/v1/grade", body, grade_from_json)
            request = self._pb_common(
                jpb.JudgeGradeRequest(response=response, scale=jpb.Scale(lo=int(lo), hi=int(hi))), body
            )
            stub = self.conns().stub(at.endpoint, jpb_grpc.JudgeServiceStub)
            return grade_from_pb(await self.grpc_call(at, stub.Grade, request))

        return await self.call(attempt, deadline=deadline)

    async def model_info(self, *, deadline: float | None) -> dict[str, Any]:
        async def attempt(at: Attempt) -> dict[str, Any]:
            if at.endpoint.kind == "http":
                body = await self.http_call(at, "GET", "/v1/models")
                try:
                    return dict(body["data"][0])
                except (KeyError, IndexError, TypeError) as exc:
                    raise ServerError(f"unexpected /v1/models answer: {exc!r}") from None
            stub = self.conns().stub(at.endpoint, jpb_grpc.JudgeServiceStub)
            info = await self.grpc_call(at, stub.GetModelInfo, jpb.GetJudgeInfoRequest())
            from google.protobuf.json_format import MessageToDict

            limits = MessageToDict(info.limits, preserving_proto_field_name=True)
            bounds = limits.get("grade_scale_bounds")
            if isinstance(bounds, Mapping):
                limits["grade_scale_bounds"] = [bounds.get("lo", 0), bounds.get("hi", 0)]
            return {
                "id": info.judge.model,
                "backend": info.judge.backend,
                "model": info.judge.model,
                "template_hash": info.judge.template_hash,
                "limits": limits,
            }

        return await self.call(attempt, deadline=deadline)


def _compare_item(x: CompareItem, i: int) -> dict[str, Any]:
    """One ``compare_many`` item: ``(prompt, a, b)``, or a mapping with ``prompt`` and ``a``/``b``
    or ``responses: [a, b]``, plus optional ``rubric``, ``reference``, ``protocol``, ``principles``."""
    if isinstance(x, Mapping):
        if "responses" in x:
            responses = list(x["responses"])
            if len(responses) != 2:
                raise InvalidRequestError(f"items[{i}]: responses must hold exactly two responses", item=i)
            a, b = responses
        else:
            a, b = x.get("a"), x.get("b")
        unknown = set(x) - {"prompt", "a", "b", "responses", "rubric", "reference", "protocol", "principles"}
        if unknown or "prompt" not in x:
            raise InvalidRequestError(
                f"items[{i}]: needs prompt and a/b (or responses); unknown keys {sorted(unknown)}", item=i
            )
        return {
            "prompt": x["prompt"],
            "a": a,
            "b": b,
            "rubric": x.get("rubric"),
            "reference": x.get("reference"),
            "protocol": x.get("protocol", "both_orders"),
            "principles": x.get("principles"),
        }
    if isinstance(x, Sequence) and not isinstance(x, str) and len(x) == 3:
        prompt, a, b = x
        return {
            "prompt": prompt,
            "a": a,
            "b": b,
            "rubric": None,
            "reference": None,
            "protocol": "both_orders",
            "principles": None,
        }
    raise InvalidRequestError(f"items[{i}]: expected (prompt, a, b) or a mapping", item=i)


# -- the twins -------------------------------------------------------------------------------------


class _JudgeClientBase:
    def __init__(
        self,
        url: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float | None = 120,
        max_retries: int = 8,
        max_concurrency: int = 16,
        tls_ca: str | os.PathLike[str] | None = None,
    ) -> None:
        """A client of the judge service.

        ``url``: ``http(s)://host:port``, ``grpc(s)://host:port``, ``dns:///name:port`` or a list
        (as for the reward client). ``api_key`` defaults to ``RLHF_FEEDBACK_API_KEY``;
        ``timeout`` is per attempt (LLM judgments can be slow); ``max_concurrency`` bounds
        :meth:`compare_many` unless it is given ``concurrency``.
        """
        self._core = _JudgeCore(
            url,
            api_key=api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_concurrency=max_concurrency,
            tls_ca=tls_ca,
        )

    def __repr__(self) -> str:
        return api_repr(type(self).__name__, self._core)


class AsyncJudgeClient(_JudgeClientBase):
    """Async client of the judge service (the sync twin is :class:`JudgeClient`)."""

    async def compare(
        self,
        prompt: Prompt,
        a: str,
        b: str,
        *,
        rubric: str | None = None,
        reference: str | None = None,
        protocol: JudgeProtocol = "both_orders",
        principles: Sequence[str] | None = None,
        deadline_s: float | None = None,
    ) -> Judgment:
        """P(a better than b) with winner and consistency, or an abstain with its reason."""
        return await self._core.compare(
            prompt,
            a,
            b,
            rubric=rubric,
            reference=reference,
            protocol=protocol,
            principles=principles,
            deadline=deadline_from(deadline_s),
        )

    async def compare_many(
        self, items: Sequence[CompareItem], *, concurrency: int | None = None, deadline_s: float | None = None
    ) -> list[Judgment]:
        """Judge many pairs concurrently; results in input order, a failed item as a Judgment with ``error``."""
        return await self._core.compare_many(items, concurrency=concurrency, deadline_s=deadline_s)

    async def rank(
        self,
        prompt: Prompt,
        responses: Sequence[str],
        *,
        rubric: str | None = None,
        reference: str | None = None,
        principles: Sequence[str] | None = None,
        deadline_s: float | None = None,
    ) -> Ranking:
        """Bradley-Terry scores and ranking of several responses, or an abstain."""
        return await self._core.rank(
            prompt,
            responses,
            rubric=rubric,
            reference=reference,
            principles=principles,
            deadline=deadline_from(deadline_s),
        )

    async def grade(
        self,
        prompt: Prompt,
        response: str,
        *,
        rubric: str | None = None,
        reference: str | None = None,
        scale: tuple[int, int] = (1, 5),
        principles: Sequence[str] | None = None,
        deadline_s: float | None = None,
    ) -> Grade:
        """A grade in [0, 1] (and ``raw`` on ``scale``), or an abstain."""
        return await self._core.grade(
            prompt,
            response,
            rubric=rubric,
            reference=reference,
            scale=scale,
            principles=principles,
            deadline=deadline_from(deadline_s),
        )

    async def model_info(self, *, deadline_s: float | None = None) -> dict[str, Any]:
        """The judge (backend, model, template hash) and the server's limits."""
        return await self._core.model_info(deadline=deadline_from(deadline_s))

    async def batch_create(
        self, requests: Sequence[Mapping[str, Any]], *, idempotency_key: str, deadline_s: float | None = None
    ) -> dict[str, Any]:
        """Start a batch job (``POST /v1/batches``): ``requests`` from :func:`compare_request`,
        :func:`rank_request`, :func:`grade_request`; the same ``idempotency_key`` returns the same job.
        The job (``id``, ``status``, ``queries``, ``usage``...) as the service answers it."""
        return await self._core.batch_create(requests, idempotency_key=idempotency_key,
                                             deadline=deadline_from(deadline_s))  # fmt: skip

    async def batch_status(self, batch_id: str, *, deadline_s: float | None = None) -> dict[str, Any]:
        """A batch job's progress (``GET /v1/batches/{id}``): ``status`` is ``completed`` when it is done."""
        return await self._core.batch_status(batch_id, deadline=deadline_from(deadline_s))

    async def aclose(self) -> None:
        await self._core.aclose()

    async def __aenter__(self) -> AsyncJudgeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class JudgeClient(_JudgeClientBase):
    """Sync client of the judge service: the same core as :class:`AsyncJudgeClient`, run on a
    private event-loop thread. Safe to call from several threads; picklable."""

    def compare(
        self,
        prompt: Prompt,
        a: str,
        b: str,
        *,
        rubric: str | None = None,
        reference: str | None = None,
        protocol: JudgeProtocol = "both_orders",
        principles: Sequence[str] | None = None,
        deadline_s: float | None = None,
    ) -> Judgment:
        """P(a better than b) with winner and consistency, or an abstain with its reason."""
        return run_sync(
            self._core.compare(
                prompt,
                a,
                b,
                rubric=rubric,
                reference=reference,
                protocol=protocol,
                principles=principles,
                deadline=deadline_from(deadline_s),
            )
        )

    def compare_many(
        self, items: Sequence[CompareItem], *, concurrency: int | None = None, deadline_s: float | None = None
    ) -> list[Judgment]:
        """Judge many pairs concurrently; results in input order, a failed item as a Judgment with ``error``."""
        return run_sync(self._core.compare_many(items, concurrency=concurrency, deadline_s=deadline_s))

    def rank(
        self,
        prompt: Prompt,
        responses: Sequence[str],
        *,
        rubric: str | None = None,
        reference: str | None = None,
        principles: Sequence[str] | None = None,
        deadline_s: float | None = None,
    ) -> Ranking:
        """Bradley-Terry scores and ranking of several responses, or an abstain."""
        return run_sync(
            self._core.rank(
                prompt,
                responses,
                rubric=rubric,
                reference=reference,
                principles=principles,
                deadline=deadline_from(deadline_s),
            )
        )

    def grade(
        self,
        prompt: Prompt,
        response: str,
        *,
        rubric: str | None = None,
        reference: str | None = None,
        scale: tuple[int, int] = (1, 5),
        principles: Sequence[str] | None = None,
        deadline_s: float | None = None,
    ) -> Grade:
        """A grade in [0, 1] (and ``raw`` on ``scale``), or an abstain."""
        return run_sync(
            self._core.grade(
                prompt,
                response,
                rubric=rubric,
                reference=reference,
                scale=scale,
                principles=principles,
                deadline=deadline_from(deadline_s),
            )
        )

    def model_info(self, *, deadline_s: float | None = None) -> dict[str, Any]:
        """The judge (backend, model, template hash) and the server's limits."""
        return run_sync(self._core.model_info(deadline=deadline_from(deadline_s)))

    def batch_create(
        self, requests: Sequence[Mapping[str, Any]], *, idempotency_key: str, deadline_s: float | None = None
    ) -> dict[str, Any]:
        """Start a batch job (``POST /v1/batches``): ``requests`` from :func:`compare_request`,
        :func:`rank_request`, :func:`grade_request`; the same ``idempotency_key`` returns the same job.
        The job (``id``, ``status``, ``queries``, ``usage``...) as the service answers it."""
        return run_sync(self._core.batch_create(requests, idempotency_key=idempotency_key,
                                                deadline=deadline_from(deadline_s)))  # fmt: skip

    def batch_status(self, batch_id: str, *, deadline_s: float | None = None) -> dict[str, Any]:
        """A batch job's progress (``GET /v1/batches/{id}``): ``status`` is ``completed`` when it is done."""
        return run_sync(self._core.batch_status(batch_id, deadline=deadline_from(deadline_s)))

    def close(self) -> None:
        close_sync(self._core)

    def __enter__(self) -> JudgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["AsyncJudgeClient", "JudgeClient", "compare_request", "grade_request", "rank_request"]
