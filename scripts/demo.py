"""``make demo``: the whole loop on the embedded defaults, then a summary.

1. start the reward service (SmolLM2-135M-Instruct + the committed Bradley-Terry head) and the
   judge service (the same SmolLM2 as a local judge);
2. the policy (SmolLM2-135M-Instruct) writes two answers to each prompt of examples/prompts.jsonl;
3. ``rlhf-feedback label`` asks the judge which answer is better (both orders) → DPO pairs;
4. ``rlhf-feedback train rm --freeze-backbone`` fits a reward head on those pairs;
5. ``rlhf-feedback train ppo`` runs a few PPO steps whose rewards come from the reward service,
   scoring overlapped with generation;
6. a summary prints; both services drain and stop.

Every step is the command a user would run; the README says which piece to swap for real work.
Flags: ``--workdir DIR`` (keep outputs there), ``--steps N`` (PPO steps), ``--prompts FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clients.process import ServerProcess  # noqa: E402
from rlhf_train.generate import GenerateOptions, generate_answers, read_prompts, write_candidates  # noqa: E402


def _cli(args: Sequence[str], log: Path) -> None:
    """Run one ``rlhf-feedback`` command; its output goes to ``log``; fail loudly with the log's tail."""
    with log.open("wb") as fh:
        code = subprocess.call([sys.executable, "-m", "rlhf_feedback", *args], stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"`rlhf-feedback {' '.join(args[:2])}` failed with exit code {code}; log {log}:\n{tail}")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Step:
    """Prints a numbered step and its duration."""

    def __init__(self, timings: dict[str, float], name: str, text: str) -> None:
        self.timings, self.name, self.text = timings, name, text

    def __enter__(self) -> Step:
        print(f"\n== {self.text}", flush=True)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = time.monotonic() - self.t0
        print(f"   ({self.timings[self.name]:.0f} s)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="Where outputs go (default: a new temp folder).")
    parser.add_argument("--prompts", type=Path, default=ROOT / "examples" / "prompts.jsonl")
    parser.add_argument("--steps", type=int, default=4, help="PPO steps.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each model-running process.")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads starve the other processes
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rlhf-feedback-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = str(args.threads)
    timings: dict[str, float] = {}
    started = time.monotonic()
    print(f"rlhf-feedback demo: outputs and logs in {work}")

    with Step(timings, "start", "1. start the reward service and the judge service (embedded SmolLM2-135M)"):
        reward = ServerProcess.reward(["--threads", threads], log_path=work / "reward-service.log")
        # The 135M judge's preferences sit within a few thousandths of 0.5, so the default tie
        # margin (0.05) would call every pair a tie; a real judge keeps the default.
        judge = ServerProcess.judge(
            ["--backend", "local", "--cache", "off", "--tie-margin", "0", "--threads", threads],
            log_path=work / "judge-service.log",
        )
    try:
        with reward, judge:
            reward.wait_ready()
            judge.wait_ready()
            print(f"   reward service {reward.http_url}, judge service {judge.http_url}")
            summary = _run_loop(args, work, threads, reward, judge, timings)
            with Step(timings, "stop", "6. stop the services (SIGTERM: drain, then exit)"):
                codes = {"reward": reward.terminate(), "judge": judge.terminate()}
    except BaseException:
        print(f"\nthe demo stopped early; service logs: {work}/reward-service.log, {work}/judge-service.log")
        raise
    summary["service_exit_codes"] = codes
    summary["seconds"] = {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.monotonic() - started)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    _print_summary(summary, work)
    return 0 if all(c == 0 for c in codes.values()) else 1


def _run_loop(
    args: argparse.Namespace,
    work: Path,
    threads: str,
    reward: ServerProcess,
    judge: ServerProcess,
    timings: dict[str, float],
) -> dict[str, Any]:
    from services.runtime.default_model import backbone_dir

    policy = backbone_dir()
    prompts = read_prompts(args.prompts)
    candidates = work / "candidates.jsonl"
    with Step(timings, "generate", f"2. the policy writes two answers to each of {len(prompts)} prompts"):
        answers = generate_answers(policy, prompts, GenerateOptions(num_answers=2, threads=int(threads)))
        kept = write_candidates(candidates, prompts, answers)
        print(f"   {kept} prompts with two distinct answers -> {candidates}")

    labels = work / "pairs.jsonl"
    with Step(timings, "label", "3. label: the judge compares each pair in both orders -> DPO preference rows"):
        label_args = ["label", "--judge", judge.http_url, "--input", str(candidates), "--output", str(labels)]
        _cli(label_args, work / "label.log")
    pairs = _jsonl(labels)
    rejects = _jsonl(work / "pairs.rejects.jsonl")
    consistent = sum(1 for p in pairs if p.get("consistent"))
    print(f"   {len(pairs)} pairs labelled ({consistent} consistent in both orders), {len(rejects)} rejected")

    rm_out = work / "reward-model"
    with Step(timings, "train_rm", "4. train rm --freeze-backbone: a Bradley-Terry head on the judge's labels"):
        _cli(
            ["train", "rm", "--data", str(labels), "--freeze-backbone", "--out", str(rm_out), "--threads", threads],
            work / "train-rm.log",
        )
    rm_metrics = json.loads((rm_out / "metrics.json").read_text(encoding="utf-8"))

    ppo_out = work / "ppo"
    with Step(timings, "ppo", f"5. train ppo: {args.steps} steps, rewards from the reward service, scoring overlapped"):
        _cli(
            [
                "train", "ppo",
                "--reward-url", reward.http_url,
                "--prompts", str(args.prompts),
                "--steps", str(args.steps),
                "--batch-size", "8",
                "--max-new-tokens", "32",
                "--ppo-epochs", "1",
                "--save-every", str(args.steps),
                "--keep-checkpoints", "1",
                "--out", str(ppo_out),
                "--threads", threads,
            ],
            work / "train-ppo.log",
        )  # fmt: skip
    ppo_log = _jsonl(ppo_out / "log.jsonl")
    return {
        "prompts": len(prompts),
        "candidate_pairs": kept,
        "labels": {"pairs": len(pairs), "consistent": consistent, "rejected": len(rejects)},
        "reward_model": rm_metrics,
        "ppo": ppo_log,
    }


def _fmt(v: Any, spec: str = ".3f") -> str:
    return format(v, spec) if isinstance(v, int | float) else "-"


def _print_summary(s: dict[str, Any], work: Path) -> None:
    lab, rm = s["labels"], s["reward_model"]
    res = rm.get("results", {})
    print("\n================ summary ================")
    print(f"prompts {s['prompts']}, answer pairs {s['candidate_pairs']}")
    print(
        f"judge labels: {lab['pairs']} pairs, {lab['consistent']} consistent in both orders, {lab['rejected']} rejected"
    )
    print(
        f"reward model (frozen backbone, linear head): held-out pairwise accuracy {_fmt(res.get('test_acc'))} "
        f"on {res.get('test_pairs', 0)} pairs (train {_fmt(res.get('train_acc'))} on {res.get('train_pairs', 0)}; "
        f"'longer wins' {_fmt(res.get('length_baseline_test_acc'))})"
    )
    print("PPO against the reward service:")
    print(f"{'step':>4} {'reward':>8} {'± std':>7} {'KL':>8} {'gen s':>6} {'score s':>7} {'wait s':>6} {'train s':>7}")
    for r in s["ppo"]:
        print(
            f"{r.get('step', '-'):>4} {_fmt(r.get('reward_mean')):>8} {_fmt(r.get('reward_std')):>7} "
            f"{_fmt(r.get('kl'), '.4f'):>8} {_fmt(r.get('generate_s'), '.1f'):>6} {_fmt(r.get('score_s'), '.1f'):>7} "
            f"{_fmt(r.get('wait_s'), '.1f'):>6} {_fmt(r.get('train_s'), '.1f'):>7}"
        )
    print(f"services stopped with exit codes {s['service_exit_codes']}; total {s['seconds']['total']} s")
    print(f"everything is in {work} (summary.json, pairs.jsonl, reward-model/, ppo/, logs)")


if __name__ == "__main__":
    sys.exit(main())
