"""gRPC transport of the reward service: ``rlhf.v1.RewardService`` over grpc.aio.

Thin by design: each method translates the request (:func:`from_grpc` helpers), calls the
:class:`RewardEngine`, and translates the outcome back (``to_grpc`` helpers). Errors travel
through the one error table (:mod:`services.common.grpc_support`); health, reflection, auth and
request ids are wired in :func:`create_grpc_server`.

ScoreStream runs every incoming request concurrently and streams each item's result as soon as
its batch finishes. A request-level failure of one request (invalid input, queue full, draining)
becomes a per-item error for each of that request's items and leaves the other requests alone;
a message that cannot be decoded at all (bad UTF-8, over the size limit) ends the stream with
INVALID_ARGUMENT, since its request id and items are unknown.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from protos.rlhf.v1 import common_pb2 as cpb
from protos.rlhf.v1 import reward_pb2 as pb
from services.common.errors import INTERNAL_MESSAGE, ErrorCode, ServiceError, invalid
from services.common.grpc_support import (
    GrpcServerHandle,
    MethodHandlers,
    Rejected,
    build_grpc_server,
    deadline_of,
    fan_out,
)
from services.reward.engine.results import CompareOutcome, ItemError, ItemResult, Limits, ModelRef
from services.reward.engine.service import RewardEngine
from services.reward.settings import RewardSettings
from services.runtime.chat import Prompt, as_messages
from services.runtime.items import ModelInfo, Priority, RewardInput

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RewardService"].full_name  # "rlhf.v1.RewardService"
TRANSPORT = "grpc"

# -- from_grpc ---------------------------------------------------------------------------------

_PRIORITIES: dict[int, Priority] = {
    pb.PRIORITY_UNSPECIFIED: Priority.ONLINE,
    pb.PRIORITY_ONLINE: Priority.ONLINE,
    pb.PRIORITY_BATCH: Priority.BATCH,
}


def priority_from_grpc(value: int) -> Priority:
    try:
        return _PRIORITIES[value]
    except KeyError:
        raise invalid(f"unknown priority {value}; expected PRIORITY_ONLINE or PRIORITY_BATCH") from None


def prompt_from_grpc(msg: pb.PromptResponse | pb.CompareRequest, *, item: int | None = None) -> Prompt:
    which = msg.WhichOneof("prompt")
    if which == "prompt_text":
        return msg.prompt_text
    if which == "prompt_messages":
        return as_messages(msg.prompt_messages.messages)
    raise invalid("prompt is not set: send prompt_text or prompt_messages", item=item)


def input_from_grpc(msg: pb.RewardInput, index: int) -> RewardInput:
    which = msg.WhichOneof("input")
    if which == "text":
        return RewardInput(text=msg.text)
    if which == "pair":
        return RewardInput(prompt=prompt_from_grpc(msg.pair, item=index), response=msg.pair.response)
    if which == "messages":
        return RewardInput(messages=as_messages(msg.messages.messages))
    raise invalid("an item is exactly one of text, pair or messages; none is set", item=index)


def inputs_from_grpc(inputs: Sequence[pb.RewardInput]) -> list[RewardInput]:
    return [input_from_grpc(x, i) for i, x in enumerate(inputs)]


# -- to_grpc -----------------------------------------------------------------------------------


def model_to_grpc(model: ModelRef) -> pb.ModelRef:
    out = pb.ModelRef(id=model.id, revision=model.revision)
    if model.normalization is not None:
        n = model.normalization
        out.normalization.CopyFrom(pb.Normalization(mean=n.mean, std=n.std, source=n.source))
    return out


def error_to_grpc(code: ErrorCode, message: str) -> pb.ItemResult:
    return pb.ItemResult(error=cpb.Error(code=code.value, message=message))


def result_to_grpc(result: ItemResult) -> pb.ItemResult:
    if isinstance(result, ItemError):
        return error_to_grpc(result.code, result.message)
    score = pb.Score(
        score=result.score, scores=result.scores or (), num_tokens=result.num_tokens, truncated=result.truncated
    )
    if result.normalized is not None:
        score.normalized = result.normalized
    return pb.ItemResult(score=score)


def compare_to_grpc(outcome: CompareOutcome) -> pb.CompareResponse:
    return pb.CompareResponse(
        model=model_to_grpc(outcome.model),
        scores=outcome.scores,
        probabilities=outcome.probabilities,
        ranking=outcome.ranking,
    )


def model_info_to_grpc(info: ModelInfo, limits: Limits) -> pb.ModelInfo:
    return pb.ModelInfo(
        id=info.id,
        revision=info.revision,
        architecture=info.architecture,
        backend=info.backend,
        dtype=info.dtype,
        device=info.device,
        max_length=info.max_length,
        num_labels=info.num_labels,
        label_names=info.label_names,
        has_chat_template=info.has_chat_template,
        limits=pb.Limits(
            max_items_per_request=limits.max_items_per_request,
            max_body_bytes=limits.max_body_bytes,
            max_text_bytes=limits.max_text_bytes,
            max_batch_tokens=limits.max_batch_tokens,
            max_request_tokens=limits.max_request_tokens,
        ),
    )


# -- the servicer ------------------------------------------------------------------------------


class RewardServicer:
    """``rlhf.v1.RewardService``: from_grpc → engine → to_grpc, nothing else."""

    def __init__(self, engine: RewardEngine) -> None:
        self.engine = engine

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.ScoreResponse:
        outcome = await self.engine.score(
            inputs_from_grpc(request.inputs),
            priority=priority_from_grpc(request.priority),
            deadline=deadline_of(context),
            normalize=request.normalize,
        )
        return pb.ScoreResponse(
            model=model_to_grpc(outcome.model), results=[result_to_grpc(r) for r in outcome.results]
        )

    async def Compare(
        self, request: pb.CompareRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.CompareResponse:
        outcome = await self.engine.compare(
            prompt_from_grpc(request), list(request.responses), deadline=deadline_of(context)
        )
        return compare_to_grpc(outcome)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext, request_id: str
    ) -> pb.ModelInfo:
        return model_info_to_grpc(self.engine.info, self.engine.limits)

    async def ScoreStream(
        self,
        requests: AsyncIterator[pb.ScoreRequest | Rejected],
        context: grpc.aio.ServicerContext,
        request_id: str,
    ) -> AsyncIterator[pb.ScoreStreamResponse]:
        deadline = deadline_of(context)

        async def handle(request: pb.ScoreRequest, emit: Callable[[pb.ScoreStreamResponse], None]) -> None:
            await self._score_one(request, deadline, emit)

        async for response in fan_out(requests, handle):
            yield response

    async def _score_one(
        self,
        request: pb.ScoreRequest,
        deadline: float | None,
        emit: Callable[[pb.ScoreStreamResponse], None],
    ) -> None:
        """Score one request of a stream; each result (or request-level error per item) is emitted."""
        rid = request.request_id
        sent: set[int] = set()
        try:
            results = self.engine.score_each(
                inputs_from_grpc(request.inputs),
                priority=priority_from_grpc(request.priority),
                deadline=deadline,
                normalize=request.normalize,
            )
            async for index, result, model in results:
                sent.add(index)
                emit(
                    pb.ScoreStreamResponse(
                        request_id=rid, index=index, result=result_to_grpc(result), model=model_to_grpc(model)
                    )
                )
        except ServiceError as err:
            self._fail_rest(request, sent, err.code, err.message, emit)
        except Exception:
            log.exception("ScoreStream request %r failed", rid)
            self._fail_rest(request, sent, ErrorCode.INTERNAL, INTERNAL_MESSAGE, emit)

    @staticmethod
    def _fail_rest(
        request: pb.ScoreRequest,
        sent: set[int],
        code: ErrorCode,
        message: str,
        emit: Callable[[pb.ScoreStreamResponse], None],
    ) -> None:
        """A request-level failure inside a stream: one error per item not yet answered (at least one)."""
        for index in range(max(1, len(request.inputs))):
            if index not in sent:
                emit(
                    pb.ScoreStreamResponse(
                        request_id=request.request_id, index=index, result=error_to_grpc(code, message)
                    )
                )


# -- the server --------------------------------------------------------------------------------


def create_grpc_server(
    engine: RewardEngine,
    settings: RewardSettings,
    *,
    api_key: str | None,
    health_poll_interval: float = 1.0,
) -> GrpcServerHandle:
    """Build the reward service's grpc.aio server: RewardService, health, reflection, auth, limits."""
    servicer = RewardServicer(engine)
    m = MethodHandlers(engine.metrics, settings.max_body_bytes)
    handlers = {
        "Score": m.unary("Score", servicer.Score, pb.ScoreRequest, pb.ScoreResponse),
        "ScoreStream": m.stream("ScoreStream", servicer.ScoreStream, pb.ScoreRequest, pb.ScoreStreamResponse),
        "Compare": m.unary("Compare", servicer.Compare, pb.CompareRequest, pb.CompareResponse),
        "GetModelInfo": m.unary("GetModelInfo", servicer.GetModelInfo, pb.GetModelInfoRequest, pb.ModelInfo),
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
