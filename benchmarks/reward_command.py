"""``rlhf-feedback bench reward``: our server vs the naive server vs the in-process limit.

Example (the README's performance section):

    rlhf-feedback bench reward --model default --texts hh --num-texts 128 --max-tokens 256 \\
        --loads 32x8,64x1 --transports http,grpc --repeats 3 --parity 16 --grpo 8 \\
        --out bench-results --update-readme README.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.loadgen import TRANSPORTS, Load

DEFAULTS: dict[str, Any] = {
    "num_texts": 128,
    "max_tokens": 256,
    "loads": "32x8,64x1",
    "budgets": "256,512,1024",
    "repeats": 3,
    "parity": 0,
    "grpo_prompts": 16,
}
# --quick: a smoke run in seconds (tests, checking a set-up); any flag given explicitly wins.
QUICK: dict[str, Any] = {
    "num_texts": 16,
    "max_tokens": 64,
    "loads": "4x2,8x1",
    "budgets": "128,256",
    "repeats": 1,
    "parity": 8,
    "grpo_prompts": 4,
}


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = kinds.add_parser(
        "reward",
        help="Reward service throughput and latency vs a naive server and the in-process limit.",
        description="Drive `serve reward` and a naive one-forward-per-request server with C concurrent "
        "clients × K items per request over HTTP and gRPC, and measure the in-process limit (the same "
        "texts, length-sorted token-budget batches, no server), interleaved over --repeats rounds. "
        "Writes results.json, results.md and results.png to --out.",
        epilog="example (the README's performance section):\n"
        "  rlhf-feedback bench reward --model default --repeats 3 --parity 16 --grpo 8 \\\n"
        "      --out bench-results/reward --update-readme README.md\n"
        "quick check: rlhf-feedback bench reward --model tiny --quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="default",
        help="default (embedded SmolLM2-135M RM), tiny (random 4-layer "
        "Llama with SmolLM2's tokenizer, built once into the cache) or a checkpoint folder. [default]",
    )
    p.add_argument(
        "--texts",
        default="hh",
        help='hh (HH-RLHF dialogues from --data-dir) or a JSONL file with "text" or "prompt" + "response" rows. [hh]',
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data/hh-rlhf"),
        help="Folder with the HH-RLHF *.test.jsonl.gz files. [../shared/data/hh-rlhf]",
    )
    p.add_argument("--num-texts", type=int, help=f"Texts per run, each scored once. [{DEFAULTS['num_texts']}]")
    p.add_argument(
        "--max-tokens", type=int, help=f"Token cap; longer texts lose tokens from the left. [{DEFAULTS['max_tokens']}]"
    )
    p.add_argument("--loads", help=f"Comma-separated CLIENTSxITEMS loads. [{DEFAULTS['loads']}]")
    p.add_argument("--transports", default="http,grpc", help="Comma-separated: http, grpc. [http,grpc]")
    p.add_argument("--servers", default="ours,naive", help="Comma-separated: ours, naive. [ours,naive]")
    p.add_argument("--budgets", help=f"Token budgets of the in-process limit. [{DEFAULTS['budgets']}]")
    p.add_argument(
        "--max-batch-tokens",
        default="auto",
        help="`serve reward --max-batch-tokens`: a number, or auto (the best limit budget). [auto]",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help=f"Interleaved rounds (limit, servers, ...); medians reported. [{DEFAULTS['repeats']}]",
    )
    p.add_argument(
        "--limit-best-only",
        action="store_true",
        help="After the first round, measure the limit at the first round's best budget only (faster).",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="[float32]")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] for servers and limit. [cpu]")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process (0: torch's choice). [2]")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="Extra flag for `serve reward` (repeat; use --server-arg=--flag for dashes).",
    )
    p.add_argument(
        "--parity",
        type=int,
        help="Check this many texts' scores from each server against "
        "transformers' unbatched forward (max |Δ| in the report). [0; --quick: 8]",
    )
    p.add_argument(
        "--parity-tolerance", type=float, default=1e-4, help="Largest |Δ| that passes (exit 1 beyond). [1e-4]"
    )
    p.add_argument(
        "--grpo",
        type=int,
        default=0,
        metavar="G",
        help="Add the GRPO-shaped load: real HH prompts × G "
        "responses per request, ours vs ours --no-prefix-sharing. [off]",
    )
    p.add_argument("--grpo-prompts", type=int, help=f"Prompts of the GRPO load. [{DEFAULTS['grpo_prompts']}]")
    p.add_argument("--grpo-clients", type=int, default=8, help="Concurrent clients of the GRPO load. [8]")
    p.add_argument(
        "--grpo-max-tokens",
        type=int,
        default=None,
        help="Token cap of each GRPO item (prompt + response). [--max-tokens]",
    )
    p.add_argument(
        "--grpo-min-prompt-tokens",
        type=int,
        default=0,
        help="Use only HH prompts whose rendered prompt (after fitting the cap) has at least this many tokens. [0]",
    )
    p.add_argument("--seed", type=int, default=0, help="Text sample seed. [0]")
    p.add_argument("--timeout", type=float, default=600.0, help="Seconds for a server start or one request. [600]")
    p.add_argument(
        "--out", type=Path, default=Path("bench-results/reward"), help="Output folder. [bench-results/reward]"
    )
    p.add_argument(
        "--update-readme",
        type=Path,
        metavar="README",
        help="Replace the <!-- bench:reward:start/end --> "
        "block of this file with the results, the command and the machine.",
    )
    p.add_argument(
        "--readme-block",
        default="reward",
        metavar="NAME",
        help="Which block --update-readme replaces: <!-- bench:NAME:start/end -->. [reward]",
    )
    p.add_argument("--quick", action="store_true", help="Small smoke-test sizes (explicit flags still win).")
    p.set_defaults(run=run)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{what} must be positive integers; got {text!r}")
    return values


def _names(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise ValueError(f"{what}: unknown {bad or text!r}; expected some of {', '.join(allowed)}")
    return names


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> Any:
    """Validate the flags into a :class:`BenchConfig` (ValueError with a one-line message)."""
    from benchmarks.models import resolve_model
    from benchmarks.runner import SERVERS, BenchConfig

    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    get = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]  # noqa: E731
    for name in ("num_texts", "max_tokens", "repeats", "grpo_prompts", "grpo_clients"):
        if get(name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.grpo < 0 or get("parity") < 0:
        raise ValueError("--grpo and --parity cannot be negative")
    loads = [Load.parse(x) for x in get("loads").split(",") if x.strip()]
    mbt = None if args.max_batch_tokens == "auto" else _ints(args.max_batch_tokens, "--max-batch-tokens")[0]
    transports = _names(args.transports, TRANSPORTS, "--transports")
    servers = _names(args.servers, SERVERS, "--servers")
    budgets = _ints(get("budgets"), "--budgets")
    try:
        model_dir = resolve_model(args.model)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    command = "rlhf-feedback bench reward " + shlex.join(argv if argv is not None else sys.argv[3:])
    return BenchConfig(
        model=args.model,
        model_dir=model_dir,
        out=args.out,
        texts=args.texts,
        data_dir=args.data_dir,
        num_texts=get("num_texts"),
        max_tokens=get("max_tokens"),
        loads=loads,
        transports=transports,
        servers=servers,
        budgets=budgets,
        max_batch_tokens=mbt,
        repeats=get("repeats"),
        limit_best_only=args.limit_best_only,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads or None,
        server_args=list(args.server_arg),
        parity=get("parity"),
        parity_tolerance=args.parity_tolerance,
        grpo=args.grpo,
        grpo_prompts=get("grpo_prompts"),
        grpo_clients=args.grpo_clients,
        grpo_max_tokens=args.grpo_max_tokens,
        grpo_min_prompt_tokens=args.grpo_min_prompt_tokens,
        seed=args.seed,
        timeout=args.timeout,
        command=command.strip(),
    )


def run(args: argparse.Namespace) -> int:
    from benchmarks import report
    from benchmarks.runner import Bench
    from benchmarks.texts import TextsError

    prog = "rlhf-feedback bench reward"
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.update_readme is not None and not args.update_readme.is_file():
        print(f"{prog}: {args.update_readme}: no such file", file=sys.stderr)
        return 2
    started = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        results = Bench(cfg, progress).run()
    except (TextsError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:  # a server died, did not start, or refused the load
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    paths = report.write_all(results, cfg.out)
    if args.update_readme is not None:
        try:
            report.update_readme(args.update_readme, results, args.readme_block)
        except ValueError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    print(report.markdown(results))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    bad = sum(s["errors"] for s in results["summary"]) + sum(
        s["errors"] for s in results.get("grpo", {}).get("summary", [])
    )
    if bad:
        print(f"{prog}: {bad} items failed (see results.json, first_error)", file=sys.stderr)
    parity = results.get("parity")
    if parity is not None and not parity["ok"]:
        print(
            f"{prog}: scores differ from the unbatched reference by more than {args.parity_tolerance}", file=sys.stderr
        )
    return 1 if bad or (parity is not None and not parity["ok"]) else 0
