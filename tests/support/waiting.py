"""Polling for a condition another task or thread makes true (queue depths, metrics, counters).

Prefer events where the code under test offers one; poll only for state it exposes as a value.
The timeout is generous on purpose: it bounds a hang, it is not a performance assertion.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0, interval: float = 0.005) -> None:
    """Return once ``cond()`` is true; fail the test if it is still false after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"condition not reached in {timeout:.0f} s"
        await asyncio.sleep(interval)
