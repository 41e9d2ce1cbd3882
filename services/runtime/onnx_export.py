"""Export a reward checkpoint to a folder the onnx backend serves (``rlhf-feedback export-onnx``).

The checkpoint is loaded with the torch backend (float32, CPU) and traced with torch's
TorchScript ONNX exporter (``dynamo=False``: it needs only the ``onnx`` package, not
``onnxscript``, and handles these models' masking code) with dynamic batch and sequence axes.
Decoders are exported as backbone + gather at ``read_positions`` + score head, encoders whole;
see :mod:`services.runtime.backends.onnx_backend` for the graph's inputs. The output folder
also gets the tokenizer, chat template, ``config.json``, ``rlhf_feedback.json`` and a manifest,
so ``serve reward --backend onnx --model OUT`` needs nothing else.

``--quantize int8`` applies onnxruntime's dynamic int8 quantization. It is much faster on CPU
but can reorder preferences (measured here on SmolLM2-135M: score correlation 0.65 with
float32), so check it with ``rlhf-feedback bench agreement`` before serving it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import inspect
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from services.runtime.backends.onnx_backend import (
    DECODER_INPUTS,
    MANIFEST_FILE,
    MODEL_FILE,
    ExportManifest,
    OnnxRewardBackend,
)
from services.runtime.items import EncodedItem

if TYPE_CHECKING:
    import torch

    from services.runtime.backends.torch_backend import TorchRewardBackend

DEFAULT_OPSET = 17
CHECK_TOLERANCE = 1e-4  # float32 exports; DESIGN.md's tolerance for 100M+ models
QUANTIZATIONS = ("int8",)
INT8_WARNING = (
    "warning: dynamic int8 quantization can change which response a model prefers; measure it with "
    "`rlhf-feedback bench agreement --backends onnx-int8` before serving it"
)
Quantize = Literal["int8"] | None


class ExportError(RuntimeError):
    """Bad input to an export (missing package, unusable output folder, unsupported model)."""


@dataclass(frozen=True)
class CheckResult:
    """ONNX vs torch float32 (each item alone, unpadded) on ``items`` synthetic items."""

    items: int
    max_abs_diff: float
    mean_abs_diff: float


# -- export -------------------------------------------------------------------------------------


def export_onnx(
    model_dir: Path,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    quantize: Quantize = None,
    source: TorchRewardBackend | None = None,
) -> ExportManifest:
    """Export ``model_dir`` (a HF sequence-classification checkpoint) into the folder ``out``.

    ``out`` must be absent, empty, or an earlier export (which is replaced). The folder is built
    beside ``out`` and renamed into place, so a crash never leaves a half-written export.
    ``source`` reuses an already loaded float32 CPU torch backend of ``model_dir``.
    """
    check_out_dir(out)
    try:
        import onnx  # noqa: F401  # the TorchScript exporter serialises through it
    except ImportError as exc:
        raise ExportError(
            "export needs the onnx package: pip install 'rlhf-feedback[onnx]' (or pip install onnx)"
        ) from exc
    if source is None:
        source = load_source(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        inputs = _export_graph(source, tmp / MODEL_FILE, opset)
        if quantize == "int8":
            _quantize_int8(tmp / MODEL_FILE)
        _copy_side_files(model_dir, tmp)
        manifest = ExportManifest(
            kind="decoder" if source.is_decoder else "encoder",
            inputs=inputs,
            num_labels=source.info.num_labels,
            model_id=source.info.id,
            architecture=source.info.architecture,
            source_revision=source.info.revision,
            opset=opset,
            dtype="int8" if quantize == "int8" else "float32",
            quantized="int8-dynamic" if quantize == "int8" else None,
            versions=_versions(),
        )
        (tmp / MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
        check_out_dir(out)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def load_source(model_dir: Path) -> TorchRewardBackend:
    """The checkpoint as a float32 CPU torch backend (the reference the export must equal)."""
    from services.runtime.backends.torch_backend import TorchRewardBackend

    return TorchRewardBackend(model_dir, dtype="float32", device="cpu", prefix_sharing=False)


def check_out_dir(out: Path) -> None:
    """Refuse an output folder that holds something other than an earlier export."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).is_file())):
        raise ExportError(f"--out {out} exists and is not an empty folder or an earlier export; pick another")


def _decoder_graph(model: Any) -> torch.nn.Module:
    """Backbone + gather at per-item read positions + score head (what the torch backend runs)."""
    import torch

    class DecoderGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = getattr(model, model.base_model_prefix)
            self.score = model.score

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            read_positions: torch.Tensor,
        ) -> torch.Tensor:
            hidden = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
            # gather, not hidden[arange(B), pos]: no batch size baked into the trace
            index = read_positions.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            return self.score(hidden.gather(1, index).squeeze(1)).float()

    return DecoderGraph()


def _encoder_graph(model: Any, input_names: tuple[str, ...]) -> torch.nn.Module:
    """The whole model (its own pooling and classifier), inputs passed by name."""
    import torch

    class EncoderGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(input_names, inputs, strict=True))).logits.float()

    return EncoderGraph()


def _sample_inputs(source: TorchRewardBackend, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """A right-padded batch of two rows of different lengths to trace with. The mask must have
    real padding: transformers skips an all-ones attention mask, and a trace of that path would
    ignore padding in every later batch."""
    import torch

    width = max(2, min(8, source.renderer.max_length))
    lengths = (width, width // 2)
    token = next(t for t in range(len(source.tokenizer)) if t != source.pad_token_id)
    pad = source.pad_token_id if source.pad_token_id is not None else 0
    ids = torch.full((2, width), pad, dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, k in enumerate(lengths):
        ids[row, :k] = token
        mask[row, :k] = 1
    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "read_positions": torch.tensor([k - 1 for k in lengths]),
    }
    return tuple(tensors[name] for name in names)


def _export_graph(source: TorchRewardBackend, path: Path, opset: int) -> tuple[str, ...]:
    model = source.model
    use_cache = model.config.use_cache
    model.config.use_cache = False  # the export fails on (and never needs) a KV cache
    try:
        return _trace(source, model, path, opset)
    finally:
        model.config.use_cache = use_cache


def _trace(source: TorchRewardBackend, model: Any, path: Path, opset: int) -> tuple[str, ...]:
    import torch

    if source.is_decoder:
        names: tuple[str, ...] = DECODER_INPUTS
        graph = _decoder_graph(model)
    else:
        takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
        names = ("input_ids", "attention_mask", "token_type_ids") if takes_types else ("input_ids", "attention_mask")
        graph = _encoder_graph(model, names)
    dynamic: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in names}
    if source.is_decoder:
        dynamic["read_positions"] = {0: "batch"}
    dynamic["logits"] = {0: "batch"}
    with _quiet_tracing(), torch.no_grad():
        torch.onnx.export(
            graph.eval(),
            _sample_inputs(source, names),
            str(path),
            dynamo=False,
            input_names=list(names),
            output_names=["logits"],
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
        )
    return names


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """The tracer warns about every Python-level shape check in the model code; the exactness
    check (``--check``) is what tells whether the trace generalises, not these warnings."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        yield


def _quantize_int8(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_name("model.fp32.onnx")
    path.rename(fp32)
    # MatMul weights only, per output channel: that is where the time goes; int8 embeddings
    # (Gather) and per-tensor scales cost accuracy for no speed.
    with _quiet_quantizer():
        quantize_dynamic(
            str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
        )
    fp32.unlink()


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """onnxruntime's quantizer logs a "consider pre-processing" hint on the root logger at every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _copy_side_files(model_dir: Path, out: Path) -> None:
    """Tokenizer, chat template, config, rlhf_feedback.json, model card: every top-level file
    that is not weights (the export's weights are in the graph)."""
    from services.runtime.device import WEIGHT_SUFFIXES

    for path in sorted(model_dir.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name == MANIFEST_FILE:
            continue
        if path.suffix in WEIGHT_SUFFIXES or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, out / path.name)


def _versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def cached_export(model_dir: Path, *, quantize: Quantize = None, root: Path | None = None) -> Path:
    """An export of ``model_dir`` under the cache (``<cache>/onnx``), made once per source revision."""
    from services.runtime.default_model import cache_dir
    from services.runtime.device import weights_revision

    revision = weights_revision(model_dir)
    final = (root or cache_dir() / "onnx") / f"{model_dir.name}-{revision}-{quantize or 'float32'}"
    if (final / MANIFEST_FILE).is_file():
        return final
    try:
        export_onnx(model_dir, final, quantize=quantize)
    except (OSError, ExportError):
        if (final / MANIFEST_FILE).is_file():  # another process exported it at the same time
            return final
        raise
    return final


# -- check ----------------------------------------------------------------------------------------


def synthetic_items(source: TorchRewardBackend, n: int, *, seed: int = 0, longest: int = 128) -> list[EncodedItem]:
    """``n`` random token sequences of mixed lengths (1 to ``longest``); every fourth one ends in
    the pad token, which the read-position rule must skip."""
    rng = np.random.default_rng(seed)
    top = max(1, min(longest, source.renderer.max_length))
    vocab = len(source.tokenizer)
    items = []
    for i in range(n):
        length = int(rng.integers(1, top + 1))
        ids = [int(t) for t in rng.integers(0, vocab, size=length)]
        if i % 4 == 3 and source.pad_token_id is not None and length > 1:
            ids[-1] = source.pad_token_id
        items.append(EncodedItem(tuple(ids), truncated=False))
    return items


def check_export(
    export_dir: Path,
    source: TorchRewardBackend,
    n: int,
    *,
    seed: int = 0,
    batch_size: int = 8,
    threads: int | None = None,
) -> CheckResult:
    """Score ``n`` synthetic items with the export, in mixed-length batches, and with the float32
    torch backend one item at a time (the unpadded reference); return the differences."""
    backend = OnnxRewardBackend(export_dir, device="cpu", threads=threads)
    items = synthetic_items(source, n, seed=seed)
    got = np.concatenate([backend.forward(items[i : i + batch_size]) for i in range(0, n, batch_size)])
    want = np.concatenate([source.forward([it]) for it in items])
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    return CheckResult(items=n, max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()))
