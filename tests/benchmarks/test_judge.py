"""``bench judge``: protocol vs generate on a tiny causal LM, the provider RPM run, the README block."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch

from benchmarks.judge_command import criteria
from benchmarks.judge_local import JudgePair, parse_letter, run_local
from benchmarks.judge_provider import ProviderProcess, run_provider, summarise
from benchmarks.judge_report import markdown
from benchmarks.readme import ReadmeBlockError, markers, replace_block
from rlhf_feedback.cli import main
from services.runtime.chat import ChatMessage
from tests.support.tiny_causal import make_tiny_causal_llama

README_START, README_END = markers("judge")

PAIRS = [
    JudgePair((ChatMessage("user", "How do I bake bread?"),), "Mix flour, water, salt and yeast.", "No.", "p0"),
    JudgePair("What is the capital of France?", "Paris is the capital.", "Lyon, I think.", "p1"),
    JudgePair(
        (ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!"), ChatMessage("user", "Numbers 1 2 3?")),
        "1 2 3 4 5",
        "I cannot help with that request.",
        "p2",
    ),
]


@pytest.fixture(scope="module")
def tiny_judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The judge's template is ~1.5k characters; the tiny tokenizer spends about a token each.
    return make_tiny_causal_llama(tmp_path_factory.mktemp("tiny-judge"), max_position=2048)


def test_parse_letter_takes_the_first_standalone_letter() -> None:
    assert parse_letter(" A") == "A"
    assert parse_letter("Response B is better") == "B"
    assert parse_letter("Both are fine. A") == "A"  # "Both" is no verdict
    assert parse_letter("<<<RESPONSE_A_") == "A"  # what SmolLM2-135M tends to write
    assert parse_letter("<<<END_RESPONSE_") is None
    assert parse_letter("Bread") is None


def test_protocol_and_generate_judge_the_same_prompts(tiny_judge_dir: Path) -> None:
    torch.set_num_threads(1)
    out = run_local(PAIRS, model_dir=tiny_judge_dir, device="cpu", threads=1)
    assert out["pairs"] == len(PAIRS) == len(out["per_pair"])
    assert out["prompt_tokens"]["min"] > 100  # the judge's template, rendered
    assert out["same_prompts"] is True  # the generate side rebuilt exactly the engine's queries
    assert [p["source"] for p in out["per_pair"]] == ["p0", "p1", "p2"]
    for part in ("protocol", "generate"):
        assert out[part]["seconds"] > 0
        assert out[part]["pairs_per_s"] == pytest.approx(len(PAIRS) / out[part]["seconds"])
    assert out["speedup"] == pytest.approx(out["protocol"]["pairs_per_s"] / out["generate"]["pairs_per_s"])
    for p in out["per_pair"]:
        assert len(p["generate"]["texts"]) == 2 and len(p["protocol"]["letters"]) == 2
        assert all(letter in ("A", "B") for letter in p["protocol"]["letters"])
        assert 0.0 <= p["protocol"]["preference"] <= 1.0
    # agreement counts every verdict of every pair
    agree = sum(
        a == b for p in out["per_pair"] for a, b in zip(p["protocol"]["letters"], p["generate"]["letters"], strict=True)
    )
    assert out["agreement"]["verdicts"] == pytest.approx(agree / (2 * len(PAIRS)))
    assert out["generate"]["unparsed_verdicts"] == sum(
        letter is None for p in out["per_pair"] for letter in p["generate"]["letters"]
    )
    json.dumps(out)  # JSON-ready


def test_summarise_leaves_out_the_first_window() -> None:
    # 10 calls/s for 30 s, plus a burst of 10 extra in the first second
    accepted = [100.0 + i / 10 for i in range(300)] + [100.0 + i / 100 for i in range(10)]
    s = summarise(accepted, [101.0], started=100.0, duration_s=30.0, exclude_s=10.0, rpm=600.0)
    assert s["accepted_in_steady_window"] == 200
    assert s["sustained_share"] == pytest.approx(1.0)
    assert s["run_share"] == pytest.approx(310 / 300)
    assert s["provider_429s"] == 1
    assert s["busiest_10s"]["accepted"] == 110
    assert s["busiest_60s"]["accepted"] == 310


def test_emulated_provider_enforces_its_rpm(tmp_path: Path) -> None:
    provider = ProviderProcess(rpm=60, latency_ms=0, window_s=10, log_path=tmp_path / "p.log")
    try:
        provider.wait_ready()
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 5}
        answers = [httpx.post(provider.url + "/v1/chat/completions", json=body, timeout=10) for _ in range(12)]
        assert [a.status_code for a in answers] == [200] * 10 + [429] * 2  # 60 RPM = 10 per 10 s window
        assert float(answers[-1].headers["retry-after-ms"]) > 0
        first = answers[0].json()["choices"][0]
        assert first["message"]["content"] in ("A", "B")
        assert answers[1].json()["choices"][0]["message"]["content"] == first["message"]["content"]  # deterministic
        tops = {t["token"] for t in first["logprobs"]["content"][0]["top_logprobs"]}
        assert {"A", "B"} <= tops
        stats = provider.stats()
        assert len(stats["accepted"]) == 10 and len(stats["rejected"]) == 2
    finally:
        provider.stop()


@pytest.mark.slow
def test_service_sustains_the_rpm_without_429s_to_callers(tmp_path: Path) -> None:
    out = run_provider(rpm=600, latency_ms=50, duration_s=12, callers=16, exclude_s=2, log_dir=tmp_path)
    assert out["caller_429s"] == 0
    assert out["caller_failures"] == 0, out["caller_failure_reasons"]
    assert out["caller_outcomes"]["ok"] > 0
    assert out["judge_exit_code"] == 0
    # 10 calls/s for 10 s; loose so a busy machine cannot flake it, and never more than the limit allows
    assert 0.5 < out["sustained_share"] <= 1.05
    # The limiter allows rpm/6 = 100 starts in any 10 s; arrivals at the provider jitter around the
    # window edge on a loaded machine (102-112 seen), but without a limiter it would be thousands.
    assert out["busiest_10s"]["accepted"] <= 125
    assert out["provider_429s"] == 0


def _result() -> dict[str, object]:
    local = {
        "model": "tiny", "dtype": "float32", "device": "cpu", "pairs": 3, "same_prompts": True, "speedup": 6.0,
        "prompt_tokens": {"mean": 700.0},
        "protocol": {"pairs_per_s": 6.0, "seconds": 0.5}, "generate": {"pairs_per_s": 1.0, "seconds": 3.0,
        "unparsed_verdicts": 0}, "agreement": {"verdicts": 0.5, "winners": 1.0},
    }  # fmt: skip
    machine = {"cpu": "cpu", "cores": 2, "usable_cores": 2, "torch": "2", "python": "3", "date": "2020-01-01"}
    return {"command": "rlhf-feedback bench judge --local", "local": local, "machine": machine}


def test_readme_block_is_replaced(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n{README_START}\nold table\n{README_END}\nafter\n", encoding="utf-8")
    table = markdown(_result())
    replace_block(readme, "judge", table)
    text = readme.read_text(encoding="utf-8")
    assert "old table" not in text
    assert text.startswith("# T\n\nbefore\n" + README_START + "\n")
    assert text.endswith(README_END + "\nafter\n")
    assert "6.0×" in text and "rlhf-feedback bench judge --local" in text and "2020-01-01" in text
    replace_block(readme, "judge", table)  # idempotent
    assert readme.read_text(encoding="utf-8") == text
    readme.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ReadmeBlockError):
        replace_block(readme, "judge", table)


def test_criteria_follow_the_issue_thresholds() -> None:
    c = criteria(_result())
    assert c["local_speedup_at_least_5x"] is True
    assert c["zero_429s_to_callers"] is None  # the provider part did not run


def test_cli_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "judge", "--provider", "--rpm", "0"]) == 2
    assert "--rpm must be > 0" in capsys.readouterr().err
    readme = tmp_path / "README.md"
    readme.write_text("nothing here\n", encoding="utf-8")
    assert main(["bench", "judge", "--provider", "--update-readme", str(readme)]) == 2
    assert "bench:judge:start" in capsys.readouterr().err
    assert main(["bench", "judge", "--local", "--data", str(tmp_path), "--pairs", "2"]) == 2
    assert "missing" in capsys.readouterr().err
