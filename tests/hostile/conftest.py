"""Real servers under attack, with a normal client beside them.

Every test here starts (or shares) a real ``rlhf-feedback serve`` process with the embedded
models and an API key, runs one attack from issue 12, and meanwhile a :class:`Probe` sends
ordinary one-item requests and records their latency while an :class:`RssWatch` samples the
server's resident memory. Bounds are generous multiples of what the issue asks on an idle
machine (the suite must pass on a busy one); ``make test-hostile`` prints the measured numbers.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from clients.process import ServerProcess
from tests.support.memory import proc_status_bytes

API_KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MIB = 2**20
READ_TIMEOUT_S = 3.0


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS), in bytes."""
    return proc_status_bytes(pid, "VmRSS")


class RssWatch:
    """Samples a process's RSS every 20 ms in a thread; ``rise`` is the peak over the start."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = rss_bytes(pid)
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, RuntimeError):
                return
            self._stop.wait(0.02)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def rise_mib(self) -> float:
        return (self.peak - self.start) / MIB


@dataclass
class Probe:
    """A normal client: ``call()`` in a loop on its own thread, latency of each call recorded."""

    call: Callable[[httpx.Client], None]
    url: str
    interval: float = 0.1
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=120) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    self.call(client)
                except Exception as exc:  # recorded: a probe failure is what the test looks for
                    self.errors.append(repr(exc))
                self.latencies.append(time.perf_counter() - started)
                self._stop.wait(self.interval)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(180)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)

    def p99(self) -> float:
        if len(self.latencies) < 2:
            return self.worst
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[98]


def post_timed(srv: ServerProcess, path: str, body: bytes) -> tuple[httpx.Response, float]:
    """POST a ready JSON body with the API key; the answer and the seconds it took."""
    started = time.perf_counter()
    r = httpx.post(srv.http_url + path, content=body, headers={**AUTH, "content-type": "application/json"}, timeout=600)
    return r, time.perf_counter() - started


def score_one(client: httpx.Client) -> None:
    r = client.post("/v1/score", json={"inputs": [{"text": "A short, ordinary answer."}]})
    assert r.status_code == 200, r.text


def report(name: str, **numbers: object) -> None:
    """One line per attack; ``make test-hostile`` runs with -s so that these reach the terminal."""
    shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
    print(f"\nHOSTILE {name}: {shown}")


@pytest.fixture(scope="package")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "api-key"
    path.write_text(API_KEY, encoding="utf-8")
    return path


@pytest.fixture(scope="package")
def reward_server(key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``serve reward`` with the embedded default model and an API key; default limits but for
    HTTP read timeouts of 3 s (so that the slow-client attack takes seconds, not half a minute)."""
    log = tmp_path_factory.mktemp("hostile-reward") / "server.log"
    argv = ["--api-key-file", str(key_file), "--threads", "2"]
    argv += ["--http-header-timeout-s", str(READ_TIMEOUT_S), "--http-body-timeout-s", str(READ_TIMEOUT_S)]
    srv = ServerProcess.reward(argv, log_path=log)
    try:
        srv.wait_ready(timeout=600)
        yield srv
    finally:
        srv.terminate()
