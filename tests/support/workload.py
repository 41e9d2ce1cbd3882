"""A workload for multi-replica tests: many distinct texts and their reference scores.

The scores come from an unbatched ``transformers`` forward of each text alone, so a lost,
duplicated or misplaced result of a served run shows as a mismatch at its index.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny_models import CORPUS


def texts(n: int) -> list[str]:
    """``n`` distinct short texts (4 to 10 corpus words each) whose scores are distinct too."""
    pool = " ".join(CORPUS[:6]).split()
    return [f"item {i}: " + " ".join(pool[(7 * i + j) % len(pool)] for j in range(4 + i % 7)) for i in range(n)]


def reference_scores(model_dir: Path, items: list[str]) -> list[float]:
    """Each text alone through ``transformers`` (``add_special_tokens=False``, as ``text`` items are)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.inference_mode():
        for t in items:
            ids = tok(t, add_special_tokens=False)["input_ids"]
            assert len(ids) < model.config.max_position_embeddings  # no truncation in play
            out.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return out
