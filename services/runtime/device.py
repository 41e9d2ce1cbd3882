"""Where a model runs and which weights it is: device and dtype names, the weights' revision hash.

torch is imported only by the functions that need it, so an ONNX-only process can hash its
weights without loading torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Dtype = Literal["float32", "bfloat16", "float16"]  # the --dtype names every model-running command takes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name; KeyError for anything but a :data:`Dtype`."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(device: str) -> torch.device:
    """``auto`` is cuda when torch sees a GPU, else cpu; anything else is passed to torch as is."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def weights_revision(model_dir: Path) -> str:
    """A hash of the weight files (names, sizes and contents): the response's ``model.revision``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        digest.update(str(path.relative_to(model_dir)).encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
