"""HTTP transport of the reward service (FastAPI): wire → engine → wire, nothing else.

Routes: ``POST /v1/score``, ``POST /v1/compare``, ``POST /get_reward`` (OpenRLHF), ``GET /v1/models``,
``GET /health/live``, ``GET /health/ready``, ``GET /metrics``.

Edge behaviour (error bodies through the one error table, 422/400/413, ``Retry-After``, request
ids, auth, ``X-Request-Timeout`` deadlines, client disconnects cancelling the work) is shared with
the judge service and lives in :mod:`services.common.http_support`. A disconnect cancels the engine
call, and the engine then cancels its item futures, which the batcher drops before the forward pass.

OpenRLHF's remote reward model (``POST /get_reward``), as read in OpenRLHF's sources:

- Client, ``openrlhf/utils/remote_rm_utils.py`` (OpenRLHF/OpenRLHF): ``remote_rm_fn_ray`` /
  ``remote_rm_fn`` POST ``{"query": queries, "prompts": prompts, "labels": labels}`` as JSON with
  ``Content-Type: application/json`` (no other headers: no API key, no timeout header) through
  ``request_api_wrapper``, which calls ``raise_for_status()`` and retries any failure up to 5 times,
  1 s apart (timeout 180 s). Older releases return ``response["rewards"]`` (``score_key="rewards"``)
  as a tensor; current ones return the whole JSON object, and ``update_samples_with_rewards`` in
  ``openrlhf/trainer/ppo_utils/experience_maker.py`` reads ``info["rewards"]`` (advantages),
  ``info["scores"]`` if present (dynamic filtering; falls back to rewards), and every key of
  ``info["extra_logs"]`` if present, concatenated across chunks and logged, so each extra log must
  be a list of numbers, one per query.
- ``queries`` are ``tokenizer.batch_decode(remove_pad_token(sequences, attention_mask),
  skip_special_tokens=False)``: the full prompt + response, chat-template tokens included
  (``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>``). ``prompts`` are
  the prompt strings and ``labels`` the dataset labels (may be ``null``s); a reward model does not
  need them.
- Server, ``openrlhf/cli/serve_rm.py``: reads ``data.get("query")`` (and ``prompts``), tokenizes the
  queries with ``add_special_tokens=False`` (older releases stripped pad/eos and re-appended eos)
  and answers ``{"rewards": r, "scores": r, "extra_logs": {"dummy_scores": r}}``.

So ``/get_reward`` scores each query as a ``text`` item, verbatim (never stripped: the service
tokenizes text items with ``add_special_tokens=False``), and answers ``{"rewards": [...],
"scores": [...], "extra_logs": {"rm_num_tokens": [...], "rm_truncated": [...]}}`` with raw scores.
OpenRLHF needs a number for every query, so a runtime failure of any item fails the whole request
with that item's status (504, 503, 500); its client retries. Never a silent zero reward.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from services.common.http_support import (
    PROBE_ROUTE_NAMES,
    BodyParser,
    DocumentedRoute,
    Loc,
    OrjsonResponse,
    add_probe_routes,
    create_edge_app,
    document_bodies,
    request_deadline,
    run_until_disconnect,
)
from services.common.wire import PROMPT_TAGS
from services.reward.engine.service import RewardEngine
from services.reward.schemas import (
    ITEM_TAGS,
    CompareRequest,
    CompareResponse,
    GetRewardRequest,
    GetRewardResponse,
    ModelList,
    ScoreRequest,
    ScoreResponse,
    compare_body,
    models_body,
    score_body,
)
from services.reward.settings import RewardSettings
from services.reward.transports.openrlhf import SCORES_MODES, get_reward_body, rule_hook, scores_mode
from services.reward.transports.pooling import POOLING_DOCUMENTED, POOLING_ROUTE_NAMES, add_pooling_routes
from services.runtime.items import Priority, RewardInput

# Route → metrics label; anything else is "other" (bounded label cardinality).
ROUTE_NAMES: Mapping[str, str] = {
    "/v1/score": "score",
    "/v1/compare": "compare",
    "/get_reward": "get_reward",
    **POOLING_ROUTE_NAMES,
    **PROBE_ROUTE_NAMES,
}


def _clean_loc(loc: Sequence[int | str]) -> Loc:
    """Drop the union tags pydantic inserts, so the path is what the client wrote."""
    out: Loc = []
    for i, part in enumerate(loc):
        prev = loc[i - 1] if i > 0 else None
        if isinstance(part, str):
            if part in ITEM_TAGS and isinstance(prev, int) and i == 2 and loc[0] == "inputs":
                continue
            if part in PROMPT_TAGS and prev == "prompt":
                continue
        out.append(part)
    return out


# Validation errors inside ``inputs[i]`` / ``responses[i]`` / ``query[i]`` carry that index as `item`.
PARSER = BodyParser(item_lists=frozenset({"inputs", "responses", "query"}), clean_loc=_clean_loc)

# What /openapi.json shows for each route: (method, request body model, 200 body shapes); the same
# models the routes parse with. The probe routes are documented by ``document_bodies`` itself.
DOCUMENTED: Mapping[str, DocumentedRoute] = {
    "/v1/score": ("post", ScoreRequest, (ScoreResponse,)),
    "/v1/compare": ("post", CompareRequest, (CompareResponse,)),
    "/get_reward": ("post", GetRewardRequest, (GetRewardResponse,)),
    "/v1/models": ("get", None, (ModelList,)),
}

# /get_reward's one query parameter (read by the route itself, so FastAPI cannot see it).
GET_REWARD_OPENAPI: dict[str, Any] = {
    "parameters": [
        {
            "name": "scores",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": list(SCORES_MODES)},
            "description": "How `scores` is reported (default: the server's --openrlhf-scores); `rewards` stay raw.",
        }
    ]
}


# -- the app ------------------------------------------------------------------------------------


def create_http_app(engine: RewardEngine, settings: RewardSettings, *, api_key: str | None) -> FastAPI:
    """The reward service's HTTP app. The caller owns the engine's lifecycle (start, drain, stop)."""
    max_body = settings.max_body_bytes
    created = int(time.time())
    app = create_edge_app(
        title="rlhf-feedback reward service",
        api_key=api_key,
        metrics=engine.metrics,
        route_names=ROUTE_NAMES,
        parser=PARSER,
    )
    app.state.engine = engine
    rule = rule_hook(settings)

    # -- scoring ---------------------------------------------------------------------------------

    @app.post("/v1/score", summary="Score items: rendered text, prompt + response, or a conversation")
    async def score(request: Request) -> Response:
        deadline = request_deadline(request)
        req = await PARSER.read(request, ScoreRequest, max_body)
        outcome = await run_until_disconnect(
            request,
            engine.score(req.to_engine(), priority=req.engine_priority, deadline=deadline, normalize=req.normalize),
        )
        return OrjsonResponse(score_body(outcome))

    @app.post("/v1/compare", summary="Bradley-Terry comparison of N responses to one prompt")
    async def compare(request: Request) -> Response:
        deadline = request_deadline(request)
        req = await PARSER.read(request, CompareRequest, max_body)
        outcome = await run_until_disconnect(
            request, engine.compare(req.engine_prompt(), req.responses, deadline=deadline)
        )
        return OrjsonResponse(compare_body(outcome))

    @app.post("/get_reward", summary="OpenRLHF remote reward model", openapi_extra=GET_REWARD_OPENAPI)
    async def get_reward(request: Request) -> Response:
        deadline = request_deadline(request)
        mode = scores_mode(request.query_params.get("scores"), settings.openrlhf_scores)
        req = await PARSER.read(request, GetRewardRequest, max_body)
        outcome = None
        if req.query:  # OpenRLHF 0.11.0 posts {"query": []} to every endpoint but the first
            inputs = [RewardInput(text=q) for q in req.query]
            outcome = await run_until_disconnect(
                request, engine.score(inputs, priority=Priority.ONLINE, deadline=deadline)
            )
        body = await get_reward_body(outcome, req.query, req.prompts, req.labels, rule=rule, mode=mode)
        return OrjsonResponse(body)

    # -- model info, health, metrics ---------------------------------------------------------------

    @app.get("/v1/models", summary="The loaded model and the request limits")
    async def models() -> Response:
        return OrjsonResponse(models_body(engine.info, engine.limits, max_body_bytes=max_body, created=created))

    add_pooling_routes(app, engine, settings)  # vLLM's /classify and /pooling
    add_probe_routes(app, engine, engine.metrics.registry, state=lambda: engine.state.value)
    document_bodies(app, DOCUMENTED, POOLING_DOCUMENTED)
    return app
