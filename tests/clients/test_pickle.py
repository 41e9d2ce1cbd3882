"""Clients are picklable: configuration travels, connections do not (they open lazily in the process
that uses the client). A RewardClient is used in a *spawned* process (as TRL's AsyncGRPO and
multiprocessing data loaders do) against real servers (uvicorn + grpc.aio) started in this one."""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

from clients import AsyncRewardClient, RewardClient, ScoreResults
from tests.support.client_cases import Servers, texts

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    s = Servers.start()
    yield s
    s.stop()


def score_in_child(client: RewardClient, items: list[str]) -> tuple[list[float | None], dict[int, str], str]:
    """Runs in the spawned process: the client arrives pickled, with no connection."""
    res = client.score_texts(items)
    return list(res), {i: e.code for i, e in res.errors.items()}, repr(client)


def async_score_in_child(client: AsyncRewardClient, items: list[str]) -> list[float | None]:
    async def main() -> list[float | None]:
        async with client:
            return list(await client.score_texts(items))

    return asyncio.run(main())


@pytest.mark.slow  # a spawned interpreter
@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_reward_client_in_a_spawned_process(servers: Servers, transport: str) -> None:
    client = RewardClient(servers.main.url(transport), chunk_size=8, api_key="not-needed")
    items = texts(30, "spawn")
    # Used here first, so that it holds open connections and a running loop when pickled.
    warm = client.score_texts(items[:3])
    assert list(warm) == [servers.main.expected({"text": t}) for t in items[:3]]

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:
        scores, errors, name = pool.submit(score_in_child, client, items).result(timeout=45)
        async_scores = pool.submit(async_score_in_child, AsyncRewardClient(servers.main.url(transport)), items[:5])
        assert async_scores.result(timeout=30) == [servers.main.expected({"text": t}) for t in items[:5]]
    assert scores == [servers.main.expected({"text": t}) for t in items]
    assert errors == {}
    assert name == repr(client)
    # The parent's client still works after being pickled.
    assert list(client.score_texts(items[:2])) == [servers.main.expected({"text": t}) for t in items[:2]]
    client.close()


def test_pickle_round_trip_keeps_configuration_not_connections(servers: Servers) -> None:
    client = RewardClient(
        [servers.main.url("grpc"), servers.main.url("http")], chunk_size=5, max_retries=3, priority="batch"
    )
    client.score_texts(["open", "the", "connections"])
    state: Any = client._core.__getstate__()
    assert state["_conns"] is None
    clone = pickle.loads(pickle.dumps(client))
    assert clone._core.endpoints == client._core.endpoints
    assert (clone._core.chunk_size, clone._core.policy.max_retries, clone._core.priority) == (5, 3, "batch")
    res = clone.score_texts(["open", "the", "connections"])
    assert isinstance(res, ScoreResults) and res.ok
    # Results pickle too (a list with its reasons), e.g. to travel back from a worker.
    back = pickle.loads(pickle.dumps(res))
    assert list(back) == list(res) and back.model == res.model and back.errors == res.errors
    client.close()
    clone.close()


def test_errors_pickle() -> None:
    from clients import InvalidRequestError, OverloadedError

    err = pickle.loads(pickle.dumps(InvalidRequestError("bad", item=3, status=400)))
    assert isinstance(err, InvalidRequestError) and err.item == 3 and err.status == 400
    over = pickle.loads(pickle.dumps(OverloadedError("busy", retry_after=1.5)))
    assert over.retry_after == 1.5 and over.retryable
