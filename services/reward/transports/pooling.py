"""vLLM's pooling API on the reward service: ``POST /classify`` and ``POST /pooling`` (and ``/v1/...``).

A thin transport like :mod:`services.reward.transports.http` (whose edge it shares: error table,
body limits, auth, ``X-Request-Timeout`` deadlines, disconnects cancelling the work): parse the
vLLM-shaped request (:mod:`services.reward.pooling_schemas`), refuse what cannot be honoured with
a 400, score the items through the engine with ONLINE priority (the engine applies
``--max-items-per-request``, ``--max-text-bytes`` and ``--max-request-tokens``), answer vLLM's
response shape.

Who calls it, read in their sources:

- verl 0.9.1's reward-model server mode (``verl/experimental/reward_loop/reward_loop.py``,
  ``RewardLoopWorker.compute_score_disrm`` with ``reward_model.rollout.name=vllm``) posts
  ``{"model": <model path>, "input": <one rendered conversation>, "use_activation": false}`` to
  ``http://<router>/classify`` with aiohttp, calls ``raise_for_status()`` (no retry on 4xx, up to 16
  tries on anything else) and reads ``data[-1]["probs"][-1]`` as the reward: the raw score here.
  It renders the conversation with the reward model's chat template and strips a leading BOS
  string, because vLLM adds the tokenizer's special tokens to ``input`` by default; this service
  scores the string as it is (see the README: for a tokenizer that adds a BOS, the score is the
  one of the sequence without it).
- vLLM 0.33.0's own routes (``vllm/entrypoints/pooling/{classify,pooling}/api_router.py``) are
  ``/classify`` and ``/pooling``; the ``/v1`` aliases serve clients whose base URL ends in ``/v1``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import Response

from services.common.http_support import (
    REQUEST_ID_HEADER,
    BodyParser,
    DocumentedRoute,
    Loc,
    OrjsonResponse,
    request_deadline,
    run_until_disconnect,
)
from services.reward.engine.results import ScoreOutcome
from services.reward.engine.service import RewardEngine
from services.reward.pooling_schemas import (
    CLASSIFY_PATHS,
    INPUT_TAGS,
    POOLING_PATHS,
    REQUEST_TAGS,
    AnyVariant,
    ClassificationRequest,
    ClassificationResponse,
    PoolingRequest,
    PoolingResponse,
    classify_body,
    engine_inputs,
    pooling_body,
    unsupported,
)
from services.reward.settings import RewardSettings
from services.runtime.items import Priority

# Path → metrics label, merged into the reward app's ROUTE_NAMES.
POOLING_ROUTE_NAMES: Mapping[str, str] = {
    **dict.fromkeys(CLASSIFY_PATHS, "classify"),
    **dict.fromkeys(POOLING_PATHS, "pooling"),
}

# The routes' bodies for /openapi.json (services.common.http_support.document_bodies).
POOLING_DOCUMENTED: Mapping[str, DocumentedRoute] = {
    **dict.fromkeys(CLASSIFY_PATHS, ("post", ClassificationRequest, (ClassificationResponse,))),
    **dict.fromkeys(POOLING_PATHS, ("post", PoolingRequest, (PoolingResponse,))),
}


def _clean_loc(loc: Sequence[int | str]) -> Loc:
    """Drop the union tags (request variant, input form) so the path is what the client wrote."""
    out: Loc = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and (
            (i == 0 and part in REQUEST_TAGS) or (part in INPUT_TAGS and i > 0 and loc[i - 1] == "input")
        ):
            continue
        out.append(part)
    return out


# A schema error inside ``input[i]`` carries that index as the error's ``item``.
POOLING_PARSER = BodyParser(item_lists=frozenset({"input"}), clean_loc=_clean_loc)


def _response_id(request: Request, prefix: str, body_id: str | None) -> str:
    """vLLM's order: the ``X-Request-Id`` header, else the body's ``request_id``, else a fresh id."""
    if request.headers.get(REQUEST_ID_HEADER) is not None:
        base = str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)
    else:
        base = body_id or str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)
    return f"{prefix}-{base}"


def add_pooling_routes(app: FastAPI, engine: RewardEngine, settings: RewardSettings) -> None:
    """Register ``POST /classify``, ``/v1/classify``, ``/pooling`` and ``/v1/pooling`` on the reward app
    (built by :func:`services.common.http_support.create_edge_app`, whose error handlers answer the
    errors raised here)."""
    max_body = settings.max_body_bytes

    async def score(request: Request, req: AnyVariant, deadline: float | None) -> ScoreOutcome:
        info = engine.info  # 503 while the model loads
        refusal = unsupported(req, max_length=info.max_length, max_items=engine.limits.max_items_per_request)
        if refusal is not None:
            raise refusal
        return await run_until_disconnect(
            request, engine.score(engine_inputs(req), priority=Priority.ONLINE, deadline=deadline)
        )

    async def classify(request: Request) -> Response:
        deadline = request_deadline(request)
        req = (await POOLING_PARSER.read(request, ClassificationRequest, max_body)).root
        outcome = await score(request, req, deadline)
        body = classify_body(
            outcome,
            engine.info,
            use_activation=req.use_activation is not False,
            response_id=_response_id(request, "classify", req.request_id),
            created=int(time.time()),
        )
        return OrjsonResponse(body)

    async def pooling(request: Request) -> Response:
        deadline = request_deadline(request)
        req = (await POOLING_PARSER.read(request, PoolingRequest, max_body)).root
        outcome = await score(request, req, deadline)
        body = pooling_body(
            outcome,
            use_activation=req.use_activation is not False,
            response_id=_response_id(request, "pooling", req.request_id),
            created=int(time.time()),
            encoding_format=req.encoding_format,
            embed_dtype=req.embed_dtype,
            endianness=req.endianness,
        )
        return OrjsonResponse(body)

    for path in CLASSIFY_PATHS:
        app.add_api_route(
            path,
            classify,
            methods=["POST"],
            summary="vLLM-compatible classification (raw scores with use_activation: false)",
        )
    for path in POOLING_PATHS:
        app.add_api_route(
            path,
            pooling,
            methods=["POST"],
            summary="vLLM-compatible pooling (task classify)",
        )
