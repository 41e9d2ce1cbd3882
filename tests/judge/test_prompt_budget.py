"""The judge's prompt budget (``--max-prompt-chars``): a request whose prompt would be too long is a
400 with the numbers, before anything is rendered (its texts alone) or before any backend call (as
rendered), whichever backend; the default comes from the backend."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.process import ServerProcess
from services.common.errors import ErrorCode, ServiceError
from services.judge.backends.base import DEFAULT_MAX_PROMPT_CHARS
from services.judge.backends.scripted import ScriptedBackend
from services.judge.engine import JudgeEngine, JudgeEngineConfig
from services.judge.engine.prompts import escape_data
from services.judge.engine.validation import validate_compare, validate_grade, validate_rank
from services.judge.types import CompareInput, CompareResult, GradeInput, RankInput
from services.runtime.chat import ChatMessage
from tests.support.fakes import FakeOpenAI, always_better

LIMIT = 5000
LIMITS = JudgeEngineConfig(max_prompt_chars=LIMIT, max_text_bytes=10**7).limits


def refused(check: Any) -> str:
    with pytest.raises(ServiceError) as info:
        check()
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.http_status == 400
    return info.value.message


# -- on the request's texts, before anything is rendered ------------------------------------------


def test_texts_over_the_budget_are_refused_with_every_counted_size() -> None:
    prompt = tuple(ChatMessage("user", "x" * 1000) for _ in range(5))  # 5 x (4 + 2 + 1000) + 4 x 2 = 5038
    message = refused(lambda: validate_compare(CompareInput(prompt, ("a", "bb")), LIMITS))
    assert message == (
        "the judge prompt would be over --max-prompt-chars 5000: its texts alone are 5041 characters "
        "(prompt (5 messages) 5038, responses[0] 1, responses[1] 2)"
    )
    message = refused(
        lambda: validate_grade(
            GradeInput("q", "z" * 3000, rubric="r" * 7, reference="f" * 1000, principles=("p", "p" * 999)), LIMITS
        )
    )
    assert message.endswith(
        "its texts alone are 5007 characters (prompt 1, response 3000, reference 1000, rubric 7, principles[1] 999)"
    )


def test_rank_counts_its_two_longest_responses() -> None:
    responses = ("a" * 100, "b" * 2600, "c" * 2399, "d" * 2500)
    message = refused(lambda: validate_rank(RankInput("q", responses), LIMITS))
    assert message.endswith("its texts alone are 5101 characters (prompt 1, responses[1] 2600, responses[3] 2500)")
    validate_rank(RankInput("q", responses[:3]), LIMITS)  # 1 + 2600 + 2399: the texts fit


# -- as rendered, before any backend call -----------------------------------------------------------


async def engine_with(backend: Any, **cfg: Any) -> JudgeEngine:
    engine = JudgeEngine(lambda: backend, JudgeEngineConfig(max_text_bytes=10**7, **cfg))
    await engine.start()
    return engine


async def test_the_rendered_prompt_counts_template_and_escaping() -> None:
    backend = ScriptedBackend()
    engine = await engine_with(backend, max_prompt_chars=LIMIT)
    template = engine.protocols.longest_prompt_chars(CompareInput("", ("", "")))
    assert 1000 < template < 2000  # the pairwise template's own text: fences, instructions, criteria
    fits = LIMIT - template
    ok = await engine.compare(CompareInput("q", ("a" * (fits - 2), "b")))
    assert isinstance(ok, CompareResult)
    calls = backend.call_count
    # the same length, but every "<|" grows by one when escaped: the texts fit, the prompt does not
    evil = "<|" * ((fits - 2) // 2)
    assert len(escape_data(evil)) == len(evil) * 3 // 2
    with pytest.raises(ServiceError) as info:
        await engine.compare(CompareInput("q", (evil, "b")))
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    rendered = template + 1 + len(escape_data(evil)) + 1
    assert info.value.message == (
        f"the judge prompt would be {rendered} characters as rendered (template, fences and escaping included), "
        f"over --max-prompt-chars {LIMIT}"
    )
    assert backend.call_count == calls  # no backend call for it


async def test_the_longest_query_is_the_one_measured() -> None:
    """Rank's two longest responses, the constitution's longest principle, the grade template."""
    engine = await engine_with(ScriptedBackend(), principles=("short", "a much longer principle " * 10))
    p = engine.protocols
    base = p.longest_prompt_chars(RankInput("q", ("a", "b", "c")))
    assert p.longest_prompt_chars(RankInput("q", ("a" * 50, "b", "c" * 70))) == base + 49 + 69
    grade = p.longest_prompt_chars(GradeInput("q", "r"))
    assert p.longest_prompt_chars(GradeInput("q", "r" * 11)) == grade + 10
    longer = JudgeEngine(lambda: ScriptedBackend(), JudgeEngineConfig(principles=("short",)))
    assert p.longest_prompt_chars(GradeInput("q", "r")) - longer.protocols.longest_prompt_chars(
        GradeInput("q", "r")
    ) == len("a much longer principle " * 10) - len("short")


class _Sized(ScriptedBackend):
    max_prompt_chars = 2500


async def test_the_budget_comes_from_the_flag_else_the_backend_else_the_default() -> None:
    assert (await engine_with(ScriptedBackend())).limits.max_prompt_chars == DEFAULT_MAX_PROMPT_CHARS
    sized = await engine_with(_Sized())
    assert sized.limits.max_prompt_chars == 2500
    with pytest.raises(ServiceError, match="over --max-prompt-chars 2500"):
        await sized.compare(CompareInput("q" * 2600, ("a", "b")))
    assert (await engine_with(_Sized(), max_prompt_chars=9000)).limits.max_prompt_chars == 9000


# -- through a real `serve judge` ------------------------------------------------------------------


@pytest.mark.slow
async def test_a_10_mib_prompt_is_a_400_in_under_a_second(tmp_path: Path) -> None:
    """40 messages x 256 KiB: under --max-body-bytes (64 MiB) and --max-text-bytes (256 KiB) each,
    over the provider default budget; refused before any upstream call."""
    prompt = [{"role": "user", "content": "x" * (256 * 2**10)} for _ in range(40)]
    body = {"prompt": prompt, "responses": ["a", "b"]}
    with (
        FakeOpenAI(policy=always_better()) as provider,
        ServerProcess.judge(
            ["--backend", "openai-compatible", "--base-url", provider.base_url, "--model", "m", "--cache", "off"],
            log_path=tmp_path / "judge.log",
            env={"OPENAI_API_KEY": "sk-test"},
        ) as server,
    ):
        server.wait_ready(60)
        async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as client:
            content = httpx.Request("POST", "/", json=body).read()  # encoded before the clock starts
            assert len(content) > 10 * 2**20
            headers = {"content-type": "application/json"}
            small = await client.post("/v1/compare", json={"prompt": "Capital?", "responses": ["a", "b"]})
            assert small.status_code == 200, small.text
            started = time.perf_counter()
            r = await client.post("/v1/compare", content=content, headers=headers)
            elapsed = time.perf_counter() - started
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert (
            "over --max-prompt-chars 1000000" in message
            and f"prompt (40 messages) {40 * (4 + 2 + 256 * 2**10) + 39 * 2}" in message
        )
        assert elapsed < 1.0, elapsed
        assert len(provider.calls) == 2  # the small compare's two orders only
        assert server.terminate() == 0, server.log_tail()
