"""``rlhf-feedback train ppo``: the command line around :func:`rlhf_train.ppo.trainer.run_ppo`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rlhf_train.cli_env import EnvDefaults, add_api_key, add_required

ENV_PREFIX = "RLHF_FEEDBACK_PPO_"
# Defaults stay text here: argparse converts a text default with the option's type, so a bad
# value exits 2 like a bad flag.
_env = EnvDefaults(ENV_PREFIX)


def _urls(value: str | None) -> str | list[str] | None:
    if value is None:
        return None
    urls = [u.strip() for u in value.split(",") if u.strip()]
    return urls[0] if len(urls) == 1 else urls


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("reward source (exactly one)")
    src.add_argument(
        "--reward-url",
        default=_env("reward_url", None),
        help="The reward service: http(s)://host:port or grpc(s)://host:port (several: comma-separated).",
    )
    src.add_argument(
        "--judge-url",
        default=_env("judge_url", None),
        help="The judge service; its grade (a score in [0, 1]) is the reward.",
    )
    src.add_argument("--rubric", default=_env("rubric", None), help="With --judge-url: the rubric the judge grades by.")

    io = p.add_argument_group("data and outputs")
    add_required(
        io,
        _env,
        "--prompts",
        type=Path,
        help='JSONL rows {"prompt": str | [messages]}; rendered with the policy\'s chat template.',
    )
    add_required(
        io,
        _env,
        "--out",
        type=Path,
        help="Output folder: checkpoints/step-N/ (policy/ loads with from_pretrained) and log.jsonl.",
    )
    io.add_argument("--log", type=Path, default=_env("log", None), help="Per-step JSONL log (default <out>/log.jsonl).")
    io.add_argument(
        "--policy",
        type=Path,
        default=_env("policy", None),
        help="Hugging Face causal LM folder (default: the embedded SmolLM2-135M-Instruct).",
    )
    io.add_argument(
        "--ref-policy",
        type=Path,
        default=_env("ref_policy", None),
        help="Frozen reference model for the KL penalty (default: the starting policy).",
    )
    io.add_argument(
        "--save-every", type=int, default=_env("save_every", 50), help="Checkpoint every N steps (0: only at the end)."
    )
    io.add_argument(
        "--keep-checkpoints", type=int, default=_env("keep_checkpoints", 2), help="How many checkpoints to keep."
    )
    io.add_argument(
        "--resume",
        action="store_true",
        help="Continue from the latest checkpoint in --out: its policy, value head, optimizer, RNG, prompt position "
        "and the batch it had in flight (--policy and --ref-policy are then taken from the checkpoint).",
    )

    ppo = p.add_argument_group("PPO")
    ppo.add_argument("--steps", type=int, default=_env("steps", 20), help="PPO steps (a resumed run counts on).")
    ppo.add_argument("--batch-size", type=int, default=_env("batch_size", 8), help="Prompts (rollouts) per step.")
    ppo.add_argument(
        "--minibatch-size", type=int, default=_env("minibatch_size", 4), help="Rollouts per optimizer step."
    )
    ppo.add_argument("--ppo-epochs", type=int, default=_env("ppo_epochs", 2), help="Passes over each batch.")
    ppo.add_argument("--lr", type=float, default=_env("lr", 1e-5), help="AdamW learning rate (policy and value head).")
    ppo.add_argument(
        "--kl-coef", type=float, default=_env("kl_coef", 0.05), help="Per-token KL penalty to the reference."
    )
    ppo.add_argument("--cliprange", type=float, default=_env("cliprange", 0.2), help="Policy ratio clip epsilon.")
    ppo.add_argument(
        "--cliprange-value", type=float, default=_env("cliprange_value", 0.2), help="Value clip around old values."
    )
    ppo.add_argument("--vf-coef", type=float, default=_env("vf_coef", 0.1), help="Weight of the value loss.")
    ppo.add_argument("--gamma", type=float, default=_env("gamma", 1.0), help="Discount.")
    ppo.add_argument("--lam", type=float, default=_env("lam", 0.95), help="GAE lambda.")
    ppo.add_argument("--max-grad-norm", type=float, default=_env("max_grad_norm", 1.0), help="Gradient clipping norm.")
    ppo.add_argument(
        "--whiten-rewards",
        action="store_true",
        default=_env.flag("whiten_rewards"),
        help="Normalise each batch's scores to zero mean and unit std before use.",
    )
    ppo.add_argument(
        "--seed", type=int, default=_env("seed", 0), help="Seed of sampling, prompt order and minibatches."
    )

    gen = p.add_argument_group("generation")
    gen.add_argument(
        "--max-new-tokens", type=int, default=_env("max_new_tokens", 64), help="Longest response, in tokens."
    )
    gen.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=_env("max_prompt_tokens", 512),
        help="Longer rendered prompts keep their last tokens.",
    )
    gen.add_argument("--temperature", type=float, default=_env("temperature", 1.0), help="Sampling temperature.")

    run = p.add_argument_group("runtime")
    run.add_argument("--threads", type=int, default=_env("threads", None), help="torch intra-op threads.")
    add_api_key(run)
    run.add_argument(
        "--timeout", type=float, default=_env("timeout", 120.0), help="Seconds per scoring request attempt."
    )
    run.add_argument("--max-retries", type=int, default=_env("max_retries", 8), help="Retries of a scoring request.")
    run.add_argument(
        "--max-empty-batches",
        type=int,
        default=_env("max_empty_batches", 3),
        help="Stop after this many batches in a row without a single score.",
    )
    run.add_argument("--quiet", action="store_true", help="No progress bar and no per-step lines.")


def config_from_args(args: argparse.Namespace) -> Any:
    from rlhf_train.ppo.config import PPOConfig

    return PPOConfig(
        prompts=args.prompts,
        out=args.out,
        reward_url=_urls(args.reward_url),
        judge_url=_urls(args.judge_url),
        policy=args.policy,
        ref_policy=args.ref_policy,
        log=args.log,
        steps=args.steps,
        batch_size=args.batch_size,
        minibatch_size=args.minibatch_size,
        ppo_epochs=args.ppo_epochs,
        lr=args.lr,
        kl_coef=args.kl_coef,
        cliprange=args.cliprange,
        cliprange_value=args.cliprange_value,
        vf_coef=args.vf_coef,
        gamma=args.gamma,
        lam=args.lam,
        max_grad_norm=args.max_grad_norm,
        max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        temperature=args.temperature,
        whiten_rewards=args.whiten_rewards,
        seed=args.seed,
        threads=args.threads,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        resume=args.resume,
        rubric=args.rubric,
        api_key=args.api_key,
        timeout=args.timeout,
        max_retries=args.max_retries,
        max_empty_batches=args.max_empty_batches,
        quiet=args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    """The command: 0 when the run reached ``--steps``, 2 on bad input, 1 when it failed."""
    from rlhf_train.ppo.config import PPOError

    # Spinning OpenMP workers fight the reward service (and each other) for the cores of a small
    # machine: measured here, 10x slower generation under load. Only effective before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        cfg = config_from_args(args)
        cfg.check()
        from rlhf_train.ppo.trainer import run_ppo

        summary = run_ppo(cfg)
    except PPOError as exc:
        print(f"rlhf-feedback train ppo: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rlhf-feedback train ppo: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    if not summary.records:
        print(f"train ppo: already at step {summary.final_step} of {cfg.steps}; nothing to do")
        return 0
    recs = summary.records
    dropped = sum(r.dropped for r in recs)
    first, last = recs[0], recs[-1]
    score_s = sum(r.score_s for r in recs)
    wait_s = sum(r.wait_s for r in recs)
    print(
        f"train ppo: steps {summary.start_step + 1}..{summary.final_step}; reward "
        f"{_f(first.reward_mean)} -> {_f(last.reward_mean)}; dropped samples {dropped}; "
        f"scoring {score_s:.1f}s of which the learner waited {wait_s:.1f}s\n"
        f"  checkpoint: {summary.checkpoint}\n  log: {summary.log}"
    )
    return 0


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def register(trainers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = trainers.add_parser(
        "ppo",
        help="PPO for a causal LM with rewards from the reward service (or the judge), scoring overlapped.",
        description="Token-level RLHF PPO: the policy with a value head, a frozen reference for the KL penalty, "
        "GAE, clipped policy and value losses. Rewards come from the reward service (--reward-url) or the "
        "judge's grade (--judge-url); while one batch is scored remotely the next is generated. A sample "
        "without a score is dropped from the update (counted in the log), never scored 0. Checkpoints are "
        "written atomically; --resume continues from the latest. Every flag also reads an environment "
        f"variable {ENV_PREFIX}<FLAG>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(run=run)


__all__ = ["add_arguments", "config_from_args", "register", "run"]
