"""TRL's own reward code (trl 1.16 as installed) calling our reward functions against the real
reward service (fake backend): GRPO's and RLOO's ``_calculate_rewards`` and OnlineDPO's
``_calculate_rewards_from_functions``, with a rule reward next to the remote one; both ways TRL
releases detect an async reward function; head selection of a vector reward model."""

from __future__ import annotations

import asyncio
import inspect
import math
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.integrations import TooManyFailuresError
from clients.integrations import trl as ours
from clients.integrations.trl import (
    AsyncGatedReward,
    AsyncRemoteJudgeReward,
    AsyncRemoteReward,
    GatedReward,
    RemoteJudgeReward,
    RemoteReward,
    RewardCoroutine,
)
from services.reward.engine.service import RewardEngine
from services.reward.settings import RewardSettings
from services.reward.transports.http import create_http_app
from services.runtime.backends.fake import FakeBackend
from tests.support.servers import BOOM, BackgroundLoop, RewardServer, start_reward_server, start_uvicorn, stop_uvicorn

ASYNC_CLASSES = [AsyncRemoteReward, AsyncRemoteJudgeReward]
SYNC_CLASSES = [RemoteReward, RemoteJudgeReward]


def exact_match(prompts: list[Any], completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """The rule reward of the README: 1.0 when the completion is the reference answer."""
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


async def async_exact_match(prompts: list[Any], completions: list[Any], answer: list[str], **kw: Any) -> list[float]:
    return exact_match(prompts, completions, answer)


# -- async detection: both styles ----------------------------------------------------------------


@pytest.mark.parametrize("cls", ASYNC_CLASSES)
def test_async_classes_are_coroutine_functions_to_every_trl_detector(cls: type) -> None:
    from trl.trainer.utils import is_async_callable  # trl >= 1.14

    fn = cls("http://h:1", name="rm")
    assert is_async_callable(fn)
    assert inspect.iscoroutinefunction(fn)  # trl 1.0-1.13 (the 1.10 development code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in 3.14
        assert asyncio.iscoroutinefunction(fn)  # trl 0.27
    # the instance still reads as the reward function it is
    assert str(inspect.signature(fn)) == (
        "(prompts: 'Sequence[Any]', completions: 'Sequence[Any]', **kwargs: 'Any') -> 'list[float | None]'"
    )
    assert fn.__name__ == "rm" and callable(fn) and not inspect.isfunction(fn)
    copy = pickle.loads(pickle.dumps(fn))  # nothing of the duck typing is in the pickled state
    assert type(copy) is cls and inspect.iscoroutinefunction(copy) and is_async_callable(copy)
    assert "__code__" not in vars(copy)


@pytest.mark.parametrize("cls", SYNC_CLASSES)
def test_sync_classes_are_not(cls: type) -> None:
    from trl.trainer.utils import is_async_callable

    fn = cls("http://h:1")
    assert not is_async_callable(fn) and not inspect.iscoroutinefunction(fn)
    gate = fn.gate(exact_match)
    assert isinstance(gate, GatedReward) and not is_async_callable(gate) and not inspect.iscoroutinefunction(gate)


def test_gates_of_async_functions_are_async() -> None:
    from trl.trainer.utils import get_callable_name, is_async_callable

    gate = AsyncRemoteReward("http://h:1").gate(exact_match)
    assert isinstance(gate, AsyncGatedReward)
    assert is_async_callable(gate) and inspect.iscoroutinefunction(gate)
    assert get_callable_name(gate) == "exact_match"  # logged under the rule's own name


def _detection_script() -> str:
    # our own mechanism's source, run by another interpreter without the project's dependencies
    parts = [
        inspect.getsource(ours._reward_call_signature),
        inspect.getsource(ours._mark_coroutine_function),
        inspect.getsource(ours._CoroutineFunctionLike),
    ]
    return "\n".join(
        [
            "from __future__ import annotations",
            "import asyncio, inspect, pickle, sys",
            "from collections.abc import Callable, Sequence",
            "from typing import Any, TypeVar",
            "T = TypeVar('T')",
            *parts,
            textwrap.dedent(
                """
                class Func(_CoroutineFunctionLike):
                    def __init__(self):
                        self.__name__ = "f"
                    @_mark_coroutine_function
                    def __call__(self, prompts, completions, **kwargs):
                        return asyncio.sleep(0, [1.0])
                f = pickle.loads(pickle.dumps(Func()))
                marked = sys.version_info >= (3, 12)
                print(inspect.iscoroutinefunction(f), inspect.iscoroutinefunction(f.__call__) == marked,
                      str(inspect.signature(f)).startswith("(prompts"), asyncio.run(f(["p"], ["c"])) == [1.0])
                """
            ),
        ]
    )


def _other_pythons() -> list[str]:
    """Python 3.10, 3.12 and 3.13 where installed (PATH, pyenv): the ones that start."""
    found = []
    for v in ("3.10", "3.12", "3.13"):
        candidates = [*sorted(Path.home().glob(f".pyenv/versions/{v}*/bin/python{v}")), shutil.which(f"python{v}")]
        for exe in filter(None, candidates):
            if subprocess.run([str(exe), "-c", "pass"], capture_output=True, timeout=60, check=False).returncode == 0:
                found.append(str(exe))
                break
    return found


@pytest.mark.slow  # other interpreters
def test_the_duck_typing_holds_on_other_pythons() -> None:
    pythons = [sys.executable, *_other_pythons()]
    script = _detection_script()
    for exe in pythons:
        out = subprocess.run([exe, "-c", script], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, (exe, out.stderr)
        assert out.stdout.split() == ["True"] * 4, (exe, out.stdout)
    if len(pythons) == 1:
        pytest.skip("only this interpreter is installed: the others (3.10, 3.12, 3.13) were not checked")


async def test_the_awaitable_is_a_coroutine_that_refuses_to_be_a_list(service: RewardServer) -> None:
    fn = AsyncRemoteReward(service.url("http"))
    call = fn(prompts=["Hi"], completions=["Hey"])
    assert isinstance(call, RewardCoroutine) and asyncio.iscoroutine(call)
    assert list(await call) == pytest.approx([service.expected({"prompt": "Hi", "response": "Hey"})], abs=1e-6)
    task = asyncio.ensure_future(fn(prompts=["Hi"], completions=["Hey"]))  # a task too (AsyncGRPO's gather)
    assert len(await task) == 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # closed: no "coroutine was never awaited" on top
        misused = fn(prompts=["Hi"], completions=["Hey"])
        with pytest.raises(TypeError, match=r"'remote_reward' is async and was called without await.*RemoteReward"):
            [r for r in misused]  # what OnlineDPO does with the result
        with pytest.raises(TypeError, match="called without await"):
            len(fn(prompts=["Hi"], completions=["Hey"]))


def test_asyncio_run_takes_it(service: RewardServer) -> None:
    out = asyncio.run(AsyncRemoteReward(service.url("http"))(prompts=["Hi"], completions=["Hey"]))
    assert list(out) == pytest.approx([service.expected({"prompt": "Hi", "response": "Hey"})], abs=1e-6)


# -- head selection -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vector_service(bg: BackgroundLoop) -> Iterator[str]:
    """The real reward service over a fake model with three heads (LABEL_0..2 = score + 0, 1, 2)."""
    backend = FakeBackend(max_length=64, num_labels=3)
    cfg = RewardSettings.model_validate({"host": "127.0.0.1", "max_wait_ms": 1.0})
    engine = RewardEngine(lambda: backend, cfg.engine_config())

    async def up() -> tuple[Any, Any, int]:
        await engine.start()
        return await start_uvicorn(create_http_app(engine, cfg, api_key=None))

    server, task, port = bg.run(up())
    yield f"http://127.0.0.1:{port}"

    async def down() -> None:
        await stop_uvicorn(server, task)
        await engine.stop()

    bg.run(down())


@pytest.mark.parametrize("cls", [RemoteReward, AsyncRemoteReward])
async def test_head_selects_one_output_of_a_vector_model(cls: type, vector_service: str) -> None:
    from clients import AsyncRewardClient

    prompts, completions = ["Hi", "What is 2+2?"], ["Hey", "4"]
    async with AsyncRewardClient(vector_service) as client:
        full = await client.score([{"prompt": p, "response": c} for p, c in zip(prompts, completions, strict=True)])
    assert full.vectors is not None
    vectors = [v for v in full.vectors if v is not None]
    assert len(vectors) == 2 and len(vectors[0]) == 3
    by_index = cls(vector_service, head=2)
    by_name = cls(vector_service, head="LABEL_1")
    assert (by_index.__name__, by_name.__name__) == ("remote_reward_2", "remote_reward_LABEL_1")
    for fn, k in ((by_index, 2), (by_name, 1)):
        out = await _call(fn, prompts=prompts, completions=completions)
        assert list(out) == pytest.approx([v[k] for v in vectors], abs=1e-6)
        assert [v[k] - v[0] for v in vectors] == pytest.approx([k, k], abs=1e-5)  # fake heads: score + k
    with pytest.raises(ValueError, match=r"head 'helpfulness' is not a head of fake \(heads: \['LABEL_0', 'LABEL_1'"):
        await _call(cls(vector_service, head="helpfulness"), prompts=prompts, completions=completions)
    with pytest.raises(ValueError, match="with 3 heads"):
        await _call(cls(vector_service, head=3), prompts=prompts, completions=completions)
    with pytest.raises(TypeError, match="head"):
        cls(vector_service, head=1.5)


async def test_head_of_a_scalar_model(service: RewardServer) -> None:
    item = {"prompt": "Hi", "response": "Hey"}
    assert list(await AsyncRemoteReward(service.url("http"), head="LABEL_0")(["Hi"], ["Hey"])) == pytest.approx(
        [service.expected(item)], abs=1e-6
    )
    with pytest.raises(ValueError, match="one head"):
        await AsyncRemoteReward(service.url("http"), head=1)(["Hi"], ["Hey"])


async def _call(fn: Any, **kwargs: Any) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(**kwargs)
    return await asyncio.to_thread(lambda: fn(**kwargs))


# -- TRL's reward code against the live service -------------------------------------------------------


@pytest.fixture(scope="module")
def boom_service(bg: BackgroundLoop) -> Iterator[RewardServer]:
    """The real service, failing the item ``BOOM`` alone: every item is its own batch."""
    srv = start_reward_server(bg, fail_on_boom=True, max_batch_tokens=1)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.tiny_causal import make_tiny_causal_llama

    return make_tiny_causal_llama(tmp_path_factory.mktemp("policy"))


# Standard (string) data, scored verbatim: the completion "boom" is the text the fake model fails on.
PROMPTS = ["", "", "", ""]
COMPLETIONS = ["4", BOOM, "five", "4"]
ANSWERS = ["4", "4", "5", "4"]


def _trainer(kind: str, policy: Path, tmp_path: Path, funcs: list[Any], weights: list[float] | None = None) -> Any:
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": ["What is 2+2?"] * 2, "answer": ["4"] * 2})
    common: dict[str, Any] = {
        "output_dir": str(tmp_path / kind),
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "save_strategy": "no",
        "reward_weights": weights,
    }
    if kind == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        grpo = GRPOConfig(**common, per_device_train_batch_size=4, num_generations=2, max_completion_length=8)
        return GRPOTrainer(model=str(policy), reward_funcs=funcs, args=grpo, train_dataset=dataset)
    if kind == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        rloo = RLOOConfig(**common, per_device_train_batch_size=4, num_generations=2, max_completion_length=8)
        return RLOOTrainer(model=str(policy), reward_funcs=funcs, args=rloo, train_dataset=dataset)
    from transformers import AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    args = OnlineDPOConfig(**common, per_device_train_batch_size=2, max_new_tokens=8)
    tok = AutoTokenizer.from_pretrained(policy)
    return OnlineDPOTrainer(
        model=str(policy), reward_funcs=funcs, args=args, train_dataset=dataset, processing_class=tok
    )


def _rewards(trainer: Any) -> Any:
    """TRL's own reward step on the fixed batch: GRPO/RLOO give the per-function columns,
    OnlineDPO the weighted ``nansum`` it ranks completions by."""
    ids = [[1]] * len(COMPLETIONS)
    if hasattr(trainer, "_calculate_rewards"):
        inputs = [
            {"prompt": p, "completion": c, "answer": a} for p, c, a in zip(PROMPTS, COMPLETIONS, ANSWERS, strict=True)
        ]
        return trainer._calculate_rewards(inputs, list(PROMPTS), list(COMPLETIONS), ids)
    return trainer._calculate_rewards_from_functions(list(PROMPTS), list(COMPLETIONS), ids, answer=list(ANSWERS))


def _expected(srv: RewardServer) -> list[float]:
    return [srv.expected({"text": p + c}) for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]


@pytest.mark.slow  # builds trainers
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("cls", [RemoteReward, AsyncRemoteReward])
def test_grpo_rloo_never_turn_a_failed_item_into_zero(
    kind: str, cls: type, boom_service: RewardServer, policy: Path, tmp_path: Path
) -> None:
    import torch

    url = boom_service.url("http")
    want = _expected(boom_service)
    rule = [1.0, 0.0, 0.0, 1.0]

    # 1. the remote reward alone (the documented case): the failed row is NaN, which TRL leaves out
    alone = cls(url, template_source="verbatim")
    col = _rewards(_trainer(kind, policy, tmp_path, [alone]))[:, 0].tolist()
    assert math.isnan(col[1]) and [col[i] for i in (0, 2, 3)] == pytest.approx([want[i] for i in (0, 2, 3)], abs=1e-5)

    # 2. next to an ungated rule reward, by default: raised, never a 0 through nansum
    rm = cls(url, template_source="verbatim")
    trainer = _trainer(kind, policy, tmp_path, [exact_match, rm])
    with pytest.raises(TooManyFailuresError) as info:
        _rewards(trainer)
    assert info.value.reasons[1].code == "INTERNAL" and info.value.failure_rate == 0.25
    assert "the trainer's other reward functions ('exact_match') would still score the row" in info.value.__notes__[0]

    # 3. gated: the whole row is NaN (whichever of the two TRL calls first), the rule is kept elsewhere
    for order in ("rule first", "remote first"):
        rm = cls(url, template_source="verbatim")
        gated = rm.gate(async_exact_match if cls is AsyncRemoteReward else exact_match)
        funcs = [gated, rm] if order == "rule first" else [rm, gated]
        rows = _rewards(_trainer(kind, policy, tmp_path, funcs, weights=[1.0, 0.5]))
        r, m = (0, 1) if order == "rule first" else (1, 0)
        assert torch.isnan(rows[1]).all(), order  # unscorable: left out of the group statistics
        assert rows[[0, 2, 3], r].tolist() == [rule[i] for i in (0, 2, 3)]
        assert rows[[0, 2, 3], m].tolist() == pytest.approx([want[i] for i in (0, 2, 3)], abs=1e-5)

    # 4. the user's explicit choice: the failed reward drops out of the nansum (counts as 0)
    rm = cls(url, template_source="verbatim", on_failure="nan")
    rows = _rewards(_trainer(kind, policy, tmp_path, [exact_match, rm]))
    assert rows[1, 0].item() == 0.0 and math.isnan(rows[1, 1].item())


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("cls", [RemoteReward, AsyncRemoteReward])
def test_a_gated_batch_is_scored_once(cls: type, boom_service: RewardServer, policy: Path, tmp_path: Path) -> None:
    backend = boom_service.backend
    rm = cls(boom_service.url("http"), template_source="verbatim")
    funcs = [rm.gate(exact_match), rm, rm.gate(async_exact_match, name="again")]
    trainer = _trainer("grpo", policy, tmp_path, funcs)
    for _ in range(2):  # a new batch (new lists) is scored again
        backend.batches.clear()
        rows = _rewards(trainer)
        scored = [bytes(it.input_ids).decode() for batch in backend.batches for it in batch]
        assert sorted(scored) == sorted(COMPLETIONS)  # 4 items, once, though three functions asked
        assert rows[:, 0].tolist()[::2] == [1.0, 0.0] and rows[:, 2].tolist()[::2] == [1.0, 0.0]
        assert math.isnan(rows[1, 0]) and math.isnan(rows[1, 2])
    assert rm._batch is None  # every function had it: the lists are not kept


def test_gates_pickle_with_their_function() -> None:
    rm = RemoteReward("http://h:1", name="rm")
    funcs = pickle.loads(pickle.dumps([rm, rm.gate(exact_match)]))  # AsyncGRPO pickles the list
    assert funcs[1].remote is funcs[0] and funcs[0]._gates == 1 and funcs[1].__name__ == "exact_match"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_online_dpo_takes_the_sync_class_and_names_the_fix_for_the_async_one(
    boom_service: RewardServer, policy: Path, tmp_path: Path
) -> None:
    url = boom_service.url("http")
    want = _expected(boom_service)
    ok = ["4", "five"]  # no failing item: the sync class scores through OnlineDPO's own code
    trainer = _trainer("online_dpo", policy, tmp_path, [RemoteReward(url, template_source="verbatim")])
    total = trainer._calculate_rewards_from_functions(["", ""], ok, [[1], [1]])
    assert total.tolist() == pytest.approx([want[0], want[2]], abs=1e-5)

    trainer = _trainer("online_dpo", policy, tmp_path, [AsyncRemoteReward(url, template_source="verbatim")])
    with pytest.raises(TypeError, match=r"called without await: this trainer calls reward functions synchronously"):
        trainer._calculate_rewards_from_functions(["", ""], ok, [[1], [1]])

    # OnlineDPO sums with nansum even when every function failed: by default a failure raises there
    rm = RemoteReward(url, template_source="verbatim")
    for funcs in ([rm], [exact_match, rm], [rm, rm.gate(exact_match)]):
        with pytest.raises(TooManyFailuresError) as info:
            _rewards(_trainer("online_dpo", policy, tmp_path, list(funcs)))
        assert "not a TRL GRPO/RLOO trainer" in info.value.__notes__[0]
