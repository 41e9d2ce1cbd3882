"""Score parity on real data: the reward engine's batched scores against transformers alone.

    python scripts/check_score_parity.py --model tiny --rows 1000 --max-length 128 256
    python scripts/check_score_parity.py --model default --rows 50 --max-length 128 256

For the first ``--rows`` rows of each HH-RLHF test file, the items of
``scripts/check_truncation_parity.py`` (chosen and rejected dialogues as ``text`` and
``messages``, the parsed prompt with each response as ``prompt``+``response``) are scored through
:class:`RewardEngine` (the service's batcher, token budgets, prefix sharing of a prompt's two
responses) and, one by one, by transformers' own ``AutoModelForSequenceClassification`` on the
item's kept ids, unpadded. Prints items, truncated items and the largest |difference| per maximum
length, absolute and scaled (|difference| / max(1, |score|): float32 carries ~7 digits, and the
random tiny model's scores reach ~40); exit status 1 when a scaled difference is over
``--tolerance`` (1e-5).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from check_truncation_parity import HH_DIR, hh_items  # noqa: E402

from benchmarks.models import resolve_model  # noqa: E402
from services.reward.engine.results import ScoredItem  # noqa: E402
from services.reward.settings import RewardSettings  # noqa: E402
from services.runtime.items import EncodedItem, RewardInput  # noqa: E402


async def engine_scores(
    model_dir: Path, items: list[RewardInput], max_length: int
) -> tuple[list[float], list[EncodedItem]]:
    from services.reward.engine.service import RewardEngine
    from services.runtime.backends.torch_backend import TorchRewardBackend

    settings = RewardSettings(model=model_dir, device="cpu", max_length=max_length, max_request_tokens=1 << 30)
    backend = TorchRewardBackend(model_dir, device="cpu", max_length=max_length)
    engine = RewardEngine(lambda: backend, settings.engine_config())
    await engine.start()
    try:
        scores: list[float] = []
        for start in range(0, len(items), 256):  # a trainer's request size
            outcome = await engine.score(items[start : start + 256])
            for r in outcome.results:
                assert isinstance(r, ScoredItem), r
                scores.append(r.score)
    finally:
        await engine.stop()
    return scores, backend.encode(items)


def reference(model_dir: Path, encoded: list[EncodedItem]) -> list[float]:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for enc in encoded:
            kw: dict[str, torch.Tensor] = {"input_ids": torch.tensor([enc.input_ids])}
            if enc.token_type_ids is not None:
                kw["token_type_ids"] = torch.tensor([enc.token_type_ids])
            out.append(float(model(**kw).logits.float()[0, 0]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, default or a checkpoint folder [tiny]")
    p.add_argument("--data", type=Path, default=HH_DIR, help="folder with the HH-RLHF *.test.jsonl.gz files")
    p.add_argument("--rows", type=int, default=1000, help="first rows of each file [1000]")
    p.add_argument("--max-length", type=int, nargs="+", default=[128, 256])
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    items = hh_items(args.data, args.rows)
    worst_all = 0.0
    for max_length in args.max_length:
        started = time.perf_counter()
        served, encoded = asyncio.run(engine_scores(model_dir, items, max_length))
        ref = reference(model_dir, encoded)
        worst = max(abs(a - b) for a, b in zip(served, ref, strict=True))
        scaled = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(served, ref, strict=True))
        worst_all = max(worst_all, scaled)
        truncated = sum(1 for e in encoded if e.truncated)
        print(
            f"model {args.model}, max_length {max_length}: {len(items)} items ({truncated} truncated), "
            f"max |served - transformers alone| = {worst:.2e}, scaled {scaled:.2e}, "
            f"max |score| {max(abs(b) for b in ref):.1f} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    return 0 if worst_all <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
