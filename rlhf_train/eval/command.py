"""``rlhf-feedback judge-eval``: measure a judge service against human preference labels.

Sends every pair of a labelled set to ``POST {judge}/v1/compare`` (each protocol asked for, one
after the other), with bounded concurrency and retries that honour ``Retry-After`` on 429/503,
then writes ``report.json``, ``report.md``, ``calibration.png`` and ``judgments.jsonl`` to the
output folder and prints the summary table. Metric definitions: :mod:`rlhf_train.eval.judge_eval`.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import random
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

from rlhf_train.cli_env import EnvDefaults, add_api_key, add_required
from rlhf_train.eval.judge_eval import (
    DEFINITIONS,
    FORMATS,
    Dataset,
    DatasetError,
    Example,
    Judgment,
    build_protocol_report,
    first_position_counts,
    first_position_delta,
    load_dataset,
    plot_reliability,
    render_report,
    swap_slots,
)
from services import __version__

ENV_PREFIX = "RLHF_FEEDBACK_JUDGE_EVAL_"
_env = EnvDefaults(ENV_PREFIX)
PROTOCOLS = ("both_orders", "single")
RETRY_STATUS = frozenset({429, 502, 503, 504})


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "judge-eval",
        help="Measure a judge service's agreement with human preference labels.",
        description="Send a human-labelled preference set to a judge service (POST /v1/compare) and report "
        "agreement with the labels (ties handled), position consistency, first-position rate, abstain rate, "
        "length bias and calibration (Brier, ECE, a reliability PNG), for each protocol side by side. "
        f"Every flag also reads an environment variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}JUDGE).",
    )
    add_required(p, _env, "--judge", help="Judge service base URL, e.g. http://127.0.0.1:8001.")
    add_required(p, _env, "--data", type=Path, help="Data file (LLMBar: a file or its folder).")
    add_required(
        p,
        _env,
        "--format",
        choices=FORMATS,
        help="pandalm: PandaLM testset-v1.json; llmbar: LLMBar_*.json or their folder; hh-rlhf: chosen/rejected "
        "dialogues (.jsonl[.gz]); jsonl: {prompt, response_a, response_b, label: a|b|tie}.",
    )
    p.add_argument(
        "--protocol",
        choices=(*PROTOCOLS, "both"),
        default=_env("protocol", "both"),
        help="Judge protocol to evaluate; 'both' runs both_orders then single and reports them side by side.",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=_env("limit", None),
        help="Evaluate a seeded random sample of this many pairs (default: all).",
    )
    p.add_argument("--concurrency", type=int, default=int(_env("concurrency", 16)), help="Requests in flight.")
    p.add_argument(
        "--output-dir",
        type=Path,
        default=_env("output_dir", None),
        help="Where the report goes (default: judge-eval/<data name>).",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=int(_env("seed", 0)),
        help="Seeds the sample, the HH-RLHF chosen position, and which rows send response b in the first slot.",
    )
    p.add_argument(
        "--timeout", type=float, default=float(_env("timeout", 600.0)), help="Seconds to wait for one response."
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=int(_env("max_retries", 8)),
        help="Retries per pair on 429/502/503/504 and connection errors (then the pair counts as an error).",
    )
    p.add_argument(
        "--max-retry-wait",
        type=float,
        default=float(_env("max_retry_wait", 60.0)),
        help="Longest wait between retries, whatever Retry-After says.",
    )
    add_api_key(p)
    p.add_argument("--quiet", action="store_true", default=_env.flag("quiet"), help="No progress bar.")
    p.set_defaults(run=run)


# -- talking to the judge ----------------------------------------------------------------------


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number, or an HTTP date (seconds from now); None if absent or bad."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


def request_body(example: Example, protocol: str, swapped: bool) -> dict[str, Any]:
    first, second = (example.response_b, example.response_a) if swapped else (example.response_a, example.response_b)
    return {"prompt": example.prompt, "responses": [first, second], "protocol": protocol}


def parse_compare(payload: Any, swapped: bool) -> Judgment:
    """A 200 answer of /v1/compare, mapped back to the example's orientation."""
    if not isinstance(payload, dict):
        return Judgment(status="error", swapped=swapped, reason="malformed response: not an object")
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    if "abstain" in payload:
        ab = payload.get("abstain") or {}
        reason = str(ab.get("reason", "?")) if isinstance(ab, dict) else str(ab)
        return Judgment(status="abstain", swapped=swapped, reason=reason, usage=usage or {})
    pref = payload.get("preference")
    winner = payload.get("winner")
    if not isinstance(pref, int | float) or isinstance(pref, bool) or not 0.0 <= float(pref) <= 1.0:
        return Judgment(status="error", swapped=swapped, reason="malformed response: no preference in [0, 1]")
    if winner not in (0, 1, None) or isinstance(winner, bool):
        return Judgment(status="error", swapped=swapped, reason="malformed response: winner not 0, 1 or null")
    p = float(pref)
    if swapped:
        p = 1.0 - p
        winner = None if winner is None else 1 - winner
    consistent = payload.get("consistent")
    soft = payload.get("soft")
    judge = payload.get("judge")
    return Judgment(
        status="ok",
        swapped=swapped,
        preference=p,
        winner="tie" if winner is None else ("a" if winner == 0 else "b"),
        consistent=consistent if isinstance(consistent, bool) else None,
        soft=soft if isinstance(soft, bool) else None,
        cached=bool(payload.get("cached", False)),
        usage=usage or {},
        judge=judge if isinstance(judge, dict) else {},
    )


def _error_reason(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error", {})
        code, message = err.get("code"), err.get("message")
    except (ValueError, AttributeError):
        code, message = None, None
    detail = f" {code}: {message}" if code or message else ""
    return f"HTTP {resp.status_code}{detail}"[:300]


async def judge_one(
    client: httpx.AsyncClient,
    example: Example,
    protocol: str,
    *,
    seed: int,
    max_retries: int,
    max_retry_wait: float,
    sleep: Callable[[float], Any] = asyncio.sleep,
) -> Judgment:
    """One pair, one protocol: retries 429/502/503/504 and connection failures (Retry-After when
    the server sent one, else exponential backoff with jitter), reusing one Idempotency-Key."""
    swapped = swap_slots(example, seed)
    body = request_body(example, protocol, swapped)
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    last = "?"
    for attempt in range(1, max_retries + 2):
        delay: float | None = None
        try:
            resp = await client.post("/v1/compare", json=body, headers=headers)
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}: {exc}"[:300] or type(exc).__name__
        else:
            if resp.status_code == 200:
                try:
                    payload = resp.json()
                except ValueError:
                    return Judgment(status="error", swapped=swapped, reason="malformed response: not JSON")
                j = parse_compare(payload, swapped)
                return Judgment(**{**asdict(j), "attempts": attempt})
            last = _error_reason(resp)
            if resp.status_code not in RETRY_STATUS:
                return Judgment(status="error", swapped=swapped, reason=last, attempts=attempt)
            delay = retry_after_seconds(resp.headers.get("retry-after"))
        if attempt > max_retries:
            break
        if delay is None:
            delay = min(0.5 * 2 ** (attempt - 1), max_retry_wait) * random.uniform(0.5, 1.0)
        await sleep(min(delay, max_retry_wait))
    return Judgment(
        status="error", swapped=swapped, reason=f"gave up after {max_retries + 1} attempts: {last}", attempts=attempt
    )


class _Progress:
    """tqdm when installed (rate and ETA), else a plain stderr line every few seconds."""

    def __init__(self, total: int, desc: str, disable: bool) -> None:
        self.total, self.desc, self.disable = total, desc, disable
        self.done, self.start, self.last = 0, time.monotonic(), 0.0
        self._bar: Any = None
        if not disable:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="pair", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def update(self, status: str) -> None:
        self.done += 1
        if self.disable:
            return
        if self._bar is not None:
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self.last >= 2.0 or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(
                f"\r{self.desc}: {self.done}/{self.total} pairs, {rate:.2f}/s, ETA {eta:.0f}s",
                end="\n" if self.done == self.total else "",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def evaluate_protocol(
    client: httpx.AsyncClient,
    examples: Sequence[Example],
    protocol: str,
    *,
    concurrency: int,
    seed: int,
    max_retries: int,
    max_retry_wait: float,
    progress: bool = True,
) -> list[Judgment]:
    """Every example through one protocol with at most ``concurrency`` requests in flight."""
    results: list[Judgment | None] = [None] * len(examples)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(examples)):
        queue.put_nowait(i)
    bar = _Progress(len(examples), protocol, disable=not progress)

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            j = await judge_one(
                client, examples[i], protocol, seed=seed, max_retries=max_retries, max_retry_wait=max_retry_wait
            )
            results[i] = j
            bar.update(j.status)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(examples))))))
    finally:
        bar.close()
    return [r if r is not None else Judgment(status="error", reason="not run") for r in results]


async def scrape_first_position(client: httpx.AsyncClient) -> dict[str, float] | None:
    """The service's first-position counters from ``GET /metrics``, or None where it has none."""
    try:
        resp = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return first_position_counts(resp.text)


async def describe_judge(client: httpx.AsyncClient) -> dict[str, Any]:
    """``GET /v1/models``, or what went wrong (the run goes on: /v1/compare answers tell the rest)."""
    try:
        resp = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if resp.status_code != 200:
        return {"error": f"GET /v1/models: HTTP {resp.status_code}"}
    try:
        body = resp.json()
    except ValueError:
        return {"error": "GET /v1/models: not JSON"}
    return body if isinstance(body, dict) else {"models": body}


# -- the command -------------------------------------------------------------------------------


async def run_eval(args: argparse.Namespace, dataset: Dataset) -> dict[str, Any]:
    protocols = list(PROTOCOLS) if args.protocol == "both" else [args.protocol]
    headers = {"User-Agent": f"rlhf-feedback-judge-eval/{__version__}"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    limits = httpx.Limits(max_connections=max(args.concurrency, 1), max_keepalive_connections=max(args.concurrency, 1))
    judgments: dict[str, list[Judgment]] = {}
    timings: dict[str, float] = {}
    server_fp: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(
        base_url=args.judge.rstrip("/"), timeout=httpx.Timeout(args.timeout), headers=headers, limits=limits
    ) as client:
        models = await describe_judge(client)
        for protocol in protocols:
            before = await scrape_first_position(client)
            t0 = time.monotonic()
            judgments[protocol] = await evaluate_protocol(
                client,
                dataset.examples,
                protocol,
                concurrency=args.concurrency,
                seed=args.seed,
                max_retries=args.max_retries,
                max_retry_wait=args.max_retry_wait,
                progress=not args.quiet,
            )
            timings[protocol] = time.monotonic() - t0
            server_fp[protocol] = first_position_delta(before, await scrape_first_position(client))

    report: dict[str, Any] = {
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": {
            "path": str(args.data),
            "name": dataset.name,
            "format": dataset.format,
            "n": len(dataset.examples),
            "limit": args.limit,
            "seed": args.seed,
            "skipped": dict(dataset.skipped),
            "notes": dict(dataset.notes),
        },
        "judge_url": args.judge,
        "judge": _judge_ref(judgments, models),
        "models": models,
        "protocols": {},
        "definitions": DEFINITIONS,
    }
    for protocol in protocols:
        pairs = list(zip(dataset.examples, judgments[protocol], strict=True))
        section = build_protocol_report(pairs, protocol)
        section["overall"]["first_position_server"] = server_fp[protocol]
        section["elapsed_s"] = round(timings[protocol], 3)
        section["pairs_per_s"] = round(len(pairs) / timings[protocol], 3) if timings[protocol] > 0 else None
        report["protocols"][protocol] = section
    report["_judgments"] = judgments
    return report


def _judge_ref(judgments: dict[str, list[Judgment]], models: dict[str, Any]) -> dict[str, Any]:
    """The judge as its answers name it (``judge: {backend, model, template_hash}``; every distinct
    one when they differ), else the scalar fields of ``GET /v1/models``."""
    refs: list[dict[str, Any]] = []
    for js in judgments.values():
        for j in js:
            if j.judge and dict(j.judge) not in refs:
                refs.append(dict(j.judge))
    if len(refs) == 1:
        return refs[0]
    if refs:
        return {"distinct": refs}
    return {k: v for k, v in models.items() if isinstance(v, str | int | float)}


def write_outputs(report: dict[str, Any], dataset: Dataset, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    judgments: dict[str, list[Judgment]] = report.pop("_judgments")
    paths = {
        "json": out_dir / "report.json",
        "markdown": out_dir / "report.md",
        "png": out_dir / "calibration.png",
        "judgments": out_dir / "judgments.jsonl",
    }
    report["outputs"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_report(report, markdown=True), encoding="utf-8")
    plot_reliability(report, paths["png"])
    with paths["judgments"].open("w", encoding="utf-8") as fh:
        for protocol, js in judgments.items():
            for ex, j in zip(dataset.examples, js, strict=True):
                row = {"id": ex.id, "subset": ex.subset or None, "label": ex.label, "protocol": protocol, **asdict(j)}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


def run(args: argparse.Namespace) -> int:
    if args.limit is not None:
        args.limit = int(args.limit)
    if args.concurrency < 1:
        print("rlhf-feedback judge-eval: --concurrency must be at least 1", file=sys.stderr)
        return 2
    try:
        dataset = load_dataset(Path(args.data), args.format, seed=args.seed, limit=args.limit)
    except (DatasetError, OSError, json.JSONDecodeError) as exc:
        print(f"rlhf-feedback judge-eval: {exc}", file=sys.stderr)
        return 2
    if not dataset.examples:
        print(f"rlhf-feedback judge-eval: {args.data}: no pairs to evaluate", file=sys.stderr)
        return 2
    out_dir = args.output_dir or Path("judge-eval") / dataset.name
    report = asyncio.run(run_eval(args, dataset))
    paths = write_outputs(report, dataset, out_dir)
    print(render_report(report, markdown=False))
    print(f"report: {paths['json']}  table: {paths['markdown']}  plot: {paths['png']}")
    judged = sum(report["protocols"][p]["overall"]["judged"] for p in report["protocols"])
    return 0 if judged else 1
