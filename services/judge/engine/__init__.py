"""The judge engine: protocols (both orders, soft labels, rank, grade, principles), cache, limiter, budgets."""

from services.judge.engine.cache import JudgeCache
from services.judge.engine.clock import Clock, FakeClock, SystemClock
from services.judge.engine.config import DEFAULT_PRICES, JudgeEngineConfig
from services.judge.engine.service import JudgeEngine, JudgeLimits

__all__ = [
    "DEFAULT_PRICES",
    "Clock",
    "FakeClock",
    "JudgeCache",
    "JudgeEngine",
    "JudgeEngineConfig",
    "JudgeLimits",
    "SystemClock",
]
