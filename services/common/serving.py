"""Process lifecycle shared by the services: run HTTP and gRPC in one loop, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import uvicorn

log = logging.getLogger(__name__)


class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our own event loop: we own the signals, so we decide when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def uvicorn_server(app: Any, *, host: str, port: int, log_level: str, ssl: tuple[str, str] | None) -> EmbeddedUvicorn:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=log_level == "debug",
        ssl_certfile=ssl[0] if ssl else None,
        ssl_keyfile=ssl[1] if ssl else None,
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
