"""The judge engine: admission (service), protocols (both orders, rank, grade, principles), the
verdict caller (cache, single flight, limiter, retries, pricing), validation, budgets."""

from services.judge.clock import Clock, FakeClock, SystemClock
from services.judge.engine.cache import JudgeCache
from services.judge.engine.config import DEFAULT_PRICES, GRADE_SCALE_BOUNDS, JudgeEngineConfig, JudgeLimits
from services.judge.engine.service import JudgeEngine

__all__ = [
    "DEFAULT_PRICES",
    "GRADE_SCALE_BOUNDS",
    "Clock",
    "FakeClock",
    "JudgeCache",
    "JudgeEngine",
    "JudgeEngineConfig",
    "JudgeLimits",
    "SystemClock",
]
