"""``bench judge`` output: a Markdown table and a PNG (the machine and README block: benchmarks.readme)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
        f"Machine: {m['cpu']} ({m.get('cpu_capability', 'capability not recorded')}), "
        f"{m['cores']} cores ({m['usable_cores']} usable), torch {m['torch']}{gpu}, "
        f"Python {m['python']}, {m['date']}.",
    ]
    return "\n".join(lines) + "\n"


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
