"""Choose and load the backend a reward server runs (the embedded default when no --model)."""

from __future__ import annotations

import logging

from services.reward.settings import RewardSettings
from services.runtime.backends.base import RewardBackend

log = logging.getLogger(__name__)


def load_backend(settings: RewardSettings) -> RewardBackend:
    """Load ``--model`` (or assemble the embedded default) with the configured backend."""
    if settings.backend == "onnx":
        return _load_onnx(settings)
    from services.runtime.backends.torch_backend import TorchRewardBackend

    if settings.model is not None:
        model_dir = settings.model
    else:
        from services.runtime.default_model import default_model_dir

        model_dir = default_model_dir()
    return TorchRewardBackend(
        model_dir,
        dtype=settings.dtype,
        device=settings.device,
        max_length=settings.max_length,
        threads=settings.threads,
        model_id=settings.model_id,
        prefix_sharing=settings.prefix_sharing,
    )


def check_onnx_settings(settings: RewardSettings) -> None:
    """Raise ``ValueError`` (one clear line) for ``--backend onnx`` settings that cannot work:
    a ``--model`` folder that ``export-onnx`` did not write, or a ``--dtype`` other than the
    export's own. Cheap: reads the manifest only."""
    from services.runtime.backends.onnx_backend import ExportManifest

    if settings.model is not None:
        ExportManifest.read(settings.model)  # NotAnExportError says to run export-onnx first
    if settings.dtype not in ("auto", "float32"):
        raise ValueError(
            f"--dtype {settings.dtype} does not apply to --backend onnx: an export runs in its own dtype "
            "(float32, or int8 with `export-onnx --quantize int8`)"
        )


def _load_onnx(settings: RewardSettings) -> RewardBackend:
    from services.runtime.backends.onnx_backend import OnnxRewardBackend

    check_onnx_settings(settings)
    if settings.model is not None:
        export_dir = settings.model
    else:
        # The embedded default: export it once into the cache (about a minute), then reuse it.
        from services.runtime.default_model import default_model_dir
        from services.runtime.onnx_export import cached_export

        log.info("exporting the embedded default model to ONNX (once; cached)")
        export_dir = cached_export(default_model_dir())
    return OnnxRewardBackend(
        export_dir,
        device=settings.device,
        max_length=settings.max_length,
        threads=settings.threads,
        model_id=settings.model_id,
    )
