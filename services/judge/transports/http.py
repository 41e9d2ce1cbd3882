"""HTTP transport of the judge service (FastAPI): wire → engine → wire, nothing else.

Routes: ``POST /v1/compare``, ``POST /v1/rank``, ``POST /v1/grade``, ``GET /v1/models``,
``GET /health/live``, ``GET /health/ready``, ``GET /metrics``.

Each route parses its body with the request models (:mod:`services.judge.schemas`: JSON shape and
types), calls the :class:`JudgeEngine` (which validates the values, the same checks as for gRPC),
and answers with the body :mod:`services.judge.wire` builds.

The edge behaviour is the reward service's, from :mod:`services.common.http_support`: error bodies
through the one error table, 422 for schema violations (with the index of the offending
``responses[i]`` as ``item``), 400 for invalid JSON/UTF-8 and limits, 413 over
``--max-body-bytes``, 429 with ``Retry-After`` (full queue, spent budget), request ids, Bearer
auth, ``X-Request-Timeout`` deadlines, and a client disconnect cancels the judgment (and with it
its provider calls). An abstain (upstream judge failed after retries, unparseable replies) is a
result: HTTP 200 with ``{"abstain": {"reason"}, "judge"?, "usage"}``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.responses import Response

from services.common.http_support import (
    PROBE_ROUTE_NAMES,
    DocumentedRoute,
    OrjsonResponse,
    add_probe_routes,
    create_edge_app,
    document_bodies,
    request_deadline,
    run_until_disconnect,
)
from services.judge.engine.service import JudgeEngine
from services.judge.schemas import PARSER, CompareRequest, GradeRequest, RankRequest
from services.judge.settings import JudgeSettings
from services.judge.transports.batches import register_batch_routes
from services.judge.wire import (
    AbstainOut,
    CompareOut,
    GradeOut,
    ModelList,
    RankOut,
    compare_body,
    grade_body,
    models_body,
    rank_body,
)

# Route → metrics label; anything else is "other" (bounded label cardinality).
ROUTE_NAMES: Mapping[str, str] = {
    "/v1/compare": "compare",
    "/v1/rank": "rank",
    "/v1/grade": "grade",
    **PROBE_ROUTE_NAMES,
}

# What /openapi.json shows for each route: (method, request body model, 200 body shapes).
DOCUMENTED: Mapping[str, DocumentedRoute] = {
    "/v1/compare": ("post", CompareRequest, (CompareOut, AbstainOut)),
    "/v1/rank": ("post", RankRequest, (RankOut, AbstainOut)),
    "/v1/grade": ("post", GradeRequest, (GradeOut, AbstainOut)),
    "/v1/models": ("get", None, (ModelList,)),
}


def create_http_app(engine: JudgeEngine, settings: JudgeSettings, *, api_key: str | None) -> FastAPI:
    """The judge service's HTTP app. The caller owns the engine's lifecycle (start, drain, stop)."""
    max_body = settings.max_body_bytes
    created = int(time.time())
    app = create_edge_app(
        title="rlhf-feedback judge service",
        api_key=api_key,
        metrics=engine.metrics,
        route_names=ROUTE_NAMES,
        parser=PARSER,
    )
    app.state.engine = engine

    @app.post("/v1/compare", summary="Which of two responses is better: P(a better), winner, consistency (or abstain)")
    async def compare(request: Request) -> Response:
        deadline = request_deadline(request)
        req = await PARSER.read(request, CompareRequest, max_body)
        result = await run_until_disconnect(request, engine.compare(req.to_engine(), deadline=deadline))
        return OrjsonResponse(compare_body(result))

    @app.post("/v1/rank", summary="Bradley-Terry ranking of N responses from pairwise judgments (or abstain)")
    async def rank(request: Request) -> Response:
        deadline = request_deadline(request)
        req = await PARSER.read(request, RankRequest, max_body)
        result = await run_until_disconnect(request, engine.rank(req.to_engine(), deadline=deadline))
        return OrjsonResponse(rank_body(result))

    @app.post("/v1/grade", summary="A rubric grade of one response, mapped to [0, 1] (or abstain)")
    async def grade(request: Request) -> Response:
        deadline = request_deadline(request)
        req = await PARSER.read(request, GradeRequest, max_body)
        result = await run_until_disconnect(request, engine.grade(req.to_engine(), deadline=deadline))
        return OrjsonResponse(grade_body(result))

    @app.get("/v1/models", summary="The judge (backend, model, template hash) and limits")
    async def models() -> Response:
        return OrjsonResponse(models_body(engine.info, engine.limits, max_body_bytes=max_body, created=created))

    register_batch_routes(app, engine, settings)  # POST /v1/batches, GET /v1/batches/{id}
    add_probe_routes(app, engine, engine.metrics.registry, state=lambda: engine.state.value, what="the judge")
    document_bodies(app, DOCUMENTED)
    return app
