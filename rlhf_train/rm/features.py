"""The on-disk feature cache of ``train rm --freeze-backbone``: frozen features by token ids.

Features do not depend on the head, so a rerun (or an interrupted run resumed) computes only the
sequences its cache lacks; the cache folder is named by the base model and the dtype (see
:func:`rlhf_train.rm.trainer.extract_features`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from services.runtime.items import EncodedItem

log = logging.getLogger("rlhf_train.rm")

FEATURE_CACHE_FORMAT = 1  # in the folder name: bump it when what a cached feature means changes


def item_key(item: EncodedItem) -> str:
    """The feature-cache key of an encoded item: a hash of its token ids (the model is the folder's)."""
    return hashlib.sha256(np.asarray(item.input_ids, dtype=np.int64).tobytes()).hexdigest()


class FeatureCache:
    """Features by token-id hash, in append-only ``.npz`` shards (each written atomically)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, np.ndarray] = {}
        for shard in sorted(folder.glob("shard-*.npz")):
            try:
                with np.load(shard) as z:
                    for k, f in zip(z["keys"].tolist(), z["feats"], strict=True):
                        self.data[str(k)] = f
            except (OSError, ValueError, KeyError) as exc:  # a torn shard: recompute its rows
                log.warning("ignoring unreadable feature shard %s: %s", shard, exc)
        self._pending_keys: list[str] = []
        self._pending: list[np.ndarray] = []

    def add(self, keys: Sequence[str], feats: np.ndarray) -> None:
        """Remember ``feats`` (one row per key); they reach the disk at the next :meth:`flush`."""
        for k, f in zip(keys, feats, strict=True):
            self.data[k] = f
            self._pending_keys.append(k)
            self._pending.append(f)

    def flush(self) -> None:
        """Write what was added since the last flush as one new shard."""
        if not self._pending:
            return
        final = self.folder / f"shard-{time.time_ns()}-{os.getpid()}.npz"
        tmp = final.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.asarray(self._pending_keys), feats=np.stack(self._pending).astype(np.float32))
        os.replace(tmp, final)
        self._pending_keys, self._pending = [], []


def token_batches(items: list[tuple[str, EncodedItem]], budget: int) -> Iterable[list[tuple[str, EncodedItem]]]:
    """Shortest first (so that a rerun with a smaller ``--max-length`` reuses the most cached
    features); each batch's padded size (rows × longest) stays within ``budget`` tokens."""
    batch: list[tuple[str, EncodedItem]] = []
    for entry in sorted(items, key=lambda e: e[1].num_tokens):
        if batch and (len(batch) + 1) * entry[1].num_tokens > budget:
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch
