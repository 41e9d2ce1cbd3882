"""``rlhf-feedback bench agreement``: backends vs float32 torch on real preference pairs."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchmarks.agreement import BACKENDS, DEFAULT_BACKENDS, MIN_AGREEMENT


def register(kinds: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = kinds.add_parser(
        "agreement",
        help="Compare backends (torch bf16/fp16, ONNX fp32/int8) with float32 torch on real preference pairs.",
        description="Score the chosen and rejected responses of N real preference pairs with float32 torch "
        "(the reference) and each backend; report max and mean |Δscore|, score correlation, pairwise "
        "agreement (same preferred response) overall and on pairs whose float32 margin exceeds --margin, "
        "and throughput on one common subset of the items. Writes results.json and results.md to --out. "
        f"The bar: agreement ≥ {100 * MIN_AGREEMENT:g}% and 100% above the margin.",
    )
    p.add_argument("--model", default="default", metavar="DIR", help="Checkpoint folder, or `default` (default).")
    p.add_argument("--pairs", type=int, default=1000, metavar="N", help="How many pairs (default 1000).")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("../shared/data/hh-rlhf"),
        metavar="DIR",
        help="HH-RLHF folder with helpful-base/harmless-base .test.jsonl.gz; N pairs are drawn with --seed "
        "(default ../shared/data/hh-rlhf).",
    )
    p.add_argument(
        "--pairs-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="Use the first N rows of this .jsonl instead: {prompt: str | [messages], chosen, rejected, id?}.",
    )
    p.add_argument(
        "--backends",
        default=",".join(DEFAULT_BACKENDS),
        help=f"Comma-separated, from {', '.join(BACKENDS)} (default {','.join(DEFAULT_BACKENDS)}).",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="Where results.json and results.md go.")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu).")
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2).")
    p.add_argument("--max-length", type=int, default=None, help="Tokens per item (default: the model's maximum).")
    p.add_argument(
        "--batch-tokens", type=int, default=512, help="Padded token budget of a batch, length-sorted (default 512)."
    )
    p.add_argument(
        "--margin", type=float, default=0.1, help="fp32 margin above which agreement must be 100%% (default 0.1)."
    )
    p.add_argument(
        "--timing-items",
        type=int,
        default=128,
        help="Items timed for throughput, the same for every backend (default 128; 0: no timing).",
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the pair sample and the timed subset (default 0).")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="Reference scores and ONNX exports are cached here (default: the rlhf-feedback cache folder).",
    )
    p.add_argument("--quiet", action="store_true", help="No progress bars.")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"rlhf-feedback bench agreement: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    # Passive OpenMP waits (before torch starts its thread pool): spinning threads slow everything
    # else on a shared CPU, and the onnx backend reads the same variable.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from benchmarks import agreement

    for flag, value, low in (("--pairs", args.pairs, 1), ("--batch-tokens", args.batch_tokens, 1)):
        if value < low:
            return _fail(f"{flag} must be at least {low}")
    if args.timing_items < 0 or args.margin < 0 or (args.threads is not None and args.threads < 1):
        return _fail("--timing-items and --margin must be 0 or more, --threads at least 1")
    try:
        backends = agreement.parse_backends(args.backends)
        if args.model == "default":
            from services.runtime.default_model import default_model_dir

            try:
                model_dir = default_model_dir()
            except FileNotFoundError as exc:
                raise agreement.AgreementInputError(str(exc)) from None
        else:
            model_dir = Path(args.model)
            if not (model_dir / "config.json").is_file():
                raise agreement.AgreementInputError(f"--model {model_dir} is not a Hugging Face checkpoint folder")
        if args.pairs_file is not None:
            pairs = agreement.file_pairs(args.pairs_file, args.pairs)
            source = str(args.pairs_file)
        else:
            pairs = agreement.hh_pairs(args.data_dir, args.pairs, seed=args.seed)
            source = f"HH-RLHF test files in {args.data_dir} (seed {args.seed})"
    except agreement.AgreementInputError as exc:
        return _fail(str(exc))
    if len(pairs) < args.pairs:
        print(f"note: only {len(pairs)} pairs available", file=sys.stderr)

    from services.runtime.default_model import cache_dir

    config = agreement.RunConfig(
        model_dir=model_dir,
        device=args.device,
        threads=args.threads,
        max_length=args.max_length,
        batch_tokens=args.batch_tokens,
        margin=args.margin,
        timing_items=args.timing_items,
        cache=args.cache if args.cache is not None else cache_dir(),
        seed=args.seed,
        progress=not args.quiet,
    )
    report = agreement.run(pairs, backends, config, source=source)
    js, md = agreement.write(report, args.out)
    print(agreement.markdown(report))
    print(f"wrote {js} and {md}", file=sys.stderr)
    return 0
