"""The in-process limit: the same model and texts, no server, length-sorted token-budget batches.

What a perfect batcher with every item known in advance could do: the texts are encoded once,
sorted by length and cut into batches whose padded size (items × longest) stays within the
budget; only the forward passes are timed (after a warm-up of the first and last batch shape).

Run as a worker process (``python -m benchmarks.inprocess``) so that the bench never
measures two things at once on a small machine: it loads the model once, then answers one
JSON command per stdin line (``{"texts": [...]}`` to set the texts, ``{"budgets": [...]}`` to
measure) with one ``@@ {json}`` line on stdout, and sleeps in between.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from services.runtime.items import EncodedItem

_MARK = "@@ "


@dataclass(frozen=True)
class LimitResult:
    budget: int
    seconds: float
    samples: int
    real_tokens: int
    padded_tokens: int
    batches: int

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {**asdict(self), "samples_per_s": self.samples_per_s, "tokens_per_s": self.tokens_per_s}


def budget_batches(encoded: Sequence[EncodedItem], budget: int) -> list[list[EncodedItem]]:
    """Shortest first; a batch's padded size (rows × longest) stays within ``budget``
    (an item longer than the budget runs alone)."""
    batches: list[list[EncodedItem]] = []
    batch: list[EncodedItem] = []
    for it in sorted(encoded, key=lambda e: e.num_tokens):
        if batch and (len(batch) + 1) * it.num_tokens > budget:
            batches.append(batch)
            batch = []
        batch.append(it)
    if batch:
        batches.append(batch)
    return batches


def measure(backend: Any, encoded: Sequence[EncodedItem], budget: int) -> LimitResult:
    """Time the forwards of every batch for one budget (warm-up of the extreme shapes first)."""
    batches = budget_batches(encoded, budget)
    for b in {0, len(batches) - 1}:
        backend.forward(batches[b])
    started = time.perf_counter()
    for batch in batches:
        backend.forward(batch)
    seconds = time.perf_counter() - started
    return LimitResult(
        budget=budget,
        seconds=seconds,
        samples=sum(len(b) for b in batches),
        real_tokens=sum(it.num_tokens for b in batches for it in b),
        padded_tokens=sum(len(b) * max(it.num_tokens for it in b) for b in batches),
        batches=len(batches),
    )


def _worker(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    from services.runtime.backends.torch_backend import TorchRewardBackend
    from services.runtime.items import RewardInput

    backend = TorchRewardBackend(args.model, dtype=args.dtype, device=args.device, threads=args.threads)
    encoded: list[EncodedItem] = []
    print(_MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if "texts" in cmd:
            encoded = backend.encode([RewardInput.of_text(t) for t in cmd["texts"]])
            reply: dict[str, Any] = {"encoded": len(encoded)}
        else:
            reply = {"results": [measure(backend, encoded, int(b)).summary() for b in cmd["budgets"]]}
        print(_MARK + json.dumps(reply), flush=True)
    return 0


class LimitWorker:
    """The bench's handle on a worker process (started by the runner with the server's env)."""

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self._read()  # ready

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the in-process limit worker exited with {self.proc.wait()}")
            if line.startswith(_MARK):
                data: dict[str, Any] = json.loads(line[len(_MARK) :])
                return data

    def _ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def set_texts(self, texts: Sequence[str]) -> int:
        return int(self._ask({"texts": list(texts)})["encoded"])

    def measure(self, budgets: Sequence[int]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = self._ask({"budgets": list(budgets)})["results"]
        return results

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    sys.exit(_worker())
