"""The judge engine: protocols (both orders, soft labels, rank, grade, principles), cache, limiter, budgets."""

from .cache import JudgeCache
from .clock import Clock, FakeClock, SystemClock
from .config import DEFAULT_PRICES, JudgeEngineConfig
from .service import JudgeEngine, JudgeLimits

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
