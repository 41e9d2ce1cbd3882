"""Rows as ``rlhf-feedback label`` writes them, in TRL's own ``RewardTrainer`` (trl 1.16): they
load as they are, and a ``margin`` column (``label --margin``) changes the trainer's loss to
``-logsigmoid(r_chosen - r_rejected - margin)``: why the column is opt-in."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest


def label_rows(margin: bool) -> list[dict[str, Any]]:
    rows = []
    for i, p in enumerate((0.9, 0.75)):
        row: dict[str, Any] = {
            "id": f"{i:064x}",
            "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "chosen": [{"role": "assistant", "content": f"{2 * i}"}],
            "rejected": [{"role": "assistant", "content": f"{2 * i + 1}"}],
            "preference": p,
            "consistent": True,
            "judge": {"backend": "fake", "model": "m", "template_hash": "h"},
        }
        if margin:
            row["margin"] = math.log(p / (1 - p))
        rows.append(row)
    return rows


@pytest.mark.slow  # builds a trainer
@pytest.mark.timeout(180)
def test_margin_column_changes_reward_trainer_loss(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    losses = {}
    for margin in (False, True):
        args = RewardConfig(
            output_dir=str(tmp_path / f"rm-{margin}"),
            per_device_train_batch_size=2,
            report_to="none",
            use_cpu=True,
            bf16=False,
            save_strategy="no",
        )
        trainer = RewardTrainer(
            model=str(tiny_llama_dir), args=args, train_dataset=Dataset.from_list(label_rows(margin))
        )
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("margin" in batch) is margin
        model = trainer.model
        assert model is not None
        model.eval()
        with torch.no_grad():
            loss, outputs = trainer.compute_loss(model, batch, return_outputs=True)
        chosen, rejected = outputs["logits"].squeeze(-1).chunk(2)
        diff = (chosen - rejected).double()
        offset: Any = 0.0
        if margin:  # the rows' own margins (the sampler may reorder them)
            offset = batch["margin"].double()
            assert sorted(offset.tolist()) == pytest.approx([math.log(3.0), math.log(9.0)])
        assert loss.item() == pytest.approx(float(-torch.nn.functional.logsigmoid(diff - offset).mean()), abs=1e-5)
        losses[margin] = loss.item()
    assert losses[True] > losses[False] + 0.5  # the rewards must now be log(p / (1 - p)) apart
