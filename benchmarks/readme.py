"""What every bench writes beside its numbers: the machine they were measured on, and the
README block (between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``) they replace."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
from pathlib import Path
from typing import Any


class ReadmeBlockError(ValueError):
    """The README has no (or a malformed) block to replace."""


def markers(block: str) -> tuple[str, str]:
    """The start and end comments of a README block (``reward``, ``reward-tiny``, ``judge``, ...)."""
    return f"<!-- bench:{block}:start -->", f"<!-- bench:{block}:end -->"


def check_block(readme: Path, block: str) -> str:
    """The README's text; raises ReadmeBlockError unless it has exactly one start/end marker pair."""
    first, last = markers(block)
    try:
        content = readme.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReadmeBlockError(f"cannot read {readme}: {exc.strerror or exc}") from None
    start, end = content.count(first), content.count(last)
    if start != 1 or end != 1 or content.index(first) > content.index(last):
        raise ReadmeBlockError(
            f"{readme} needs exactly one '{first}' followed by one '{last}' line "
            f"(found {start} and {end}); add them where the {block} results belong"
        )
    return content


def replace_block(readme: Path, block: str, text: str) -> None:
    """Replace what lies between the ``block`` markers in ``readme`` with ``text``."""
    content = check_block(readme, block)
    first, last = markers(block)
    pattern = re.compile(re.escape(first) + r".*?" + re.escape(last), re.S)
    replacement = f"{first}\n{text.rstrip()}\n{last}"
    readme.write_text(pattern.sub(lambda _m: replacement, content, count=1), encoding="utf-8")


def machine() -> dict[str, Any]:
    """CPU model and capability, cores, torch version and threads, GPU (if any), Python, platform, the time.

    The capability (torch's vector ISA, native bf16 or not) is recorded because machines of the
    same kind differ: bf16 is about 2x faster than float32 on an AVX-512 BF16 CPU and several
    times slower on an AVX2-only one.
    """
    import torch

    from services.runtime.device import cpu_capability

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_capability": cpu_capability(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
