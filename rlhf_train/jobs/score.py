"""``rlhf-feedback score``: score every completion of every row with the reward service, resumably.

Input rows (``.jsonl``, ``.json`` or ``.parquet``) carry a ``prompt`` (a string or chat messages)
and the completions to score, as one of::

    {"prompt": ..., "completions": [str, ...]}      # best-of-n, rejection sampling
    {"prompt": ..., "response": str}
    {"prompt": ..., "chosen": ..., "rejected": ...}  # filtering a preference set by reward

(a completion may also be one assistant message, or a list holding one, as in TRL's format).
Each row is written back unchanged plus ``scores`` (raw reward-model outputs, aligned with the
completions as listed above: ``[chosen, rejected]`` for a pair), ``score_errors`` (aligned; null,
or the reason an item has no score) and ``reward_model`` (``{id, revision}``). A failed item's
score is null, never 0. Rows go to the reward client in batches of ``--batch-size`` rows,
``--concurrency`` batches at a time; the client chunks and retries. Resuming after any crash:
:mod:`rlhf_train.jobs.io`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_train.cli_env import EnvDefaults
from rlhf_train.jobs.flags import add_request_flags, add_service_io
from rlhf_train.jobs.io import (
    InputError,
    JobError,
    Journal,
    Progress,
    ResumeState,
    SourceRow,
    UnitFailed,
    check_fresh_outputs,
    content_hash,
    exit_code,
    in_input_order,
    journal_path,
    output_format,
    read_rows,
    run_units,
    start_fresh,
    write_rows,
)
from rlhf_train.jobs.label import Prompt, as_completion, as_messages

RESULT_COLUMNS = ("scores", "score_errors", "reward_model")


@dataclass(frozen=True)
class ScoreItem:
    """One input row, checked: the prompt, the responses to score, and its key."""

    index: int
    where: str
    key: str
    row: dict[str, Any]
    prompt: Prompt
    responses: list[str]


def parse_row(data: Any) -> tuple[Prompt, list[str]]:
    """The prompt and the responses to score of one row; ValueError saying what is wrong."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a row is a JSON object, not {type(data).__name__}")
    if "prompt" not in data:
        raise ValueError("the row has no 'prompt'")
    raw = data["prompt"]
    prompt: Prompt = raw if isinstance(raw, str) else as_messages(raw, "prompt")
    if data.get("completions") is not None:
        comps = data["completions"]
        if not isinstance(comps, list) or not comps:
            raise ValueError("'completions' must be a non-empty list")
        return prompt, [as_completion(c, f"completions[{i}]") for i, c in enumerate(comps)]
    if data.get("response") is not None:
        return prompt, [as_completion(data["response"], "response")]
    if "chosen" in data and "rejected" in data:
        return prompt, [as_completion(data["chosen"], "chosen"), as_completion(data["rejected"], "rejected")]
    raise ValueError("the row needs 'completions', 'response', or 'chosen' and 'rejected'")


def load_items(path: Path) -> list[ScoreItem]:
    """Every row of the input, checked up front (InputError names the first bad line)."""
    items: list[ScoreItem] = []
    seen: Counter[str] = Counter()
    for row in read_rows(path):
        items.append(_item(path, row, seen))
    return items


def _item(path: Path, row: SourceRow, seen: Counter[str]) -> ScoreItem:
    try:
        prompt, responses = parse_row(row.data)
    except ValueError as exc:
        raise InputError(f"{path}: {row.where}: {exc}") from None
    data = dict(row.data)
    base = content_hash(data)
    occurrence = seen[base]
    seen[base] += 1
    key = content_hash({"row": data, "occurrence": occurrence}) if occurrence else base
    return ScoreItem(row.index, row.where, key, data, prompt, responses)


def check_parquet_compatible(items: Sequence[ScoreItem]) -> None:
    """Parquet holds one type per column: refuse, before any work, rows that mix them."""
    import pyarrow as pa

    rows = [{k: v for k, v in it.row.items() if k not in RESULT_COLUMNS} for it in items]
    try:
        pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(
            f"the input rows cannot be one Parquet table ({exc}); a column mixes types (a string prompt in some "
            "rows, messages in others?): write .jsonl output, or make the rows uniform"
        ) from None


# -- scoring one batch -------------------------------------------------------------------------------


def _record(
    item: ScoreItem, scores: Sequence[float | None], errors: Sequence[str | None], model: Any
) -> dict[str, Any]:
    row = {k: v for k, v in item.row.items() if k not in RESULT_COLUMNS}
    row["scores"] = list(scores)
    row["score_errors"] = list(errors)
    row["reward_model"] = {"id": model.id, "revision": model.revision} if model is not None else None
    ok = [s for s in scores if s is not None]
    stats = {
        "items": len(scores),
        "scored": len(ok),
        "failed": len(scores) - len(ok),
        "sum": float(sum(ok)),
        "errors": dict(Counter(e.split(":", 1)[0] for e in errors if e is not None)),
    }
    return {"k": item.key, "out": [row], "rej": [], "stats": stats}


async def score_batch(client: Any, batch: Sequence[ScoreItem], pinned: list[Any]) -> list[dict[str, Any]]:
    """Score every response of every row in ``batch``; one journal record per row.

    ``pinned`` holds the model of the first successful batch: scores of another model (a replica
    serving a different checkpoint) stop the job rather than mix.
    """
    from clients.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError, RlhfFeedbackError

    flat = [{"prompt": it.prompt, "response": r} for it in batch for r in it.responses]
    try:
        results = await client.score(flat)
        scores: list[float | None] = list(results)
        errors = [str(results.errors[i]) if i in results.errors else None for i in range(len(flat))]
        model = results.model
    except (AuthenticationError, PermissionDeniedError) as exc:
        raise JobError(f"the reward service refused the credentials: {exc}") from None
    except InvalidRequestError:
        # One item the service refuses (too long...): score item by item so only it gets None.
        scores, errors, model = [], [], None
        for one in flat:
            try:
                r = await client.score([one])
                scores.append(r[0])
                errors.append(str(r.errors[0]) if 0 in r.errors else None)
                model = model or r.model
            except InvalidRequestError as exc:
                scores.append(None)
                errors.append(f"{exc.code}: {exc.message}")
            except (AuthenticationError, PermissionDeniedError) as exc:
                raise JobError(f"the reward service refused the credentials: {exc}") from None
            except RlhfFeedbackError as exc:
                raise UnitFailed(f"{batch[0].where}..{batch[-1].where}: {type(exc).__name__}: {exc}") from None
    except RlhfFeedbackError as exc:
        raise UnitFailed(f"{batch[0].where}..{batch[-1].where}: {type(exc).__name__}: {exc}") from None
    if model is not None:
        ref = (model.id, model.revision)
        if not pinned:
            pinned.append(ref)
        elif pinned[0] != ref:
            raise JobError(
                f"the reward service now serves {ref[0]}@{ref[1]}, not {pinned[0][0]}@{pinned[0][1]} as before; "
                "scores of different models must not mix"
            )
    records, pos = [], 0
    for it in batch:
        n = len(it.responses)
        records.append(_record(it, scores[pos : pos + n], errors[pos : pos + n], model))
        pos += n
    return records


# -- the job -----------------------------------------------------------------------------------------


@dataclass
class Totals:
    rows: int = 0
    items: int = 0
    scored: int = 0
    failed: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        self.errors: Counter[str] = Counter()

    def add(self, stats: Mapping[str, Any]) -> None:
        self.rows += 1
        self.items += int(stats.get("items", 0))
        self.scored += int(stats.get("scored", 0))
        self.failed += int(stats.get("failed", 0))
        self.total += float(stats.get("sum", 0.0))
        self.errors.update({k: int(v) for k, v in (stats.get("errors") or {}).items()})


def summary_text(
    totals: Totals, *, total_rows: int, this_run: int, failed_rows: int, output: Path, elapsed: float
) -> str:
    mean = f"{totals.total / totals.scored:.4f}" if totals.scored else "n/a"
    errs = ", ".join(f"{k} {v}" for k, v in totals.errors.most_common()) or "none"
    return "\n".join(
        [
            f"score: {total_rows} input rows: {totals.rows} done"
            + f" ({this_run} this run, {totals.rows - this_run} earlier)"
            + (f", {failed_rows} failed (rerun to retry them)" if failed_rows else "")
            + (
                f", {total_rows - totals.rows - failed_rows} not started"
                if total_rows - totals.rows - failed_rows > 0
                else ""
            ),
            f"  items: {totals.items}; scored {totals.scored}, no score {totals.failed} ({errs}); mean score {mean}",
            f"  -> {output}; {elapsed:.1f}s this run",
        ]
    )


def _pinned_model(state: ResumeState) -> list[Any]:
    for rec in state.done.values():
        for row in rec.get("out") or ():
            m = row.get("reward_model")
            if isinstance(m, Mapping):
                return [(m.get("id"), m.get("revision"))]
    return []


async def _score_all(
    args: argparse.Namespace,
    items: Sequence[ScoreItem],
    pending: Sequence[ScoreItem],
    journal: Journal,
    state: ResumeState,
    totals: Totals,
) -> Any:
    from clients import AsyncRewardClient

    def postfix() -> str:
        return f"items={totals.items} no_score={totals.failed}"

    def on_commit(records: Sequence[Mapping[str, Any]]) -> None:
        for rec in records:
            totals.add(rec.get("stats") or {})

    batches = [list(pending[i : i + args.batch_size]) for i in range(0, len(pending), args.batch_size)]
    pinned = _pinned_model(state)
    progress = Progress(
        total=len(items), initial=len(items) - len(pending), desc="score", quiet=args.quiet, postfix=postfix
    )
    client = AsyncRewardClient(
        args.reward,
        api_key=args.api_key,
        timeout=args.timeout,
        max_retries=args.max_retries,
        max_concurrency=args.concurrency,
        priority=args.priority,
    )
    try:

        async def work(batch: list[ScoreItem]) -> list[dict[str, Any]]:
            return await score_batch(client, batch, pinned)

        return await run_units(
            batches,
            work,
            journal=journal,
            state=state,
            concurrency=args.concurrency,
            progress=progress,
            on_commit=on_commit,
            rows_of=len,
            max_failures_in_a_row=max(10, 2 * args.concurrency),
        )
    finally:
        progress.close()
        await client.aclose()


def run(args: argparse.Namespace) -> int:
    """The ``score`` command; exit 0 when it finished, 1 when it failed, 2 on bad input."""
    try:
        return _run(args)
    except JobError as exc:
        print(f"rlhf-feedback score: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rlhf-feedback score: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    output = Path(args.output)
    output_format(output)
    if args.concurrency < 1 or args.batch_size < 1:
        raise InputError("--concurrency and --batch-size must be at least 1")
    items = load_items(Path(args.input))
    if output_format(output) == "parquet":
        check_parquet_compatible(items)
    jpath = journal_path(output)
    if args.restart:
        start_fresh([jpath, output])
    check_fresh_outputs(jpath, [output])
    journal, state = Journal.open(jpath, job="score", config={})
    try:
        keys = [it.key for it in items]
        pending = [it for it in items if it.key not in state.done]
        totals = Totals()
        for rec in in_input_order(state.done, keys):
            totals.add(rec.get("stats") or {})
        if state.complete:
            if pending:
                raise InputError(
                    f"{jpath}: this job finished earlier and the input now has {len(pending)} rows it did not "
                    "score; pass --restart to score the whole input again"
                )
            if not output.exists():
                raise JobError(f"{jpath}: the job finished earlier but its output is gone; pass --restart")
            print(
                summary_text(
                    totals,
                    total_rows=len(items),
                    this_run=0,
                    failed_rows=0,
                    output=output,
                    elapsed=time.monotonic() - t0,
                )
            )
            return 0
        outcome = asyncio.run(_score_all(args, items, pending, journal, state, totals)) if pending else None
        rows = [row for rec in in_input_order(state.done, keys) for row in rec.get("out") or ()]
        write_rows(output, rows)
        done = all(k in state.done for k in keys)
        if done:
            journal.compact(in_input_order(state.done, keys))
    finally:
        journal.close()
    failed = outcome.failed if outcome is not None else 0
    print(
        summary_text(
            totals,
            total_rows=len(items),
            this_run=outcome.committed if outcome is not None else 0,
            failed_rows=failed,
            output=output,
            elapsed=time.monotonic() - t0,
        )
    )
    return exit_code("score", outcome, pending=0 if done else len(items) - len(state.done), verb="scored")


# -- the parser ------------------------------------------------------------------------------------

ENV_PREFIX = "RLHF_FEEDBACK_SCORE_"
_env = EnvDefaults(ENV_PREFIX)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_service_io(
        p,
        _env,
        service="reward",
        service_help="Reward service URL: http(s)://host:port, grpc(s)://host:port or dns:///name:port "
        "(several: comma-separated; chunks are spread over them).",
        input_help="Rows {prompt, completions | response | chosen+rejected}: .jsonl, .json or .parquet.",
        output_help="The rows with scores, score_errors and reward_model added; .jsonl or .parquet.",
    )
    p.add_argument("--concurrency", type=int, default=int(_env("concurrency", 4)), help="Batches in flight.")
    p.add_argument(
        "--batch-size",
        type=int,
        default=int(_env("batch_size", 64)),
        help="Rows per scoring call (the client cuts calls into the server's request size).",
    )
    p.add_argument(
        "--priority",
        choices=("batch", "online"),
        default=_env("priority", "batch"),
        help="Queue priority on the service: batch (yields to online trainer traffic) or online.",
    )
    add_request_flags(p, _env, request="scoring", timeout=120.0, failed="its rows count", outputs="output")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "score",
        help="Score every completion of a file with the reward service (resumable).",
        description="Send every completion of every row to a reward service and write the rows back with their raw "
        "scores (null with a reason for a failed item, never 0): best-of-n, rejection sampling, filtering by "
        "reward. Kill it at any moment and run the same command again: it resumes. Every flag also reads an "
        f"environment variable {ENV_PREFIX}<FLAG>.",
    )
    add_arguments(p)
    p.set_defaults(run=lambda args: run(_split_urls(args)))


def _split_urls(args: argparse.Namespace) -> argparse.Namespace:
    urls = [u.strip() for u in str(args.reward).split(",") if u.strip()]
    args.reward = urls[0] if len(urls) == 1 else urls
    return args


__all__ = ["ScoreItem", "load_items", "parse_row", "register", "run", "score_batch"]
