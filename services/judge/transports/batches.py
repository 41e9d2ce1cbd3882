"""HTTP routes of the judge's batch jobs: ``POST /v1/batches``, ``GET /v1/batches/{id}``.

A batch job takes the interactive routes' request bodies (compare, rank, grade) and fills the
verdict cache through the provider's batch endpoint at the batch price
(:mod:`services.judge.engine.batches`); the interactive requests sent afterwards are answered from
the cache. The same ``idempotency_key`` always returns the same job. Thin, like the other routes:
parse, call the manager, answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.errors import invalid
from services.common.http_support import BodyParser, DocumentedRoute, OrjsonResponse, document_bodies
from services.common.wire import StrictModel
from services.judge.engine.batch_store import BatchStore, store_path_for
from services.judge.engine.batches import BatchManager, BatchOptions
from services.judge.engine.service import JudgeEngine
from services.judge.schemas import CompareRequest, GradeRequest, RankRequest
from services.judge.settings import JudgeSettings
from services.judge.types import CompareInput, GradeInput, RankInput

__all__ = ["BATCH_DOCUMENTED", "BatchJobOut", "BatchJobRequest", "register_batch_routes"]

BATCH_PARSER = BodyParser(item_lists=frozenset({"requests"}))


class BatchItem(StrictModel):
    """One request of a batch job: exactly one of ``compare``, ``rank``, ``grade`` (the routes' bodies)."""

    compare: CompareRequest | None = None
    rank: RankRequest | None = None
    grade: GradeRequest | None = None

    @model_validator(mode="after")
    def _one(self) -> BatchItem:
        if sum(x is not None for x in (self.compare, self.rank, self.grade)) != 1:
            raise ValueError("give exactly one of compare, rank, grade")
        return self

    def to_engine(self) -> CompareInput | RankInput | GradeInput:
        item = self.compare or self.rank or self.grade
        assert item is not None
        return item.to_engine()


class BatchJobRequest(StrictModel):
    """``POST /v1/batches``: judge these requests through the provider's batch API into the cache."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "idempotency_key": "label-3f2a9c-chunk-0",
                    "requests": [
                        {"compare": {"prompt": "What is 2 + 2?", "responses": ["4", "5"]}},
                        {"rank": {"prompt": "Name a colour.", "responses": ["red", "car", "blue"]}},
                    ],
                }
            ]
        }
    )

    idempotency_key: str = Field(
        min_length=1, max_length=256, description="The same key returns the same job (never a second provider batch)."
    )
    requests: list[BatchItem] = Field(min_length=1, description="compare / rank / grade bodies, as the routes take.")


class BatchQueriesOut(BaseModel):
    total: int = Field(description="Verdict queries the requests need (both orders, principles, rank pairs).")
    cached: int = Field(description="Already in the verdict cache when the job was created.")
    pending: int
    submitted: int
    done: int
    failed: int


class ProviderBatchOut(BaseModel):
    id: str | None = Field(description="The provider's batch id (null until created).")
    status: str
    requests: int


class BatchFailureOut(BaseModel):
    reason: str
    count: int


class BatchUsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float = Field(description="At the batch price.")
    interactive_cost_usd: float = Field(description="What the same tokens cost through the interactive API.")
    requests_submitted: int


class BatchJobOut(BaseModel):
    """A batch job: ``completed`` once every query is in the cache or failed (with its reason)."""

    id: str
    idempotency_key: str
    created_at: float
    provider: str
    status: str = Field(json_schema_extra={"enum": ["in_progress", "completed"]})
    requests: int
    invalid: list[dict[str, Any]] = Field(description="Requests refused as invalid: {index, message}.")
    queries: BatchQueriesOut
    provider_batches: list[ProviderBatchOut]
    failures: list[BatchFailureOut]
    usage: BatchUsageOut


BATCH_DOCUMENTED: Mapping[str, DocumentedRoute] = {
    "/v1/batches": ("post", BatchJobRequest, (BatchJobOut,)),
    "/v1/batches/{batch_id}": ("get", None, (BatchJobOut,)),
}


def batch_options(settings: JudgeSettings) -> BatchOptions:
    return BatchOptions(
        poll_s=settings.batch_poll_s,
        max_attempts=settings.batch_max_attempts,
        max_requests=settings.batch_max_requests,
        price_factor=settings.batch_price_factor,
        compatible=settings.batch_api == "on",
    )


def batch_store_path(settings: JudgeSettings) -> Path | None:
    if settings.batch_store:
        return Path(settings.batch_store).expanduser()
    cache = settings.cache_path()
    return None if cache is None else store_path_for(cache)


def register_batch_routes(app: FastAPI, engine: JudgeEngine, settings: JudgeSettings) -> BatchManager | None:
    """Add the batch routes to the judge's app (``--batch-api off``: routes that say it is off)."""
    max_body = settings.max_body_bytes
    path = batch_store_path(settings) if settings.batch_api != "off" else None
    manager = BatchManager(engine, BatchStore(path), batch_options(settings)) if path is not None else None
    app.state.batches = manager

    def the_manager() -> BatchManager:
        if manager is None:
            why = (
                "it runs with --batch-api off"
                if settings.batch_api == "off"
                else ("it runs with --cache off, and batch results fill the cache")
            )
            raise invalid(f"this judge has no batch API: {why}")
        return manager

    @app.post("/v1/batches", summary="Judge requests through the provider's batch API (half price) into the cache")
    async def create_batch(request: Request) -> Response:
        m = the_manager()
        req = await BATCH_PARSER.read(request, BatchJobRequest, max_body)
        items: Sequence[Any] = [item.to_engine() for item in req.requests]
        return OrjsonResponse(await m.create(req.idempotency_key, items))

    @app.get("/v1/batches/{batch_id}", summary="A batch job's progress, failures and cost")
    async def get_batch(batch_id: str) -> Response:
        return OrjsonResponse(await the_manager().status(batch_id))

    document_bodies(app, BATCH_DOCUMENTED)
    return manager
