"""``serve judge`` settings: flags, env vars, defaults, and the engine config they build."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from services.common.settings import SettingsError
from services.judge.engine.config import DEFAULT_PRICES
from services.judge.settings import JudgeSettings


def parse(argv: list[str], environ: dict[str, str] | None = None) -> JudgeSettings:
    parser = argparse.ArgumentParser()
    JudgeSettings.add_arguments(parser)
    return JudgeSettings.from_sources(vars(parser.parse_args(argv)), environ or {})


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLHF_FEEDBACK_CACHE", str(tmp_path))
    s = parse([])
    assert (s.backend, s.http_port, s.grpc_port, s.max_queue_items) == ("local", 8001, 50052, 10_000)
    assert s.rpm is None and s.tpm is None and s.rationale is False and s.tie_margin == 0.05
    assert s.cache_path() == tmp_path / "judge-cache.sqlite"
    config = s.engine_config()
    assert config.rpm is None and config.principles == () and dict(config.prices) == dict(DEFAULT_PRICES)


def test_flags_and_env_vars(tmp_path: Path) -> None:
    principles = tmp_path / "constitution.txt"
    principles.write_text("Be honest.\n\n  Be harmless.\n", encoding="utf-8")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"m": [1.0, 2.0], "n": {"input": 3, "output": 4}}), encoding="utf-8")
    env = {"RLHF_FEEDBACK_JUDGE_RPM": "120", "RLHF_FEEDBACK_JUDGE_CLAMP": "0.2,0.8", "RLHF_FEEDBACK_API_KEY": "k"}
    s = parse(
        ["--backend", "openai-compatible", "--model", "m", "--base-url", "http://x/v1", "--cache", "off",
         "--rationale", "--principles", str(principles), "--principle-mode", "ensemble", "--prices", str(prices),
         "--tpm", "1000", "--max-concurrency", "4"],
        env,
    )  # fmt: skip
    assert s.cache_path() is None and s.resolved_api_key() == "k"
    config = s.engine_config()
    assert config.rpm == 120 and config.tpm == 1000 and config.clamp == (0.2, 0.8) and config.rationale
    assert config.principles == ("Be honest.", "Be harmless.") and config.principle_mode == "ensemble"
    assert config.prices["m"] == (1.0, 2.0) and config.prices["n"] == (3.0, 4.0) and config.max_concurrency == 4
    options = s.backend_options()
    assert options["model"] == "m" and options["base_url"] == "http://x/v1" and options["soft_mode"] == "verbalised"
    assert (
        parse(["--backend", "anthropic", "--model", "c", "--samples", "5"]).backend_options()["soft_mode"] == "samples"
    )
    assert parse(["--rationale", "--no-rationale"]).rationale is False


@pytest.mark.parametrize(
    "argv",
    [
        ["--backend", "openai"],  # no --model
        ["--backend", "openai-compatible", "--model", "m"],  # no --base-url
        ["--clamp", "0.9,0.1"],
        ["--clamp", "0.5"],
        ["--tie-margin", "0.5"],
        ["--rpm", "0"],
        ["--http-port", "0", "--grpc-port", "0"],
    ],
)
def test_bad_settings_name_the_flag(argv: list[str]) -> None:
    with pytest.raises(SettingsError):
        parse(argv)


def test_every_flag_has_help_and_an_env_var() -> None:
    parser = argparse.ArgumentParser()
    JudgeSettings.add_arguments(parser)
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and "env: RLHF_FEEDBACK_" in action.help, action.dest
    assert JudgeSettings.env_var("model") == "RLHF_FEEDBACK_JUDGE_MODEL"
    assert JudgeSettings.env_var("api_key") == "RLHF_FEEDBACK_API_KEY"


def test_max_prompt_chars_reaches_the_engine_and_the_local_backend() -> None:
    s = parse([])
    assert s.max_prompt_chars is None and s.engine_config().max_prompt_chars is None  # the backend's default
    assert s.backend_options()["max_prompt_chars"] is None
    s = parse(["--max-prompt-chars", "50000"], {"RLHF_FEEDBACK_JUDGE_MAX_QUEUE_ITEMS": "64"})
    assert s.engine_config().max_prompt_chars == 50_000 and s.engine_config().limits.max_prompt_chars == 50_000
    assert s.backend_options()["max_prompt_chars"] == 50_000 and s.backend_options()["max_queue_items"] == 64
    with pytest.raises(SettingsError):
        parse(["--max-prompt-chars", "0"])
