"""A schema fuzzer (schemathesis 4.32, hypothesis underneath) against the *served* schema of both
services: the real reward service over the FakeBackend and the real judge service over the scripted
fake judge, each behind uvicorn on loopback.

For every operation of ``/openapi.json`` the fuzzer generates requests that match the schema
(positive) and requests that break it (negative), sends them and checks each answer: no 5xx, a
status code the operation documents, the documented content type, a body that the documented schema
of that status accepts, the documented response headers, and a 4xx for every request that breaks
the schema. The run is bounded (about 300-400 cases per service) and deterministic: ``derandomize``,
no example database, and hypothesis's caches in a temporary directory, never in the repository.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.judge.backends.scripted import ScriptedBackend
from services.judge.transports.http import create_http_app as create_judge_app
from tests.support.judge import judge_engine, judge_settings
from tests.support.servers import BackgroundLoop, start_reward_server, start_uvicorn, stop_uvicorn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# The caller's own deadline (X-Request-Timeout, seconds) below which a 504 is its answer, not a fault.
ASKED_DEADLINE_S = 1.0


def not_a_server_error_unless_asked(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """schemathesis's ``not_a_server_error``, except for the 504 DEADLINE_EXCEEDED that the error table
    prescribes when the case itself asked for a sub-second deadline (the fuzzer sends ``5e-324``)."""
    asked = response.status_code == 504 and _asked_deadline(case) < ASKED_DEADLINE_S
    if asked and response.json()["error"]["code"] == "DEADLINE_EXCEEDED":
        return None
    return not_a_server_error(ctx, response, case)


def _asked_deadline(case: Case) -> float:
    headers = {k.lower(): v for k, v in (case.headers or {}).items()}
    try:
        return float(headers.get("x-request-timeout", "inf"))
    except ValueError:
        return float("inf")


CHECKS = [
    not_a_server_error_unless_asked,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]
# Cases per operation and mode: routes with a body get the most; GETs have nothing to vary. The
# judge has 3 POST routes to the reward service's 7, so it gets twice as many cases on each.
Budget = dict[tuple[str, GenerationMode], int]
BUDGET: Budget = {
    ("post", GenerationMode.POSITIVE): 30,
    ("post", GenerationMode.NEGATIVE): 20,
    ("get", GenerationMode.POSITIVE): 5,
}
JUDGE_BUDGET: Budget = {**BUDGET, ("post", GenerationMode.POSITIVE): 60, ("post", GenerationMode.NEGATIVE): 40}


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Hypothesis writes caches (unicode tables, constants) under its home directory, ``./.hypothesis``
    by default: point it at a temporary directory for this module."""
    home = tmp_path_factory.mktemp("hypothesis")
    set_hypothesis_home_dir(home)
    yield home
    set_hypothesis_home_dir(None)


@pytest.fixture(scope="module")
def bg() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@dataclass
class Run:
    cases: int = 0
    statuses: dict[int, int] | None = None


def fuzz(base_url: str, budget: Budget) -> tuple[Run, list[str]]:
    """Fuzz every operation of the schema served at ``base_url``; return the counts and the failures
    (one per operation and mode: hypothesis stops at the first failing case, shrunk)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=30)
    run = Run(statuses={})
    failures: list[str] = []
    with requests.Session() as session:
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result  # the served schema loads, every operation of it
            operation = result.ok()
            for (method, mode), n in budget.items():
                if operation.method.lower() != method:
                    continue
                test = _test(operation.as_strategy(generation_mode=mode), n, base_url, session, run)
                try:
                    test()
                except (Exception, FailureGroup) as exc:  # collected, so that one run reports every operation's failure
                    failures.append(f"{operation.label} ({mode.value}): {exc}")
    return run, failures


def _test(strategy: Any, n: int, base_url: str, session: requests.Session, run: Run) -> Callable[[], None]:
    @hypothesis.settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @hypothesis.given(case=strategy)
    def test(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, timeout=30)
        run.cases += 1
        assert run.statuses is not None
        run.statuses[response.status_code] = run.statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=CHECKS)

    return test


def test_reward_service_survives_the_schema_fuzzer(bg: BackgroundLoop) -> None:
    server = start_reward_server(bg)
    try:
        run, failures = fuzz(server.url("http"), BUDGET)
    finally:
        server.stop()
    assert not failures, "\n\n".join(failures)
    assert run.statuses is not None
    # 7 POST operations (score, compare, get_reward, /classify, /pooling and their /v1 aliases) and 4 GETs
    assert run.cases >= 300, run
    assert run.statuses.get(200, 0) >= 30 and sum(n for s, n in run.statuses.items() if 400 <= s < 500) >= 100, run
    assert not {s for s in run.statuses if s >= 500} - {504}, run  # 504: only the deadlines cases asked for


def test_judge_service_survives_the_schema_fuzzer(bg: BackgroundLoop) -> None:
    settings = judge_settings(max_text_bytes=4096)
    engine = judge_engine(ScriptedBackend(), settings)

    async def up() -> tuple[Any, Any, int]:
        await engine.start()
        return await start_uvicorn(create_judge_app(engine, settings, api_key=None))

    server, task, port = bg.run(up())
    try:
        run, failures = fuzz(f"http://127.0.0.1:{port}", JUDGE_BUDGET)
    finally:

        async def down() -> None:
            await stop_uvicorn(server, task)
            await engine.stop()

        bg.run(down())
    assert not failures, "\n\n".join(failures)
    assert run.statuses is not None
    # 3 POST operations (compare, rank, grade) and 4 GETs
    assert run.cases >= 300, run
    assert run.statuses.get(200, 0) >= 30 and sum(n for s, n in run.statuses.items() if 400 <= s < 500) >= 100, run
    assert not {s for s in run.statuses if s >= 500} - {504}, run
