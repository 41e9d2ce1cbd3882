"""Where a model runs and which weights it is: device and dtype names, the weights' revision hash.

torch is imported only by the functions that need it, so an ONNX-only process can hash its
weights without loading torch.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The --dtype names every model-running command takes; "auto" resolves with resolve_dtype.
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
ConcreteDtype = Literal["float32", "bfloat16", "float16"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx", ".gguf")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a resolved ``--dtype`` name; KeyError for anything but a :data:`ConcreteDtype`."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX tiles).

    Without it torch emulates bf16, and a bf16 model runs several times *slower* than float32
    (measured on an AVX2-only machine of the same kind as ours: 0.30 samples/s against 2.73).
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    found = [getattr(torch.cpu, name, None) for name in probes]
    if any(callable(f) for f in found):
        return any(bool(f()) for f in found if callable(f))
    try:  # older torch: the kernel's own flags
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_capability() -> str:
    """What a benchmark report records about the CPU: torch's vector ISA and native bf16."""
    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    return f"{isa}, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}"


def _native_bf16(device: torch.device) -> bool:
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_dtype(name: str, device: torch.device) -> ConcreteDtype:
    """``auto`` is bfloat16 where the hardware computes it natively (CUDA with bf16, a CPU with
    AVX-512 BF16 or AMX), float32 everywhere else. An explicit ``bfloat16`` on hardware without
    it is kept (the user asked) but logged: it is much slower there than float32."""
    if name == "auto":
        return "bfloat16" if _native_bf16(device) else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    if name == "bfloat16" and not _native_bf16(device):
        log.warning(
            "--dtype bfloat16 on %s without native bf16 (%s): torch emulates it, typically several "
            "times slower than float32; use --dtype auto or float32",
            device,
            cpu_capability() if device.type == "cpu" else "no bf16 support",
        )
    return cast(ConcreteDtype, name)


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
