"""gRPC transport of the judge service: ``rlhf.v1.JudgeService`` over grpc.aio.

Thin by design, like the reward service's: each method translates the request straight into the
engine's input (``*_from_grpc``), calls the :class:`JudgeEngine`, which validates it with the same
checks as HTTP requests get (:mod:`services.judge.engine.validation`), and translates the result
back (:mod:`services.judge.wire`, which also builds the HTTP bodies). An abstain is the ``abstain``
member of the response's ``outcome`` oneof, never a status. Errors travel through the one error
table; auth, limits, request ids, health, reflection and TLS come from
:mod:`services.common.grpc_support`.

CompareStream judges every incoming request concurrently and sends each answer as soon as it is
done, tagged with the request's ``request_id``. A request-level failure of one request (invalid
input, queue full, draining, deadline) becomes that request's ``error`` and leaves the others
alone; a message that cannot be decoded at all ends the stream with INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping

import grpc

from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import judge_pb2 as pb
from services.common.errors import INTERNAL_MESSAGE, ErrorCode, ServiceError, invalid
from services.common.grpc_support import (
    GrpcServerHandle,
    MethodHandlers,
    Rejected,
    build_grpc_server,
    deadline_of,
    fan_out,
)
from services.judge.engine.service import JudgeEngine
from services.judge.settings import JudgeSettings
from services.judge.types import DEFAULT_SCALE, CompareInput, GradeInput, JudgePrompt, RankInput
from services.judge.wire import compare_to_grpc, grade_to_grpc, info_to_grpc, rank_to_grpc
from services.runtime.chat import as_messages

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JudgeService"].full_name  # "rlhf.v1.JudgeService"

_PROTOCOLS: Mapping[int, str] = {
    pb.PROTOCOL_UNSPECIFIED: "both_orders",
    pb.PROTOCOL_BOTH_ORDERS: "both_orders",
    pb.PROTOCOL_SINGLE: "single",
}

# -- from_grpc ---------------------------------------------------------------------------------


_Request = pb.JudgeCompareRequest | pb.JudgeRankRequest | pb.JudgeGradeRequest


def prompt_from_grpc(msg: _Request) -> JudgePrompt:
    """The prompt as the engine takes it; an unset ``prompt`` oneof is INVALID_ARGUMENT."""
    which = msg.WhichOneof("prompt")
    if which == "prompt_text":
        return msg.prompt_text
    if which == "prompt_messages":
        return as_messages(msg.prompt_messages.messages)
    raise invalid("prompt is not set: send prompt_text or prompt_messages")


def _rubric_reference(msg: _Request) -> tuple[str | None, str | None]:
    """The optional texts: unset is None (an empty string is set, and refused by validation)."""
    return (
        msg.rubric if msg.HasField("rubric") else None,
        msg.reference if msg.HasField("reference") else None,
    )


def protocol_from_grpc(value: int) -> str:
    """The protocol's API name; an unknown value is named as such, for validation to refuse."""
    return _PROTOCOLS.get(value, f"<enum value {value}>")


def compare_from_grpc(msg: pb.JudgeCompareRequest) -> CompareInput:
    rubric, reference = _rubric_reference(msg)
    return CompareInput.from_wire(
        prompt_from_grpc(msg),
        msg.responses,
        rubric=rubric,
        reference=reference,
        protocol=protocol_from_grpc(msg.protocol),
        principles=msg.principles,
    )


def rank_from_grpc(msg: pb.JudgeRankRequest) -> RankInput:
    rubric, reference = _rubric_reference(msg)
    return RankInput(
        prompt=prompt_from_grpc(msg),
        responses=tuple(msg.responses),
        rubric=rubric,
        reference=reference,
        principles=tuple(msg.principles),
    )


def grade_from_grpc(msg: pb.JudgeGradeRequest) -> GradeInput:
    rubric, reference = _rubric_reference(msg)
    return GradeInput(
        prompt=prompt_from_grpc(msg),
        response=msg.response,
        rubric=rubric,
        reference=reference,
        scale=(msg.scale.lo, msg.scale.hi) if msg.HasField("scale") else DEFAULT_SCALE,
        principles=tuple(msg.principles),
    )


# -- the servicer ------------------------------------------------------------------------------


class JudgeServicer:
    """``rlhf.v1.JudgeService``: from_grpc → engine → to_grpc, nothing else."""

    def __init__(self, engine: JudgeEngine, *, max_body_bytes: int) -> None:
        self.engine = engine
        self.max_body_bytes = max_body_bytes  # reported by GetModelInfo; enforced by the method handlers

    async def Compare(
        self, request: pb.JudgeCompareRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.JudgeCompareResponse:
        item = compare_from_grpc(request)
        return compare_to_grpc(await self.engine.compare(item, deadline=deadline_of(context)))

    async def Rank(
        self, request: pb.JudgeRankRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.JudgeRankResponse:
        item = rank_from_grpc(request)
        return rank_to_grpc(await self.engine.rank(item, deadline=deadline_of(context)))

    async def Grade(
        self, request: pb.JudgeGradeRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.JudgeGradeResponse:
        item = grade_from_grpc(request)
        return grade_to_grpc(await self.engine.grade(item, deadline=deadline_of(context)))

    async def GetModelInfo(
        self, request: pb.GetJudgeInfoRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.JudgeInfo:
        return info_to_grpc(self.engine.info, self.engine.limits, max_body_bytes=self.max_body_bytes)

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
            result = await self.engine.compare(compare_from_grpc(request), deadline=deadline)
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
    servicer = JudgeServicer(engine, max_body_bytes=settings.max_body_bytes)
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
