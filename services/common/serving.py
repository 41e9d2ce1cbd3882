"""Process lifecycle shared by the services: run HTTP and gRPC in one loop, drain on SIGTERM.

:func:`run_service` is the whole start/drain sequence of ``serve reward`` and ``serve judge``:
transports first (``/health/live`` answers, readiness says 503 / NOT_SERVING), then the engine
starts (model loaded, warm-up done), then readiness turns true. On SIGTERM: readiness goes false,
new work is refused (503 / UNAVAILABLE, so a load balancer retries it elsewhere), admitted work
gets ``--drain-seconds`` to finish, the process exits 0 (1 when the engine failed to start).

The HTTP server (:func:`uvicorn_server`) bounds what a slow or idle client can hold: see
:mod:`services.common.http_guard` (the ``--http-*`` flags).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Protocol

import uvicorn

from services.common.http_guard import HttpLimits, SlowBodyGuard, guarded_protocol
from services.common.settings import ServiceSettings

if TYPE_CHECKING:
    from services.common.grpc_support import GrpcServerHandle

log = logging.getLogger(__name__)


class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our own event loop: we own the signals, so we decide when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def uvicorn_server(
    app: Any,
    *,
    host: str,
    port: int,
    log_level: str,
    ssl: tuple[str, str] | None,
    limits: HttpLimits | None = None,
) -> EmbeddedUvicorn:
    """An embedded uvicorn serving ``app`` under ``limits`` (default: the flags' defaults)."""
    limits = limits if limits is not None else HttpLimits.from_settings(ServiceSettings())
    config = uvicorn.Config(
        SlowBodyGuard(app, limits),
        host=host,
        port=port,
        http=guarded_protocol(limits),
        log_level=log_level,
        access_log=log_level == "debug",
        ssl_certfile=ssl[0] if ssl else None,
        ssl_keyfile=ssl[1] if ssl else None,
        timeout_keep_alive=limits.keep_alive_s,
        timeout_graceful_shutdown=5,
        lifespan="off",
    )
    return EmbeddedUvicorn(config)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set ``stop`` (a second SIGINT still interrupts hard)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, stop)


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if stop.is_set() and sig == signal.SIGINT:
        raise KeyboardInterrupt
    log.info("received %s: draining", sig.name)
    stop.set()


async def wait_started(server: EmbeddedUvicorn, task: Awaitable[None]) -> None:
    """Wait until uvicorn has bound its socket (or failed trying)."""
    fut = asyncio.ensure_future(task)
    while not server.started:
        if fut.done():
            fut.result()  # re-raise the bind error
            raise RuntimeError("HTTP server exited during start-up")
        await asyncio.sleep(0.01)


StateHook = Callable[[], None]


class ServedEngine(Protocol):
    """What :func:`run_service` drives: an engine's lifecycle."""

    async def start(self) -> None: ...

    async def drain(self, seconds: float) -> bool: ...

    async def stop(self) -> None: ...


async def run_service(
    engine: ServedEngine,
    settings: ServiceSettings,
    *,
    http_app: Callable[[], Any] | None,
    grpc_server: Callable[[], GrpcServerHandle] | None,
    stop: asyncio.Event | None = None,
    logger: logging.Logger = log,
    what: str = "model",
    on_ready: Callable[[], None] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Serve ``engine`` over the transports until ``stop`` is set (by SIGTERM/SIGINT when not given).

    ``http_app`` / ``grpc_server`` build the transports (None, or a zero port, disables one).
    ``on_ready`` runs once the engine has started (background work that needs it, e.g. the judge's
    batch driver resuming); ``on_stop`` is awaited after the drain, before the engine stops.
    Returns the process exit code: 0 after a drain, 1 when the engine failed to start.
    """
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(stop)
    ssl = (str(settings.tls_cert), str(settings.tls_key)) if settings.tls_cert and settings.tls_key else None

    http = None
    http_task = None
    if http_app is not None and settings.http_port:
        http = uvicorn_server(
            http_app(),
            host=settings.host,
            port=settings.http_port,
            log_level=settings.log_level,
            ssl=ssl,
            limits=HttpLimits.from_settings(settings),
        )
        http_task = asyncio.create_task(http.serve(), name="http")
        await wait_started(http, http_task)
        logger.info("HTTP listening on %s:%d", settings.host, settings.http_port)
    grpc_handle = None
    if grpc_server is not None and settings.grpc_port:
        grpc_handle = grpc_server()
        await grpc_handle.start()

    def refresh() -> None:
        if grpc_handle is not None:
            grpc_handle.refresh()

    loading = asyncio.create_task(engine.start(), name=f"load-{what}")
    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loading, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if loading in done and loading.exception() is not None:
        logger.error("%s failed to load", what, exc_info=loading.exception())
        exit_code = 1
    else:
        refresh()
        if loading in done:
            if on_ready is not None:
                on_ready()
            await stop_wait
        else:
            loading.cancel()
    # Drain: readiness false at once, admitted work finishes, new work gets UNAVAILABLE.
    draining = asyncio.create_task(engine.drain(settings.drain_seconds))
    await asyncio.sleep(0)
    refresh()
    finished = await draining
    if not finished:
        logger.warning("drain timed out after %.1fs; remaining work is failed with UNAVAILABLE", settings.drain_seconds)
    if grpc_handle is not None:
        await grpc_handle.stop(grace=1.0)
    if on_stop is not None:
        await on_stop()
    await engine.stop()
    if http is not None and http_task is not None:
        http.should_exit = True
        await http_task
    logger.info("stopped")
    return exit_code
