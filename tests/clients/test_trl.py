"""TRL reward functions: unit tests against in-process servers, and a real ``trl`` GRPO step
against a live reward service (``rlhf-feedback serve reward`` on a tiny Llama reward model)."""

from __future__ import annotations

import asyncio
import inspect
import math
import multiprocessing as mp
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from clients import InvalidRequestError, RewardClient
from clients.integrations import TooManyFailuresError
from clients.integrations.trl import AsyncRemoteJudgeReward, AsyncRemoteReward, RemoteJudgeReward, RemoteReward
from clients.process import ServerProcess
from clients.types import ScoreResults
from tests.support.servers import (
    BackgroundLoop,
    FakeReward,
    RewardServer,
    start_uvicorn,
    stop_uvicorn,
)

# -- in-process servers ------------------------------------------------------------------------------


class FakeJudge:
    """A judge server whose /v1/grade gives ``min(1, len(response) / 10)``, abstains on ``ABSTAIN``
    and records the bodies."""

    def __init__(self, bg: BackgroundLoop) -> None:
        self.bg = bg
        self.bodies: list[dict[str, Any]] = []
        app = FastAPI()

        @app.post("/v1/grade")
        async def grade(request: Request) -> Any:
            body = await request.json()
            self.bodies.append(body)
            common = {"judge": {"backend": "fake", "model": "m", "template_hash": "h"}, "usage": {}, "cached": False}
            if "ABSTAIN" in body["response"]:
                return {"abstain": {"reason": "unparseable verdict"}, **common}
            score = min(1.0, len(body["response"]) / 10)
            return {"score": score, "raw": 1 + 4 * score, **common}

        self.server, self.task, self.port = bg.run(start_uvicorn(app))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.bg.run(stop_uvicorn(self.server, self.task))


@pytest.fixture(scope="module")
def judge(bg: BackgroundLoop) -> Iterator[FakeJudge]:
    srv = FakeJudge(bg)
    yield srv
    srv.stop()


async def call(func: Any, **kwargs: Any) -> Any:
    """Call a sync reward function in a thread (as a trainer would), an async one in this loop."""
    if inspect.iscoroutinefunction(func):
        return await func(**kwargs)
    return await asyncio.to_thread(lambda: func(**kwargs))


TWINS = [pytest.param(RemoteReward, id="sync"), pytest.param(AsyncRemoteReward, id="async")]
JUDGE_TWINS = [pytest.param(RemoteJudgeReward, id="sync"), pytest.param(AsyncRemoteJudgeReward, id="async")]


# -- inputs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", TWINS)
@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_standard_inputs_score_like_the_service(cls: type, transport: str, service: RewardServer) -> None:
    fn = cls(service.url(transport))
    prompts = ["What is 2+2?", "Say hi", "What is 2+2?"]
    completions = ["4", "Hello there", "five"]
    out = await call(fn, prompts=prompts, completions=completions, completion_ids=[[1], [2], [3]], answer=["4"] * 3)
    assert isinstance(out, ScoreResults) and out.errors == {}
    want = [service.expected({"prompt": p, "response": c}) for p, c in zip(prompts, completions, strict=True)]
    assert list(out) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("cls", TWINS)
async def test_conversational_inputs(cls: type, service: RewardServer) -> None:
    fn = cls(service.url("http"))
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    completions = [
        [{"role": "assistant", "content": "Hello!"}],
        # content blocks (a VLM's format): the text parts are scored
        [{"role": "assistant", "content": [{"type": "text", "text": "Hey"}]}],
        # a tool loop: several messages after the prompt → scored as the whole conversation
        [
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "It is 42."},
        ],
    ]
    items = fn.items([prompt] * 3, completions)
    assert items[0] == {"prompt": prompt, "response": "Hello!"}
    assert items[1] == {"prompt": prompt, "response": "Hey"}
    assert items[2] == {
        "messages": [
            *prompt,
            {"role": "assistant", "content": ""},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "It is 42."},
        ]
    }
    out = await call(fn, prompts=[prompt] * 3, completions=completions, trainer_state=object())
    assert list(out) == pytest.approx([service.expected(x) for x in items], abs=1e-6)


async def test_verbatim_template_source_and_prompt_key(service: RewardServer) -> None:
    fn = AsyncRemoteReward(service.url("http"), template_source="verbatim")
    out = await fn(prompts=["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"], completions=["Hey<|im_end|>"])
    assert list(out) == pytest.approx(
        [service.expected({"text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHey<|im_end|>"})]
    )
    with pytest.raises(ValueError, match="verbatim"):
        await fn(prompts=[[{"role": "user", "content": "Hi"}]], completions=[[{"role": "assistant", "content": "x"}]])

    keyed = AsyncRemoteReward(service.url("http"), prompt_key="question")
    out = await keyed(prompts=["templated junk"], completions=["4"], question=["What is 2+2?"])
    assert list(out) == pytest.approx([service.expected({"prompt": "What is 2+2?", "response": "4"})])
    with pytest.raises(KeyError, match="question"):
        await keyed(prompts=["p"], completions=["c"])
    with pytest.raises(ValueError, match="template_source"):
        RemoteReward("http://x", template_source="policy")  # type: ignore[arg-type]


# -- failures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", TWINS)
async def test_failed_items_are_none_with_reasons(cls: type, fake: FakeReward) -> None:
    logged: list[tuple[str, float]] = []
    fn = cls(fake.url, max_failure_rate=0.5, on_failure="nan")
    completions = ["good", "FAIL", "fine", "okay"]
    out = await call(fn, prompts=["p"] * 4, completions=completions, log_metric=lambda k, v: logged.append((k, v)))
    assert list(out) == [4.0, None, 4.0, 4.0]  # never a zero
    assert set(out.errors) == {1} and out.errors[1].code == "DEADLINE_EXCEEDED"
    assert logged == [("remote_reward/failure_rate", 0.25)]

    # by default ("auto") a None is given only to a GRPO/RLOO trainer that then drops the whole row
    # (tests/clients/test_trl_framework.py); called any other way, a failed item raises
    with pytest.raises(TooManyFailuresError) as info:
        await call(cls(fake.url, max_failure_rate=0.5), prompts=["p"] * 4, completions=completions)
    assert info.value.failure_rate == 0.25 and info.value.reasons[1].code == "DEADLINE_EXCEEDED"
    assert "not a TRL GRPO/RLOO trainer" in info.value.__notes__[0] and "on_failure='nan'" in info.value.__notes__[0]
    with pytest.raises(TooManyFailuresError) as info:  # asked for: raise on any failed item, wherever
        await call(cls(fake.url, on_failure="raise"), prompts=["p"] * 4, completions=completions)
    assert "(on_failure='raise')" in info.value.__notes__[0]
    with pytest.raises(ValueError, match="on_failure"):
        cls(fake.url, on_failure="zero")


@pytest.mark.parametrize("cls", TWINS)
async def test_past_the_threshold_it_raises_with_rate_and_reasons(cls: type, fake: FakeReward) -> None:
    fn = cls(fake.url, max_failure_rate=0.5, name="rm")
    with pytest.raises(TooManyFailuresError) as info:
        await call(fn, prompts=["p"] * 4, completions=["FAIL a", "FAIL b", "FAIL c", "fine"])
    err = info.value
    assert err.failure_rate == 0.75 and err.max_failure_rate == 0.5 and err.total == 4
    assert set(err.reasons) == {0, 1, 2} and "DEADLINE_EXCEEDED: too slow (x3)" in str(err)
    assert str(err).startswith("TOO_MANY_FAILURES: rm: 3 of 4 rewards failed (75% > max_failure_rate 50%)")
    assert pickle.loads(pickle.dumps(err)).failure_rate == 0.75  # crosses process boundaries

    strict = cls(fake.url, max_failure_rate=0.0)  # e.g. OnlineDPO, where None counts as 0
    with pytest.raises(TooManyFailuresError):
        await call(strict, prompts=["p"] * 4, completions=["FAIL", "a", "b", "c"])


@pytest.mark.parametrize("cls", TWINS)
async def test_a_failed_request_counts_as_every_item_failing(cls: type, fake: FakeReward) -> None:
    fn = cls(fake.url)
    with pytest.raises(TooManyFailuresError) as info:
        await call(fn, prompts=["p"] * 2, completions=["HTTP500", "fine"])
    assert info.value.failure_rate == 1.0 and info.value.reasons[0].code == "INTERNAL"
    assert info.value.__cause__ is not None  # the client's ServerError

    tolerant = cls(fake.url, max_failure_rate=1.0, on_failure="nan")  # the caller asked never to raise on failures
    out = await call(tolerant, prompts=["p"] * 2, completions=["HTTP500", "fine"])
    assert list(out) == [None, None] and out.errors[1].code == "INTERNAL"

    with pytest.raises(InvalidRequestError):  # a bug in the inputs is raised as is, whatever the threshold
        await call(tolerant, prompts=["p"], completions=["HTTP400"])


# -- TRL's view of the functions ------------------------------------------------------------------


def test_trl_sees_names_and_async_ness() -> None:
    from trl.trainer.utils import get_callable_name, is_async_callable

    assert get_callable_name(RemoteReward("http://h:1")) == "remote_reward"
    assert get_callable_name(AsyncRemoteReward("http://h:1", name="helpfulness")) == "helpfulness"
    assert get_callable_name(RemoteJudgeReward("http://h:1")) == "remote_judge"
    assert not is_async_callable(RemoteReward("http://h:1"))
    assert not is_async_callable(RemoteJudgeReward("http://h:1"))
    assert is_async_callable(AsyncRemoteReward("http://h:1"))
    assert is_async_callable(AsyncRemoteJudgeReward("http://h:1"))
    # trl 1.0-1.13 asked inspect.iscoroutinefunction of the instance (test_trl_framework.py: every style)
    assert inspect.iscoroutinefunction(AsyncRemoteReward("http://h:1"))
    assert not inspect.iscoroutinefunction(RemoteReward("http://h:1"))
    with pytest.raises(ValueError, match="max_failure_rate"):
        RemoteReward("http://h:1", max_failure_rate=1.5)
    for cls in (RemoteReward, AsyncRemoteReward, RemoteJudgeReward, AsyncRemoteJudgeReward):
        copy = pickle.loads(pickle.dumps(cls("http://h:1", name="n", max_failure_rate=0.2)))
        assert type(copy) is cls and copy.__name__ == "n" and copy.max_failure_rate == 0.2


def _score_in_child(payload: bytes, queue: Any) -> None:
    fn = pickle.loads(payload)
    try:
        out = fn(prompts=["p", "p"], completions=["abc", "FAIL"])
        queue.put((list(out), {i: e.code for i, e in out.errors.items()}, fn.__name__))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(repr(exc))


@pytest.mark.slow  # a spawned interpreter
@pytest.mark.timeout(120)
def test_pickled_into_a_spawned_process(fake: FakeReward) -> None:
    fn = RemoteReward(fake.url, name="rm-in-child", on_failure="nan")
    assert list(fn(prompts=["p"], completions=["used in the parent first"])) == [24.0]
    ctx = mp.get_context("spawn")  # what TRL's AsyncGRPO rollout worker uses
    queue = ctx.Queue()
    child = ctx.Process(target=_score_in_child, args=(pickle.dumps(fn), queue))
    child.start()
    try:
        result = queue.get(timeout=90)
    finally:
        child.join(30)
    assert result == ([3.0, None], {1: "DEADLINE_EXCEEDED"}, "rm-in-child")
    # the async twin pickles too
    afn = pickle.loads(pickle.dumps(AsyncRemoteReward(fake.url)))
    assert afn.__name__ == "remote_reward" and afn.max_failure_rate == 0.5


# -- judge -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", JUDGE_TWINS)
async def test_judge_grade_is_the_reward(cls: type, judge: FakeJudge) -> None:
    judge.bodies.clear()
    fn = cls(
        judge.url, rubric="Be correct.", reference_key="answer", scale=(1, 10), max_failure_rate=0.5, on_failure="nan"
    )
    prompts = [[{"role": "user", "content": "2+2?"}]] * 3
    completions = [
        [{"role": "assistant", "content": "four"}],
        [{"role": "assistant", "content": "ABSTAIN"}],
        [{"role": "assistant", "content": "the answer is four"}],
    ]
    out = await call(fn, prompts=prompts, completions=completions, answer=["4", "4", "4"])
    assert list(out) == [0.4, None, 1.0]
    assert out.errors[1].code == "ABSTAINED" and "unparseable" in out.errors[1].message
    assert {b["reference"] for b in judge.bodies} == {"4"}
    assert all(b["rubric"] == "Be correct." and b["scale"] == [1, 10] for b in judge.bodies)
    assert judge.bodies[0]["prompt"] == [{"role": "user", "content": "2+2?"}]
    with pytest.raises(TooManyFailuresError):
        await call(fn, prompts=["q"] * 2, completions=["ABSTAIN", "ABSTAIN too"], answer=["a", "a"])


# -- a real TRL GRPO step against a live reward service -------------------------------------------


class RecordingReward(RemoteReward):
    """Keeps what TRL passed and what the service answered (module level: picklable)."""

    calls: list[tuple[list[dict[str, Any]], list[float | None]]]

    def __call__(self, prompts: Any, completions: Any, **kwargs: Any) -> list[float | None]:
        out = super().__call__(prompts, completions, **kwargs)
        if not hasattr(self, "calls"):
            self.calls = []
        self.calls.append((self.items(prompts, completions, **kwargs), list(out)))
        return out


def items_scored(http_url: str) -> float:
    text = httpx.get(http_url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("rlhf_reward_items_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_grpo_step_against_a_live_reward_service(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tests.support.tiny_causal import make_tiny_causal_llama

    policy = make_tiny_causal_llama(tmp_path / "policy")
    with ServerProcess.reward(["--model", str(tiny_llama_dir)], log_path=tmp_path / "reward.log") as srv:
        srv.wait_ready(timeout=120)
        before = items_scored(srv.http_url)
        dataset = Dataset.from_dict(
            {
                "prompt": [
                    [{"role": "user", "content": "How do I bake bread?"}],
                    [{"role": "user", "content": "What is the capital of France?"}],
                ]
            }
        )
        args = GRPOConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=1,
            per_device_train_batch_size=4,  # one step: 2 prompts x 2 generations
            num_generations=2,
            max_completion_length=8,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
            seed=0,
        )
        sync_rm = RecordingReward(srv.http_url)  # HTTP, sync
        async_rm = AsyncRemoteReward(f"grpc://{srv.grpc_target}", name="remote_reward_grpc")  # gRPC, async
        funcs: list[Any] = [sync_rm, async_rm]  # trl's annotation does not list async callables
        trainer = GRPOTrainer(model=str(policy), reward_funcs=funcs, args=args, train_dataset=dataset)
        trainer.train()

        assert trainer.state.global_step == 1
        logs = next(h for h in trainer.state.log_history if "rewards/remote_reward/mean" in h)
        [(items, scores)] = sync_rm.calls
        assert len(items) == 4 and all(s is not None for s in scores)  # 2 prompts x 2 generations
        assert all(isinstance(x["prompt"], list) and isinstance(x["response"], str) for x in items)
        # the service really received the rollouts: both functions' 4 items
        assert items_scored(srv.http_url) - before >= 8
        # the logged reward is the mean of the scores the service gives for those completions
        with RewardClient(srv.http_url) as client:
            again = client.score(items)
        mean = sum(float(s) for s in again if s is not None) / len(again)
        assert logs["rewards/remote_reward/mean"] == pytest.approx(mean, abs=1e-4)
        assert logs["rewards/remote_reward_grpc/mean"] == pytest.approx(mean, abs=1e-4)  # same model, gRPC
        assert math.isfinite(logs["reward"]) and logs["reward"] == pytest.approx(2 * mean, abs=1e-3)
        assert logs["remote_reward/failure_rate"] == 0.0
