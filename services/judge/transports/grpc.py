"""gRPC transport of the judge service: ``rlhf.v1.JudgeService`` over grpc.aio.

Thin by design: each method translates the request (``*_from_grpc``: the decoded message is
validated by the same wire models as HTTP bodies, :func:`services.judge.schemas.validate`, and the
same size limits, so both transports reject the same requests), calls the :class:`JudgeEngine`,
and translates the result back (``*_to_grpc``). An abstain is the ``abstain`` member of the
response's ``outcome`` oneof, never a status. Errors travel through the one error table; auth,
limits, request ids, health, reflection and TLS come from :mod:`services.common.grpc_support`.

CompareStream judges every incoming request concurrently and sends each answer as soon as it is
done, tagged with the request's ``request_id``. A request-level failure of one request (invalid
input, queue full, draining, deadline) becomes that request's ``error`` and leaves the others
alone; a message that cannot be decoded at all ends the stream with INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import judge_pb2 as pb
from services.common.errors import INTERNAL_MESSAGE, ErrorCode, ServiceError
from services.common.grpc_support import (
    GrpcServerHandle,
    MethodHandlers,
    Rejected,
    build_grpc_server,
    deadline_of,
    fan_out,
)
from services.judge.engine.service import JudgeEngine
from services.judge.schemas import (
    CompareRequest,
    GradeRequest,
    RankRequest,
    RequestLimits,
    validate,
)
from services.judge.settings import JudgeSettings
from services.judge.types import (
    Abstain,
    CompareInput,
    CompareResult,
    GradeInput,
    GradeResult,
    JudgeRef,
    RankInput,
    RankResult,
    Usage,
)

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JudgeService"].full_name  # "rlhf.v1.JudgeService"

_PROTOCOLS: Mapping[int, str] = {
    pb.PROTOCOL_UNSPECIFIED: "both_orders",
    pb.PROTOCOL_BOTH_ORDERS: "both_orders",
    pb.PROTOCOL_SINGLE: "single",
}

# -- from_grpc ---------------------------------------------------------------------------------


def _prompt(msg: Any) -> Any:
    """The prompt as the JSON API would carry it (validated by the wire model; unset is an error there)."""
    which = msg.WhichOneof("prompt")
    if which == "prompt_text":
        return msg.prompt_text
    if which == "prompt_messages":
        return [{"role": m.role, "content": m.content} for m in msg.prompt_messages.messages]
    return None


def _common(msg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"prompt": _prompt(msg), "principles": list(msg.principles)}
    if msg.HasField("rubric"):
        out["rubric"] = msg.rubric
    if msg.HasField("reference"):
        out["reference"] = msg.reference
    return out


def compare_from_grpc(msg: pb.JudgeCompareRequest) -> CompareInput:
    protocol = _PROTOCOLS.get(msg.protocol, f"<enum value {msg.protocol}>")
    data = {**_common(msg), "responses": list(msg.responses), "protocol": protocol}
    return validate(CompareRequest, data).to_engine()


def rank_from_grpc(msg: pb.JudgeRankRequest) -> RankInput:
    return validate(RankRequest, {**_common(msg), "responses": list(msg.responses)}).to_engine()


def grade_from_grpc(msg: pb.JudgeGradeRequest) -> GradeInput:
    data = {**_common(msg), "response": msg.response}
    if msg.HasField("scale"):
        data["scale"] = (msg.scale.lo, msg.scale.hi)
    return validate(GradeRequest, data).to_engine()


# -- to_grpc -----------------------------------------------------------------------------------


def judge_to_grpc(ref: JudgeRef) -> pb.JudgeRef:
    return pb.JudgeRef(backend=ref.backend, model=ref.model, template_hash=ref.template_hash)


def usage_to_grpc(usage: Usage) -> pb.JudgeUsage:
    return pb.JudgeUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cost_usd=usage.cost_usd,
        calls=usage.calls,
    )


def _abstain_fields(result: Abstain) -> dict[str, Any]:
    out: dict[str, Any] = {"abstain": pb.Abstain(reason=result.reason), "usage": usage_to_grpc(result.usage)}
    if result.judge is not None:
        out["judge"] = judge_to_grpc(result.judge)
    return out


def _judged_fields(result: CompareResult | RankResult | GradeResult) -> dict[str, Any]:
    return {"judge": judge_to_grpc(result.judge), "usage": usage_to_grpc(result.usage), "cached": result.cached}


def compare_to_grpc(result: CompareResult | Abstain) -> pb.JudgeCompareResponse:
    if isinstance(result, Abstain):
        return pb.JudgeCompareResponse(**_abstain_fields(result))
    comparison = pb.Comparison(preference=result.preference, consistent=result.consistent, soft=result.soft)
    if result.winner is not None:
        comparison.winner = result.winner
    if result.rationale is not None:
        comparison.rationale = result.rationale
    return pb.JudgeCompareResponse(comparison=comparison, **_judged_fields(result))


def rank_to_grpc(result: RankResult | Abstain) -> pb.JudgeRankResponse:
    if isinstance(result, Abstain):
        return pb.JudgeRankResponse(**_abstain_fields(result))
    ranking = pb.Ranking(scores=result.scores, ranking=result.ranking, consistent_rate=result.consistent_rate)
    return pb.JudgeRankResponse(ranking=ranking, **_judged_fields(result))


def grade_to_grpc(result: GradeResult | Abstain) -> pb.JudgeGradeResponse:
    if isinstance(result, Abstain):
        return pb.JudgeGradeResponse(**_abstain_fields(result))
    grade = pb.Grade(score=result.score, raw=result.raw, soft=result.soft)
    if result.rationale is not None:
        grade.rationale = result.rationale
    return pb.JudgeGradeResponse(grade=grade, **_judged_fields(result))


def info_to_grpc(ref: JudgeRef, limits: Mapping[str, Any]) -> pb.JudgeInfo:
    """``limits``: :meth:`RequestLimits.body` (the service's limits and the engine's)."""
    out = pb.JudgeLimits()
    for name, fd in pb.JudgeLimits.DESCRIPTOR.fields_by_name.items():
        value = limits.get(name)
        if value is None:
            continue
        if fd.message_type is not None:  # grade_scale_bounds: (lo, hi)
            lo, hi = value
            getattr(out, name).CopyFrom(pb.Scale(lo=int(lo), hi=int(hi)))
        elif fd.type == fd.TYPE_DOUBLE:
            setattr(out, name, float(value))
        else:
            setattr(out, name, int(value))
    return pb.JudgeInfo(judge=judge_to_grpc(ref), limits=out)


# -- the servicer ------------------------------------------------------------------------------


class JudgeServicer:
    """``rlhf.v1.JudgeService``: from_grpc → engine → to_grpc, nothing else."""

    def __init__(self, engine: JudgeEngine, limits: RequestLimits) -> None:
        self.engine = engine
        self.limits = limits

    async def Compare(
        self, request: pb.JudgeCompareRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.JudgeCompareResponse:
        item = self.limits.check_compare(compare_from_grpc(request))
        return compare_to_grpc(await self.engine.compare(item, deadline=deadline_of(context)))

    async def Rank(
        self, request: pb.JudgeRankRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.JudgeRankResponse:
        item = self.limits.check_rank(rank_from_grpc(request))
        return rank_to_grpc(await self.engine.rank(item, deadline=deadline_of(context)))

    async def Grade(
        self, request: pb.JudgeGradeRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.JudgeGradeResponse:
        item = self.limits.check_grade(grade_from_grpc(request))
        return grade_to_grpc(await self.engine.grade(item, deadline=deadline_of(context)))

    async def GetModelInfo(
        self, request: pb.GetJudgeInfoRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.JudgeInfo:
        return info_to_grpc(self.engine.info, self.limits.body(self.engine.limits))

    async def CompareStream(
        self,
        requests: AsyncIterator[pb.JudgeCompareRequest | Rejected],
        context: grpc.aio.ServicerContext,
        request_id: str,
    ) -> AsyncIterator[pb.JudgeCompareStreamResponse]:
        deadline = deadline_of(context)

        async def handle(
            request: pb.JudgeCompareRequest, emit: Callable[[pb.JudgeCompareStreamResponse], None]
        ) -> None:
            await self._compare_one(request, deadline, emit)

        async for response in fan_out(requests, handle):
            yield response

    async def _compare_one(
        self,
        request: pb.JudgeCompareRequest,
        deadline: float | None,
        emit: Callable[[pb.JudgeCompareStreamResponse], None],
    ) -> None:
        """Judge one request of a stream; its answer (or its request-level error) is emitted."""
        rid = request.request_id
        try:
            item = self.limits.check_compare(compare_from_grpc(request))
            result = await self.engine.compare(item, deadline=deadline)
            emit(pb.JudgeCompareStreamResponse(request_id=rid, response=compare_to_grpc(result)))
        except ServiceError as err:
            emit(_error(rid, err.code, err.message if err.code is not ErrorCode.INTERNAL else INTERNAL_MESSAGE))
        except Exception:
            log.exception("CompareStream request %r failed", rid)
            emit(_error(rid, ErrorCode.INTERNAL, INTERNAL_MESSAGE))


def _error(request_id: str, code: ErrorCode, message: str) -> pb.JudgeCompareStreamResponse:
    return pb.JudgeCompareStreamResponse(request_id=request_id, error=cpb.Error(code=code.value, message=message))


# -- the server --------------------------------------------------------------------------------


def create_grpc_server(
    engine: JudgeEngine,
    settings: JudgeSettings,
    *,
    api_key: str | None,
    health_poll_interval: float = 1.0,
) -> GrpcServerHandle:
    """Build the judge service's grpc.aio server: JudgeService, health, reflection, auth, limits, TLS."""
    servicer = JudgeServicer(engine, RequestLimits.of(settings))
    m = MethodHandlers(engine.metrics, settings.max_body_bytes)
    handlers = {
        "Compare": m.unary("Compare", servicer.Compare, pb.JudgeCompareRequest, pb.JudgeCompareResponse),
        "CompareStream": m.stream(
            "CompareStream", servicer.CompareStream, pb.JudgeCompareRequest, pb.JudgeCompareStreamResponse
        ),
        "Rank": m.unary("Rank", servicer.Rank, pb.JudgeRankRequest, pb.JudgeRankResponse),
        "Grade": m.unary("Grade", servicer.Grade, pb.JudgeGradeRequest, pb.JudgeGradeResponse),
        "GetModelInfo": m.unary("GetModelInfo", servicer.GetModelInfo, pb.GetJudgeInfoRequest, pb.JudgeInfo),
    }
    return build_grpc_server(
        SERVICE_NAME,
        handlers,
        settings,
        api_key=api_key,
        metrics=engine.metrics,
        live=lambda: engine.live,
        ready=lambda: engine.ready,
        health_poll_interval=health_poll_interval,
    )
