"""Tokenizers that several threads can use at once: one private copy per thread.

A Hugging Face fast tokenizer is not safe to call from two threads at the same time: every
call that truncates or pads reconfigures the shared Rust object (``RefCell already borrowed``
panics, or one call truncating with another's settings). Rather than one tokenizer thread
that a single huge request can hold for everybody, each worker of a small pool tokenizes with
its own deep copy, made on that thread's first call (a copy of the SmolLM2 tokenizer takes
about 70 ms and a few MB).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

S = TypeVar("S")

DEFAULT_TOKENIZE_WORKERS = max(1, min(4, os.cpu_count() or 1))


class PerThread(Generic[S]):
    """``get()`` returns this thread's own copy of a prototype (built with ``make``)."""

    def __init__(self, prototype: S, make: Callable[[S], S] | None = None) -> None:
        self._prototype = prototype
        self._make = make or copy.deepcopy
        self._local = threading.local()
        self._lock = threading.Lock()  # a copy reads the prototype: never while another copies it

    def get(self) -> S:
        state: S | None = getattr(self._local, "state", None)
        if state is None:
            with self._lock:
                state = self._make(self._prototype)
            self._local.state = state
        return state


def tokenize_pool(workers: int, name: str) -> ThreadPoolExecutor:
    """The executor tokenization runs in: off the event loop and off the model thread."""
    if workers < 1:
        raise ValueError(f"tokenize workers must be at least 1, got {workers}")
    return ThreadPoolExecutor(workers, thread_name_prefix=name)
