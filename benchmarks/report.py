"""Results of ``bench reward`` as JSON, a Markdown table, a PNG chart and the README block."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.readme import replace_block


def _f(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


MODEL_NAMES = {
    "default": "SmolLM2-135M reward model (the embedded default)",
    "tiny": "tiny reward model (random 4-layer Llama, hidden 256, SmolLM2 tokenizer)",
}


def markdown(res: dict[str, Any]) -> str:
    """Tables: servers vs the limit per load and transport, the limit per budget, GRPO, parity."""
    cfg, texts, limit = res["config"], res["texts"], res["limit"]
    lines = [
        f"{MODEL_NAMES.get(cfg['model'], '`' + cfg['model'] + '`')}, {cfg['dtype']}, {cfg['threads']} threads, "
        f"{texts['count']} texts ({texts['min_tokens']}–{texts['max_tokens']} tokens, median "
        f"{texts['median_tokens']:.0f}); {cfg['repeats']} interleaved round{'s' if cfg['repeats'] != 1 else ''} "
        "(limit, then every server run), medians; × limit = median over rounds of run / same-round limit. "
        "In-process limit: length-sorted batches of "
        f"≤ {limit['best_budget']} padded tokens (the best of {', '.join(map(str, cfg['budgets']))}), "
        f"{_f(limit['best_samples_per_s'])} samples/s, {limit['best_tokens_per_s']:.0f} tokens/s. "
        f"`serve reward --max-batch-tokens {cfg['server_max_batch_tokens']}`.",
        "",
        "| server | transport | load (clients×items) | samples/s | × limit | real tokens/s "
        "| p50 ms | p99 ms | padding | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in res["summary"]:
        lines.append(
            f"| {s['server']} | {s['transport']} | {s['load']} | {_f(s['samples_per_s'])} | "
            f"{_f(s['ratio_to_limit'])} | {s['tokens_per_s']:.0f} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | "
            f"{_pct(s['padding'])} | {s['errors']} |"
        )
    lines += ["", "| limit: token budget | " + " | ".join(map(str, cfg["budgets"])) + " |"]
    lines.append("|---|" + "---:|" * len(cfg["budgets"]))
    by = limit["samples_per_s_by_budget"]
    lines.append("| samples/s | " + " | ".join(_f(by[str(b)]) for b in cfg["budgets"]) + " |")
    if "grpo" in res:
        g = res["grpo"]
        lines += [
            "",
            f"GRPO-shaped load: {g['prompts']} real HH prompts × G = {g['group_size']} responses, "
            f"one prompt per request, {g['clients']} clients; items ≤ {g.get('max_tokens', '?')} tokens, "
            f"prompts ≥ {g.get('min_prompt_tokens', 0)} tokens (mean prompt {g.get('prompt_tokens_mean', 0):.0f}, "
            f"mean item {g.get('item_tokens_mean', 0):.0f} tokens).",
            "",
            "| transport | prefix sharing samples/s | --no-prefix-sharing samples/s | speedup | errors |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in g["summary"]:
            lines.append(
                f"| {s['transport']} | {_f(s['prefix_sharing_samples_per_s'])} | "
                f"{_f(s['no_prefix_sharing_samples_per_s'])} | {_f(s['speedup'])}× | {s['errors']} |"
            )
    if "parity" in res:
        p = res["parity"]
        worst = [v for v in p["max_abs_diff"].values()]
        shown = "missing scores" if any(v is None for v in worst) else f"{max(worst, default=0.0):.2e}"
        what = f"{p['texts']} texts" + (f" and {p['grpo_items']} GRPO items" if "grpo_items" in p else "")
        lines += [
            "",
            f"Scores vs transformers' unbatched single-sequence forward ({what}, every server, transport "
            f"and load): max |Δ| = {shown}.",
        ]
    return "\n".join(lines) + "\n"


def machine_line(res: dict[str, Any]) -> str:
    m = res["machine"]
    capability = m.get("cpu_capability", "capability not recorded")
    return (
        f"{m['cpu']} ({capability}), {m['cores']} cores, torch {m['torch']}, Python {m['python']}, "
        f"{m['platform']}, {m['date']}"
    )


def readme_block(res: dict[str, Any]) -> str:
    """The README block's body: the tables, the command that reproduces them, the machine."""
    return f"{markdown(res)}\nReproduce: `{res['command']}`\n\nMachine: {machine_line(res)}."


def update_readme(path: Path, res: dict[str, Any], block: str = "reward") -> None:
    """Replace the ``block`` between its bench markers (exactly one pair, start before end)."""
    replace_block(path, block, readme_block(res))


def chart(res: dict[str, Any], path: Path) -> None:
    """Bars of samples/s per server, grouped by transport/load; the best limit as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = res["summary"]
    groups = list(dict.fromkeys(f"{s['transport']} {s['load']}" for s in summary))
    servers = list(dict.fromkeys(s["server"] for s in summary))
    width = 0.8 / max(1, len(servers))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.0))
    for i, name in enumerate(servers):
        values = [
            next(
                (s["samples_per_s"] for s in summary if s["server"] == name and f"{s['transport']} {s['load']}" == g),
                0.0,
            )
            for g in groups
        ]
        ax.bar([k + (i - (len(servers) - 1) / 2) * width for k in range(len(groups))], values, width, label=name)
    lim = res["limit"]
    ax.axhline(
        lim["best_samples_per_s"],
        color="black",
        linestyle="--",
        label=f"in-process limit ({lim['best_budget']} tokens)",
    )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("samples/s")
    ax.set_title(f"reward service, {res['config']['model']} {res['config']['dtype']}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(res: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "png": out / "results.png"}
    paths["json"].write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(res), encoding="utf-8")
    chart(res, paths["png"])
    return paths
