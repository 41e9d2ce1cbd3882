"""Start a service as a child process on loopback and wait until it is ready.

Used by ``make demo``, the real-server tests and anyone who wants a local server in a
notebook: ``with ServerProcess.reward(["--model", DIR]) as srv: httpx.post(srv.http_url + ...)``
(``ServerProcess.judge([...])`` for the judge service).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx


def free_port() -> int:
    """A port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A ``rlhf-feedback serve ...`` child process with its ports and log file."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        http_port: int,
        grpc_port: int,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        self.tls_ca = tls_ca
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.log_path = log_path
        self._log: IO[bytes] | None = open(log_path, "wb") if log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf_feedback", *argv],
            stdout=self._log if self._log is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    @classmethod
    def serve(
        cls,
        service: str,
        extra: Sequence[str] = (),
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        tls_ca: Path | None = None,
    ) -> ServerProcess:
        """``rlhf-feedback serve SERVICE`` on loopback, both transports on free ports."""
        http_port, grpc_port = free_port(), free_port()
        argv = ["serve", service, "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
        return cls([*argv, *extra], http_port=http_port, grpc_port=grpc_port, log_path=log_path, env=env, tls_ca=tls_ca)

    @classmethod
    def reward(
        cls,
        extra: Sequence[str] = (),
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        tls_ca: Path | None = None,
    ) -> ServerProcess:
        return cls.serve("reward", extra, log_path=log_path, env=env, tls_ca=tls_ca)

    @classmethod
    def judge(
        cls,
        extra: Sequence[str] = (),
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        tls_ca: Path | None = None,
    ) -> ServerProcess:
        return cls.serve("judge", extra, log_path=log_path, env=env, tls_ca=tls_ca)

    @property
    def http_url(self) -> str:
        scheme = "https" if self.tls_ca else "http"
        host = "localhost" if self.tls_ca else "127.0.0.1"  # the name a test certificate carries
        return f"{scheme}://{host}:{self.http_port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What httpx should verify the server with (the CA file when serving TLS)."""
        return ssl.create_default_context(cafile=str(self.tls_ca)) if self.tls_ca else True

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Poll ``/health/ready`` until 200; raise with the log tail if the process dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.http_url + "/health/ready", timeout=2.0, verify=self.verify).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (the drain path) and wait for the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.terminate()
        if self._log is not None:
            self._log.close()
