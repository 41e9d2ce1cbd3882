"""``rlhf-feedback train rm`` on tiny random models (issue "Done when"): a separable synthetic
preference set is learned to > 95% held-out pairwise accuracy by both the frozen-backbone head
and full fine-tuning, and the saved checkpoint, loaded the way ``serve reward --model`` loads it
and scored through the reward engine, gives the trainer's scores.

The set: every chosen response carries one marker phrase, every rejected one another, after a
varied filler, under varied prompts. The markers are ordered so that the *untrained* tiny model
prefers the rejected phrase (asserted below), so a pass means training flipped the preference.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from rlhf_feedback.cli import main
from rlhf_train.jobs.io import InputError
from rlhf_train.rm.data import load_preferences, parse_preference_row
from rlhf_train.rm.trainer import RmOptions, RmResult, train_reward_model
from services.reward.engine.results import ScoredItem
from services.reward.engine.service import RewardEngine
from services.reward.loading import load_backend
from services.reward.settings import RewardSettings
from services.runtime.backends.torch_backend import TorchRewardBackend
from services.runtime.chat import ChatMessage
from services.runtime.items import RewardInput
from tests.support.tiny_causal import make_tiny_causal_llama

GOOD = "The quick brown fox jumps."
BAD = "I cannot help with that request."
TOPICS = ["bread", "France", "the fox", "reward models", "numbers", "punctuation", "the dog", "yeast"]
FILLERS = ["Sure.", "Here goes:", "Well,", "Okay.", "Hmm,", "Right."]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def synthetic_rows(n: int = 240, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"Question {i}: tell me about {rng.choice(TOPICS)}."}]
        filler = rng.choice(FILLERS)
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": f"{filler} {GOOD}"}],
                "rejected": [{"role": "assistant", "content": f"{filler} {BAD}"}],
                "margin": 0.5,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("rm-data") / "pairs.jsonl", synthetic_rows())


@pytest.fixture(scope="module")
def tiny_causal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_llama(tmp_path_factory.mktemp("tiny-causal"), max_position=96)


def accuracy(scores: np.ndarray) -> float:
    return float(np.mean(scores[:, 0] > scores[:, 1]))


async def served_scores(model_dir: Path, items: list[RewardInput]) -> np.ndarray:
    """Scores through the reward engine with the backend ``serve reward --model DIR`` loads."""
    settings = RewardSettings(model=model_dir, device="cpu", threads=1, max_request_tokens=1 << 20)
    backend = load_backend(settings)
    engine = RewardEngine(lambda: backend, settings.engine_config())
    await engine.start()
    try:
        outcome = await engine.score(items)
    finally:
        await engine.stop()
    scores = []
    for r in outcome.results:
        assert isinstance(r, ScoredItem), r
        scores.append(r.score)
    return np.asarray(scores, dtype=np.float32)


def untrained_accuracy(model_dir: Path, result: RmResult) -> float:
    backend = TorchRewardBackend(model_dir, device="cpu")
    flat = [x for pair in result.test_items for x in pair]
    scores = backend.forward(backend.encode(flat))[:, 0]
    return accuracy(np.stack([scores[0::2], scores[1::2]], axis=1))


async def check_served(result: RmResult, *, min_accuracy: float = 0.95) -> None:
    assert result.model_dir is not None
    flat = [x for pair in result.test_items for x in pair]
    served = await served_scores(result.model_dir, flat)
    trained = result.test_scores.reshape(-1)
    assert served.shape == trained.shape == (2 * result.test_pairs,)
    np.testing.assert_allclose(served, trained, rtol=0, atol=1e-5)
    # The served model ranks the held-out pairs as trained: equal scores alone could be constants.
    assert accuracy(served.reshape(-1, 2)) > min_accuracy


async def test_freeze_backbone_learns_and_serves_same_scores(
    pairs_file: Path, tiny_causal_dir: Path, tmp_path: Path
) -> None:
    # A causal LM base: train rm builds the sequence classifier (num_labels=1, the backbone's pad).
    opts = RmOptions(
        data=pairs_file,
        out=tmp_path / "rm",
        model=tiny_causal_dir,
        freeze_backbone=True,
        feature_cache=tmp_path / "features",
        device="cpu",
        quiet=True,
    )
    result = train_reward_model(opts)
    assert result.mode == "freeze-backbone"
    assert result.test_pairs >= 30 and result.train_pairs >= 150
    assert result.test_acc > 0.95, result.metrics["results"]
    assert result.test_loss < 0.3
    assert result.length_baseline_test_acc == 0.0  # the rejected phrase is the longer one
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["results"]["test_acc"] == result.test_acc
    assert metrics["l2"] in opts.l2_grid and len(metrics["l2_grid"]) == len(opts.l2_grid)
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["pad_token_id"] == json.loads((tiny_causal_dir / "config.json").read_text())["pad_token_id"]
    assert json.loads((tmp_path / "rm" / "rlhf_feedback.json").read_text()) == {"model_id": "rm"}
    await check_served(result)

    # The features are cached: a rerun computes none and gives the same head.
    again = train_reward_model(RmOptions(**{**opts.__dict__, "out": tmp_path / "rm2"}))
    assert again.metrics["features"]["computed_sequences"] == 0
    np.testing.assert_array_equal(again.test_scores, result.test_scores)

    # --use-margin: every row asks the chosen response to win by 0.5 (TRL RewardTrainer's loss).
    with_margin = train_reward_model(RmOptions(**{**opts.__dict__, "out": tmp_path / "rm3", "use_margin": True}))
    m = with_margin.test_scores[:, 0].astype(np.float64) - with_margin.test_scores[:, 1]
    assert with_margin.test_loss == pytest.approx(float(np.mean(np.logaddexp(0.0, -(m - 0.5)))), rel=1e-9)
    assert with_margin.test_acc > 0.95
    assert not np.array_equal(with_margin.test_scores, result.test_scores)


async def test_full_finetuning_learns_and_serves_same_scores(
    pairs_file: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    opts = RmOptions(
        data=pairs_file,
        out=tmp_path / "rm",
        model=tiny_llama_dir,
        epochs=1,
        lr=3e-4,
        batch_size=16,
        device="cpu",
        seed=1,
        quiet=True,
    )
    result = train_reward_model(opts)
    assert result.mode == "full" and result.l2 is None
    assert untrained_accuracy(tiny_llama_dir, result) < 0.5  # the base model prefers the rejected phrase
    assert result.test_acc > 0.95, result.metrics["results"]
    assert result.train_acc > 0.95
    history = result.metrics["training"]["history"]
    assert history[0]["train_loss_running"] < 0.69  # it learned within the epoch
    await check_served(result)


async def test_full_finetuning_of_an_encoder_serves_same_scores(
    pairs_file: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    # No chat template: prompt and response are a sentence pair, read at [CLS], as served. (The
    # tiny BERT learns this set slowly; this checks the round trip, not the accuracy.)
    opts = RmOptions(
        data=pairs_file, out=tmp_path / "rm", model=tiny_bert_dir, lr=1e-3, batch_size=16, device="cpu", quiet=True
    )
    result = train_reward_model(opts)
    base = TorchRewardBackend(tiny_bert_dir, device="cpu")
    before = base.forward(base.encode([x for pair in result.test_items for x in pair]))[:, 0]
    assert np.max(np.abs(before - result.test_scores.reshape(-1))) > 1e-3  # the weights did change
    await check_served(result, min_accuracy=0.0)
    with pytest.raises(InputError, match="encoder"):
        train_reward_model(RmOptions(**{**opts.__dict__, "freeze_backbone": True, "out": tmp_path / "frozen"}))


def test_head_only_writes_a_default_head_format_file(
    pairs_file: Path, tiny_causal_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.numpy import load

    from services.runtime import default_model

    out = tmp_path / "head"
    code = main(
        [
            "train",
            "rm",
            "--data",
            str(pairs_file),
            "--out",
            str(out),
            "--model",
            str(tiny_causal_dir),
            "--freeze-backbone",
            "--head-only",
            "--feature-cache",
            str(tmp_path / "features"),
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "head.safetensors", "metrics.json"]
    data = (out / "head.safetensors").read_bytes()
    tensors = load(data)
    assert list(tensors) == ["score.weight"]
    w = tensors["score.weight"]
    assert w.shape == (1, 64) and w.dtype == np.float32 and np.any(w)
    # default_model's loader checks the [1, HIDDEN_SIZE] float32 format (HIDDEN_SIZE is SmolLM2's 576).
    monkeypatch.setattr(default_model, "HIDDEN_SIZE", 64)
    np.testing.assert_array_equal(default_model.load_head(data), w)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["results"]["test_acc"] > 0.95
    assert "held out" in (out / "MODEL_CARD.md").read_text()

    # The head on its backbone scores the held-out pairs as metrics.json says.
    loaded = load_preferences(pairs_file)
    test = [p for p in loaded.pairs if p.split == "test"]
    assert len(test) == metrics["results"]["test_pairs"]
    seqcls = tmp_path / "seqcls"
    train_reward_model(
        RmOptions(
            data=pairs_file,
            out=seqcls,
            model=tiny_causal_dir,
            freeze_backbone=True,
            feature_cache=tmp_path / "features",
            device="cpu",
            quiet=True,
        )
    )
    backend = TorchRewardBackend(seqcls, device="cpu")
    np.testing.assert_array_equal(backend.model.score.weight.detach().numpy(), w)


def test_row_forms_render_like_explicit_prompts() -> None:
    prompt = [{"role": "user", "content": "Hi?"}]
    explicit = parse_preference_row(
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": "Go away."}
    )
    implicit = parse_preference_row(
        {
            "chosen": [*prompt, {"role": "assistant", "content": "Hello."}],
            "rejected": [*prompt, {"role": "assistant", "content": "Go away."}],
        }
    )
    assert explicit[:5] == implicit[:5]
    assert explicit[0] == RewardInput.of_pair((ChatMessage("user", "Hi?"),), "Hello.")
    text = parse_preference_row({"chosen": "Q: hi A: hello", "rejected": "Q: hi A: go"})
    assert text[0] == RewardInput.of_text("Q: hi A: hello") and text[2:4] == ("hello", "go")
    assert parse_preference_row({"prompt": "Hi?", "chosen": "a", "rejected": "b", "margin": 2}, use_margin=True)[5] == 2


@pytest.mark.parametrize(
    ("rows", "extra", "message"),
    [
        (None, [], "no such file"),
        ([], [], "no rows"),
        ([{"prompt": "p", "chosen": "a"}], [], "line 1: the row needs 'chosen' and 'rejected'"),
        ([{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3, [], "every row has chosen == rejected"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], [], "held-out split is empty"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], ["--use-margin"], "'margin'"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b"}], ["--head-only"], "--head-only needs --freeze-backbone"),
    ],
)
def test_bad_input_is_a_one_line_error(
    rows: list[Any] | None,
    extra: list[str],
    message: str,
    tmp_path: Path,
    tiny_llama_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "pairs.jsonl"
    if rows is not None:
        write_jsonl(data, rows)
    args = ["train", "rm", "--data", str(data), "--out", str(tmp_path / "out"), "--model", str(tiny_llama_dir)]
    assert main([*args, "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rlhf-feedback train rm: ") and "\n" not in err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_the_recorded_reproduce_command_is_a_head_only_train_rm_with_the_committed_heads_settings() -> None:
    import argparse
    import shlex

    from rlhf_train.rm import command
    from services.runtime import default_model

    recorded = json.loads((default_model.HEAD_DIR / "metrics.json").read_text())["reproduce"]
    words = shlex.split(recorded)
    assert words[:3] == ["rlhf-feedback", "train", "rm"]
    assert f"\n{recorded}\n" in (default_model.HEAD_DIR / "MODEL_CARD.md").read_text()
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    opts = command.options_from_args(p.parse_args(words[3:]))
    assert (opts.freeze_backbone, opts.head_only, opts.dtype, opts.max_length) == (True, True, "bfloat16", 512)
    # The committed head's bf16 features were extracted in batches of <= 3072 tokens on 2 CPU threads;
    # another batch budget changes bf16 features, hence the head's bytes.
    assert (opts.batch_tokens, opts.threads, opts.device) == (3072, 2, "cpu")
