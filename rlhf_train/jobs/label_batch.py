"""``rlhf-feedback label --batch-api``: judge every pair through the provider's batch API first (half price,
outside the interactive rate limits), then label as usual, every call answered from the judge's cache.

Phase 1 (this module) builds exactly the requests the interactive run sends (one ``compare`` per
pair of two completions or per pair with ``--pairs all``; one ``rank`` per row of more completions
with ``--pairs best-worst``), in chunks of ``--batch-chunk`` over the *whole* input, each sent once
to the judge's ``POST /v1/batches`` with an idempotency key derived from the chunk's content and
the job's settings. Every judge batch id is appended to the job's journal (fsynced) as soon as it
is known; a run killed at any moment and run again polls the recorded jobs, and re-sends an
unrecorded chunk with the same key, which returns the job the judge already has: no provider batch
is ever created twice. The judge service resubmits failed and expired requests itself.

Phase 2 is the interactive labelling of :mod:`rlhf_train.jobs.label`, unchanged: its rows are
byte-identical to an interactive run's with the same replies, and it makes no provider call (the
compare of a rank's best against its worst is among the pairs the rank judged, unless the judge
samples pairs, above its ``--rank-max-pairs``). Requests the batch could not judge (failed after
the judge's attempts) are asked interactively in phase 2, and abstain there as they would.

The provider's own turnaround is up to 24 hours: ``--batch-timeout`` stops phase 1 (exit 1, the
journal keeps the batch ids) so that a later run resumes polling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from rlhf_train.cli_env import EnvDefaults
from rlhf_train.jobs.io import InputError, JobError, Journal, Progress, content_hash

BATCH_RECORD = "batch"  # journal lines {"batch": {"chunk", "of", "key", "id"}}: ignored by the row reader


def add_batch_arguments(p: argparse.ArgumentParser, env: EnvDefaults) -> None:
    """``--batch-api`` and its knobs (each with its ``RLHF_FEEDBACK_LABEL_*`` variable)."""
    p.add_argument(
        "--batch-api",
        action="store_true",
        default=env.flag("batch_api"),
        help="Judge every pair through the provider's batch API first (half price; the judge needs a cache and an "
        "openai or anthropic backend), then label from the judge's cache. Turnaround: up to 24 h.",
    )
    p.add_argument(
        "--batch-chunk",
        type=int,
        default=int(env("batch_chunk", 1000)),
        help="Requests per judge batch job (the judge splits them into provider batches within their limits).",
    )
    p.add_argument(
        "--batch-poll",
        type=float,
        default=float(env("batch_poll", 30.0)),
        help="Seconds between polls of the judge's batch jobs.",
    )
    p.add_argument(
        "--batch-timeout",
        type=float,
        default=float(env("batch_timeout", 0.0)),
        help="Stop waiting for the batches after this many seconds (exit 1; rerun to resume polling). 0: no limit.",
    )


@dataclass
class BatchTotals:
    """What the judge's batch jobs of this label job report, summed."""

    jobs: int = 0
    requests: int = 0
    queries: int = 0
    cached: int = 0
    done: int = 0
    failed: int = 0
    provider_batches: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    interactive_cost_usd: float = 0.0

    @classmethod
    def of(cls, jobs: Sequence[Mapping[str, Any]]) -> BatchTotals:
        t = cls(jobs=len(jobs))
        for j in jobs:
            q, u = j["queries"], j["usage"]
            t.requests += int(j["requests"])
            t.queries += int(q["total"])
            t.cached += int(q["cached"])
            t.done += int(q["done"])
            t.failed += int(q["failed"])
            t.provider_batches += len(j.get("provider_batches") or ())
            t.prompt_tokens += int(u["prompt_tokens"])
            t.completion_tokens += int(u["completion_tokens"])
            t.cost_usd += float(u["cost_usd"])
            t.interactive_cost_usd += float(u["interactive_cost_usd"])
        return t

    def text(self) -> str:
        return (
            f"  batch API: {self.jobs} judge batch jobs, {self.requests} requests, {self.queries} verdict queries "
            f"({self.cached} already cached, {self.done} judged in {self.provider_batches} provider batches, "
            f"{self.failed} failed and left to the interactive pass); tokens {self.prompt_tokens:,} prompt + "
            f"{self.completion_tokens:,} completion; cost ${self.cost_usd:.6f} at batch prices "
            f"(${self.interactive_cost_usd:.6f} at interactive prices)"
        )


def batch_requests(items: Sequence[Any], opts: Any) -> list[dict[str, Any]]:
    """The judge requests of ``label_item`` for every row, in input order, as batch-job items."""
    from clients.judge import compare_request, rank_request

    out: list[dict[str, Any]] = []
    for item in items:
        n = len(item.completions)
        if n == 2:
            pairs = [(0, 1)]
        elif opts.pairs == "all":
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        else:
            out.append(rank_request(item.prompt, item.completions, rubric=opts.rubric))
            continue
        for i, j in pairs:
            out.append(
                compare_request(
                    item.prompt, item.completions[i], item.completions[j], rubric=opts.rubric, protocol=opts.protocol
                )
            )
    return out


def recorded_jobs(path: Path) -> dict[int, dict[str, Any]]:
    """The batch records of the journal at ``path`` by chunk number (the journal is already opened and
    checked: a regular file, not a link, its torn tail cut)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    finally:
        os.close(fd)
    found: dict[int, dict[str, Any]] = {}
    for raw in data.split(b"\n"):
        if BATCH_RECORD.encode() not in raw:
            continue
        try:
            rec = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        b = rec.get(BATCH_RECORD) if isinstance(rec, dict) else None
        if isinstance(b, dict) and isinstance(b.get("chunk"), int) and isinstance(b.get("id"), str):
            found[b["chunk"]] = b
    return found


def run_batch_phase(args: argparse.Namespace, items: Sequence[Any], journal: Journal, config: Mapping[str, Any],
                    opts: Any) -> BatchTotals:  # fmt: skip
    """Phase 1: every request judged through the batch API into the judge's cache (see the module docstring)."""
    if args.batch_chunk < 1:
        raise InputError("--batch-chunk must be at least 1")
    if args.batch_poll <= 0:
        raise InputError("--batch-poll must be > 0")
    urls = args.judge if isinstance(args.judge, list) else [args.judge]
    if any(not str(u).startswith(("http://", "https://")) for u in urls):
        raise InputError("--batch-api talks to the judge's HTTP API: pass an http(s):// --judge URL")
    requests = batch_requests(items, opts)
    chunks = [requests[i : i + args.batch_chunk] for i in range(0, len(requests), args.batch_chunk)]
    return asyncio.run(_phase(args, chunks, journal, config))


async def _phase(
    args: argparse.Namespace, chunks: Sequence[Sequence[dict[str, Any]]], journal: Journal, config: Mapping[str, Any]
) -> BatchTotals:
    from clients import AsyncJudgeClient
    from clients.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError, RlhfFeedbackError

    recorded = recorded_jobs(journal.path)
    client = AsyncJudgeClient(args.judge, api_key=args.api_key, timeout=args.timeout, max_retries=args.max_retries)
    started = time.monotonic()
    progress: Progress | None = None
    try:
        ids: list[str] = []
        for n, chunk in enumerate(chunks):
            key = "label-" + content_hash({"job": "label", "config": dict(config), "chunk": n, "requests": chunk})[:40]
            rec = recorded.get(n)
            if rec is not None and rec.get("key") == key:
                ids.append(str(rec["id"]))
                continue
            # Not recorded (or killed before it was): the same key returns the job the judge already has.
            job = await client.batch_create(chunk, idempotency_key=key)
            journal.append([{BATCH_RECORD: {"chunk": n, "of": len(chunks), "key": key, "id": job["id"]}}])
            ids.append(str(job["id"]))
        jobs: list[dict[str, Any]] = []

        def postfix() -> str:
            t = BatchTotals.of(jobs)
            return f"batches={t.provider_batches} failed={t.failed} cost=${t.cost_usd:.4f}"

        while True:
            jobs = [await client.batch_status(i) for i in ids]
            total = sum(int(j["queries"]["total"]) for j in jobs)
            settled = sum(int(j["queries"][k]) for j in jobs for k in ("cached", "done", "failed"))
            if progress is None:
                progress = Progress(total=total, initial=0, desc="label batch", quiet=args.quiet, postfix=postfix)
                progress_n = 0
            progress.update(settled - progress_n)
            progress_n = settled
            if all(j["status"] == "completed" for j in jobs):
                return BatchTotals.of(jobs)
            if args.batch_timeout and time.monotonic() - started >= args.batch_timeout:
                raise JobError(
                    f"--batch-timeout {args.batch_timeout:g}s: {total - settled} of {total} verdict queries are still "
                    "in the providers' batches (up to 24 h); run the same command again to resume polling"
                )
            await asyncio.sleep(args.batch_poll)
    except (AuthenticationError, PermissionDeniedError) as exc:
        raise JobError(f"the judge service refused the credentials: {exc}") from None
    except InvalidRequestError as exc:
        raise InputError(f"--batch-api: the judge refused the batch: {exc}") from None
    except RlhfFeedbackError as exc:
        raise JobError(f"--batch-api: {type(exc).__name__}: {exc}; run the same command again to resume") from None
    finally:
        if progress is not None:
            progress.close()
        await client.aclose()


__all__ = ["BatchTotals", "add_batch_arguments", "batch_requests", "recorded_jobs", "run_batch_phase"]
