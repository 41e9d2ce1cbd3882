"""PyTorch backend: any local Hugging Face sequence-classification checkpoint.

Exactness: an item's score equals what ``transformers`` returns for that one sequence,
unpadded, whatever batch it rides in. Decoder models (a ``score`` head on the last token)
are run as backbone + head, reading the hidden state at the position transformers' own rule
picks for the *unpadded* sequence (the rightmost token that is not the pad token, or the last
token when the model has no pad token), offset by the padding we add. So pad == eos, left or
right padding, and any batch composition read the same position. Encoders (a ``classifier``
on the first token) are run whole with right padding and an attention mask.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from services.reward.backends.rendering import Renderer, model_max_length
from services.reward.engine.items import EncodedItem, ModelInfo, RewardInput

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


def weights_revision(model_dir: Path) -> str:
    """A hash of the weight files (names, sizes and contents): the response's ``model.revision``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(str(path.relative_to(model_dir)).encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TorchRewardBackend:
    """Loads the checkpoint once; ``encode`` is thread-safe, ``forward`` runs on one thread."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        device: str = "auto",
        max_length: int | None = None,
        threads: int | None = None,
        model_id: str | None = None,
        padding_side: Literal["right", "left"] = "right",
        prefix_sharing: bool = True,
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
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=DTYPES[dtype])
        self.model.to(self.device).eval()
        config = self.model.config
        self.padding_side = padding_side
        self.prefix_sharing = prefix_sharing
        self.is_decoder = hasattr(self.model, "score") and not hasattr(self.model, "classifier")
        self.pad_token_id: int | None = config.pad_token_id
        # What we pad with; never read by the head (positions are computed per item).
        self._pad_with = self.pad_token_id if self.pad_token_id is not None else (self.tokenizer.pad_token_id or 0)
        self.renderer = Renderer(self.tokenizer, model_max_length(self.tokenizer, config, max_length))
        meta = _read_meta(model_dir)
        self.info = ModelInfo(
            id=model_id or meta.get("model_id") or model_dir.name,
            revision=weights_revision(model_dir),
            architecture=(config.architectures or [type(self.model).__name__])[0],
            backend="torch",
            dtype=dtype,
            device=str(self.device),
            max_length=self.renderer.max_length,
            num_labels=int(config.num_labels),
            label_names=tuple(str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)),
            has_chat_template=self.renderer.has_template,
        )

    # -- stage 1: render + tokenize -------------------------------------------------------------

    def encode(self, inputs: Sequence[RewardInput]) -> list[EncodedItem]:
        return self.renderer.encode(inputs)

    # -- stage 2: forward -------------------------------------------------------------------------

    def read_position(self, ids: Sequence[int]) -> int:
        """The position transformers' pooling reads for this unpadded sequence."""
        if self.pad_token_id is None:
            return len(ids) - 1
        for pos in range(len(ids) - 1, -1, -1):
            if ids[pos] != self.pad_token_id:
                return pos
        return 0  # all pad: transformers' argmax over an all-zero mask gives 0

    def _pad(self, batch: Sequence[EncodedItem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[int]]:
        width = max(it.num_tokens for it in batch)
        n = len(batch)
        ids = torch.full((n, width), self._pad_with, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        tt = torch.zeros((n, width), dtype=torch.long) if any(it.token_type_ids for it in batch) else None
        offsets = []
        for row, it in enumerate(batch):
            k = it.num_tokens
            start = width - k if self.padding_side == "left" and self.is_decoder else 0
            ids[row, start : start + k] = torch.tensor(it.input_ids, dtype=torch.long)
            mask[row, start : start + k] = 1
            if tt is not None and it.token_type_ids:
                tt[row, start : start + k] = torch.tensor(it.token_type_ids, dtype=torch.long)
            offsets.append(start)
        return ids, mask, tt, offsets

    @torch.inference_mode()
    def features(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        """Decoder models: the final hidden state at the position the score head reads, ``[n, hidden]``."""
        if not self.is_decoder:
            raise TypeError("features() is defined for decoder (last-token) reward models")
        return self._pooled_hidden(batch).float().cpu().numpy()

    def _pooled_hidden(self, batch: Sequence[EncodedItem]) -> torch.Tensor:
        ids, mask, _, offsets = self._pad(batch)
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        rows = torch.arange(len(batch), device=self.device)
        cols = torch.tensor(
            [off + self.read_position(it.input_ids) for off, it in zip(offsets, batch, strict=True)],
            device=self.device,
        )
        return hidden[rows, cols]

    @torch.inference_mode()
    def forward(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        if self.is_decoder:
            logits = self.model.score(self._pooled_hidden(batch))
        else:
            ids, mask, tt, _ = self._pad(batch)
            kwargs: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
            if tt is not None:
                kwargs["token_type_ids"] = tt.to(self.device)
            logits = self.model(**kwargs).logits
        return logits.float().cpu().numpy().reshape(len(batch), -1)


def _read_meta(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "rlhf_feedback.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    return {}
