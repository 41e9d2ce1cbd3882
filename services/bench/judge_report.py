"""``bench judge`` output: the machine, a Markdown table, a PNG, and the README block."""

from __future__ import annotations

import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

README_START = "<!-- bench:judge:start -->"
README_END = "<!-- bench:judge:end -->"


class ReadmeBlockError(ValueError):
    """The README has no (or a malformed) ``bench:judge`` block to replace."""


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version, GPU (if any) and the date: what a number was measured on."""
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
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a dependency
        info["torch"] = None
    return info


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables (one per part that ran), then the command and the machine."""
    lines: list[str] = []
    local = result.get("local")
    if local:
        p, g = local["protocol"], local["generate"]
        lines += [
            f"Local judge ({local['model']}, {local['dtype']}, {local['device']}, {local['pairs']} HH-RLHF pairs, "
            f"both orders, verdict prompts of {local['prompt_tokens']['mean']:.0f} tokens on average):",
            "",
            "| method | pairs/s | seconds |",
            "|---|---:|---:|",
            f"| batched one-forward logprob protocol (the service) | {_f(p['pairs_per_s'])} | {_f(p['seconds'], 1)} |",
            f"| HF `generate` ≤8 tokens per order, one pair at a time, letter parsed | {_f(g['pairs_per_s'])} | "
            f"{_f(g['seconds'], 1)} |",
            "",
            f"Speed-up **{local['speedup']:.1f}×**; same prompts: {'yes' if local['same_prompts'] else 'NO'}; "
            f"agreement: verdict letters {local['agreement']['verdicts']:.1%}, pair winners "
            f"{local['agreement']['winners']:.1%}; unparsed generated verdicts: {g['unparsed_verdicts']}.",
            "",
        ]
    prov = result.get("provider")
    if prov:
        lines += [
            f"Judge service vs an emulated provider ({prov['latency_ms']:g} ms latency, {prov['rpm']:g} RPM enforced "
            f"over a sliding {prov['provider_window_s']:g} s window), {prov['callers']} callers for "
            f"{prov['duration_s']:g} s, `--rpm {prov['rpm']:g}`:",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| share of RPM sustained (steady part, {prov['steady_window_s'][0]:g}–{prov['steady_window_s'][1]:g} s) "
            f"| **{prov['sustained_share']:.1%}** ({_f(prov['sustained_rpm'], 1)} calls/min) |",
            f"| share of RPM over the whole run | {prov['run_share']:.1%} |",
            f"| busiest 10 s at the provider (the limiter allows RPM/6) | {prov['busiest_10s']['accepted']} / "
            f"{prov['busiest_10s']['limit']:g} |",
            f"| 429s the provider sent the service (retried by it) | {prov['provider_429s']} |",
            f"| 429s that reached callers | **{prov['caller_429s']}** |",
            f"| other caller errors / abstains | {prov['caller_outcomes']['errors']} / "
            f"{prov['caller_outcomes']['abstained']} |",
            f"| compares answered | {prov['caller_outcomes']['ok']} |",
            f"| caller latency p50 / p95 (s) | {_f(prov['caller_latency_s']['p50'])} / "
            f"{_f(prov['caller_latency_s']['p95'])} |",
            "",
        ]
    m = result["machine"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    lines += [
        f"Reproduce: `{result['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), torch {m['torch']}{gpu}, "
        f"Python {m['python']}, {m['date']}.",
    ]
    return "\n".join(lines) + "\n"


def replace_readme_block(readme: Path, text: str) -> None:
    """Replace what lies between the ``bench:judge`` markers in ``readme`` with ``text``."""
    content = check_readme_block(readme)
    pattern = re.compile(re.escape(README_START) + r".*?" + re.escape(README_END), re.S)
    block = f"{README_START}\n{text.rstrip()}\n{README_END}"
    readme.write_text(pattern.sub(lambda _m: block, content, count=1), encoding="utf-8")


def check_readme_block(readme: Path) -> str:
    """The README's text; raises ReadmeBlockError unless it has exactly one start/end marker pair."""
    try:
        content = readme.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReadmeBlockError(f"cannot read {readme}: {exc.strerror or exc}") from None
    start, end = content.count(README_START), content.count(README_END)
    if start != 1 or end != 1 or content.index(README_START) > content.index(README_END):
        raise ReadmeBlockError(
            f"{readme} needs exactly one '{README_START}' followed by one '{README_END}' line "
            f"(found {start} and {end}); add them where the judge results belong"
        )
    return content


def plot(result: dict[str, Any], path: Path) -> bool:
    """A two-panel PNG (pairs/s per method; RPM share and 429s); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    local, prov = result.get("local"), result.get("provider")
    panels = [x for x in (local, prov) if x]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    i = 0
    if local:
        ax = axes[0][i]
        i += 1
        values = [local["protocol"]["pairs_per_s"], local["generate"]["pairs_per_s"]]
        ax.bar(["logprob protocol\n(batched)", "generate + parse\n(per pair)"], values, color=["#2a7", "#999"])
        ax.set_ylabel("pairs/s")
        ax.set_title(f"Local judge: {local['speedup']:.1f}× faster")
    if prov:
        ax = axes[0][i]
        ax.bar(["sustained", "whole run"], [100 * prov["sustained_share"], 100 * prov["run_share"]], color="#27a")
        ax.axhline(100, color="k", lw=0.8, ls="--")
        ax.set_ylim(0, 110)
        ax.set_ylabel("% of provider RPM")
        ax.set_title(f"RPM {prov['rpm']:g}: 429s to callers {prov['caller_429s']}, to service {prov['provider_429s']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
