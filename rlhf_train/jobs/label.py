"""``rlhf-feedback label``: label DPO preference pairs with the judge service, resumably.

Input rows (``.jsonl``, ``.json`` or ``.parquet``)::

    {"prompt": str | [messages], "completions": [str, str, ...]}     # two or more
    {"prompt": ..., "chosen": ..., "rejected": ...}                  # re-label an existing pair

(``chosen``/``rejected`` may be strings, one ``{"role": "assistant", ...}`` message, or a list
holding one, as in TRL's conversational format.) Two completions: one ``compare``. More: the
judge's ``rank``, then ``compare`` of its best against its worst (``--pairs best-worst``), or
``compare`` of every pair (``--pairs all``).

Output rows are TRL's conversational preference format with an explicit prompt::

    {"prompt": [messages], "chosen": [{"role": "assistant", "content": ...}], "rejected": [...],
     "preference": P(chosen better), "consistent": bool | null,
     "judge": {"backend", "model", "template_hash"}, "id": sha256(row content + pair)}

With ``--margin`` the rows also carry ``"margin": log(p / (1 - p))``, the Bradley-Terry margin of
the judgment. It is opt-in because TRL's ``RewardTrainer`` reads a ``margin`` column whenever the
dataset has one and subtracts it inside its loss (``-logsigmoid(r_chosen - r_rejected - margin)``,
trl 1.16 ``reward_trainer.py``): the rewards must then be that much further apart, which changes
what the trainer learns. ``--margin`` is one of the settings a job resumes under.

Ties (``winner`` null), abstentions, items below ``--min-confidence`` (confidence = ``|2p - 1|``)
and items the judge refuses as invalid go to the rejects file with their reason, never to the
output. Resuming after any crash: :mod:`rlhf_train.jobs.io`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
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
    default_rejects_path,
    exit_code,
    in_input_order,
    journal_path,
    output_format,
    read_rows,
    run_units,
    start_fresh,
    write_bytes_atomically,
    write_jsonl,
    write_rows,
)

PAIR_MODES = ("best-worst", "all")
PROTOCOLS = ("both_orders", "single")
REJECT_KINDS = ("tie", "abstain", "low_confidence", "invalid")
P_CLIP = 1e-6  # margins stay finite for p = 0 or 1

Prompt = str | list[dict[str, str]]


# -- input rows ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelItem:
    """One input row, checked: its prompt, its completions and its key (content hash)."""

    index: int
    where: str
    key: str
    content: dict[str, Any]  # what the key and the ids are hashed from
    prompt: Prompt
    completions: list[str]


def as_messages(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{what}[{i}] must be a message with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def as_completion(value: Any, what: str) -> str:
    """A completion: a string, one assistant message, or a list holding exactly one (TRL's format)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list) and len(value) == 1:
        (m,) = as_messages(value, what)
        return m["content"]
    raise ValueError(f"{what} must be a string or a single assistant message")


def parse_row(data: Any) -> tuple[Prompt, list[str]]:
    """The prompt and completions of one input row; ValueError saying what is wrong."""
    if not isinstance(data, Mapping):
        raise ValueError(f"a row is a JSON object, not {type(data).__name__}")
    if "prompt" not in data:
        raise ValueError("the row has no 'prompt'")
    prompt_raw = data["prompt"]
    prompt: Prompt = prompt_raw if isinstance(prompt_raw, str) else as_messages(prompt_raw, "prompt")
    if data.get("completions") is not None:
        raw = data["completions"]
        if not isinstance(raw, list) or len(raw) < 2:
            raise ValueError("'completions' must be a list of at least 2 completions")
        completions = [as_completion(c, f"completions[{i}]") for i, c in enumerate(raw)]
    elif "chosen" in data and "rejected" in data:
        completions = [as_completion(data["chosen"], "chosen"), as_completion(data["rejected"], "rejected")]
    else:
        raise ValueError("the row needs 'completions' (a list of at least 2) or 'chosen' and 'rejected'")
    return prompt, completions


def load_items(path: Path) -> list[LabelItem]:
    """Every row of the input, checked up front (InputError names the first bad line)."""
    items: list[LabelItem] = []
    seen: Counter[str] = Counter()
    for row in read_rows(path):
        items.append(_item(path, row, seen))
    return items


def _item(path: Path, row: SourceRow, seen: Counter[str]) -> LabelItem:
    try:
        prompt, completions = parse_row(row.data)
    except ValueError as exc:
        raise InputError(f"{path}: {row.where}: {exc}") from None
    content: dict[str, Any] = {"prompt": prompt, "completions": completions}
    base = content_hash(content)
    occurrence = seen[base]
    seen[base] += 1
    if occurrence:  # the same content again: a distinct item with a distinct key
        content = {**content, "occurrence": occurrence}
    return LabelItem(row.index, row.where, content_hash(content), content, prompt, completions)


def pair_id(item: LabelItem, i: int, j: int) -> str:
    """The output id of the pair (i, j) of a row: stable across runs, machines and file paths."""
    a, b = sorted((i, j))
    return content_hash({**item.content, "pair": [a, b]})


def prompt_messages(prompt: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


# -- judging one row ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelOptions:
    pairs: str = "best-worst"
    protocol: str = "both_orders"
    min_confidence: float = 0.0
    rubric: str | None = None
    llama_factory: bool = False  # add chosen_message / rejected_message (single messages)
    margin: bool = False  # write the margin column (TRL's RewardTrainer subtracts it in its loss)


def _new_stats() -> dict[str, Any]:
    return {
        "judgments": 0,
        "abstained": 0,
        "consistent": 0,
        "consistency_known": 0,
        "cached": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cost_usd": 0.0,
        "pairs": 0,
        "rejects": {},
    }


def _add_usage(stats: dict[str, Any], result: Any) -> None:
    u = result.usage
    stats["prompt_tokens"] += int(u.prompt_tokens)
    stats["completion_tokens"] += int(u.completion_tokens)
    stats["cost_usd"] += float(u.cost_usd)
    stats["judgments"] += 1
    stats["cached"] += int(bool(result.cached))
    if result.abstain_reason is not None:
        stats["abstained"] += 1


def _judge_json(ref: Any) -> dict[str, str] | None:
    if ref is None:
        return None
    return {"backend": ref.backend, "model": ref.model, "template_hash": ref.template_hash}


def _reject(
    item: LabelItem,
    stats: dict[str, Any],
    kind: str,
    reason: str,
    pair: tuple[int, int] | None,
    *,
    preference: float | None = None,
    judge: Any = None,
) -> dict[str, Any]:
    stats["rejects"][kind] = stats["rejects"].get(kind, 0) + 1
    completions = [item.completions[pair[0]], item.completions[pair[1]]] if pair else item.completions
    return {
        "id": pair_id(item, *pair) if pair else item.key,
        "kind": kind,
        "reason": reason,
        "input": item.where,
        "pair": list(pair) if pair else None,
        "preference": preference,
        "prompt": prompt_messages(item.prompt),
        "completions": completions,
        "judge": _judge_json(judge),
    }


def _decide(
    item: LabelItem, i: int, j: int, judgment: Any, opts: LabelOptions, stats: dict[str, Any]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """One judgment of completions (i, j), sent in that order, into a data row or a reject."""
    _add_usage(stats, judgment)
    if judgment.consistent is not None:
        stats["consistency_known"] += 1
        stats["consistent"] += int(bool(judgment.consistent))
    p = judgment.preference
    if p is None:
        return None, _reject(
            item, stats, "abstain", f"abstain: {judgment.abstain_reason}", (i, j), judge=judgment.judge
        )
    if judgment.winner is None:
        reason = f"tie: preference {p:.3f} is within the judge's tie margin of 0.5"
        return None, _reject(item, stats, "tie", reason, (i, j), preference=p, judge=judgment.judge)
    confidence = abs(2.0 * p - 1.0)
    if confidence < opts.min_confidence:
        reason = f"low confidence: |2p - 1| = {confidence:.3f} < --min-confidence {opts.min_confidence:g}"
        return None, _reject(item, stats, "low_confidence", reason, (i, j), preference=p, judge=judgment.judge)
    win, lose = (i, j) if judgment.winner == 0 else (j, i)
    pref = p if judgment.winner == 0 else 1.0 - p
    q = min(max(pref, P_CLIP), 1.0 - P_CLIP)
    chosen = {"role": "assistant", "content": item.completions[win]}
    rejected = {"role": "assistant", "content": item.completions[lose]}
    row: dict[str, Any] = {
        "id": pair_id(item, i, j),
        "prompt": prompt_messages(item.prompt),
        "chosen": [chosen],
        "rejected": [rejected],
        "preference": pref,
        "margin": math.log(q / (1.0 - q)),
        "consistent": judgment.consistent,
        "judge": _judge_json(judgment.judge),
    }
    if opts.llama_factory:
        row["chosen_message"] = dict(chosen)
        row["rejected_message"] = dict(rejected)
    stats["pairs"] += 1
    return row, None


async def label_item(client: Any, item: LabelItem, opts: LabelOptions) -> dict[str, Any]:
    """Judge one row into its journal record ``{k, out, rej, stats}``.

    Raises :class:`UnitFailed` when the judge service could not be reached (the row stays pending),
    :class:`JobError` on an authentication failure; a request the service calls invalid becomes a
    reject of kind ``invalid``.
    """
    from clients.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError, RlhfFeedbackError

    stats = _new_stats()
    out: list[dict[str, Any]] = []
    rej: list[dict[str, Any]] = []

    async def compare(i: int, j: int) -> None:
        judgment = await client.compare(
            item.prompt, item.completions[i], item.completions[j], rubric=opts.rubric, protocol=opts.protocol
        )
        row, reject = _decide(item, i, j, judgment, opts, stats)
        if row is not None:
            out.append(row)
        if reject is not None:
            rej.append(reject)

    n = len(item.completions)
    try:
        if n == 2:
            await compare(0, 1)
        elif opts.pairs == "all":
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
            # Judged concurrently; kept in pair order so that the record does not depend on timing.
            judgments = await asyncio.gather(
                *(
                    client.compare(
                        item.prompt,
                        item.completions[i],
                        item.completions[j],
                        rubric=opts.rubric,
                        protocol=opts.protocol,
                    )
                    for i, j in pairs
                )
            )
            for (i, j), judgment in zip(pairs, judgments, strict=True):
                row, reject = _decide(item, i, j, judgment, opts, stats)
                if row is not None:
                    out.append(row)
                if reject is not None:
                    rej.append(reject)
        else:
            ranking = await client.rank(item.prompt, item.completions, rubric=opts.rubric)
            _add_usage(stats, ranking)
            if ranking.ranking is None:
                reason = f"abstain: {ranking.abstain_reason}"
                rej.append(_reject(item, stats, "abstain", reason, None, judge=ranking.judge))
            else:
                await compare(ranking.ranking[0], ranking.ranking[-1])
    except (AuthenticationError, PermissionDeniedError) as exc:
        raise JobError(f"the judge service refused the credentials: {exc}") from None
    except InvalidRequestError as exc:
        stats = _new_stats()
        out, rej = [], [_reject(item, stats, "invalid", f"invalid: {exc}", None)]
    except RlhfFeedbackError as exc:
        raise UnitFailed(f"{item.where}: {type(exc).__name__}: {exc}") from None
    return {"k": item.key, "out": out, "rej": rej, "stats": stats}


# -- the job -----------------------------------------------------------------------------------------


@dataclass
class Totals:
    """Statistics summed over finished rows."""

    rows: int = 0
    pairs: int = 0
    judgments: int = 0
    abstained: int = 0
    consistent: int = 0
    consistency_known: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def __post_init__(self) -> None:
        self.rejects: Counter[str] = Counter()

    def add(self, stats: Mapping[str, Any]) -> None:
        self.rows += 1
        for name in (
            "pairs",
            "judgments",
            "abstained",
            "consistent",
            "consistency_known",
            "cached",
            "prompt_tokens",
            "completion_tokens",
        ):
            setattr(self, name, getattr(self, name) + int(stats.get(name, 0)))
        self.cost_usd += float(stats.get("cost_usd", 0.0))
        self.rejects.update({k: int(v) for k, v in (stats.get("rejects") or {}).items()})


def job_config(opts: LabelOptions) -> dict[str, Any]:
    """The settings that shape the output: a journal only resumes under the same ones."""
    return {
        "pairs": opts.pairs,
        "protocol": opts.protocol,
        "min_confidence": float(opts.min_confidence),
        "rubric": opts.rubric,
        "llama_factory_columns": opts.llama_factory,
        # only when set: journals of releases that always wrote the margin resume without it
        **({"margin_column": True} if opts.margin else {}),
    }


def arrow_schema(opts: LabelOptions) -> Any:
    """The Parquet schema of the output (TRL's columns, typed even when there are no rows)."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    fields = [
        ("id", pa.string()),
        ("prompt", pa.list_(message)),
        ("chosen", pa.list_(message)),
        ("rejected", pa.list_(message)),
        ("preference", pa.float64()),
        *([("margin", pa.float64())] if opts.margin else []),
        ("consistent", pa.bool_()),
        ("judge", pa.struct([("backend", pa.string()), ("model", pa.string()), ("template_hash", pa.string())])),
    ]
    if opts.llama_factory:
        fields += [("chosen_message", message), ("rejected_message", message)]
    return pa.schema(fields)


def dataset_info_entry(output: Path, info_path: Path) -> dict[str, Any]:
    """A LLaMA-Factory ``dataset_info.json`` entry for the output (sharegpt, ranking)."""
    return {
        "file_name": os.path.relpath(output.resolve(), info_path.resolve().parent),
        "formatting": "sharegpt",
        "ranking": True,
        "columns": {"messages": "prompt", "chosen": "chosen_message", "rejected": "rejected_message"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
            "system_tag": "system",
        },
    }


def write_dataset_info(info_path: Path, name: str, output: Path) -> None:
    """Add (or replace) the entry ``name`` in ``info_path``, keeping the other entries."""
    import json

    entries: dict[str, Any] = {}
    if info_path.exists():
        try:
            entries = json.loads(info_path.read_text(encoding="utf-8") or "{}")
        except json.JSONDecodeError as exc:
            raise JobError(f"{info_path}: not valid JSON ({exc}); not touching it") from None
        if not isinstance(entries, dict):
            raise JobError(f"{info_path}: not a JSON object; not touching it")
    entries[name] = dataset_info_entry(output, info_path)
    write_bytes_atomically(info_path, (json.dumps(entries, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _materialize(
    state: ResumeState, items: Sequence[LabelItem], output: Path, rejects: Path, opts: LabelOptions
) -> tuple[int, int]:
    """Rebuild the output and the rejects file from the journal, in input order."""
    out: list[dict[str, Any]] = []
    rej: list[dict[str, Any]] = []
    for rec in in_input_order(state.done, [it.key for it in items]):
        out.extend(rec.get("out") or ())
        rej.extend(rec.get("rej") or ())
    if not opts.margin:  # journaled rows carry it (and did before --margin existed)
        out = [{k: v for k, v in row.items() if k != "margin"} for row in out]
    n_out = write_rows(output, out, arrow_schema(opts) if output_format(output) == "parquet" else None)
    n_rej = write_jsonl(rejects, rej)
    return n_out, n_rej


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "n/a"


def summary_text(
    totals: Totals,
    *,
    total_rows: int,
    this_run: int,
    failed: int,
    output: Path,
    rejects: Path,
    elapsed: float,
) -> str:
    n_rej = sum(totals.rejects.values())
    kinds = ", ".join(f"{k} {totals.rejects.get(k, 0)}" for k in REJECT_KINDS)
    lines = [
        f"label: {total_rows} input rows: {totals.rows} done ({this_run} this run, {totals.rows - this_run} earlier)"
        + (f", {failed} failed (rerun to retry them)" if failed else "")
        + (f", {total_rows - totals.rows - failed} not started" if total_rows - totals.rows - failed > 0 else ""),
        f"  pairs written: {totals.pairs} -> {output}",
        f"  rejected: {n_rej} ({kinds}) -> {rejects}",
        f"  judgments: {totals.judgments}; consistent {_pct(totals.consistent, totals.consistency_known)}"
        f" (of {totals.consistency_known} judged in both orders); abstained {_pct(totals.abstained, totals.judgments)};"
        f" cached {_pct(totals.cached, totals.judgments)}",
        f"  tokens: {totals.prompt_tokens:,} prompt + {totals.completion_tokens:,} completion;"
        f" cost ${totals.cost_usd:.4f}; {elapsed:.1f}s this run",
    ]
    return "\n".join(lines)


async def _label_all(
    args: argparse.Namespace,
    items: Sequence[LabelItem],
    pending: Sequence[LabelItem],
    journal: Journal,
    state: ResumeState,
    opts: LabelOptions,
    totals: Totals,
) -> Any:
    from clients import AsyncJudgeClient

    def postfix() -> str:
        return f"pairs={totals.pairs} rejects={sum(totals.rejects.values())} cost=${totals.cost_usd:.4f}"

    def on_commit(records: Sequence[Mapping[str, Any]]) -> None:
        for rec in records:
            totals.add(rec.get("stats") or {})

    progress = Progress(
        total=len(items), initial=len(items) - len(pending), desc="label", quiet=args.quiet, postfix=postfix
    )
    client = AsyncJudgeClient(args.judge, api_key=args.api_key, timeout=args.timeout, max_retries=args.max_retries)
    try:

        async def work(item: LabelItem) -> list[dict[str, Any]]:
            return [await label_item(client, item, opts)]

        return await run_units(
            pending,
            work,
            journal=journal,
            state=state,
            concurrency=args.concurrency,
            progress=progress,
            on_commit=on_commit,
            max_failures_in_a_row=max(20, 2 * args.concurrency),
        )
    finally:
        progress.close()
        await client.aclose()


def run(args: argparse.Namespace) -> int:
    """The ``label`` command; exit 0 when it finished (rejects included), 1 when it failed, 2 on bad input."""
    try:
        return _run(args)
    except JobError as exc:
        print(f"rlhf-feedback label: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("rlhf-feedback label: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    output = Path(args.output)
    output_format(output)
    rejects = Path(args.rejects) if args.rejects else default_rejects_path(output)
    if args.concurrency < 1:
        raise InputError("--concurrency must be at least 1")
    if not 0.0 <= args.min_confidence <= 1.0:
        raise InputError("--min-confidence is a confidence |2p - 1| between 0 and 1")
    if (args.dataset_name is not None) and args.dataset_info is None:
        raise InputError("--dataset-name goes with --dataset-info")
    if rejects.resolve() == output.resolve():
        raise InputError("--rejects must differ from --output")
    opts = LabelOptions(
        pairs=args.pairs,
        protocol=args.protocol,
        min_confidence=float(args.min_confidence),
        rubric=args.rubric,
        llama_factory=args.dataset_info is not None,
        margin=bool(args.margin),
    )
    items = load_items(Path(args.input))
    jpath = journal_path(output)
    if args.restart:
        start_fresh([jpath, output, rejects])
    check_fresh_outputs(jpath, [output, rejects])
    journal, state = Journal.open(jpath, job="label", config=job_config(opts))
    try:
        pending = [it for it in items if it.key not in state.done]
        totals = Totals()
        for rec in in_input_order(state.done, [it.key for it in items]):
            totals.add(rec.get("stats") or {})
        if state.complete:
            if pending:
                raise InputError(
                    f"{jpath}: this job finished earlier and the input now has {len(pending)} rows it did not "
                    "label; pass --restart to label the whole input again (the judge's cache keeps it cheap)"
                )
            if not output.exists() or not rejects.exists():
                raise JobError(f"{jpath}: the job finished earlier but its output is gone; pass --restart")
            if args.dataset_info is not None:
                write_dataset_info(Path(args.dataset_info), args.dataset_name or output.stem, output)
            print(
                summary_text(
                    totals,
                    total_rows=len(items),
                    this_run=0,
                    failed=0,
                    output=output,
                    rejects=rejects,
                    elapsed=time.monotonic() - t0,
                )
            )
            return 0
        batch = None
        if getattr(args, "batch_api", False) and pending:  # phase 1: the providers' batch APIs fill the cache
            from rlhf_train.jobs.label_batch import run_batch_phase

            batch = run_batch_phase(args, items, journal, job_config(opts), opts)
        outcome = asyncio.run(_label_all(args, items, pending, journal, state, opts, totals)) if pending else None
        _materialize(state, items, output, rejects, opts)
        done = all(it.key in state.done for it in items)
        if done:
            journal.compact(in_input_order(state.done, [it.key for it in items]))
        if args.dataset_info is not None:
            write_dataset_info(Path(args.dataset_info), args.dataset_name or output.stem, output)
    finally:
        journal.close()
    failed = outcome.failed if outcome is not None else 0
    print(
        summary_text(
            totals,
            total_rows=len(items),
            this_run=outcome.committed if outcome is not None else 0,
            failed=failed,
            output=output,
            rejects=rejects,
            elapsed=time.monotonic() - t0,
        )
    )
    if batch is not None:
        print(batch.text())
    return exit_code("label", outcome, pending=0 if done else len(items) - len(state.done), verb="judged")


# -- the parser ------------------------------------------------------------------------------------

ENV_PREFIX = "RLHF_FEEDBACK_LABEL_"
_env = EnvDefaults(ENV_PREFIX)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_service_io(
        p,
        _env,
        service="judge",
        service_help="Judge service URL: http(s)://host:port or grpc(s)://host:port (several: comma-separated).",
        input_help="Rows {prompt, completions: [>= 2]} or {prompt, chosen, rejected}: .jsonl, .json or .parquet.",
        output_help="Preference pairs in TRL's conversational format; .jsonl or .parquet (from the extension).",
    )
    p.add_argument(
        "--rejects",
        default=_env("rejects", None),
        help="Ties, abstentions, low-confidence and invalid items with their reason "
        "(default: <output stem>.rejects.jsonl).",
    )
    p.add_argument("--concurrency", type=int, default=int(_env("concurrency", 8)), help="Rows judged at once.")
    p.add_argument(
        "--pairs",
        choices=PAIR_MODES,
        default=_env("pairs", "best-worst"),
        help="With more than two completions: best vs worst by the judge's ranking, or every pair.",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        default=float(_env("min_confidence", 0.0)),
        help="Reject judgments with confidence |2p - 1| below this.",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=_env("protocol", "both_orders"),
        help="both_orders (each pair judged in both slots; consistency known) or single.",
    )
    p.add_argument("--rubric", default=_env("rubric", None), help="Rubric the judge applies to every comparison.")
    p.add_argument(
        "--margin",
        action="store_true",
        default=_env.flag("margin"),
        help="Also write a margin column, log(p / (1 - p)). TRL's RewardTrainer subtracts a margin column in its "
        "loss whenever the dataset has one (-logsigmoid(r_chosen - r_rejected - margin)); off by default.",
    )
    p.add_argument(
        "--dataset-info",
        default=_env("dataset_info", None),
        help="Also add the output to this LLaMA-Factory dataset_info.json (sharegpt, ranking); adds the "
        "single-message columns chosen_message / rejected_message that LLaMA-Factory reads.",
    )
    p.add_argument(
        "--dataset-name",
        default=_env("dataset_name", None),
        help="The dataset_info.json entry's name (default: the output's stem).",
    )
    from rlhf_train.jobs.label_batch import add_batch_arguments

    add_batch_arguments(p, _env)
    add_request_flags(p, _env, request="judge", timeout=300.0, failed="its row counts", outputs="outputs")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "label",
        help="Label DPO preference pairs with the judge service (resumable).",
        description="Ask a judge service which completion of each row is better and write TRL preference rows "
        "(conversational, explicit prompt) with preference, consistency, judge provenance and a stable id (the "
        "Bradley-Terry margin with --margin). "
        "Ties, abstentions and low-confidence items go to the rejects file. Kill it at any moment and run the same "
        f"command again: it resumes. Every flag also reads an environment variable {ENV_PREFIX}<FLAG>.",
    )
    add_arguments(p)
    p.set_defaults(run=lambda args: run(_split_urls(args)))


def _split_urls(args: argparse.Namespace) -> argparse.Namespace:
    urls = [u.strip() for u in str(args.judge).split(",") if u.strip()]
    args.judge = urls[0] if len(urls) == 1 else urls
    return args


__all__ = ["LabelItem", "LabelOptions", "label_item", "load_items", "pair_id", "parse_row", "register", "run"]
