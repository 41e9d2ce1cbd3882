"""Fixtures the integration tests (TRL, verl) share: a background event loop, the real reward
service over the fake backend, and a scripted stand-in reward server, each once per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.servers import BackgroundLoop, FakeReward, RewardServer, start_reward_server


@pytest.fixture(scope="module")
def bg() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def service(bg: BackgroundLoop) -> Iterator[RewardServer]:
    """The real reward service (engine, HTTP and gRPC transports) over the fake backend."""
    srv = start_reward_server(bg)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fake(bg: BackgroundLoop) -> Iterator[FakeReward]:
    srv = FakeReward(bg)
    yield srv
    srv.stop()
