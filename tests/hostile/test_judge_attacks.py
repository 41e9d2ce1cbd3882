"""Attack 3 of issue 12 against a real ``serve judge`` with the embedded local judge (API key on).

Before: a prompt of 40 x 256 KiB was tokenized on the event loop (``/health/live`` did not answer
for 18 s) and would have been sent upstream whole by a provider backend. Now a prompt over
``--max-prompt-chars`` is a 400 before anything is rendered or tokenized, and every tokenizer call
of the local judge runs in a pool off the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from clients.process import ServerProcess
from tests.hostile.conftest import Probe, RssWatch, post_timed, report

pytestmark = pytest.mark.slow

LIVE_S = 0.1  # "/health/live answers within 100 ms during any judge request", idle; 3x allowed here


@pytest.fixture(scope="module")
def judge_server(key_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("hostile-judge") / "server.log"
    argv = ["--api-key-file", str(key_file), "--threads", "2", "--cache", "off"]
    srv = ServerProcess.judge(argv, log_path=log)
    try:
        srv.wait_ready(timeout=600)
        yield srv
    finally:
        srv.terminate()


def live(client: httpx.Client) -> None:
    assert client.get("/health/live").status_code == 200


def _compare(srv: ServerProcess, prompt: object) -> tuple[httpx.Response, float]:
    return post_timed(srv, "/v1/compare", orjson.dumps({"prompt": prompt, "responses": ["Canberra.", "Sydney."]}))


def test_a_10_mib_prompt_is_refused_at_once(judge_server: ServerProcess) -> None:
    # 40 messages of 256 KiB (each within --max-text-bytes): 10 MiB in all
    content = ("What is the capital of Australia? " * 8000)[: 256 * 1024]
    prompt = [{"role": ("user", "assistant")[i % 2], "content": content} for i in range(39)]
    prompt.append({"role": "user", "content": content})
    with RssWatch(judge_server.proc.pid) as rss, Probe(live, judge_server.http_url, interval=0.01) as probe:
        time.sleep(0.2)
        r, took = _compare(judge_server, prompt)
        time.sleep(0.2)
    report(
        "attack 3a (10 MiB judge prompt)",
        status=r.status_code,
        answered_s=took,
        live_worst_s=probe.worst,
        live_probes=len(probe.latencies),
        rss_rise_mib=rss.rise_mib,
    )
    assert r.status_code == 400, r.text
    assert "--max-prompt-chars" in r.json()["error"]["message"]
    assert took < 1.0 * 3
    assert not probe.errors and probe.worst < LIVE_S * 3


def test_health_live_answers_during_a_long_local_judgment(judge_server: ServerProcess) -> None:
    # About 1,000 tokens: within the model's 8,192, so both orders really run (seconds each here).
    prompt = "Tell me about the history of Canberra. " * 150
    with Probe(live, judge_server.http_url, interval=0.01) as probe:
        time.sleep(0.2)
        r, took = _compare(judge_server, prompt)
    report(
        "attack 3b (a long local judgment)",
        status=r.status_code,
        answered_s=took,
        live_p99_s=probe.p99(),
        live_worst_s=probe.worst,
        live_probes=len(probe.latencies),
    )
    assert r.status_code == 200, r.text
    assert not probe.errors and probe.p99() < LIVE_S * 3
