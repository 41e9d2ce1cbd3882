"""ONNX Runtime backend: a folder written by ``rlhf-feedback export-onnx``.

The folder holds ``model.onnx``, the tokenizer (with its chat template), ``config.json``,
``rlhf_feedback.json`` when the source had one, and :data:`MANIFEST_FILE`. The graph keeps the
torch backend's exactness contract (DESIGN.md, "Reward semantics"):

- decoders: inputs ``input_ids``, ``attention_mask``, ``position_ids`` (``cumsum(mask) - 1``) and
  ``read_positions`` (the position transformers' pooling picks for the *unpadded* item); the
  graph runs the backbone, gathers the hidden state at each read position and applies the score
  head, so only ``[batch, num_labels]`` leaves the session;
- encoders: the whole model on right-padded ``input_ids``/``attention_mask``
  (+ ``token_type_ids`` when the model takes them).

Tokenization is :class:`~services.runtime.rendering.Renderer`, as for torch, so both
backends see the same ids. Neither torch nor a GPU build of torch is needed at run time:
``onnxruntime`` (CPU EP) or ``onnxruntime-gpu`` (CUDA EP) is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.runtime.backends.layout import pad_rows, read_position
from services.runtime.items import EncodedItem, ModelInfo, RewardInput
from services.runtime.rendering import Renderer, model_max_length
from services.runtime.tokenizers import PerThread

MANIFEST_FILE = "onnx_export.json"
MODEL_FILE = "model.onnx"
MANIFEST_FORMAT = 1
DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids", "read_positions")


class NotAnExportError(FileNotFoundError):
    """``--backend onnx`` was pointed at a folder that ``export-onnx`` did not write."""


@dataclass(frozen=True)
class ExportManifest:
    """What ``export-onnx`` wrote, read back by the backend (``onnx_export.json``)."""

    kind: str  # "decoder" or "encoder"
    inputs: tuple[str, ...]
    num_labels: int
    model_id: str
    architecture: str
    source_revision: str  # weights_revision() of the torch checkpoint it came from
    opset: int
    dtype: str  # "float32", or "int8" when quantized
    quantized: str | None = None  # "int8-dynamic" or None
    model_file: str = MODEL_FILE
    format: int = MANIFEST_FORMAT
    versions: dict[str, str] = field(default_factory=dict)  # torch, transformers, onnxruntime

    def to_json(self) -> str:
        data = asdict(self)
        data["inputs"] = list(self.inputs)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @staticmethod
    def read(folder: Path) -> ExportManifest:
        """The manifest of an export folder; :class:`NotAnExportError` when there is none."""
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise NotAnExportError(
                f"{folder} is not an ONNX export (no {MANIFEST_FILE}); run "
                f"`rlhf-feedback export-onnx --model {folder} --out EXPORT_DIR` first and serve EXPORT_DIR"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != MANIFEST_FORMAT:
            raise NotAnExportError(
                f"{path} has format {data.get('format')!r}, this version reads {MANIFEST_FORMAT}; export again"
            )
        data["inputs"] = tuple(data["inputs"])
        return ExportManifest(**data)


def execution_providers(device: str) -> tuple[list[Any], str]:
    """onnxruntime providers for ``--device`` and the device name to report.

    ``auto`` takes the CUDA EP when onnxruntime-gpu offers it, else the CPU EP; ``cuda``/``cuda:N``
    without the CUDA EP is an error rather than a silent fall-back to CPU.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"], "cpu"
    if device.startswith("cuda"):
        if not has_cuda:
            raise RuntimeError(
                f"--device {device} needs onnxruntime's CUDA execution provider (pip install "
                f"'rlhf-feedback[onnx-gpu]'); this onnxruntime offers {', '.join(available)}"
            )
        index = int(device.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], f"cuda:{index}"
    raise ValueError(f"unknown device {device!r} for the onnx backend (cpu, cuda, cuda:N or auto)")


def session_options(threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    opts.inter_op_num_threads = 1  # one model thread runs one graph at a time
    if threads is not None:
        opts.intra_op_num_threads = threads
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        # Honour the same "do not busy-wait" request torch's OpenMP gets: on a shared CPU the
        # spinning pool threads steal cycles from everything else.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxRewardBackend:
    """Loads an export once; ``encode`` is thread-safe, ``forward`` runs on one thread."""

    def __init__(
        self,
        export_dir: Path | str,
        *,
        device: str = "auto",
        max_length: int | None = None,
        threads: int | None = None,
        model_id: str | None = None,
    ) -> None:
        import onnxruntime as ort
        from transformers import AutoConfig, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from services.runtime.device import weights_revision

        hf_logging.set_verbosity_error()  # "sequence longer than max" warnings: we truncate ourselves
        export_dir = Path(export_dir)
        self.manifest = ExportManifest.read(export_dir)
        providers, device_name = execution_providers(device)
        self.session = ort.InferenceSession(
            str(export_dir / self.manifest.model_file), sess_options=session_options(threads), providers=providers
        )
        if device_name.startswith("cuda") and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"onnxruntime could not start the CUDA execution provider for --device {device}")
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.is_decoder = self.manifest.kind == "decoder"
        self.tokenizer = AutoTokenizer.from_pretrained(export_dir)
        config = AutoConfig.from_pretrained(export_dir)
        self.pad_token_id: int | None = config.pad_token_id
        # What we pad with; never read (read positions are per item, encoders are masked).
        self._pad_with = self.pad_token_id if self.pad_token_id is not None else (self.tokenizer.pad_token_id or 0)
        self.renderer = Renderer(self.tokenizer, model_max_length(self.tokenizer, config, max_length))
        self._renderers = PerThread(self.renderer)
        self.info = ModelInfo(
            id=model_id or self.manifest.model_id,
            revision=weights_revision(export_dir),
            architecture=self.manifest.architecture,
            backend="onnx",
            dtype=self.manifest.dtype,
            device=device_name,
            max_length=self.renderer.max_length,
            num_labels=self.manifest.num_labels,
            label_names=tuple(str(config.id2label.get(i, f"LABEL_{i}")) for i in range(self.manifest.num_labels)),
            has_chat_template=self.renderer.has_template,
        )

    def encode(self, inputs: Sequence[RewardInput]) -> list[EncodedItem]:
        """Thread-safe: each calling thread renders with its own copy of the tokenizer."""
        return self._renderers.get().encode(inputs)

    def feeds(self, batch: Sequence[EncodedItem]) -> dict[str, np.ndarray]:
        """The session inputs for one batch: right padding, per-item read positions."""
        ids, mask, _ = pad_rows([it.input_ids for it in batch], self._pad_with, left=False)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.is_decoder:
            feeds["position_ids"] = np.maximum(mask.cumsum(-1) - 1, 0)
            feeds["read_positions"] = np.array(
                [read_position(it.input_ids, self.pad_token_id) for it in batch], dtype=np.int64
            )
        elif "token_type_ids" in self.input_names:
            tt, _, _ = pad_rows([it.token_type_ids or (0,) * it.num_tokens for it in batch], 0, left=False)
            feeds["token_type_ids"] = tt
        return feeds

    def forward(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        (logits,) = self.session.run(["logits"], self.feeds(batch))
        return np.asarray(logits, dtype=np.float32).reshape(len(batch), -1)
