"""``rlhf-feedback serve reward``: wire the engine to both transports and run until SIGTERM.

Start-up order: transports first (``/health/live`` answers, readiness says 503 / NOT_SERVING),
then the model loads and a warm-up batch runs, then readiness turns true. On SIGTERM:
readiness goes false, new work is refused (503 / UNAVAILABLE, so a load balancer retries it
elsewhere), admitted work gets ``--drain-seconds`` to finish, the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging

from services.common.serving import install_stop_signals, uvicorn_server, wait_started
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
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(stop)
    ssl = (str(settings.tls_cert), str(settings.tls_key)) if settings.tls_cert and settings.tls_key else None

    http = None
    http_task = None
    if settings.http_port:
        app = create_http_app(engine, settings, api_key=api_key)
        http = uvicorn_server(app, host=settings.host, port=settings.http_port, log_level=settings.log_level, ssl=ssl)
        http_task = asyncio.create_task(http.serve(), name="http")
        await wait_started(http, http_task)
        log.info("HTTP listening on %s:%d", settings.host, settings.http_port)
    grpc_server = None
    if settings.grpc_port:
        grpc_server = create_grpc_server(engine, settings, api_key=api_key)
        await grpc_server.start()

    def refresh() -> None:
        if grpc_server is not None:
            grpc_server.refresh()

    loading = asyncio.create_task(engine.start(), name="load-model")
    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loading, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if loading in done and loading.exception() is not None:
        log.error("model failed to load", exc_info=loading.exception())
        exit_code = 1
    else:
        refresh()
        if loading in done:
            await stop_wait
        else:
            loading.cancel()
    # Drain: readiness false at once, admitted work finishes, new work gets UNAVAILABLE.
    draining = asyncio.create_task(engine.drain(settings.drain_seconds))
    await asyncio.sleep(0)
    refresh()
    finished = await draining
    if not finished:
        log.warning("drain timed out after %.1fs; remaining work is failed with UNAVAILABLE", settings.drain_seconds)
    if grpc_server is not None:
        await grpc_server.stop(grace=1.0)
    await engine.stop()
    if http is not None and http_task is not None:
        http.should_exit = True
        await http_task
    log.info("stopped")
    return exit_code
