"""``rlhf-feedback label --batch-api`` against the batch stand-ins of both providers (issue 14, Done when).

The judge (``serve judge`` as a child process) talks to a fake provider through the real ``openai`` /
``anthropic`` SDKs; the fake's batches are held ``in_progress`` while the label job is SIGKILLed
twice, then released: one batch expires with half its requests done and 5% of the requests fail
once. The finished output must be byte-identical to an interactive run over a plain fake with the
same replies, no provider batch may be created twice, the cost is half the interactive one, and an
interactive rerun against the batch judge makes no provider call.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clients.process import ServerProcess
from rlhf_feedback.cli import main
from rlhf_train.jobs.io import journal_path
from rlhf_train.jobs.label_batch import recorded_jobs
from tests.judge.test_batches import MODELS, hashed_policy, plain_fake
from tests.support.fakes.batches import BatchScript, FakeAnthropicBatches, FakeOpenAIBatches

N_PAIRS = 500
KEYS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


def serve(provider: str, fake: Any, cache: Path, log: Path) -> ServerProcess:
    srv = ServerProcess.judge(
        ["--backend", provider, "--base-url", fake.base_url, "--model", MODELS[provider], "--cache", str(cache),
         "--max-retries", "0", "--max-parse-retries", "0", "--drain-seconds", "1", "--log-level", "warning",
         "--batch-poll-s", "0.05", "--batch-max-requests", "300", "--grpc-port", "0"],
        log_path=log,
        env={KEYS[provider]: "sk-test"},
    )  # fmt: skip
    srv.wait_ready(60)
    return srv


def rows() -> list[dict[str, Any]]:
    return [{"prompt": f"Question {i}: what is {i} + {i}?", "completions": [f"It is {2 * i}.", f"Maybe {2 * i + 1}."]}
            for i in range(N_PAIRS)]  # fmt: skip


def write_jsonl(path: Path, data: list[dict[str, Any]]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    return path


def label_cmd(url: str, inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_feedback", "label", "--judge", url, "--input", str(inp), "--output", str(out),
            "--quiet", "--concurrency", "16", *extra]  # fmt: skip


def batch_flags() -> list[str]:
    return ["--batch-api", "--batch-chunk", "200", "--batch-poll", "0.05"]


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def wait_for(cond: Any, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def cost(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    assert m is not None, text
    return float(m.group(1))


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_label_batch_api_killed_twice_equals_an_interactive_run(provider: str, tmp_path: Path) -> None:
    """500 pairs = 1000 verdict queries in 3 judge jobs (200 requests each at most) and provider batches
    of at most 300 requests; the second provider batch expires half done, 5% of requests fail once.
    Measured here: ~25 s per provider."""
    inp = write_jsonl(tmp_path / "in.jsonl", rows())
    # The reference: an interactive run over a plain fake with the same replies.
    with plain_fake(provider) as ref_fake:
        ref = serve(provider, ref_fake, tmp_path / "ref-cache.sqlite", tmp_path / "ref.log")
        try:
            ref_out = tmp_path / "ref" / "pairs.jsonl"
            ref_text = run(label_cmd(ref.http_url, inp, ref_out))
        finally:
            ref.terminate()
        assert len(ref_fake.calls) == 2 * N_PAIRS
    interactive_cost = cost(ref_text, r"cost \$([0-9.]+);")
    assert interactive_cost > 0

    script = BatchScript(expire={1}, fail_rate=0.05)
    script.hold.set()  # batches stay in progress until both kills are done
    fake_cls = FakeOpenAIBatches if provider == "openai" else FakeAnthropicBatches
    with fake_cls(policy=hashed_policy, batch_script=script) as fake:
        srv = serve(provider, fake, tmp_path / "cache.sqlite", tmp_path / "judge.log")
        try:
            out = tmp_path / "batch" / "pairs.jsonl"
            out.parent.mkdir()
            jpath = journal_path(out)
            # Kill 1: right after the first judge batch job is recorded.
            proc = subprocess.Popen(label_cmd(srv.http_url, inp, out, *batch_flags()), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)  # fmt: skip
            wait_for(lambda: jpath.exists() and len(recorded_jobs(jpath)) >= 1, proc)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            # Kill 2: the resumed run records the other jobs and polls; killed while the batches are held.
            proc = subprocess.Popen(label_cmd(srv.http_url, inp, out, *batch_flags()), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)  # fmt: skip
            wait_for(lambda: len(recorded_jobs(jpath)) == 3, proc)
            time.sleep(0.2)  # polling held batches
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert not out.exists() and fake.calls == []
            creates_while_held = list(fake.creates)
            assert len(creates_while_held) >= 4  # 1000 queries in batches of <= 300
            script.hold.clear()

            text = run(label_cmd(srv.http_url, inp, out, *batch_flags()))
            assert fake.calls == [], "phase 2 called the provider"
            assert len(fake.creates) == len(set(fake.creates))  # no batch created twice ...
            n_held = len(creates_while_held)
            assert fake.creates[:n_held] == creates_while_held  # ... and the held ones were polled, not recreated
            assert len(fake.creates) > n_held  # the expired and failed requests went again
            assert sum(fake.batch_requests.values()) < 2 * (2 * N_PAIRS)  # only those went again
            assert out.read_bytes() == ref_out.read_bytes()
            assert (
                out.with_name("pairs.rejects.jsonl").read_bytes()
                == ref_out.with_name("pairs.rejects.jsonl").read_bytes()
            )
            batch_cost = cost(text, r"cost \$([0-9.]+) at batch prices")
            list_cost = cost(text, r"\(\$([0-9.]+) at interactive prices\)")
            assert list_cost == pytest.approx(interactive_cost, abs=1e-4)
            assert batch_cost == pytest.approx(list_cost / 2, abs=2e-6)
            assert "1000 verdict queries" in text and "0 failed" in text
            print(
                f"BATCH {len(fake.creates)} provider batches created ({n_held} before the kills), "
                f"{sum(fake.batch_requests.values())} requests submitted for 1000 queries; "
                f"cost ${batch_cost:.6f} at batch prices, ${list_cost:.6f} interactive"
            )

            # An interactive rerun against the batch judge: all from the cache.
            again = tmp_path / "again" / "pairs.jsonl"
            run(label_cmd(srv.http_url, inp, again))
            assert fake.calls == [] and again.read_bytes() == ref_out.read_bytes()
        finally:
            srv.terminate()


@pytest.mark.slow
@pytest.mark.parametrize(("flags", "reason"), [
    (["--cache", "off"], "--cache off"),
    (["--batch-api", "off"], "--batch-api off"),
])  # fmt: skip
def test_batch_api_with_a_judge_without_one_exits_2(
    flags: list[str], reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A judge whose cache is off, or whose batch API is off: exit 2 with the judge's reason, nothing written."""
    inp = write_jsonl(tmp_path / "in.jsonl", rows()[:3])
    with FakeOpenAIBatches(policy=hashed_policy) as fake:
        srv = ServerProcess.judge(
            ["--backend", "openai", "--base-url", fake.base_url, "--model", "gpt-4o-mini", "--cache",
             str(tmp_path / "c.sqlite"), "--grpc-port", "0", "--log-level", "warning", *flags],
            log_path=tmp_path / "j.log",
            env={"OPENAI_API_KEY": "sk-test"},
        )  # fmt: skip
        try:
            srv.wait_ready(60)
            code = main(["label", "--judge", srv.http_url, "--input", str(inp), "--output", str(tmp_path / "o.jsonl"),
                         "--quiet", "--batch-api"])  # fmt: skip
        finally:
            srv.terminate()
        assert fake.calls == [] and fake.creates == []
    assert code == 2
    err = capsys.readouterr().err
    assert "--batch-api: the judge refused the batch" in err and reason in err, err
    assert not (tmp_path / "o.jsonl").exists()
