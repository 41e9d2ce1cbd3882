"""A tiny deterministic backend for engine and transport tests (no model, no torch).

Tokens are UTF-8 bytes; the score of an item is a fixed function of its tokens, so any batch
composition gives the same numbers. ``gate`` lets a test hold the forward pass; ``fail_when``
makes a batch raise; ``bug_text`` makes ``encode`` raise (a stand-in for a bug); ``batches``
records what reached the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

from services.common.errors import invalid
from services.runtime.items import EncodedItem, ModelInfo, RewardInput


def fake_score(ids: Sequence[int]) -> float:
    """The reference score of the fake model for one token sequence."""
    return float(np.float32(sum((i + 1) * (t % 97) for i, t in enumerate(ids)) % 1000 / 100.0 - 5.0))


class FakeBackend:
    def __init__(
        self,
        *,
        max_length: int = 64,
        num_labels: int = 1,
        gate: threading.Event | None = None,
        fail_when: Callable[[Sequence[EncodedItem]], bool] | None = None,
        bug_text: str | None = None,
    ) -> None:
        self.info = ModelInfo(
            id="fake",
            revision="0" * 16,
            architecture="Fake",
            backend="fake",
            dtype="float32",
            device="cpu",
            max_length=max_length,
            num_labels=num_labels,
            label_names=tuple(f"LABEL_{i}" for i in range(num_labels)),
        )
        self.gate = gate
        self.fail_when = fail_when
        self.bug_text = bug_text  # a text item equal to this makes encode() raise: a stand-in for a bug
        self.batches: list[list[EncodedItem]] = []
        self.entered = threading.Event()

    def _tokens(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode(self, inputs: Sequence[RewardInput]) -> list[EncodedItem]:
        out = []
        for i, x in enumerate(inputs):
            if x.text is not None and x.text == self.bug_text:
                raise RuntimeError("secret internal detail that must not reach clients")
            prompt_ids: list[int] = []
            if x.token_ids is not None:
                resp_ids = list(x.token_ids)
            elif x.text is not None:
                resp_ids = self._tokens(x.text)
            elif x.messages is not None:
                prompt_ids = self._tokens("".join(f"{m.role}:{m.content}\n" for m in x.messages[:-1]))
                last = x.messages[-1]
                resp_ids = self._tokens(f"{last.role}:{last.content}\n")
            else:
                p = (
                    x.prompt
                    if isinstance(x.prompt, str)
                    else "".join(f"{m.role}:{m.content}\n" for m in x.prompt or ())
                )
                prompt_ids, resp_ids = self._tokens(p), self._tokens(x.response or "")
            if not prompt_ids and not resp_ids:
                raise invalid("item renders to no tokens", item=i)
            excess = max(0, len(prompt_ids) + len(resp_ids) - self.info.max_length)
            cut = min(excess, len(prompt_ids))
            prompt_ids = prompt_ids[cut:]
            resp_ids = resp_ids[excess - cut :]
            out.append(EncodedItem(tuple(prompt_ids + resp_ids), truncated=excess > 0, prompt_tokens=len(prompt_ids)))
        return out

    def forward(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        self.batches.append(list(batch))
        if self.fail_when is not None and self.fail_when(batch):
            raise RuntimeError("fake backend failure")
        rows = [[fake_score(it.input_ids) + k for k in range(self.info.num_labels)] for it in batch]
        return np.asarray(rows, dtype=np.float32).reshape(len(batch), self.info.num_labels)
