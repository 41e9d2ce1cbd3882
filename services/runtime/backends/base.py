"""The backend interface: stages the engine calls, and nothing about queues or transports."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from services.runtime.items import EncodedItem, ModelInfo, RewardInput


class RewardBackend(Protocol):
    """A loaded reward model.

    ``encode`` (render + tokenize + truncate) is thread-safe and runs off the model thread;
    ``forward`` runs on the single model thread and returns float32 ``[len(batch), num_labels]``
    raw outputs, one row per item, in order.
    """

    info: ModelInfo

    def encode(self, inputs: Sequence[RewardInput]) -> list[EncodedItem]: ...

    def forward(self, batch: Sequence[EncodedItem]) -> np.ndarray: ...


def shared_prefix_fn(backend: object) -> Callable[[Sequence[EncodedItem]], int] | None:
    """The backend's ``shared_prefix_len`` when it runs the common token prefix of a group of
    items once (decoder models with prefix sharing on), else None.

    Optional on purpose: a backend opts in with a true ``shares_prefixes`` attribute and a
    ``shared_prefix_len(items) -> int`` method; the engine then groups items by prompt and the
    batcher keeps each group in one batch, priced with that same number.
    """
    if not getattr(backend, "shares_prefixes", False):
        return None
    fn = getattr(backend, "shared_prefix_len", None)
    return fn if callable(fn) else None
