"""The local judge tokenizes off the event loop (issue 12): ``/health/live`` of a real ``serve judge
--backend local`` keeps answering at once while a long prompt is being tokenized. Before, the
tokenizer ran on the event loop: a 40 x 256 KiB prompt held every request, probes included, for
18 s."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import orjson
import pytest

from clients.process import ServerProcess
from tests.support.tiny_causal import make_tiny_causal_llama

pytestmark = pytest.mark.slow

PROMPT_CHARS = 1_000_000  # just under the budget below: ~0.5 s of tokenizing per order, idle
# "/health/live answers within 100 ms during any judge request": nine probes in ten within it.
# Measured on a 2-core machine at load 5-6 (other test runs): median 1-3 ms, 90th percentile
# 12-14 ms, the slowest 37-140 ms (when the OS gives both cores to the tokenizer threads), over
# requests of 1.8-2.6 s.
PROBE_LIMIT_S = 0.1


async def test_health_live_answers_while_a_long_prompt_is_tokenized(tmp_path: Path) -> None:
    model = make_tiny_causal_llama(tmp_path / "tiny-judge")
    budget = PROMPT_CHARS + 10_000
    argv = ["--backend", "local", "--model", str(model), "--device", "cpu", "--cache", "off",
            "--max-prompt-chars", str(budget), "--max-text-bytes", str(2 * budget)]  # fmt: skip
    sentence = "The quick brown fox jumps over the lazy dog. "
    prompt = (sentence * (PROMPT_CHARS // len(sentence) + 1))[:PROMPT_CHARS]
    body = orjson.dumps({"prompt": prompt, "responses": ["Paris.", "Lyon."]})
    with ServerProcess.judge(argv, log_path=tmp_path / "judge.log") as server:
        server.wait_ready(120)
        async with (
            httpx.AsyncClient(base_url=server.http_url, timeout=120) as client,
            httpx.AsyncClient(base_url=server.http_url, timeout=10) as probes,
        ):
            for _ in range(3):  # connections open, code paths warm
                assert (await probes.get("/health/live")).status_code == 200
            started = time.perf_counter()
            judged = asyncio.create_task(
                client.post("/v1/compare", content=body, headers={"content-type": "application/json"})
            )
            latencies: list[float] = []
            while not judged.done():
                t0 = time.perf_counter()
                r = await probes.get("/health/live")
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200
                await asyncio.sleep(0.02)
            answer = await judged
            took = time.perf_counter() - started
        assert server.terminate() == 0, server.log_tail()
    # the tiny model reads 256 tokens: the prompt is judged as far as the tokenizer, then abstains
    assert answer.status_code == 200, answer.text
    assert "over the model's maximum of 256" in answer.json()["abstain"]["reason"]
    assert took > 0.5 and len(latencies) >= 10, (took, len(latencies))  # the probes ran during the work
    ranked = sorted(latencies)
    assert ranked[int(0.9 * len(ranked))] < PROBE_LIMIT_S, (ranked[-10:], took)
    # and not one probe waited for the tokenizing (on the event loop it stalled all of them for it)
    assert ranked[-1] < took / 3, (ranked[-5:], took)
