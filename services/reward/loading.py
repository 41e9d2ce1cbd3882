"""Choose and load the backend a reward server runs (the embedded default when no --model)."""

from __future__ import annotations

from services.reward.backends.base import RewardBackend
from services.reward.settings import RewardSettings


def load_backend(settings: RewardSettings) -> RewardBackend:
    """Load ``--model`` (or assemble the embedded default) with the configured backend."""
    from services.reward.backends.torch_backend import TorchRewardBackend

    if settings.model is not None:
        model_dir = settings.model
    else:
        from services.reward.default_model import default_model_dir

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
