"""The Bradley-Terry pieces of ``train rm`` (rlhf_train.rm.bradley_terry) and its split (rlhf_train.rm.data)."""

from __future__ import annotations

import math

import numpy as np

from rlhf_train.rm.bradley_terry import bt_loss, fit_bt, pairwise_accuracy
from rlhf_train.rm.data import split_of
from services.runtime.chat import ChatMessage


def test_bt_loss_is_the_mean_negative_logsigmoid_of_the_margins() -> None:
    assert bt_loss(np.zeros(3)) == math.log(2.0)
    assert math.isclose(bt_loss(np.array([1.0, -1.0])), (math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2)
    # With an offset (TRL's margin) the chosen response must win by that much.
    assert bt_loss(np.array([2.0]), np.array([2.0])) == math.log(2.0)
    assert math.isnan(bt_loss(np.zeros(0)))


def test_pairwise_accuracy_counts_ties_as_one_half() -> None:
    assert pairwise_accuracy(np.array([1.0, -1.0, 0.0, 2.0])) == 0.625
    assert math.isnan(pairwise_accuracy(np.zeros(0)))


def test_fit_bt_learns_a_separable_direction() -> None:
    rng = np.random.default_rng(0)
    diff = rng.normal(size=(200, 4)).astype(np.float32)
    diff[:, 0] = np.abs(diff[:, 0]) + 0.5  # chosen is always higher on feature 0
    w = fit_bt(diff, 1e-3)
    assert w.dtype == np.float32 and w.shape == (4,)
    assert pairwise_accuracy(diff @ w) == 1.0
    assert w[0] > np.abs(w[1:]).max()


def test_split_is_by_prompt_and_seeded() -> None:
    prompts = [(ChatMessage("user", f"question {i}"),) for i in range(2000)]
    splits = [split_of(p, 0, 0.2, 0.25) for p in prompts]
    assert splits == [split_of(p, 0, 0.2, 0.25) for p in prompts]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["test"] - 0.2) < 0.03 and abs(share["val"] - 0.2) < 0.03  # 25% of the other 80%
    assert splits != [split_of(p, 1, 0.2, 0.25) for p in prompts]
