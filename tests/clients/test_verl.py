"""verl's custom reward function, called the way verl calls it.

Read in verl: ``verl/utils/import_utils.py`` (``load_module``: ``pkg://a.b`` is
``importlib.import_module("a.b")``), ``verl/trainer/ppo/reward.py`` (``get_custom_reward_fn``:
``reward_kwargs`` merged into every call, winning over the call's own; an async function wrapped
in ``functools.partial`` of an async caller), ``verl/experimental/reward_loop/reward_loop.py``
(one task per sample, ``asyncio.gather``) and ``reward_manager/naive.py`` / ``batch.py`` (keyword
calls; ``inspect.iscoroutinefunction`` decides whether to await). These tests mirror those few
lines so that they run without verl; tests/clients/test_verl_framework.py runs verl's own code.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
from typing import Any

import numpy as np
import pytest

from clients.integrations import RewardUnavailableError
from clients.integrations import verl as verl_mod
from tests.support.servers import FakeReward, RewardServer
from tests.support.waiting import wait_until


def load_like_verl(path: str, name: str, reward_kwargs: dict[str, Any]) -> Any:
    """``custom_reward_function.{path,name,reward_kwargs}`` → the function verl's reward manager gets."""
    assert path.startswith("pkg://")
    module = importlib.import_module(path[len("pkg://") :].replace("/", "."))
    raw_fn = getattr(module, name)

    async def call_async(raw: Any, extra: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return await raw(*args, **{**kwargs, **extra})

    def call_sync(raw: Any, extra: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return raw(*args, **{**kwargs, **extra})

    if inspect.iscoroutinefunction(raw_fn):
        return functools.partial(call_async, raw_fn, reward_kwargs)
    return functools.partial(call_sync, raw_fn, reward_kwargs)


def sample_extra_info(prompt: Any) -> dict[str, Any]:
    # what the reward loop hands over: the dataset row's extra_info plus num_turns, rollout_reward_scores
    return {"prompt": prompt, "index": 0, "split": "train", "num_turns": 2, "rollout_reward_scores": {}}


PROMPTS: list[Any] = [
    "What is 2+2?",
    [{"role": "user", "content": "Say hi"}],
    # a messages column read back from parquet: a numpy object array of dicts (extra keys included)
    np.array([{"role": "system", "content": "Be brief.", "name": None}, {"role": "user", "content": "Hi"}]),
    "How do I bake bread?",
]
SOLUTIONS = ["4", "Hello!", "Hey", "Mix flour, water, salt and yeast."]


def expected_item(prompt: Any, solution: str) -> dict[str, Any]:
    if isinstance(prompt, str):
        return {"prompt": prompt, "response": solution}
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt], "response": solution}


def test_pkg_path_resolves_to_the_async_compute_score() -> None:
    fn = load_like_verl("pkg://clients.integrations.verl", "compute_score", {})
    assert inspect.iscoroutinefunction(fn)  # the reward manager awaits it (no thread pool)
    assert fn.args[0] is verl_mod.compute_score
    assert load_like_verl("pkg://clients/integrations/verl", "compute_score_batch", {}).args[0] is (
        verl_mod.compute_score_batch
    )
    params = list(inspect.signature(verl_mod.compute_score).parameters)
    assert params[:4] == ["data_source", "solution_str", "ground_truth", "extra_info"]
    assert inspect.signature(verl_mod.compute_score).parameters["extra_info"].default is None
    assert not inspect.iscoroutinefunction(verl_mod.compute_score_sync)


@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_concurrent_samples_like_the_reward_loop(transport: str, service: RewardServer) -> None:
    fn = load_like_verl("pkg://clients.integrations.verl", "compute_score", {"reward_url": service.url(transport)})
    before = service.requests(transport)
    scores = await asyncio.gather(
        *(
            fn(
                data_source="hh_rlhf",
                solution_str=s,
                ground_truth=None,
                extra_info=sample_extra_info(p),
                # what the manager adds when verl runs its own reward model router
                reward_router_address="127.0.0.1:1",
                reward_model_tokenizer=None,
            )
            for p, s in zip(PROMPTS, SOLUTIONS, strict=True)
        )
    )
    want = [service.expected(expected_item(p, s)) for p, s in zip(PROMPTS, SOLUTIONS, strict=True)]
    assert scores == pytest.approx(want, abs=1e-6)
    assert all(isinstance(s, float) for s in scores)
    # the samples of one worker that arrive together travel as one request, on one cached client
    # (the server counts a request after its answer is sent: the client may look first)
    await wait_until(lambda: service.requests(transport) - before >= 1)
    assert service.requests(transport) - before == 1
    assert verl_mod.get_client(service.url(transport)) is verl_mod.get_client(service.url(transport))


async def test_url_from_the_environment(service: RewardServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(verl_mod.URL_ENV, service.url("http"))
    fn = load_like_verl("pkg://clients.integrations.verl", "compute_score", {})
    score = await fn(data_source="d", solution_str="4", ground_truth="4", extra_info={"prompt": "What is 2+2?"})
    assert score == pytest.approx(service.expected({"prompt": "What is 2+2?", "response": "4"}))

    monkeypatch.delenv(verl_mod.URL_ENV)
    with pytest.raises(ValueError, match=verl_mod.URL_ENV):
        await fn(data_source="d", solution_str="4", ground_truth="4", extra_info={"prompt": "p"})


async def test_a_failed_sample_raises_and_its_neighbours_score(fake: FakeReward) -> None:
    fn = load_like_verl("pkg://clients.integrations.verl", "compute_score", {"reward_url": fake.url})
    outcomes = await asyncio.gather(
        *(
            fn(data_source="d", solution_str=s, ground_truth=None, extra_info={"prompt": "p"})
            for s in ["good", "FAIL", "fine!"]
        ),
        return_exceptions=True,
    )
    assert outcomes[0] == 4.0 and outcomes[2] == 5.0
    err = outcomes[1]
    assert isinstance(err, RewardUnavailableError)  # never a silent 0 (verl has no None reward)
    assert err.code == "DEADLINE_EXCEEDED" and "too slow" in str(err)


async def test_missing_prompt_is_a_clear_error(service: RewardServer) -> None:
    fn = load_like_verl("pkg://clients.integrations.verl", "compute_score", {"reward_url": service.url("http")})
    for extra_info in (None, {"index": 3}):
        with pytest.raises(ValueError, match=r'extra_info\["prompt"\]'):
            await fn(data_source="d", solution_str="x", ground_truth=None, extra_info=extra_info)


async def test_async_batch_function(service: RewardServer, fake: FakeReward) -> None:
    fn = load_like_verl(
        "pkg://clients.integrations.verl", "compute_score_batch_async", {"reward_url": service.url("grpc")}
    )
    assert inspect.iscoroutinefunction(fn)
    scores = await fn(
        data_sources=["d"] * 4,
        solution_strs=SOLUTIONS,
        ground_truths=[None] * 4,
        extra_infos=[sample_extra_info(p) for p in PROMPTS],
    )
    want = [service.expected(expected_item(p, s)) for p, s in zip(PROMPTS, SOLUTIONS, strict=True)]
    assert scores == pytest.approx(want, abs=1e-6)

    failing = load_like_verl("pkg://clients.integrations.verl", "compute_score_batch_async", {"reward_url": fake.url})
    with pytest.raises(RewardUnavailableError):
        await failing(
            data_sources=["d"] * 2,
            solution_strs=["ok", "FAIL"],
            ground_truths=[None] * 2,
            extra_infos=[{"prompt": "p"}] * 2,
        )


def test_batch_manager_gets_a_sync_batch_function(service: RewardServer, fake: FakeReward) -> None:
    # verl's batch manager calls compute_score(...) and indexes the result: no coroutine allowed
    fn = load_like_verl("pkg://clients.integrations.verl", "compute_score_batch", {"reward_url": service.url("http")})
    assert not inspect.iscoroutinefunction(fn)
    scores = fn(
        data_sources=np.array(["d"] * 4, dtype=object),  # verl passes the non_tensor_batch column
        solution_strs=SOLUTIONS,
        ground_truths=[None] * 4,
        extra_infos=np.array([sample_extra_info(p) for p in PROMPTS], dtype=object),
    )
    want = [service.expected(expected_item(p, s)) for p, s in zip(PROMPTS, SOLUTIONS, strict=True)]
    assert scores == pytest.approx(want, abs=1e-6)
    assert fn(data_sources=[], solution_strs=[], ground_truths=[], extra_infos=[]) == []

    failing = load_like_verl("pkg://clients.integrations.verl", "compute_score_batch", {"reward_url": fake.url})
    with pytest.raises(RewardUnavailableError) as err:
        failing(
            data_sources=["d"] * 2, solution_strs=["ok", "FAIL"], ground_truths=None, extra_infos=[{"prompt": "p"}] * 2
        )
    assert err.value.code == "DEADLINE_EXCEEDED"


def test_client_settings_from_reward_kwargs() -> None:
    # one client per URL and settings; max_retries and timeout reach it
    a = verl_mod.get_client("http://127.0.0.1:1", max_retries=0, timeout=5.0)
    assert a is verl_mod.get_client("http://127.0.0.1:1", max_retries=0, timeout=5.0)
    assert a is not verl_mod.get_client("http://127.0.0.1:1")
    assert a._core.policy.max_retries == 0 and a._core.timeout == 5.0
    assert verl_mod.get_client("http://127.0.0.1:1")._core.policy.max_retries == 8
    several = verl_mod.get_client("grpc://a:1, grpc://b:2")
    assert len(several._core.endpoints) == 2


def test_sync_twin_for_the_older_managers(service: RewardServer) -> None:
    fn = load_like_verl("pkg://clients.integrations.verl", "compute_score_sync", {"reward_url": service.url("http")})
    assert not inspect.iscoroutinefunction(fn)
    score = fn(data_source="d", solution_str="Hello!", ground_truth=None, extra_info={"prompt": PROMPTS[1]})
    assert score == pytest.approx(service.expected(expected_item(PROMPTS[1], "Hello!")))
    # ground_truth may be left out entirely (a reward model needs none)
    assert fn(data_source="d", solution_str="Hello!", extra_info={"prompt": PROMPTS[1]}) == score
