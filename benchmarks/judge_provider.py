"""The judge service against a provider with a fixed RPM: the share of it sustained, and the 429s.

Setup: the emulated provider (:mod:`benchmarks.judge_provider_server`, a child process:
fixed latency, a strict RPM answering 429 with ``retry-after``) and ``rlhf-feedback serve judge
--backend openai-compatible --base-url ... --rpm R --cache off`` (a child process), both on
loopback. ``callers`` concurrent clients (``AsyncJudgeClient`` over HTTP, **no client retries**,
so every 429 the service answers is seen and counted) each submit one ``compare`` (both orders:
two provider calls) after another, every pair distinct, for ``duration_s`` seconds, then stop
submitting and wait for what is in flight. The demand (``2 * callers`` calls waiting) is far
above the RPM, so the service's limiter decides the rate.

Measured (from the provider's own log of arrival times):

- **sustained share** = accepted calls per minute in the steady part ÷ RPM; the steady part is
  ``[start + exclude_s, start + duration_s)``, leaving out the first limiter window (10 s) where
  a fresh limiter's burst allowance could flatter the rate; the whole run's share is reported too.
- **429s to the service**: requests the provider rejected (the judge retries them itself).
- **429s to callers**: ``compare`` calls the service answered with 429 / RESOURCE_EXHAUSTED;
  other caller errors and abstains are counted separately. Must all be 0.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from clients.process import ServerProcess, free_port

LIMITER_WINDOW_S = 10.0


def auto_max_concurrency(rpm: float, latency_s: float) -> int:
    """Enough provider calls at once to reach ``rpm`` at ``latency_s`` with room (2x), at least 16."""
    return max(16, int(2 * rpm / 60.0 * max(latency_s, 0.05)) + 1)


class ProviderProcess:
    """The emulated provider as a child process (so it does not share a GIL with the callers)."""

    def __init__(self, *, rpm: float, latency_ms: float, window_s: float, log_path: Path) -> None:
        self.port = free_port()
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "benchmarks.judge_provider_server", "--port", str(self.port),
                "--rpm", f"{rpm:g}", "--latency-ms", f"{latency_ms:g}", "--window-s", f"{window_s:g}",
            ],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the emulated provider exited with {self.proc.returncode}: {self._tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the emulated provider did not start in {timeout:.0f}s: {self._tail()}")

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/stats", timeout=10.0).json()
        return data

    def reset(self) -> None:
        httpx.post(self.url + "/reset", timeout=10.0).raise_for_status()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


async def _drive(
    url: str, *, callers: int, duration_s: float, timeout_s: float, on_done: Callable[[], None]
) -> dict[str, Any]:
    """Callers submitting distinct compares back to back until ``duration_s``; outcome counts."""
    from clients.errors import OverloadedError, RlhfFeedbackError
    from clients.judge import AsyncJudgeClient

    counts = {"ok": 0, "abstained": 0, "rejected_429": 0, "errors": 0}
    reasons: dict[str, int] = {}
    latencies: list[float] = []
    started = time.time()
    stop_at = started + duration_s

    async with AsyncJudgeClient(url, max_retries=0, timeout=timeout_s, max_concurrency=callers) as client:

        async def caller(c: int) -> None:
            k = 0
            while time.time() < stop_at:
                k += 1
                t0 = time.perf_counter()
                try:
                    j = await client.compare(
                        f"Request {c}-{k}: which reply is more helpful?", f"Reply one to {c}-{k}.",
                        f"Reply two to {c}-{k}, longer.",
                    )  # fmt: skip
                except OverloadedError as exc:
                    counts["rejected_429"] += 1
                    reasons[f"429: {exc}"[:200]] = reasons.get(f"429: {exc}"[:200], 0) + 1
                    continue
                except RlhfFeedbackError as exc:
                    counts["errors"] += 1
                    key = f"{type(exc).__name__}: {exc}"[:200]
                    reasons[key] = reasons.get(key, 0) + 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if j.abstained:
                    counts["abstained"] += 1
                    key = f"abstain: {j.abstain_reason}"[:200]
                    reasons[key] = reasons.get(key, 0) + 1
                else:
                    counts["ok"] += 1
                on_done()

        await asyncio.gather(*(caller(c) for c in range(callers)))
    latencies.sort()

    def pct(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {
        "started": started,
        "finished": time.time(),
        "counts": counts,
        "reasons": reasons,
        "latency_s": {"p50": pct(0.5), "p95": pct(0.95), "max": latencies[-1] if latencies else None},
    }


def busiest(times: list[float], span: float) -> int:
    """The most arrival times in any half-open window ``[t, t + span)``."""
    ts = sorted(times)
    most, lo = 0, 0
    for hi, t in enumerate(ts):
        while ts[lo] <= t - span:
            lo += 1
        most = max(most, hi - lo + 1)
    return most


def summarise(
    accepted: list[float], rejected: list[float], *, started: float, duration_s: float, exclude_s: float, rpm: float
) -> dict[str, Any]:
    """Shares of ``rpm`` from the provider's accepted arrival times (the definitions in the module doc)."""
    end = started + duration_s
    steady_from = started + min(exclude_s, duration_s / 2)
    steady = sum(steady_from <= t < end for t in accepted)
    whole = sum(started <= t < end for t in accepted)
    steady_rpm = steady / (end - steady_from) * 60.0
    whole_rpm = whole / duration_s * 60.0
    return {
        "steady_window_s": [steady_from - started, duration_s],
        "accepted_in_steady_window": steady,
        "sustained_rpm": steady_rpm,
        "sustained_share": steady_rpm / rpm,
        "accepted_in_run": whole,
        "run_rpm": whole_rpm,
        "run_share": whole_rpm / rpm,
        "accepted_total": len(accepted),
        # what the judge's limiter promises (rpm/6 per 10 s) and what a per-minute limit sees
        "busiest_10s": {"accepted": busiest(accepted, LIMITER_WINDOW_S), "limit": rpm / 6.0},
        "busiest_60s": {"accepted": busiest(accepted, 60.0), "limit": rpm},
        "provider_429s": len(rejected),
    }


def run_provider(
    *,
    rpm: float = 600.0,
    latency_ms: float = 300.0,
    duration_s: float = 60.0,
    callers: int = 64,
    window_s: float = 60.0,
    exclude_s: float = LIMITER_WINDOW_S,
    max_concurrency: int | None = None,
    log_dir: Path | None = None,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Run the whole provider scenario; a JSON-ready result."""
    say = progress or (lambda _msg: None)
    concurrency = max_concurrency or auto_max_concurrency(rpm, latency_ms / 1000.0)
    with tempfile.TemporaryDirectory(prefix="bench-judge-") as tmp:
        logs = log_dir or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        provider = ProviderProcess(rpm=rpm, latency_ms=latency_ms, window_s=window_s, log_path=logs / "provider.log")
        try:
            provider.wait_ready()
            argv = [
                "--backend", "openai-compatible", "--model", "emulated-judge", "--base-url", provider.url + "/v1",
                "--rpm", f"{rpm:g}", "--cache", "off", "--max-concurrency", str(concurrency), "--log-level", "warning",
            ]  # fmt: skip
            with ServerProcess.judge(argv, log_path=logs / "judge.log", env={"OPENAI_API_KEY": "bench"}) as judge:
                judge.wait_ready(120.0)
                provider.reset()
                say(f"provider: {callers} callers for {duration_s:g}s against --rpm {rpm:g}")
                # A caller waits behind at most 2*callers queued calls; give it that and the run.
                queue_wait = 2 * callers / (rpm / 60.0)
                timeout = duration_s + queue_wait + 120.0
                bar = _progress_bar(progress is not None)
                driven = asyncio.run(
                    _drive(judge.http_url, callers=callers, duration_s=duration_s, timeout_s=timeout, on_done=bar)
                )
                stats = provider.stats()
                exit_code = judge.terminate()
        finally:
            provider.stop()
    shares = summarise(
        stats["accepted"], stats["rejected"], started=driven["started"], duration_s=duration_s, exclude_s=exclude_s,
        rpm=rpm,
    )  # fmt: skip
    counts = driven["counts"]
    return {
        "rpm": rpm,
        "latency_ms": latency_ms,
        "provider_window_s": window_s,
        "duration_s": duration_s,
        "drain_s": driven["finished"] - driven["started"] - duration_s,
        "callers": callers,
        "judge_max_concurrency": concurrency,
        "protocol": "both_orders (2 provider calls per compare)",
        **shares,
        "caller_outcomes": counts,
        "caller_429s": counts["rejected_429"],
        "caller_failures": counts["rejected_429"] + counts["errors"] + counts["abstained"],
        "caller_failure_reasons": driven["reasons"],
        "caller_latency_s": driven["latency_s"],
        "judge_exit_code": exit_code,
        "definition": "sustained_share: provider-accepted calls per minute with arrival in the steady window "
        "[start + exclude, start + duration) divided by the RPM; caller_429s: compares the service answered "
        "with 429 (clients do not retry); provider_429s: provider rejections the service absorbed",
    }


def _progress_bar(enabled: bool) -> Callable[[], None]:
    if not enabled:
        return lambda: None
    from tqdm import tqdm

    bar = tqdm(desc="compares", unit="cmp", leave=False)
    return lambda: bar.update(1)
