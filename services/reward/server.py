"""``rlhf-feedback serve reward``: wire the engine to both transports and run until SIGTERM.

Start-up order: transports first (``/health/live`` answers, readiness says 503 / NOT_SERVING),
then the model loads and a warm-up batch runs, then readiness turns true. On SIGTERM:
readiness goes false, new work is refused (503 / UNAVAILABLE, so a load balancer retries it
elsewhere), admitted work gets ``--drain-seconds`` to finish, the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging

from services.common.serving import run_service
from services.reward.engine.service import RewardEngine
from services.reward.loading import load_backend
from services.reward.settings import RewardSettings

log = logging.getLogger("rlhf_feedback.reward")


async def serve_reward(settings: RewardSettings, *, stop: asyncio.Event | None = None) -> int:
    """Run the reward service until ``stop`` is set (by SIGTERM/SIGINT when not given)."""
    from services.reward.transports.grpc import create_grpc_server
    from services.reward.transports.http import create_http_app

    api_key = settings.resolved_api_key()
    engine = RewardEngine(lambda: load_backend(settings), settings.engine_config())
    return await run_service(
        engine,
        settings,
        http_app=lambda: create_http_app(engine, settings, api_key=api_key),
        grpc_server=lambda: create_grpc_server(engine, settings, api_key=api_key),
        stop=stop,
        logger=log,
        what="model",
    )
