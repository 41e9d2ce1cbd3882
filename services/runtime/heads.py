"""How a vector reward head becomes the one scalar ``score``: shared by the reward service and the
in-process scorers of ``rlhf_train`` (Ray Data's ``LocalRewardScorer``), so both give the same number."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def head_weights(
    weights: Sequence[float] | None, num_labels: int, *, flag: str = "--head-weights"
) -> np.ndarray | None:
    """None for a scalar head; for a vector head the weights of the scalar ``score`` (default: the
    mean). ``flag`` names the setting in the error for a count that does not match the model."""
    if num_labels == 1:
        if weights is not None and len(weights) != 1:
            raise ValueError(f"{flag} has {len(weights)} values but the model has 1 output")
        return None
    if weights is None:
        return np.full(num_labels, 1.0 / num_labels, dtype=np.float32)
    if len(weights) != num_labels:
        raise ValueError(f"{flag} has {len(weights)} values but the model has {num_labels} outputs")
    return np.asarray(weights, dtype=np.float32)
