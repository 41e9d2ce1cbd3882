"""The backend interface: stages the engine calls, and nothing about queues or transports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from services.reward.engine.items import EncodedItem, ModelInfo, RewardInput


class RewardBackend(Protocol):
    """A loaded reward model.

    ``encode`` (render + tokenize + truncate) is thread-safe and runs off the model thread;
    ``forward`` runs on the single model thread and returns float32 ``[len(batch), num_labels]``
    raw outputs, one row per item, in order.
    """

    info: ModelInfo

    def encode(self, inputs: Sequence[RewardInput]) -> list[EncodedItem]: ...

    def forward(self, batch: Sequence[EncodedItem]) -> np.ndarray: ...
