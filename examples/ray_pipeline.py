"""Ray Data pipelines of rlhf-feedback: a Parquet or JSONL file in, a Parquet data set out.

Three pipelines (``--task``):

- ``score``: every row's ``prompt`` + ``response`` (or ``--completions-column``: a list per row)
  scored by the reward service (``--reward URL,...``) or by the model loaded in each actor
  (``--local-model DIR``; ``--num-gpus 1`` per actor on a GPU cluster); the rows come back with
  ``score``, ``truncated``, ``error`` and ``reward_model``.
- ``best-worst``: rows ``{prompt, completions: [...]}`` scored by the reward model, best vs worst
  completion written as TRL preference rows (DPOTrainer / RewardTrainer load them as they are).
- ``label``: rows ``{prompt, completions}`` (or ``chosen`` + ``rejected``) judged by the judge
  service (``--judge URL,...``): exactly the rows ``rlhf-feedback label`` writes, in
  ``OUTPUT/pairs``, and its rejects with their reasons in ``OUTPUT/rejects``.

Examples::

    python examples/ray_pipeline.py score --input rollouts.parquet --output scored/ \\
        --reward grpc://rm-0:50051,grpc://rm-1:50051 --in-flight 4
    python examples/ray_pipeline.py label --input candidates.jsonl --output dpo/ --judge http://judge:8001
    python examples/ray_pipeline.py score --input rollouts.parquet --output scored/ --local-model ./rm --actors 4

The Ray knobs that matter: ``--actors`` (Ray's ``concurrency``: the actors calling the services;
with ``--reward``/``--judge`` it defaults to replicas x ``--in-flight``, the requests each replica
should have in flight to stay busy), ``--batch-size`` (rows per call: a reward request is cut into
the server's chunk size anyway; for the judge it bounds the rows one actor has in flight), and
``--task-retries`` (a batch whose rows failed after the client's own retries raises
``RowsFailedError``; Ray 2.60 retries an actor task on it that many times, then the job fails or,
with ``--max-errored-blocks``, goes on without the block). Without ``--task-retries``, failed rows
stay in the output with a null score or a reject of kind ``error`` and their reason.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def _read(ray: Any, path: str) -> Any:
    p = Path(path)
    suffix = p.suffix.lower() if p.is_file() else next((q.suffix.lower() for q in sorted(p.iterdir())), "")
    if suffix == ".parquet":
        return ray.data.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return ray.data.read_json(path)  # JSON Lines, or a JSON array per file
    raise SystemExit(f"{path}: use .parquet or .jsonl (a file, or a folder of them)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ray_pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("task", choices=("score", "best-worst", "label"))
    p.add_argument("--input", required=True, help="A .parquet or .jsonl file, or a folder of them.")
    p.add_argument("--output", required=True, help="Output folder (Parquet files).")
    p.add_argument("--reward", help="Reward service URL(s), comma-separated (http://, grpc://, dns:///).")
    p.add_argument("--local-model", help="Score with this reward model loaded in each actor (no server).")
    p.add_argument("--judge", help="Judge service URL(s), comma-separated (task label).")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--response-column", default="response")
    p.add_argument("--completions-column", default=None, help="score: a list of completions per row.")
    p.add_argument("--id-column", default=None, help="label: the input row id, kept in the rejects' input field.")
    p.add_argument("--in-flight", type=int, default=2, help="Requests each service replica should have in flight.")
    p.add_argument("--actors", type=int, default=None, help="Ray actors (default: replicas x --in-flight).")
    p.add_argument("--batch-size", type=int, default=64, help="Rows per call of an actor.")
    p.add_argument(
        "--num-cpus",
        type=float,
        default=None,
        help="CPUs per actor (default 0.25; 0.5 with --local-model: leave CPUs for the read tasks on a small node).",
    )
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor (--local-model on a GPU cluster).")
    p.add_argument("--task-retries", type=int, default=0, help="Ray retries of a batch with failed rows (0: keep).")
    p.add_argument("--max-errored-blocks", type=int, default=0, help="Blocks that may fail before the job fails.")
    p.add_argument("--min-confidence", type=float, default=0.0, help="label: reject judgments less confident.")
    p.add_argument("--pairs", choices=("best-worst", "all"), default="best-worst", help="label: >2 completions.")
    p.add_argument("--ray-address", default=None, help="An existing Ray cluster (default: start a local one).")
    p.add_argument("--local-cpus", type=int, default=None, help="CPUs of the local Ray started without an address.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import ray

    from rlhf_train.integrations.ray import (
        JudgeLabeler,
        LocalRewardScorer,
        RewardScorer,
        RowsFailedError,
        pairs_only,
        rejects_only,
        reward_pairs,
    )

    urls = [u.strip() for u in (args.judge if args.task == "label" else args.reward or "").split(",") if u.strip()]
    if args.task == "label" and not urls:
        raise SystemExit("label needs --judge URL")
    if args.task != "label" and not urls and not args.local_model:
        raise SystemExit(f"{args.task} needs --reward URL or --local-model DIR")
    ray.init(address=args.ray_address, num_cpus=args.local_cpus, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = args.max_errored_blocks
    on_error = "row"
    retry: dict[str, Any] = {}
    if args.task_retries > 0:
        # Ray 2.60: an actor task is retried on the application errors listed here, up to the
        # actor's max_task_retries (Ray Data's default for actors is -1: forever, so bound it).
        ctx.actor_task_retry_on_errors = [RowsFailedError]
        retry["max_task_retries"] = args.task_retries
        on_error = "raise"
    actors = args.actors or max(1, len(urls) * args.in_flight)
    local = args.local_model is not None and args.task != "label"
    knobs: dict[str, Any] = {
        "batch_size": args.batch_size,
        "batch_format": "pyarrow",
        "concurrency": actors,
        "num_cpus": args.num_cpus if args.num_cpus is not None else (0.5 if local else 0.25),
        **({"num_gpus": args.num_gpus} if args.num_gpus else {}),
        **retry,
    }
    started = time.monotonic()
    ds = _read(ray, args.input)
    columns = {"prompt_column": args.prompt_column, "response_column": args.response_column}
    if args.task == "label":
        judged = ds.map_batches(
            JudgeLabeler,
            fn_constructor_kwargs={
                "url": urls,
                "min_confidence": args.min_confidence,
                "pairs": args.pairs,
                "prompt_column": args.prompt_column,
                "id_column": args.id_column,
                "on_error": on_error,
            },
            **knobs,
        ).materialize()  # judged once, split twice
        judged.map_batches(pairs_only, batch_format="pyarrow").write_parquet(f"{args.output}/pairs")
        judged.map_batches(rejects_only, batch_format="pyarrow").write_parquet(f"{args.output}/rejects")
        rows = judged.count()
    else:
        if args.task == "best-worst":
            columns["completions_column"] = args.completions_column or "completions"
        elif args.completions_column:
            columns["completions_column"] = args.completions_column
        kwargs: dict[str, Any] = {**columns, "on_error": on_error}
        if local:
            scorer: Any = LocalRewardScorer
            kwargs["model"] = args.local_model
            kwargs["device"] = "auto"
            if not args.num_gpus:
                kwargs["threads"] = max(1, int(knobs["num_cpus"]))
        else:
            scorer = RewardScorer
            kwargs["url"] = urls
        scored = ds.map_batches(scorer, fn_constructor_kwargs=kwargs, **knobs)
        if args.task == "best-worst":
            completions = columns["completions_column"]
            scored = scored.map_batches(
                reward_pairs,
                batch_format="pyarrow",
                fn_kwargs={"prompt_column": args.prompt_column, "completions_column": completions},
            )
        scored = scored.materialize()
        scored.write_parquet(args.output)
        rows = scored.count()
    seconds = time.monotonic() - started
    print(f"{args.task}: {rows} rows -> {args.output} in {seconds:.1f}s ({rows / seconds:.1f} rows/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
