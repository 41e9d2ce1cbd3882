"""``rlhf-feedback serve judge``: wire the judge engine to both transports and run until SIGTERM.

The start/drain sequence is the reward service's (:func:`services.common.serving.run_service`):
transports first (``/health/live`` answers, readiness says 503 / NOT_SERVING), then the backend is
built and started (the local model loads and warms up), then readiness turns true. On SIGTERM:
readiness goes false, new work is refused with 503 / UNAVAILABLE, admitted judgments get
``--drain-seconds`` to finish, the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.common.serving import run_service
from services.judge.backends.base import JudgeBackend
from services.judge.settings import JudgeSettings

log = logging.getLogger("rlhf_feedback.judge")


def load_backend(settings: JudgeSettings) -> JudgeBackend:
    """The backend the settings describe (SDKs and torch are imported only for the one built)."""
    from services.judge.backends.factory import build_backend

    return build_backend(settings.backend, **settings.backend_options())


async def serve_judge(settings: JudgeSettings, *, stop: asyncio.Event | None = None) -> int:
    """Run the judge service until ``stop`` is set (by SIGTERM/SIGINT when not given)."""
    from services.judge.engine.cache import JudgeCache
    from services.judge.engine.service import JudgeEngine
    from services.judge.metrics import JudgeMetrics
    from services.judge.transports.grpc import create_grpc_server
    from services.judge.transports.http import create_http_app

    api_key = settings.resolved_api_key()
    config = settings.engine_config()
    cache_path = settings.cache_path()
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("verdict cache: %s", cache_path)
    cache = JudgeCache(cache_path) if cache_path is not None else None
    # The engine owns the cache: its stop() closes it.
    engine = JudgeEngine(lambda: load_backend(settings), config, cache=cache, metrics=JudgeMetrics())
    apps: list[Any] = []

    def http_app() -> Any:
        apps.append(create_http_app(engine, settings, api_key=api_key))
        return apps[-1]

    def batches() -> Any:
        return getattr(apps[0].state, "batches", None) if apps else None

    def resume_batches() -> None:
        # provider batches a previous run left in flight are polled from start-up, not from the
        # first client call
        if (manager := batches()) is not None:
            manager.ensure_running()

    async def close_batches() -> None:
        if (manager := batches()) is not None:
            await manager.aclose()

    return await run_service(
        engine,
        settings,
        http_app=http_app,
        grpc_server=lambda: create_grpc_server(engine, settings, api_key=api_key),
        stop=stop,
        logger=log,
        what="judge backend",
        on_ready=resume_batches,
        on_stop=close_batches,
    )
