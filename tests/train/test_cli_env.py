"""Flags and their environment variables: the one helper (rlhf_train.cli_env) and the flags
``label`` and ``score`` share (rlhf_train.jobs.flags), each with a flag given, a variable given,
and neither. Defaults are read when a parser is built, so every parser here is built after the
environment is set."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rlhf_train.cli_env import API_KEY_ENV, EnvDefaults, add_api_key, add_required
from rlhf_train.jobs import label, score
from rlhf_train.jobs.flags import add_request_flags, add_service_io

ENV = EnvDefaults("RLHF_FEEDBACK_TEST_")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RLHF_FEEDBACK_TEST_DATA", "RLHF_FEEDBACK_TEST_TIMEOUT", "RLHF_FEEDBACK_TEST_QUIET", API_KEY_ENV):
        monkeypatch.delenv(name, raising=False)


def test_env_defaults_reads_the_prefixed_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ENV.variable("max_retries") == ENV.variable("max-retries") == "RLHF_FEEDBACK_TEST_MAX_RETRIES"
    assert ENV("timeout", 120.0) == 120.0
    monkeypatch.setenv("RLHF_FEEDBACK_TEST_TIMEOUT", "7.5")
    assert ENV("timeout", 120.0) == "7.5"  # text: argparse converts it with the flag's type


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, False),
        ("1", True),
        ("true", True),
        ("YES", True),
        (" On ", True),
        ("0", False),
        ("no", False),
        ("", False),
    ],
)
def test_env_switch(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is not None:
        monkeypatch.setenv("RLHF_FEEDBACK_TEST_QUIET", value)
    assert ENV.flag("quiet") is expected


def _required_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_required(p, ENV, "--data", type=Path, help="data")
    return p


def test_add_required_flag_given_variable_given_neither(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _required_parser().parse_args(["--data", "a.jsonl"]).data == Path("a.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        _required_parser().parse_args([])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --data" in capsys.readouterr().err
    monkeypatch.setenv("RLHF_FEEDBACK_TEST_DATA", "from-env.jsonl")
    assert _required_parser().parse_args([]).data == Path("from-env.jsonl")
    assert _required_parser().parse_args(["--data", "a.jsonl"]).data == Path("a.jsonl")  # the flag wins


def test_api_key_flag_variable_neither(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(argv: list[str]) -> str | None:
        p = argparse.ArgumentParser()
        add_api_key(p)
        key: str | None = p.parse_args(argv).api_key
        return key

    assert parse([]) is None
    assert parse(["--api-key", "k1"]) == "k1"
    monkeypatch.setenv(API_KEY_ENV, "k2")
    assert parse([]) == "k2"
    assert parse(["--api-key", "k1"]) == "k1"


def _job_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_service_io(p, ENV, service="judge", service_help="URL", input_help="in", output_help="out")
    add_request_flags(p, ENV, request="judge", timeout=300.0, failed="its row counts", outputs="outputs")
    return p


def test_job_flags_defaults_flags_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    args = _job_parser().parse_args(["--judge", "http://j", "--input", "i.jsonl", "--output", "o.jsonl"])
    assert (args.judge, args.input, args.output) == ("http://j", "i.jsonl", "o.jsonl")
    assert (args.api_key, args.timeout, args.max_retries, args.restart, args.quiet) == (None, 300.0, 8, False, False)
    args = _job_parser().parse_args(
        ["--judge=u", "--input=i", "--output=o", "--timeout", "5", "--max-retries", "0", "--restart", "--quiet"]
    )
    assert (args.timeout, args.max_retries, args.restart, args.quiet) == (5.0, 0, True, True)
    helps = {a.dest: a.help for a in _job_parser()._actions}
    assert helps["timeout"] == "Seconds one judge request may take (per attempt)."
    assert helps["max_retries"] == "Retries of a request on overload / unavailability before its row counts as failed."
    assert helps["restart"] == "Ignore (delete) earlier progress and outputs; start over."
    assert helps["api_key"] == "Sent as 'Authorization: Bearer KEY' (default: RLHF_FEEDBACK_API_KEY)."
    with pytest.raises(SystemExit):
        _job_parser().parse_args(["--input", "i", "--output", "o"])
    assert "the following arguments are required: --judge" in capsys.readouterr().err


def test_job_flags_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_FEEDBACK_TEST_JUDGE", "http://env")
    monkeypatch.setenv("RLHF_FEEDBACK_TEST_INPUT", "env-in.jsonl")
    monkeypatch.setenv("RLHF_FEEDBACK_TEST_OUTPUT", "env-out.jsonl")
    monkeypatch.setenv("RLHF_FEEDBACK_TEST_TIMEOUT", "12.5")
    monkeypatch.setenv("RLHF_FEEDBACK_TEST_MAX_RETRIES", "3")
    # A variable never sets --restart (it deletes progress) or --quiet.
    monkeypatch.setenv("RLHF_FEEDBACK_TEST_RESTART", "1")
    monkeypatch.setenv("RLHF_FEEDBACK_TEST_QUIET", "1")
    monkeypatch.setenv(API_KEY_ENV, "secret")
    args = _job_parser().parse_args([])
    assert (args.judge, args.input, args.output) == ("http://env", "env-in.jsonl", "env-out.jsonl")
    assert (args.api_key, args.timeout, args.max_retries, args.restart, args.quiet) == ("secret", 12.5, 3, False, False)
    assert _job_parser().parse_args(["--timeout", "1"]).timeout == 1.0


def test_label_and_score_read_their_own_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLHF_FEEDBACK_LABEL_JUDGE", "http://judge")
    monkeypatch.setenv("RLHF_FEEDBACK_LABEL_TIMEOUT", "30")
    monkeypatch.setenv("RLHF_FEEDBACK_SCORE_REWARD", "http://reward")
    monkeypatch.setenv("RLHF_FEEDBACK_SCORE_MAX_RETRIES", "2")
    io = ["--input", "i.jsonl", "--output", "o.jsonl"]

    p = argparse.ArgumentParser()
    label.add_arguments(p)
    args = p.parse_args(io)
    assert (args.judge, args.timeout, args.max_retries, args.concurrency) == ("http://judge", 30.0, 8, 8)

    p = argparse.ArgumentParser()
    score.add_arguments(p)
    args = p.parse_args(io)
    assert (args.reward, args.timeout, args.max_retries, args.concurrency) == ("http://reward", 120.0, 2, 4)
