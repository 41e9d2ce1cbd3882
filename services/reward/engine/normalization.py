"""Optional score normalisation: raw scores stay raw, ``normalized`` is added beside them."""

from __future__ import annotations

import math
import threading

from services.reward.engine.results import NormalizationInfo


class Normalizer:
    """Static (given mean/std) or running (Welford over every score this replica produced)."""

    def __init__(self, mean: float | None = None, std: float | None = None) -> None:
        self._static = mean is not None and std is not None
        self._mean = mean if mean is not None else 0.0
        self._std = std if std is not None else 1.0
        if self._static and not (self._std > 0 and math.isfinite(self._std)):
            raise ValueError("normalisation std must be a positive number")
        self._n = 0
        self._m2 = 0.0
        self._lock = threading.Lock()

    def observe(self, scores: list[float]) -> None:
        if self._static:
            return
        with self._lock:
            for x in scores:
                self._n += 1
                delta = x - self._mean
                self._mean += delta / self._n
                self._m2 += delta * (x - self._mean)
            if self._n > 1:
                self._std = math.sqrt(self._m2 / (self._n - 1)) or 1.0

    def info(self) -> NormalizationInfo:
        with self._lock:
            return NormalizationInfo(self._mean, self._std, "static" if self._static else "running")

    def apply(self, score: float, info: NormalizationInfo) -> float:
        return (score - info.mean) / info.std
