"""``rlhf-feedback score`` against a real reward service (the tiny Llama reward model in a
``serve reward`` child process): the scores are the service's own ``/v1/score`` answers, a failed
item is None with its reason (never 0), and a run killed with SIGKILL resumes to the same output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.process import ServerProcess
from rlhf_feedback.cli import main
from rlhf_train.jobs.io import journal_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

MAX_TEXT_BYTES = 2000


@pytest.fixture(scope="module")
def reward(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("reward") / "reward.log"
    srv = ServerProcess.reward(
        ["--model", str(tiny_llama_dir), "--max-text-bytes", str(MAX_TEXT_BYTES), "--threads", "1",
         "--drain-seconds", "1", "--log-level", "warning"],
        log_path=log,
    )  # fmt: skip
    try:
        srv.wait_ready(120)
        yield srv
    finally:
        srv.terminate()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def service_score(srv: ServerProcess, prompt: Any, response: str) -> float:
    r = httpx.post(srv.http_url + "/v1/score", json={"inputs": [{"prompt": prompt, "response": response}]}, timeout=30)
    assert r.status_code == 200, r.text
    return float(r.json()["results"][0]["score"])


def test_scores_are_the_services_and_failed_items_are_none_with_a_reason(
    reward: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I bake bread?"}]
    rows: list[dict[str, Any]] = [
        {"prompt": "What is the capital of France?", "completions": ["Paris.", "Lyon, I think.", "Paris is."],
         "source": "a"},
        {"prompt": messages, "response": "Mix flour, water, salt and yeast."},
        {"prompt": "Say hi", "chosen": "Hi!", "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"prompt": "Too long?", "completions": ["short one", "x" * (MAX_TEXT_BYTES + 10)], "scores": "stale"},
    ]  # fmt: skip
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--reward", reward.http_url, "--input", str(inp), "--output", str(out), "--quiet"]) == 0
    summary = capsys.readouterr().out
    assert "4 input rows: 4 done" in summary and "no score 1 (INVALID_ARGUMENT 1)" in summary

    got = read_jsonl(out)
    assert len(got) == 4
    expected_responses = [rows[0]["completions"], [rows[1]["response"]], ["Hi!", "Go away."], rows[3]["completions"]]
    for row, src, responses in zip(got, rows, expected_responses, strict=True):
        assert {k: v for k, v in row.items() if k not in ("scores", "score_errors", "reward_model")} == {
            k: v for k, v in src.items() if k != "scores"
        }  # the row comes back as it was, plus the results
        assert len(row["scores"]) == len(responses) == len(row["score_errors"])
        assert row["reward_model"]["id"]
        for s, err, resp in zip(row["scores"], row["score_errors"], responses, strict=True):
            if len(resp.encode()) > MAX_TEXT_BYTES:
                assert s is None and err.startswith("INVALID_ARGUMENT:") and "--max-text-bytes" in err
            else:
                assert err is None
                assert s == pytest.approx(service_score(reward, src["prompt"], resp), abs=1e-5)

    # Parquet output: one type per column, so rows mixing string and message prompts are refused up
    # front (exit 2); uniform rows give the same scores.
    import pyarrow.parquet as pq

    pout = tmp_path / "scored.parquet"
    assert main(["score", "--reward", reward.http_url, "--input", str(inp), "--output", str(pout), "--quiet"]) == 2
    assert "cannot be one Parquet table" in capsys.readouterr().err and not pout.exists()
    inp2 = write_jsonl(tmp_path / "uniform.jsonl", [rows[0], rows[3]])
    assert main(["score", "--reward", reward.http_url, "--input", str(inp2), "--output", str(pout), "--quiet"]) == 0
    table = pq.read_table(pout).to_pylist()
    assert [r["scores"] for r in table] == [
        pytest.approx(got[0]["scores"], abs=1e-5),
        [pytest.approx(got[3]["scores"][0], abs=1e-5), None],
    ]
    assert table[1]["score_errors"][1].startswith("INVALID_ARGUMENT:")


def test_unreachable_service_exits_1_and_scores_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "response": "r"}] * 3)
    out = tmp_path / "o.jsonl"
    code = main(["score", "--reward", "http://127.0.0.1:9", "--input", str(inp), "--output", str(out),
                 "--max-retries", "0", "--quiet"])  # fmt: skip
    assert code == 1
    assert "3 rows could not be scored" in capsys.readouterr().err
    assert read_jsonl(out) == []


def test_bad_row_exits_2_naming_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}])
    assert (
        main(["score", "--reward", "http://127.0.0.1:9", "--input", str(inp), "--output", str(tmp_path / "o.jsonl")])
        == 2
    )
    err = capsys.readouterr().err
    assert "line 2" in err and "'completions', 'response', or 'chosen' and 'rejected'" in err


def test_score_killed_then_resumed(reward: ServerProcess, tmp_path: Path) -> None:
    """SIGKILL shortly after the first rows were committed; the rerun ends with every row once, in
    input order, with the scores of an uninterrupted run."""
    n = 300
    rows = [{"id": f"r{i}", "prompt": f"Question {i}?", "completions": [f"Answer {i}.", f"No idea about {i}."]}
            for i in range(n)]  # fmt: skip
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "killed.jsonl"
    argv = [sys.executable, "-m", "rlhf_feedback", "score", "--reward", reward.http_url, "--input", str(inp),
            "--output", str(out), "--batch-size", "2", "--concurrency", "1", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        jp = journal_path(out)
        if jp.exists() and jp.read_bytes().count(b"\n") > 1:
            break
        time.sleep(0.01)
    time.sleep(0.1)
    assert proc.poll() is None, "finished before the kill"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = journal_path(out).read_bytes().count(b"\n") - 1
    assert 0 < done_at_kill < n

    rerun = subprocess.run(argv, capture_output=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr.decode()
    reference = tmp_path / "reference.jsonl"
    assert main(["score", "--reward", reward.http_url, "--input", str(inp), "--output", str(reference), "--quiet"]) == 0

    got, want = read_jsonl(out), read_jsonl(reference)
    assert [r["id"] for r in got] == [r["id"] for r in rows]  # each row once, in input order
    for g, w in zip(got, want, strict=True):
        assert g["scores"] == pytest.approx(w["scores"], abs=1e-5) and None not in g["scores"]
