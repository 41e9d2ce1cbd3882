"""PyTorch backend: any local Hugging Face sequence-classification checkpoint.

Exactness: an item's score equals what ``transformers`` returns for that one sequence,
unpadded, whatever batch it rides in. Decoder models (a ``score`` head on the last token)
are run as backbone + head, reading the hidden state at the position transformers' own rule
picks for the *unpadded* sequence (the rightmost token that is not the pad token, or the last
token when the model has no pad token), offset by the padding we add. So pad == eos, left or
right padding, and any batch composition read the same position. Encoders (a ``classifier``
on the first token) are run whole with right padding and an attention mask.

Prefix sharing (decoders): items of one ``group`` (one prompt, G responses) share their
longest common *token* prefix (never compared as strings: the tokenizer can merge across the
prompt/response boundary). A batch holding such a group runs in two passes: the distinct
prefixes once, into a KV cache, then every item's suffix against its prefix's cache rows
with positions continuing from the prefix length. The prefix stops before any item's read
position, so each item's head still reads a token of its own suffix; items without a shared
prefix ride in the suffix pass with a fully masked cache row. Scores equal the unshared ones
to float rounding (about 1e-6 in float32).
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from services.runtime.backends.layout import pad_rows, read_position
from services.runtime.device import Dtype, resolve_device, resolve_dtype, torch_dtype, weights_revision
from services.runtime.items import EncodedItem, ModelInfo, RewardInput
from services.runtime.rendering import Renderer, model_max_length
from services.runtime.tokenizers import PerThread

log = logging.getLogger(__name__)


class TorchRewardBackend:
    """Loads the checkpoint once; ``encode`` is thread-safe, ``forward`` runs on one thread."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        dtype: Dtype = "float32",
        device: str = "auto",
        max_length: int | None = None,
        threads: int | None = None,
        model_id: str | None = None,
        padding_side: Literal["right", "left"] = "right",
        prefix_sharing: bool = True,
        min_shared_prefix: int = 16,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()  # "sequence longer than max" warnings: we truncate ourselves

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face checkpoint folder (no config.json)")
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype(self.dtype))
        self.model.to(self.device).eval()
        config = self.model.config
        self.padding_side = padding_side
        self.is_decoder = hasattr(self.model, "score") and not hasattr(self.model, "classifier")
        self._backbone = getattr(self.model, self.model.base_model_prefix)
        self.prefix_sharing = prefix_sharing
        self.min_shared_prefix = max(1, min_shared_prefix)
        self._can_share = prefix_sharing and self.is_decoder and _cache_can_share(self._backbone, config)
        self.pad_token_id: int | None = config.pad_token_id
        # What we pad with; never read by the head (positions are computed per item).
        self._pad_with = self.pad_token_id if self.pad_token_id is not None else (self.tokenizer.pad_token_id or 0)
        self.renderer = Renderer(self.tokenizer, model_max_length(self.tokenizer, config, max_length))
        self._renderers = PerThread(self.renderer)
        meta = _read_meta(model_dir)
        self.info = ModelInfo(
            id=model_id or meta.get("model_id") or model_dir.name,
            revision=weights_revision(model_dir),
            architecture=(config.architectures or [type(self.model).__name__])[0],
            backend="torch",
            dtype=self.dtype,
            device=str(self.device),
            max_length=self.renderer.max_length,
            num_labels=int(config.num_labels),
            label_names=tuple(str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)),
            has_chat_template=self.renderer.has_template,
        )

    # -- stage 1: render + tokenize -------------------------------------------------------------

    def encode(self, inputs: Sequence[RewardInput]) -> list[EncodedItem]:
        """Thread-safe: each calling thread renders with its own copy of the tokenizer."""
        return self._renderers.get().encode(inputs)

    # -- stage 2: forward -------------------------------------------------------------------------

    def read_position(self, ids: Sequence[int]) -> int:
        """The position transformers' pooling reads for this unpadded sequence."""
        return read_position(ids, self.pad_token_id)

    @property
    def shares_prefixes(self) -> bool:
        """True when ``forward`` runs the common prefix of a group once (decoders, sharing on)."""
        return self._can_share

    def shared_prefix_len(self, group: Sequence[EncodedItem]) -> int:
        """Leading tokens the items of one group share that the shared path runs once (0: none).

        The longest common prefix of the token ids, capped so that every item keeps its read
        position (and so at least one token) in its suffix; 0 unless that saves at least
        ``min_shared_prefix`` tokens per item for two items or more. The batcher prices a group
        with this same number, so its token budget matches what ``forward`` runs.
        """
        if not self._can_share or len(group) < 2:
            return 0
        p = common_prefix_len([it.input_ids for it in group])
        if p < self.min_shared_prefix:
            return 0
        p = min(p, min(self.read_position(it.input_ids) for it in group))
        return p if p >= self.min_shared_prefix else 0

    def _pad(self, batch: Sequence[EncodedItem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, np.ndarray]:
        left = self.padding_side == "left" and self.is_decoder
        ids, mask, starts = pad_rows([it.input_ids for it in batch], self._pad_with, left=left)
        tt = None
        if any(it.token_type_ids for it in batch):
            tt, _, _ = pad_rows([it.token_type_ids or (0,) * it.num_tokens for it in batch], 0, left=left)
        return (
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            None if tt is None else torch.from_numpy(tt),
            starts,
        )

    @torch.inference_mode()
    def features(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        """Decoder models: the final hidden state at the position the score head reads, ``[n, hidden]``."""
        if not self.is_decoder:
            raise TypeError("features() is defined for decoder (last-token) reward models")
        return self._pooled_hidden(batch).float().cpu().numpy()

    def _pooled_hidden(self, batch: Sequence[EncodedItem]) -> torch.Tensor:
        prefixes = self._plan(batch)
        if prefixes is not None:
            return self._pooled_hidden_shared(batch, *prefixes)
        ids, mask, _, starts = self._pad(batch)
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self._backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
        reads = np.fromiter((self.read_position(it.input_ids) for it in batch), dtype=np.int64, count=len(batch))
        rows = torch.arange(len(batch), device=self.device)
        return hidden.last_hidden_state[rows, torch.from_numpy(starts + reads).to(self.device)]

    def _plan(self, batch: Sequence[EncodedItem]) -> tuple[list[int], list[int], list[int]] | None:
        """Per item: its shared prefix length and the prefix row it reads; None when nothing is shared.

        Items of one ``group`` in the batch share; items of no group, or of a group whose
        prefix is too short to pay, get prefix length 0 (their cache row is fully masked).
        """
        if not self._can_share:
            return None
        members: dict[int, list[int]] = {}
        for i, it in enumerate(batch):
            if it.group is not None:
                members.setdefault(it.group, []).append(i)
        prefix_len = [0] * len(batch)
        row_of = [0] * len(batch)
        heads: list[int] = []  # per prefix row: an item whose leading tokens it holds
        for idx in members.values():
            p = self.shared_prefix_len([batch[i] for i in idx]) if len(idx) > 1 else 0
            if p == 0:
                continue
            for i in idx:
                prefix_len[i] = p
                row_of[i] = len(heads)
            heads.append(idx[0])
        if not heads:
            return None
        return prefix_len, row_of, heads

    def _pooled_hidden_shared(
        self, batch: Sequence[EncodedItem], prefix_len: list[int], row_of: list[int], heads: list[int]
    ) -> torch.Tensor:
        """Run each shared prefix once, then every item's suffix against its prefix's cache.

        Both passes pad on the right whatever ``padding_side`` says: then no query row is
        fully masked (a fully masked row gives NaN values that a zero weight cannot cancel).
        Positions continue from each item's own prefix length, so RoPE sees the same
        positions as in the unshared forward.
        """
        from transformers import DynamicCache

        dev = self.device
        # Pass 1: the distinct prefixes, batch [groups, max P].
        pids, pmask, _ = pad_rows([batch[i].input_ids[: prefix_len[i]] for i in heads], self._pad_with, left=False)
        pmask_t = torch.from_numpy(pmask).to(dev)
        cache = DynamicCache(config=self.model.config)
        self._backbone(
            input_ids=torch.from_numpy(pids).to(dev),
            attention_mask=pmask_t,
            position_ids=(pmask_t.cumsum(-1) - 1).clamp(min=0),
            past_key_values=cache,
            use_cache=True,
        )
        # One cache row per item (items without a prefix read row 0, fully masked below).
        cache.batch_select_indices(torch.tensor(row_of, device=dev))
        width_p = pids.shape[1]
        plen = np.asarray(prefix_len, dtype=np.int64)
        prefix_mask = np.arange(width_p) < plen[:, None]
        # Pass 2: the suffixes, batch [items, max suffix].
        sids, smask, _ = pad_rows(
            [it.input_ids[p:] for it, p in zip(batch, prefix_len, strict=True)], self._pad_with, left=False
        )
        smask_t = torch.from_numpy(smask).to(dev)
        attention_mask = torch.cat([torch.from_numpy(prefix_mask.astype(np.int64)).to(dev), smask_t], dim=1)
        plen_t = torch.from_numpy(plen).to(dev)
        position_ids = plen_t[:, None] + (smask_t.cumsum(-1) - 1).clamp(min=0)
        hidden = self._backbone(
            input_ids=torch.from_numpy(sids).to(dev),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        reads = np.fromiter((self.read_position(it.input_ids) for it in batch), dtype=np.int64, count=len(batch))
        rows = torch.arange(len(batch), device=dev)
        return hidden[rows, torch.from_numpy(reads - plen).to(dev)]

    def logits(self, batch: Sequence[EncodedItem]) -> torch.Tensor:
        """Raw head outputs ``[n, num_labels]`` as a tensor, under whatever autograd mode the caller
        runs (``train rm`` fine-tunes through this very path, so training and serving agree)."""
        if self.is_decoder:
            return self.model.score(self._pooled_hidden(batch))
        ids, mask, tt, _ = self._pad(batch)
        kwargs: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if tt is not None:
            kwargs["token_type_ids"] = tt.to(self.device)
        logits: torch.Tensor = self.model(**kwargs).logits
        return logits

    @torch.inference_mode()
    def forward(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        return self.logits(batch).float().cpu().numpy().reshape(len(batch), -1)


def common_prefix_len(seqs: Sequence[tuple[int, ...]]) -> int:
    """Length of the longest common prefix of token id sequences.

    The common prefix of a set is that of its lexicographic minimum and maximum, and slice
    equality runs in C: a binary search over prefix lengths costs a few comparisons.
    """
    if not seqs:
        return 0
    lo_seq, hi_seq = min(seqs), max(seqs)
    lo, hi = 0, min(len(lo_seq), len(hi_seq))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if lo_seq[:mid] == hi_seq[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cache_can_share(backbone: Any, config: Any) -> bool:
    """The shared path needs a backbone that takes ``past_key_values`` and a cache that keeps
    every key (sliding-window or chunked layers drop some, so their rows would not line up)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if "past_key_values" not in inspect.signature(backbone.forward).parameters:
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # an exotic config the cache cannot read: run unshared
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _read_meta(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "rlhf_feedback.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    return {}
