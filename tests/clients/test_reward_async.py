"""AsyncRewardClient against the reward service (HTTP and gRPC) and scripted fakes.

Mirrors tests/clients/test_reward_sync.py: both run every case of tests/support/client_cases.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_asyncio

from clients import AsyncRewardClient
from tests.support.client_cases import CASES, Env, Servers, case_params

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers.start()
    yield s
    s.stop()


@pytest_asyncio.fixture
async def make_client() -> AsyncIterator[Callable[..., Any]]:
    made: list[AsyncRewardClient] = []

    def make(url: Any, **kw: Any) -> AsyncRewardClient:
        client = AsyncRewardClient(url, **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.mark.parametrize("transport", ["http", "grpc"])
@pytest.mark.parametrize("case", case_params())
async def test_async_reward_client(case: str, transport: str, servers: Servers, make_client: Any) -> None:
    env = Env(transport, servers.bg, servers.main, servers.shed, make_client)
    await CASES[case](env)
