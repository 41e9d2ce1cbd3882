"""``rlhf-feedback bench judge``: the local judge's protocol vs generate, and a provider's RPM share.

Two parts (both by default; ``--local`` or ``--provider`` picks one):

- local (:mod:`benchmarks.judge_local`): pairs/s of the service's batched one-forward logprob
  protocol vs HF ``generate`` of up to 8 tokens per order, one pair at a time, on the same model,
  HH-RLHF pairs and verdict prompts; the speed-up and the agreement between the two.
- provider (:mod:`benchmarks.judge_provider`): ``serve judge`` against an emulated provider
  with a fixed latency and a strict RPM, overloaded by concurrent callers; the share of the RPM
  sustained and the 429s that reached callers.

Writes ``judge.json``, ``judge.md`` and ``judge.png`` to ``--out`` and prints the table;
``--update-readme README.md`` puts the table, the command and the machine between
``<!-- bench:judge:start -->`` and ``<!-- bench:judge:end -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rlhf_train.cli_env import EnvDefaults

ENV_PREFIX = "RLHF_FEEDBACK_BENCH_JUDGE_"
_env = EnvDefaults(ENV_PREFIX)
DEFAULT_DATA = Path("../shared/data/hh-rlhf")
# The done-when thresholds (reported in the JSON; --check turns a miss into exit 1).
MIN_SPEEDUP = 5.0
MIN_SHARE = 0.95


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = kinds.add_parser(
        "judge",
        help="Judge: batched logprob protocol vs generate-per-pair; share of a provider's RPM sustained.",
        description="Measure (1) the local judge's batched one-forward logprob protocol against HF generate "
        "(up to 8 tokens per order, one pair at a time, letter parsed) on the same model, pairs and prompts, "
        "and (2) `serve judge` against an emulated OpenAI-compatible provider with a fixed latency and a "
        "strict RPM: the share of the RPM sustained and the 429s that reach callers. Both parts run unless "
        f"--local or --provider is given. Every flag also reads {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PAIRS).",
    )
    p.add_argument("--local", action="store_true", help="Run the local protocol-vs-generate part.")
    p.add_argument("--provider", action="store_true", help="Run the provider RPM part.")
    g = p.add_argument_group("local judge")
    g.add_argument("--pairs", type=int, default=int(_env("pairs", 64)), help="HH-RLHF pairs to judge (default 64).")
    g.add_argument(
        "--data", type=Path, default=Path(_env("data", DEFAULT_DATA)),
        help=f"HH-RLHF folder with the *.test.jsonl.gz files (default {DEFAULT_DATA}).",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=int(_env("seed", 0)), help="Seed of the pair sample (default 0).")
    g.add_argument(
        "--model", default=_env("model", None),
        help="Causal LM folder for the local judge (default: the embedded SmolLM2-135M-Instruct).",
    )  # fmt: skip
    g.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=_env("dtype", "float32"),
        help="Weights and compute dtype (default float32, as serve judge --backend local).",
    )  # fmt: skip
    g.add_argument("--device", default=_env("device", "auto"), help="cpu, cuda, cuda:N or auto (default auto).")
    g.add_argument(
        "--threads", type=int, default=_env("threads", None), help="torch intra-op threads (default: torch's choice)."
    )
    g.add_argument(
        "--max-batch-tokens", type=int, default=int(_env("max_batch_tokens", 8192)),
        help="Token budget of one batched forward (default 8192, as serve judge).",
    )  # fmt: skip
    r = p.add_argument_group("provider")
    r.add_argument("--rpm", type=float, default=float(_env("rpm", 600)), help="Provider RPM and judge --rpm (600).")
    r.add_argument(
        "--latency-ms", type=float, default=float(_env("latency_ms", 300)), help="Provider latency (default 300 ms)."
    )
    r.add_argument(
        "--duration", type=float, default=float(_env("duration", 60)),
        help="Seconds the callers keep submitting (default 60; at least 30 for meaningful numbers).",
    )  # fmt: skip
    r.add_argument(
        "--callers", type=int, default=int(_env("callers", 64)), help="Concurrent callers (default 64; demand >> RPM)."
    )
    r.add_argument(
        "--provider-window-s", type=float, default=float(_env("provider_window_s", 60)),
        help="Sliding window the provider enforces its RPM over (default 60; 10 = enforced in 10 s slices).",
    )  # fmt: skip
    r.add_argument(
        "--exclude-s", type=float, default=float(_env("exclude_s", 10)),
        help="Seconds at the start left out of the sustained share (default 10: the limiter's first window).",
    )  # fmt: skip
    r.add_argument(
        "--max-concurrency", type=int, default=_env("max_concurrency", None),
        help="The judge's --max-concurrency (default: enough for RPM x latency, at least 16).",
    )  # fmt: skip
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=Path(_env("out", "bench-results")), help="Output folder.")
    o.add_argument(
        "--update-readme", type=Path, default=_env("update_readme", None), metavar="README",
        help="Replace the block between <!-- bench:judge:start --> and <!-- bench:judge:end --> in this file.",
    )  # fmt: skip
    o.add_argument("--no-plot", action="store_true", help="Skip judge.png.")
    o.add_argument("--check", action="store_true", help="Exit 1 when a done-when threshold is missed.")
    p.set_defaults(run=run)


def _usage_error(message: str) -> int:
    print(f"rlhf-feedback bench judge: {message}", file=sys.stderr)
    return 2


def _validate(args: argparse.Namespace) -> str | None:
    if args.local:
        if args.pairs < 1:
            return "--pairs must be at least 1"
        if args.threads is not None and int(args.threads) < 1:
            return "--threads must be at least 1"
        if args.max_batch_tokens < 1:
            return "--max-batch-tokens must be at least 1"
        if args.model is not None and not (Path(args.model) / "config.json").is_file():
            return f"--model {args.model} is not a Hugging Face checkpoint folder (no config.json)"
    if args.provider:
        if args.rpm <= 0:
            return "--rpm must be > 0"
        if args.latency_ms < 0:
            return "--latency-ms must be >= 0"
        if args.duration <= 0:
            return "--duration must be > 0"
        if args.callers < 1:
            return "--callers must be at least 1"
        if args.provider_window_s <= 0:
            return "--provider-window-s must be > 0"
        if args.exclude_s < 0:
            return "--exclude-s must be >= 0"
        if args.max_concurrency is not None and int(args.max_concurrency) < 1:
            return "--max-concurrency must be at least 1"
    if args.update_readme is not None and not Path(args.update_readme).is_file():
        return f"--update-readme {args.update_readme}: no such file"
    return None


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run (every measured setting explicit)."""
    parts = ["rlhf-feedback", "bench", "judge"]
    if args.local and not args.provider:
        parts.append("--local")
    if args.provider and not args.local:
        parts.append("--provider")
    if args.local:
        parts += ["--pairs", str(args.pairs), "--seed", str(args.seed), "--dtype", args.dtype]
        if args.data != DEFAULT_DATA:
            parts += ["--data", str(args.data)]
        if args.model:
            parts += ["--model", str(args.model)]
        if args.device != "auto":
            parts += ["--device", args.device]
        if args.threads is not None:
            parts += ["--threads", str(args.threads)]
    if args.provider:
        parts += [
            "--rpm", f"{args.rpm:g}", "--latency-ms", f"{args.latency_ms:g}", "--duration", f"{args.duration:g}",
            "--callers", str(args.callers),
        ]  # fmt: skip
        if args.provider_window_s != 60:
            parts += ["--provider-window-s", f"{args.provider_window_s:g}"]
        if args.max_concurrency is not None:
            parts += ["--max-concurrency", str(args.max_concurrency)]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    from benchmarks.judge_local import BenchInputError, load_hh_pairs, run_local
    from benchmarks.judge_provider import run_provider
    from benchmarks.judge_report import markdown, plot
    from benchmarks.readme import ReadmeBlockError, check_block, machine, replace_block

    if not args.local and not args.provider:
        args.local = args.provider = True
    problem = _validate(args)
    if problem:
        return _usage_error(problem)
    if args.update_readme is not None:
        try:  # a README without the markers is a usage error: find out before the long run
            check_block(Path(args.update_readme), "judge")
        except ReadmeBlockError as exc:
            return _usage_error(str(exc))

    def say(msg: str) -> None:
        print(f"bench judge: {msg}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {"command": command_line(args)}
    if args.local:
        try:
            pairs = load_hh_pairs(args.data, args.pairs, seed=args.seed)
            result["local"] = run_local(
                pairs, model_dir=args.model, dtype=args.dtype, device=args.device,
                threads=None if args.threads is None else int(args.threads), max_batch_tokens=args.max_batch_tokens,
                progress=say,
            )  # fmt: skip
        except BenchInputError as exc:
            return _usage_error(str(exc))
    if args.provider:
        if args.duration < 30:
            say(f"--duration {args.duration:g} is under 30 s: the share is noisy (the limiter's window is 10 s)")
        result["provider"] = run_provider(
            rpm=args.rpm, latency_ms=args.latency_ms, duration_s=args.duration, callers=args.callers,
            window_s=args.provider_window_s, exclude_s=args.exclude_s,
            max_concurrency=None if args.max_concurrency is None else int(args.max_concurrency),
            log_dir=args.out / "judge-logs", progress=say,
        )  # fmt: skip
    result["machine"] = machine()
    result["criteria"] = criteria(result)

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    (args.out / "judge.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "judge.md").write_text(table, encoding="utf-8")
    if not args.no_plot and plot(result, args.out / "judge.png"):
        say(f"wrote {args.out / 'judge.png'}")
    print(table)
    if args.update_readme is not None:
        try:
            replace_block(Path(args.update_readme), "judge", table)
        except ReadmeBlockError as exc:
            return _usage_error(str(exc))
        say(f"updated {args.update_readme}")
    missed = [name for name, ok in result["criteria"].items() if ok is False]
    if missed:
        say("missed: " + ", ".join(missed))
    return 1 if args.check and missed else 0


def criteria(result: dict[str, Any]) -> dict[str, bool | None]:
    """The issue's done-when items, each True/False (None when its part did not run)."""
    local, prov = result.get("local"), result.get("provider")
    return {
        f"local_speedup_at_least_{MIN_SPEEDUP:g}x": None if not local else local["speedup"] >= MIN_SPEEDUP,
        f"provider_share_at_least_{MIN_SHARE:.0%}": None if not prov else prov["sustained_share"] >= MIN_SHARE,
        "zero_429s_to_callers": None if not prov else prov["caller_429s"] == 0,
        "no_caller_failures": None if not prov else prov["caller_failures"] == 0,
    }
