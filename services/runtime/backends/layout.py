"""How a batch is laid out for a forward pass, shared by the torch and ONNX backends: padded
rows, and the position a last-token reward head reads (torch-free)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np


def read_position(ids: Sequence[int], pad_token_id: int | None) -> int:
    """The position transformers' last-token pooling reads for this unpadded sequence: the
    rightmost token that is not the pad token, the last token when the model has no pad token."""
    if pad_token_id is None:
        return len(ids) - 1
    for pos in range(len(ids) - 1, -1, -1):
        if ids[pos] != pad_token_id:
            return pos
    return 0  # all pad: transformers' argmax over an all-zero mask gives 0


def pad_rows(seqs: Sequence[Sequence[int]], pad: int, *, left: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, mask, starts)``: rows padded to the longest with ``pad``, built in bulk (no per-row tensors)."""
    n = len(seqs)
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=n)
    width = int(lengths.max()) if n else 0
    starts = width - lengths if left else np.zeros(n, dtype=np.int64)
    cols = np.arange(width)
    keep = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
    ids = np.full((n, width), pad, dtype=np.int64)
    # Row-major boolean assignment fills each row's kept span in order: the concatenation fits.
    ids[keep] = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    return ids, keep.astype(np.int64), starts
