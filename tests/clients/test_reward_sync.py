"""RewardClient (sync) against the reward service (HTTP and gRPC) and scripted fakes.

Mirrors tests/clients/test_reward_async.py: both run every case of tests/support/client_cases.py. The sync
client's blocking methods run in a worker thread (as a trainer calls them), so that the shared,
awaiting case code can drive both twins.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from clients import AsyncJudgeClient, AsyncRewardClient, JudgeClient, RewardClient
from tests.support.client_cases import CASES, Env, Servers, SyncApi, case_params

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers.start()
    yield s
    s.stop()


@pytest.fixture
def make_client() -> Iterator[Callable[..., Any]]:
    made: list[RewardClient] = []

    def make(url: Any, **kw: Any) -> SyncApi:
        client = RewardClient(url, **kw)
        made.append(client)
        return SyncApi(client)

    yield make
    for client in made:
        client.close()


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("case", case_params())
async def test_sync_reward_client(case: str, transport: str, servers: Servers, make_client: Any) -> None:
    env = Env(transport, servers.bg, servers.main, servers.shed, make_client)
    await CASES[case](env)


def test_sync_client_plain_blocking_calls(servers: Servers) -> None:
    """No event loop in the caller at all: the plain way a training script uses it."""
    with RewardClient(servers.main.url("grpc")) as rm:
        res = rm.score_texts(["plain", "calls"])
        assert list(res) == [servers.main.expected({"text": t}) for t in ["plain", "calls"]]
    with RewardClient(servers.main.url("http")) as rm:
        assert rm.model_info().id == "fake"


@pytest.mark.parametrize(
    ("sync_cls", "async_cls"), [(RewardClient, AsyncRewardClient), (JudgeClient, AsyncJudgeClient)]
)
def test_twins_have_the_same_signatures(sync_cls: Any, async_cls: Any) -> None:
    def public(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(fn)
            for name, fn in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") and name not in ("close", "aclose")
        }

    sync_methods, async_methods = public(sync_cls), public(async_cls)
    assert sync_methods.keys() == async_methods.keys()
    for name, sig in sync_methods.items():
        assert sig == async_methods[name], name
        assert inspect.iscoroutinefunction(getattr(async_cls, name)), name
        assert not inspect.iscoroutinefunction(getattr(sync_cls, name)), name
        for p in list(sig.parameters.values())[1:]:
            if p.default is not inspect.Parameter.empty:
                assert p.kind is inspect.Parameter.KEYWORD_ONLY, (name, p.name)
    assert inspect.signature(sync_cls.__init__) == inspect.signature(async_cls.__init__)


# -- the shared pieces, directly (transport-independent) -------------------------------------------


def test_error_mapping_http() -> None:
    from clients import DeadlineExceededError, InvalidRequestError, OverloadedError, ServerError, UnavailableError
    from clients.errors import from_http

    over = from_http(
        429, {"error": {"code": "RESOURCE_EXHAUSTED", "message": "m"}}, {"retry-after": "2"}, request_id="r"
    )
    assert isinstance(over, OverloadedError) and over.retry_after == 2.0 and over.retryable
    proxy = from_http(502, "<html>bad gateway</html>", {}, request_id=None)
    assert isinstance(proxy, UnavailableError) and proxy.retryable  # a load balancer: try again
    gateway = from_http(504, None, {}, request_id=None)
    assert isinstance(gateway, UnavailableError) and gateway.retryable
    ours = from_http(504, {"error": {"code": "DEADLINE_EXCEEDED", "message": "late"}}, {}, request_id=None)
    assert isinstance(ours, DeadlineExceededError) and not ours.retryable  # the service's own deadline
    for status in (400, 413, 422):
        bad = from_http(
            status, {"error": {"code": "INVALID_ARGUMENT", "message": "m", "item": 2}}, {}, request_id=None, offset=10
        )
        assert isinstance(bad, InvalidRequestError) and bad.item == 12 and not bad.retryable
    assert isinstance(from_http(500, {"error": {"code": "INTERNAL", "message": "m"}}, {}, request_id=None), ServerError)


def test_retry_policy() -> None:
    import time

    from clients import ConnectionFailedError, InvalidRequestError, OverloadedError, UnavailableError
    from clients.retry import AttemptTimeout, RetryPolicy

    policy = RetryPolicy(max_retries=3, base_delay=0.1, max_delay=1.0)
    assert policy.delay(InvalidRequestError("x"), retry=0) is None
    assert policy.delay(OverloadedError("x"), retry=3) is None  # out of retries
    d = policy.delay(OverloadedError("x", retry_after=0.5), retry=0)
    assert d is not None and 0.5 <= d <= 0.6  # the server's delay, plus a little jitter
    assert policy.delay(OverloadedError("x", retry_after=5), retry=0, deadline=time.monotonic() + 1) is None
    assert policy.delay(UnavailableError("x"), retry=0, untried_endpoints=1) == 0.0  # elsewhere, at once
    for _ in range(50):
        b = policy.delay(ConnectionFailedError("x"), retry=2)
        assert b is not None and 0 <= b <= 0.4  # full jitter, capped exponential
    assert policy.delay(AttemptTimeout("t"), retry=0, idempotent=False) is None
    assert policy.delay(AttemptTimeout("t"), retry=0, idempotent=True) is not None


def test_plan_chunks_by_count_bytes_and_tokens() -> None:
    from clients.reward import ChunkLimits, plan_chunks, token_bound

    items = [{"text": "x" * 10} for _ in range(10)]
    assert plan_chunks(items, ChunkLimits(4)) == [(0, 4), (4, 8), (8, 10)]
    spans = plan_chunks(items, ChunkLimits(100, 50))  # ~24 bytes per item: two per chunk
    assert spans[0] == (0, 2) and spans[-1][1] == 10
    assert plan_chunks([{"text": "y" * 1000}], ChunkLimits(4, 10)) == [(0, 1)]  # an item alone even when over
    # Tokens: 10 bytes + 16 per item; 3 items (78) fit a budget of 80, a 4th does not.
    assert token_bound(items[0], None) == 26
    assert plan_chunks(items, ChunkLimits(100, None, 80)) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    # An item costs at most the server's truncation length.
    long = [{"prompt": [{"role": "user", "content": "é" * 500}], "response": "z" * 900} for _ in range(4)]
    assert token_bound(long[0], None) == 1000 + 900 + 32 and token_bound(long[0], 512) == 512
    assert plan_chunks(long, ChunkLimits(100, None, 1024, 512)) == [(0, 2), (2, 4)]


def test_url_parsing() -> None:
    from clients._core import parse_endpoints

    http, grpcs, dns = parse_endpoints(["https://rm.example:8443/", "grpcs://rm.example:50051", "dns:///rm:50051"])
    assert (http.kind, http.target, http.tls) == ("http", "https://rm.example:8443", True)
    assert (grpcs.kind, grpcs.target, grpcs.tls) == ("grpc", "rm.example:50051", True)
    assert dns.kind == "grpc" and dns.round_robin
    with pytest.raises(ValueError):
        parse_endpoints("ftp://nope")
    with pytest.raises(ValueError):
        parse_endpoints([])
