"""verl's own reward code (0.9.1, installed from requirements-frameworks.txt) against a live reward
service: the README's config keys through verl's Hydra config and ``get_custom_reward_fn``, the
reward-loop managers (``naive``, ``dapo``, ``gdpo``, ``rate_limited``) through verl's
``RewardLoopWorker`` and ``assemble_rm_scores``, the legacy ``batch`` and ``naive`` managers of
``verl/workers/reward_manager``, and GDPO's advantage over the heads of a vector reward model.

What is not verl's code here: the rollout (a ``DataProto`` built with verl's own class from a tiny
BPE tokenizer, as verl's agent loop would hand it over) and the Ray actor around
``RewardLoopWorker`` (``RewardLoopManager.compute_rm_score`` is ``ray.get`` over workers, then
``assemble_rm_scores``: the worker and that classmethod are called directly, without Ray). The
``remote`` manager starts Ray actors in its constructor, so only its calling convention is
checked (a sync function that pickles).
"""

from __future__ import annotations

import functools
import inspect
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clients.errors import ConnectionFailedError
from clients.integrations import RewardUnavailableError
from clients.integrations import verl as verl_mod
from clients.reward import AsyncRewardClient
from clients.types import ScoreResults
from tests.support.servers import BOOM, BackgroundLoop, RewardServer, free_port, start_reward_server
from tests.support.tiny_models import CORPUS, bpe_tokenizer

verl = pytest.importorskip("verl", reason="verl comes from requirements-frameworks.txt")
hydra = pytest.importorskip("hydra", reason="verl's config loading needs hydra-core (requirements-frameworks.txt)")
reward_py = pytest.importorskip("verl.trainer.ppo.reward")
reward_loop = pytest.importorskip("verl.experimental.reward_loop.reward_loop")
loop_managers = pytest.importorskip("verl.experimental.reward_loop.reward_manager")
limited = pytest.importorskip("verl.experimental.reward_loop.reward_manager.limited")
legacy_batch = pytest.importorskip("verl.workers.reward_manager.batch")
legacy_naive = pytest.importorskip("verl.workers.reward_manager.naive")
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

pytestmark = pytest.mark.slow

CONFIG_DIR = Path(verl.__file__).parent / "trainer" / "config"
PKG = "pkg://clients.integrations.verl"

# The README's overrides for verl >= 0.7.1 (tested: 0.9.1), and the legacy ones (verl <= 0.7.0).
README_KEYS = [
    f"reward.custom_reward_function.path={PKG}",
    "reward.custom_reward_function.name=compute_score",
]
LEGACY_KEYS = [f"custom_reward_function.path={PKG}", "custom_reward_function.name=compute_score"]


def reward_kwargs(**kw: Any) -> list[str]:
    """``+reward.custom_reward_function.reward_kwargs.<k>=<v>``: the key is not in verl's yaml."""
    return [f"+reward.custom_reward_function.reward_kwargs.{k}={v}" for k, v in kw.items()]


def verl_config(*overrides: str) -> Any:
    """verl's real ``ppo_trainer`` config, composed by Hydra with these command-line overrides."""
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra.compose(config_name="ppo_trainer", overrides=list(overrides))


# -- a rollout batch as verl's agent loop hands it to the reward loop ---------------------------------


@dataclass(frozen=True)
class Row:
    prompt: Any  # extra_info["prompt"]: a string or chat messages
    response: str
    ground_truth: Any = None


ROWS = [
    Row("What is 2+2?", "4", ground_truth="4"),
    Row([{"role": "user", "content": "Say hi"}], "Hello! é"),
    # a messages column read back from parquet: a numpy object array of dicts (extra keys included)
    Row(np.array([{"role": "system", "content": "Be brief.", "name": None}, {"role": "user", "content": "Hi"}]), "Hey"),
    Row("How do I bake bread?", "Mix flour, water, salt and yeast."),
]
PROMPT_LEN, RESPONSE_LEN = 16, 32


def wire_item(row: Row) -> dict[str, Any]:
    p = row.prompt
    prompt = p if isinstance(p, str) else [{"role": m["role"], "content": m["content"]} for m in p]
    return {"prompt": prompt, "response": row.response}


def prompt_text(p: Any) -> str:
    return p if isinstance(p, str) else "\n".join(m["content"] for m in p)


def make_batch(
    tok: Any,
    rows: Sequence[Row],
    *,
    reward_model: list[dict[str, Any]] | None = None,
    dataset_columns: dict[str, np.ndarray] | None = None,
) -> Any:
    """A ``DataProto`` with verl's tensors (left-padded prompts, right-padded responses ending in
    EOS, attention mask over both) and non-tensor columns (data_source, reward_model, extra_info;
    or ``dataset_columns`` as verl's dataset gave them), plus uid: two samples per group."""
    pad, eos = tok.pad_token_id, tok.eos_token_id
    prompts, responses, masks = [], [], []
    for r in rows:
        p = tok(prompt_text(r.prompt), add_special_tokens=False)["input_ids"][-PROMPT_LEN:]
        a = tok(r.response, add_special_tokens=False)["input_ids"] + [eos]
        assert len(a) <= RESPONSE_LEN
        prompts.append([pad] * (PROMPT_LEN - len(p)) + p)
        responses.append(a + [pad] * (RESPONSE_LEN - len(a)))
        masks.append([0] * (PROMPT_LEN - len(p)) + [1] * (len(p) + len(a)) + [0] * (RESPONSE_LEN - len(a)))
    prompt_ids, response_ids, attention_mask = torch.tensor(prompts), torch.tensor(responses), torch.tensor(masks)
    tensors = {
        "prompts": prompt_ids,
        "responses": response_ids,
        "input_ids": torch.cat([prompt_ids, response_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "response_mask": attention_mask[:, PROMPT_LEN:],
    }
    rm = (
        reward_model if reward_model is not None else [{"style": "model", "ground_truth": r.ground_truth} for r in rows]
    )
    non_tensors = {
        "data_source": np.array(["hh_rlhf"] * len(rows), dtype=object),
        "reward_model": np.array(rm, dtype=object),
        "extra_info": np.array([{"prompt": r.prompt, "index": i} for i, r in enumerate(rows)], dtype=object),
    }
    if dataset_columns is not None:
        non_tensors = dict(dataset_columns)
    non_tensors["uid"] = np.array([f"group{i // 2}" for i in range(len(rows))], dtype=object)
    return verl.DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def response_ends(data: Any) -> list[int]:
    return [int(n) - 1 for n in data.batch["attention_mask"][:, PROMPT_LEN:].sum(-1)]


def assert_rewards_at_last_token(rm_scores: torch.Tensor, data: Any, want: Sequence[float]) -> None:
    """verl's reward tensor: each sample's reward on its last response token, zeros elsewhere."""
    assert rm_scores.shape == data.batch["responses"].shape
    for i, end in enumerate(response_ends(data)):
        assert rm_scores[i, end].item() == pytest.approx(want[i], abs=1e-5)
        assert rm_scores[i].abs().sum().item() == pytest.approx(abs(want[i]), abs=1e-5)


def floats(results: ScoreResults) -> list[float]:
    assert not results.errors, results.errors
    return [float(s) for s in results if s is not None]


async def direct_scores(url: str, rows: Sequence[Row] = ROWS) -> ScoreResults:
    client = AsyncRewardClient(url)
    try:
        return await client.score([wire_item(r) for r in rows])
    finally:
        await client.aclose()


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The policy's tokenizer, saved where verl loads it from (``actor_rollout_ref.model.path``)."""
    tok = bpe_tokenizer(CORPUS + [r.response for r in ROWS], eos="<|endoftext|>", bos="<|endoftext|>", pad="<pad>")
    out = tmp_path_factory.mktemp("policy")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def two_heads(bg: BackgroundLoop) -> Iterator[RewardServer]:
    """The real service over a fake model with two heads (LABEL_0 = s, LABEL_1 = s + 1; score = mean)."""
    srv = start_reward_server(bg, num_labels=2)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def fresh_rate_limiter(monkeypatch: pytest.MonkeyPatch) -> None:
    # rate_limited keeps its semaphore on the class, bound to the first event loop that used it;
    # each test has its own loop (a training process has one)
    monkeypatch.setattr(limited.RateLimitedRewardManager, "_class_initialized", False)


@pytest.fixture
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def worker(tokenizer_dir: Path, *overrides: str) -> Any:
    """verl's reward-loop worker, configured as ``main_ppo`` would be with these overrides."""
    cfg = verl_config(*README_KEYS, f"actor_rollout_ref.model.path={tokenizer_dir}", *overrides)
    return reward_loop.RewardLoopWorker(cfg, reward_router_address=None)


# -- the README's keys through verl's own config loading ------------------------------------------------


def test_readme_keys_load_our_functions_through_verl_config() -> None:
    cfg = verl_config(*README_KEYS, *reward_kwargs(reward_url="grpc://reward-host:50051", max_retries=3))
    fn = reward_py.get_custom_reward_fn(cfg)
    assert isinstance(fn, functools.partial)
    assert fn.args[0] is verl_mod.compute_score
    assert fn.args[1] == {"reward_url": "grpc://reward-host:50051", "max_retries": 3}
    assert inspect.iscoroutinefunction(fn)  # the reward-loop managers await it

    # reward_kwargs is not declared in verl's yaml: without "+" Hydra refuses the key
    with pytest.raises(hydra.errors.ConfigCompositionException, match=r"To append to your config use \+reward"):
        verl_config(*README_KEYS, "reward.custom_reward_function.reward_kwargs.reward_url=http://x:1")

    # each documented name is the function its manager needs: async where the manager awaits
    kinds = {
        "compute_score": True,
        "compute_score_heads": True,
        "compute_score_sync": False,
        "compute_score_batch": False,
        "compute_score_batch_async": True,
    }
    for name, is_async in kinds.items():
        loaded = reward_py.get_custom_reward_fn(verl_config(*README_KEYS, f"reward.custom_reward_function.name={name}"))
        assert loaded is not None and loaded.args[0] is getattr(verl_mod, name)
        assert inspect.iscoroutinefunction(loaded) is is_async, name


async def test_legacy_top_level_keys_are_ignored_by_main_ppo_in_verl_09(tokenizer_dir: Path) -> None:
    cfg = verl_config(*LEGACY_KEYS, f"actor_rollout_ref.model.path={tokenizer_dir}")
    assert cfg.custom_reward_function.path == PKG  # Hydra accepts the key (legacy_reward_impl.yaml) ...
    assert reward_py.get_custom_reward_fn(cfg) is None  # ... and verl 0.9's main_ppo never reads it
    # so the reward loop falls back to verl's rule scorer, which knows no reward-model data source
    w = reward_loop.RewardLoopWorker(cfg, reward_router_address=None)
    tok = w.input_tokenizer
    with pytest.raises(NotImplementedError, match="hh_rlhf"):
        await w.compute_score_batch(make_batch(tok, ROWS[:1]))

    # fully_async_main (and main_ppo of verl 0.7.1-0.8.x) migrate the legacy keys first
    migrated = reward_loop.migrate_legacy_reward_impl(verl_config(*LEGACY_KEYS))
    fn = reward_py.get_custom_reward_fn(migrated)
    assert fn is not None and fn.args[0] is verl_mod.compute_score


# -- the reward-loop managers against the live service ---------------------------------------------------


@pytest.mark.parametrize(
    ("manager", "transport"),
    [("naive", "http"), ("naive", "grpc"), ("dapo", "http"), ("gdpo", "grpc"), ("rate_limited", "http")],
)
async def test_reward_loop_managers_return_the_service_scores(
    manager: str, transport: str, service: RewardServer, tokenizer_dir: Path
) -> None:
    url = service.url(transport)
    w = worker(tokenizer_dir, f"reward.reward_manager.name={manager}", *reward_kwargs(reward_url=url))
    assert type(w.reward_manager) is loop_managers.get_reward_manager_cls(manager)
    data = make_batch(w.input_tokenizer, ROWS)

    outputs = await w.compute_score_batch(data)  # one task per sample, as the Ray actor runs it
    scores = [o["reward_score"] for o in outputs]
    want = await direct_scores(url)
    assert not want.errors
    assert scores == pytest.approx(list(want), abs=1e-6)
    assert all(type(s) is float for s in scores)
    assert [o["reward_extra_info"]["acc"] for o in outputs] == scores  # no "error"/"timeout" entries
    assert all(set(o["reward_extra_info"]) == {"acc"} for o in outputs)

    rm_scores = type(w.reward_manager).assemble_rm_scores(data, scores)  # what RewardLoopManager does next
    assert_rewards_at_last_token(rm_scores, data, floats(want))


async def test_ground_truth_none_is_fine_and_a_missing_ground_truth_is_verls_key_error(
    service: RewardServer, tokenizer_dir: Path
) -> None:
    w = worker(tokenizer_dir, *reward_kwargs(reward_url=service.url("http")))
    rows = [Row("Hi", "Hey", ground_truth=None), Row("Hi", "Hello", ground_truth="")]
    outputs = await w.compute_score_batch(make_batch(w.input_tokenizer, rows))
    assert [o["reward_score"] for o in outputs] == pytest.approx(list(await direct_scores(service.url("http"), rows)))

    # verl's managers index reward_model["ground_truth"] before calling any reward function
    no_gt = make_batch(w.input_tokenizer, rows[:1], reward_model=[{"style": "model"}])
    with pytest.raises(KeyError, match="ground_truth"):
        await w.compute_score_batch(no_gt)


def to_verl_row(question: str, index: int) -> dict[str, Any]:
    """The README's data preparation: one parquet row for verl."""
    messages = [{"role": "user", "content": question}]
    return {
        "data_source": "hh_rlhf",
        "prompt": messages,  # what the policy is prompted with (verl's data.prompt_key)
        "reward_model": {"style": "model", "ground_truth": None},  # every verl reward manager reads it
        "extra_info": {"prompt": messages, "index": index},  # what compute_score sends to the reward model
    }


async def test_readme_data_preparation_through_verls_dataset(
    service: RewardServer, tokenizer_dir: Path, tmp_path: Path
) -> None:
    import datasets
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    questions = ["What is 2+2?", "Say hi", "How do I bake bread?", "Hi"]
    datasets.Dataset.from_list([to_verl_row(q, i) for i, q in enumerate(questions)]).to_parquet(
        tmp_path / "train.parquet"
    )
    w = worker(tokenizer_dir, *reward_kwargs(reward_url=service.url("grpc")), "data.filter_overlong_prompts=False")
    dataset = RLHFDataset(data_files=str(tmp_path / "train.parquet"), tokenizer=w.input_tokenizer, config=w.config.data)
    columns = collate_fn([dataset[i] for i in range(len(questions))])
    rows = [
        Row([{"role": "user", "content": q}], a)
        for q, a in zip(questions, ["4", "Hello!", "Knead.", "Hey"], strict=True)
    ]
    data = make_batch(
        w.input_tokenizer, rows, dataset_columns={k: v for k, v in columns.items() if k != "dummy_tensor"}
    )
    assert data.non_tensor_batch["reward_model"][0] == {"style": "model", "ground_truth": None}

    outputs = await w.compute_score_batch(data)
    assert [o["reward_score"] for o in outputs] == pytest.approx(floats(await direct_scores(service.url("grpc"), rows)))


async def test_gdpo_normalises_each_head_of_a_vector_reward_model(two_heads: RewardServer, tokenizer_dir: Path) -> None:
    url = two_heads.url("http")
    w = worker(
        tokenizer_dir,
        "reward.reward_manager.name=gdpo",
        "reward.custom_reward_function.name=compute_score_heads",
        *reward_kwargs(reward_url=url, head_names="[helpful,harmless]"),
        "algorithm.adv_estimator=gdpo",
        "+algorithm.gdpo_reward_keys=[helpful,harmless]",
        "+algorithm.gdpo_reward_weights=[1.0,0.5]",
    )
    data = make_batch(w.input_tokenizer, ROWS)
    outputs = await w.compute_score_batch(data)
    want = await direct_scores(url)
    assert want.vectors is not None and all(v is not None and len(v) == 2 for v in want.vectors)
    infos = [o["reward_extra_info"] for o in outputs]
    assert [o["reward_score"] for o in outputs] == pytest.approx(list(want), abs=1e-6)
    assert [i["helpful"] for i in infos] == pytest.approx([v[0] for v in want.vectors if v], abs=1e-6)
    assert [i["harmless"] for i in infos] == pytest.approx([v[1] for v in want.vectors if v], abs=1e-6)
    assert [i["harmless"] - i["helpful"] for i in infos] == pytest.approx([1.0] * len(ROWS), abs=1e-5)
    assert all(set(i) >= {"score", "helpful", "harmless"} for i in infos)

    # RewardLoopManager.compute_rm_score's columns, then verl's GDPO advantage over them
    cls = type(w.reward_manager)
    rm_scores = cls.assemble_rm_scores(data, [o["reward_score"] for o in outputs])
    columns = {k: np.array([i[k] for i in infos]) for k in infos[0]}
    columns["uid"] = data.non_tensor_batch["uid"]
    batch = {**dict(data.batch.items()), "rm_scores": rm_scores}
    adv, _ = core_algos.compute_gdpo_outcome_advantage(
        token_level_rewards=rm_scores,
        response_mask=data.batch["response_mask"],
        index=data.non_tensor_batch["uid"],
        config=w.config.algorithm,
        non_tensor_batch=columns,
        batch=batch,
    )
    assert adv.shape == rm_scores.shape and torch.isfinite(adv).all()
    mask = data.batch["response_mask"].bool()
    assert adv[~mask].abs().sum().item() == 0.0
    # within each group of two the better-scored sample gets the larger advantage
    per_sample = (adv.sum(-1) / mask.sum(-1)).tolist()
    scalar = [float(s) for s in want if s is not None]
    for g in range(0, len(ROWS), 2):
        assert (per_sample[g] > per_sample[g + 1]) == (scalar[g] > scalar[g + 1])


async def test_head_keys_default_to_the_models_label_names(two_heads: RewardServer, service: RewardServer) -> None:
    row = ROWS[3]
    kw: dict[str, Any] = {
        "data_source": "d",
        "solution_str": row.response,
        "ground_truth": None,
        "extra_info": {"prompt": row.prompt},
    }
    got = await verl_mod.compute_score_heads(**kw, reward_url=two_heads.url("grpc"))
    want = await direct_scores(two_heads.url("grpc"), [row])
    assert want.vectors is not None and want.vectors[0] is not None
    assert got == pytest.approx({"score": want[0], "LABEL_0": want.vectors[0][0], "LABEL_1": want.vectors[0][1]})
    # a scalar model has one head
    one = await verl_mod.compute_score_heads(**kw, reward_url=service.url("http"))
    assert one == pytest.approx(
        {"score": service.expected(wire_item(row)), "LABEL_0": service.expected(wire_item(row))}
    )
    with pytest.raises(ValueError, match="name 1 heads, but the model returned 2"):
        await verl_mod.compute_score_heads(**kw, reward_url=two_heads.url("http"), head_names=["only"])
    with pytest.raises(ValueError, match="not 'score'"):
        await verl_mod.compute_score_heads(**kw, reward_url=two_heads.url("http"), head_names=["score", "x"])


# -- the legacy synchronous managers (verl/workers/reward_manager) --------------------------------------


def test_batch_manager_with_the_sync_batch_function(service: RewardServer, tok: Any, tokenizer_dir: Path) -> None:
    url = service.url("grpc")
    cfg = verl_config(
        *README_KEYS, "reward.custom_reward_function.name=compute_score_batch", *reward_kwargs(reward_url=url)
    )
    manager = legacy_batch.BatchRewardManager(tok, num_examine=0, compute_score=reward_py.get_custom_reward_fn(cfg))
    data = make_batch(tok, ROWS)
    out = manager(data, return_dict=True)
    want = [service.expected(wire_item(r)) for r in ROWS]
    assert_rewards_at_last_token(out["reward_tensor"], data, want)
    assert data.batch["acc"].tolist() == pytest.approx(want, abs=1e-5)

    # main_ppo of verl 0.9 cannot select it: the reward loop's registry has no "batch", and the
    # legacy key is ignored (verl <= 0.7.0 took reward_model.reward_manager=batch)
    with pytest.raises(ValueError, match="Unknown reward manager: batch"):
        reward_py.resolve_reward_manager_cls(verl_config("reward.reward_manager.name=batch"))
    ignored = verl_config("reward_model.reward_manager=batch")
    assert reward_py.resolve_reward_manager_cls(ignored) is loop_managers.get_reward_manager_cls("naive")


def test_legacy_naive_manager_with_the_sync_function(service: RewardServer, tok: Any) -> None:
    cfg = verl_config(
        *README_KEYS,
        "reward.custom_reward_function.name=compute_score_sync",
        *reward_kwargs(reward_url=service.url("http")),
    )
    manager = legacy_naive.NaiveRewardManager(tok, num_examine=0, compute_score=reward_py.get_custom_reward_fn(cfg))
    data = make_batch(tok, ROWS)
    reward_tensor = manager(data)
    assert_rewards_at_last_token(reward_tensor, data, [service.expected(wire_item(r)) for r in ROWS])


def test_remote_manager_calling_convention(service: RewardServer) -> None:
    # RemoteRewardManager asserts a sync function and ships it to Ray actors (cloudpickle): check
    # both without starting Ray
    cfg = verl_config(
        *README_KEYS,
        "reward.custom_reward_function.name=compute_score_sync",
        *reward_kwargs(reward_url=service.url("http")),
    )
    fn = reward_py.get_custom_reward_fn(cfg)
    assert not inspect.iscoroutinefunction(fn)
    import cloudpickle

    shipped = pickle.loads(cloudpickle.dumps(fn))
    row = ROWS[1]
    got = shipped(data_source="d", solution_str=row.response, ground_truth=None, extra_info={"prompt": row.prompt})
    assert got == pytest.approx(service.expected(wire_item(row)))


# -- a dead service: loud everywhere but rate_limited ------------------------------------------------------


@pytest.mark.parametrize(
    ("manager", "name"), [("naive", "compute_score"), ("dapo", "compute_score"), ("gdpo", "compute_score_heads")]
)
async def test_a_dead_service_fails_the_reward_loop_step(
    manager: str, name: str, dead_url: str, tokenizer_dir: Path
) -> None:
    w = worker(
        tokenizer_dir,
        f"reward.reward_manager.name={manager}",
        f"reward.custom_reward_function.name={name}",
        *reward_kwargs(reward_url=dead_url, max_retries=1),
    )
    with pytest.raises(ConnectionFailedError) as err:
        await w.compute_score_batch(make_batch(w.input_tokenizer, ROWS))
    assert err.value.code == "CONNECTION_FAILED"


def test_a_dead_service_fails_the_legacy_managers(dead_url: str, tok: Any) -> None:
    data = make_batch(tok, ROWS)
    for name, manager_cls in [
        ("compute_score_batch", legacy_batch.BatchRewardManager),
        ("compute_score_sync", legacy_naive.NaiveRewardManager),
    ]:
        cfg = verl_config(
            *README_KEYS,
            f"reward.custom_reward_function.name={name}",
            *reward_kwargs(reward_url=dead_url, max_retries=1),
        )
        manager = manager_cls(tok, num_examine=0, compute_score=reward_py.get_custom_reward_fn(cfg))
        with pytest.raises(ConnectionFailedError):
            manager(data)


async def test_rate_limited_turns_a_dead_service_into_zero_rewards(dead_url: str, tokenizer_dir: Path) -> None:
    """What the README warns about: verl's rate_limited manager catches every Exception of the
    reward function (and its own timeout) and gives reward 0.0; the step goes on."""
    w = worker(
        tokenizer_dir,
        "reward.reward_manager.name=rate_limited",
        "+reward.max_concurrent=4",  # the README's settings of that manager (not in verl's yaml: "+")
        "+reward.timeout=30",
        *reward_kwargs(reward_url=dead_url, max_retries=0),
    )
    assert limited.RateLimitedRewardManager._max_concurrent == 4 and w.reward_manager.timeout == 30
    outputs = await w.compute_score_batch(make_batch(w.input_tokenizer, ROWS))
    assert [o["reward_score"] for o in outputs] == [0.0] * len(ROWS)
    for o in outputs:
        assert o["reward_extra_info"]["acc"] == 0.0
        assert "CONNECTION_FAILED" in o["reward_extra_info"]["error"]


async def test_rate_limited_also_zeroes_a_per_item_failure(bg: BackgroundLoop, tokenizer_dir: Path) -> None:
    # the same for a sample the service could not score (RewardUnavailableError), next to good ones
    boom = start_reward_server(bg, fail_on_boom=True)
    try:
        w = worker(
            tokenizer_dir,
            "reward.reward_manager.name=rate_limited",
            *reward_kwargs(reward_url=boom.url("http"), max_retries=0),
        )
        # the fake model fails a batch holding the token sequence BOOM: rate_limited sends one sample
        # per request (max_concurrent 1), so only that sample fails
        rows = [Row("Hi", "Hey"), Row("", BOOM)]
        outputs = await w.compute_score_batch(make_batch(w.input_tokenizer, rows))
        assert outputs[0]["reward_score"] == pytest.approx(boom.expected(wire_item(rows[0])))
        assert outputs[1]["reward_score"] == 0.0
        assert "INTERNAL" in outputs[1]["reward_extra_info"]["error"]

        # the naive manager raises for the same sample
        naive = worker(tokenizer_dir, *reward_kwargs(reward_url=boom.url("http"), max_retries=0))
        with pytest.raises(RewardUnavailableError, match="INTERNAL"):
            await naive.compute_score_batch(make_batch(naive.input_tokenizer, rows[1:]))
    finally:
        boom.stop()
