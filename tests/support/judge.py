"""Shared set-up of the judge transport tests: a real JudgeEngine over the scripted fake backend."""

from __future__ import annotations

from typing import Any

from services.judge.backends.scripted import ScriptedBackend
from services.judge.engine.service import JudgeEngine
from services.judge.metrics import JudgeMetrics
from services.judge.settings import JudgeSettings

GOOD = "Paris is the capital of France. [good]"
BAD = "I think it is Lyon. [bad]"


def judge_settings(**kw: Any) -> JudgeSettings:
    """Settings for in-process tests: no cache, no retries (nothing sleeps), small limits."""
    base: dict[str, Any] = {"cache": "off", "max_retries": 0, "max_parse_retries": 0}
    return JudgeSettings.model_validate({**base, **kw})


def judge_engine(backend: ScriptedBackend, settings: JudgeSettings) -> JudgeEngine:
    return JudgeEngine(lambda: backend, settings.engine_config(), cache=None, metrics=JudgeMetrics())


def sample(engine: JudgeEngine, name: str, **labels: str) -> float | None:
    return engine.metrics.registry.get_sample_value(name, labels)
