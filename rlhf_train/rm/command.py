"""``rlhf-feedback train rm``: the command line over :func:`rlhf_train.rm.trainer.train_reward_model`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from rlhf_train.cli_env import EnvDefaults, add_required

ENV_PREFIX = "RLHF_FEEDBACK_TRAIN_RM_"
_env = EnvDefaults(ENV_PREFIX)


def _l2_grid(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("the L2 grid needs one or more non-negative numbers")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    from rlhf_train.rm.bradley_terry import DEFAULT_L2_GRID

    io = p.add_argument_group("data and output")
    add_required(
        io,
        _env,
        "--data",
        type=Path,
        help="TRL preference rows (.jsonl, .json or .parquet): {prompt, chosen, rejected} as `rlhf-feedback label` "
        "writes them, or implicit-prompt rows (chosen/rejected are whole conversations or texts). A folder is read "
        "as the HH-RLHF test files (helpful-base, harmless-base).",
    )
    add_required(
        io,
        _env,
        "--out",
        type=Path,
        help="Output folder: a sequence-classification checkpoint that `rlhf-feedback serve reward --model OUT` "
        "loads (or, with --head-only, head.safetensors), plus metrics.json.",
    )
    io.add_argument(
        "--model",
        type=Path,
        default=_env("model", None),
        help="Base checkpoint folder (a Hugging Face causal LM or sequence classifier). "
        "Default: the embedded SmolLM2-135M-Instruct backbone of the default reward model.",
    )
    io.add_argument(
        "--model-id", default=_env("model_id", None), help="Model id the service reports (default: --out's name)."
    )
    io.add_argument(
        "--head-only",
        action="store_true",
        default=_env.flag("head_only"),
        help="With --freeze-backbone: write only the head (head.safetensors, metrics.json, MODEL_CARD.md) in the "
        "format of the default reward head, to assemble with its backbone.",
    )
    io.add_argument(
        "--use-margin",
        action="store_true",
        default=_env.flag("use_margin"),
        help="Use every row's 'margin' in the loss: -logsigmoid(r_chosen - r_rejected - margin) (TRL RewardTrainer).",
    )

    split = p.add_argument_group("held-out split")
    split.add_argument(
        "--test-fraction",
        type=float,
        default=float(_env("test_fraction", 0.2)),
        help="Share of prompts held out to measure pairwise accuracy (default 0.2).",
    )
    split.add_argument(
        "--val-fraction",
        type=float,
        default=float(_env("val_fraction", 0.2)),
        help="Share of the training prompts that choose the L2 strength with --freeze-backbone (default 0.2).",
    )
    split.add_argument(
        "--seed", type=int, default=int(_env("seed", 0)), help="Seed of the split, the shuffling and the head init."
    )

    frozen = p.add_argument_group("frozen backbone (fast)")
    frozen.add_argument(
        "--freeze-backbone",
        action="store_true",
        default=_env.flag("freeze_backbone"),
        help="Compute last-token features once (cached on disk) and fit only a linear head. "
        "Without it: full fine-tuning.",
    )
    frozen.add_argument(
        "--l2-grid",
        type=_l2_grid,
        default=str(_env("l2_grid", ",".join(f"{v:g}" for v in DEFAULT_L2_GRID))),
        help="Comma-separated L2 strengths tried on the validation slice (default %(default)s).",
    )
    frozen.add_argument(
        "--feature-cache",
        type=Path,
        default=_env("feature_cache", None),
        help="Feature cache folder (default: <rlhf-feedback cache>/features/<model>-<dtype>-v1).",
    )

    full = p.add_argument_group("full fine-tuning")
    full.add_argument("--epochs", type=int, default=int(_env("epochs", 1)), help="Passes over the training pairs.")
    full.add_argument("--lr", type=float, default=float(_env("lr", 1e-5)), help="AdamW learning rate (default 1e-5).")
    full.add_argument(
        "--batch-size", type=int, default=int(_env("batch_size", 8)), help="Pairs per micro-batch (default 8)."
    )
    full.add_argument(
        "--grad-accum", type=int, default=int(_env("grad_accum", 1)), help="Micro-batches per optimizer step."
    )
    full.add_argument(
        "--weight-decay", type=float, default=float(_env("weight_decay", 0.0)), help="AdamW weight decay."
    )

    run = p.add_argument_group("runtime")
    run.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=_env("dtype", "float32"),
        help="Feature-extraction dtype with --freeze-backbone (default float32: the served scores match exactly); "
        "full fine-tuning trains in float32.",
    )
    run.add_argument("--device", default=_env("device", "auto"), help="cpu, cuda, cuda:N or auto (default).")
    run.add_argument(
        "--max-length",
        type=int,
        default=_env("max_length", None),
        help="Token cap per sequence, the prompt cut from the left as the service does (default: the model's maximum).",
    )
    run.add_argument(
        "--batch-tokens",
        type=int,
        default=int(_env("batch_tokens", 4096)),
        help="Padded tokens per feature-extraction / evaluation batch (default 4096).",
    )
    run.add_argument(
        "--threads", type=int, default=_env("threads", None), help="torch CPU threads (default: torch's choice)."
    )
    run.add_argument("--quiet", action="store_true", default=_env.flag("quiet"), help="No progress bars or log lines.")


def options_from_args(args: argparse.Namespace) -> Any:
    from rlhf_train.rm.trainer import RmOptions

    return RmOptions(
        data=Path(args.data),
        out=Path(args.out),
        model=Path(args.model) if args.model is not None else None,
        model_id=args.model_id,
        freeze_backbone=bool(args.freeze_backbone),
        head_only=bool(args.head_only),
        use_margin=bool(args.use_margin),
        test_fraction=float(args.test_fraction),
        val_fraction=float(args.val_fraction),
        seed=int(args.seed),
        dtype=str(args.dtype),
        device=str(args.device),
        max_length=int(args.max_length) if args.max_length is not None else None,
        threads=int(args.threads) if args.threads is not None else None,
        batch_tokens=int(args.batch_tokens),
        l2_grid=tuple(args.l2_grid),
        feature_cache=Path(args.feature_cache) if args.feature_cache is not None else None,
        epochs=int(args.epochs),
        lr=float(args.lr),
        batch_size=int(args.batch_size),
        grad_accum=int(args.grad_accum),
        weight_decay=float(args.weight_decay),
        quiet=bool(args.quiet),
    )


def summary_text(result: Any) -> str:
    what = (
        f"head {result.head_path}"
        if result.head_path is not None
        else f"checkpoint {result.model_dir} (serve it: rlhf-feedback serve reward --model {result.model_dir})"
    )
    l2 = f", L2 {result.l2:g}" if result.l2 is not None else ""
    return (
        f"rlhf-feedback train rm ({result.mode}{l2}): held-out pairwise accuracy {100 * result.test_acc:.1f}% "
        f"on {result.test_pairs} pairs (longer-wins baseline {100 * result.length_baseline_test_acc:.1f}%, "
        f"BT loss {result.test_loss:.4f}); train {100 * result.train_acc:.1f}% on {result.train_pairs}; "
        f"{result.seconds:.1f} s\nwrote {what} and {result.metrics_path}"
    )


def run(args: argparse.Namespace) -> int:
    from rlhf_train.jobs.io import JobError
    from rlhf_train.rm.trainer import train_reward_model

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        result = train_reward_model(options_from_args(args))
    except JobError as exc:
        print(f"rlhf-feedback train rm: {exc}", file=sys.stderr)
        return exc.exit_code
    except FileNotFoundError as exc:  # the embedded backbone's package is not installed, and similar
        print(f"rlhf-feedback train rm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf-feedback train rm: interrupted (computed features are cached; rerun to resume)", file=sys.stderr)
        return 130
    print(summary_text(result))
    return 0


def register(trainers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = trainers.add_parser(
        "rm",
        help="Train a Bradley-Terry reward model on preference pairs (frozen backbone + head, or full fine-tuning).",
        description="Train a Bradley-Terry reward model on TRL preference rows (from `rlhf-feedback label`, or human "
        "data). Every pair is rendered exactly as the reward service renders it, so the trained model scores the "
        "same tokens at the same position when served. --freeze-backbone extracts last-token features once and fits "
        "a linear head (fast); without it the whole model is fine-tuned. Pairwise accuracy is measured on a held-out "
        "split by a seeded hash of the prompt. The output is a checkpoint for `rlhf-feedback serve reward --model`, "
        "or with --head-only just the head (how the default reward head is reproduced: "
        "--data ../shared/data/hh-rlhf --freeze-backbone --head-only --dtype bfloat16 --max-length 512). "
        f"Every flag also reads an environment variable {ENV_PREFIX}<FLAG>.",
    )
    add_arguments(p)
    p.set_defaults(run=run)
