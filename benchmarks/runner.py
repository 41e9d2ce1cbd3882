"""Run the reward benchmark: servers and the in-process limit, interleaved, one thing at a time.

Order of a run: the texts are loaded and cut; the limit worker loads the model and measures
every token budget once (that picks ``--max-batch-tokens auto``); the servers start. Then for
each round: the limit (every budget), then each server × transport × load, then the GRPO load.
Only one of them runs at a time; the others sleep (``OMP_WAIT_POLICY=PASSIVE`` in every
process). Ratios are taken per round (ours_r / best limit_r) and reported as medians, since a
shared machine drifts between rounds.
"""

from __future__ import annotations

import asyncio
import re
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.inprocess import LimitWorker
from benchmarks.loadgen import Load, RunResult, chunks, run_load
from benchmarks.models import load_tokenizer, model_max_tokens, reference_scores, subprocess_env
from benchmarks.readme import machine
from benchmarks.texts import BenchText, GrpoGroup, load_grpo_groups, load_texts
from clients.process import ServerProcess, free_port

SERVERS = ("ours", "naive")
NO_PREFIX = "ours-no-prefix"


@dataclass
class BenchConfig:
    """Everything one ``bench reward`` run needs (the CLI fills it; tests build it directly)."""

    model: str
    model_dir: Path
    out: Path
    texts: str = "hh"
    data_dir: Path = Path("../shared/data/hh-rlhf")
    num_texts: int = 128
    max_tokens: int = 256
    loads: list[Load] = field(default_factory=lambda: [Load(32, 8), Load(64, 1)])
    transports: list[str] = field(default_factory=lambda: ["http", "grpc"])
    servers: list[str] = field(default_factory=lambda: list(SERVERS))
    budgets: list[int] = field(default_factory=lambda: [256, 512, 1024])
    max_batch_tokens: int | None = None  # None: the best limit budget of the first measurement
    repeats: int = 3
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = 2
    server_args: list[str] = field(default_factory=list)
    limit_best_only: bool = False  # after round 1, measure only round 1's best budget
    parity: int = 0
    parity_tolerance: float = 1e-4
    grpo: int = 0
    grpo_prompts: int = 16
    grpo_clients: int = 8
    grpo_max_tokens: int | None = None  # default: max_tokens
    grpo_min_prompt_tokens: int = 0
    seed: int = 0
    timeout: float = 600.0
    command: str = ""


class _ModuleServer(ServerProcess):
    """A ``python -m MODULE`` server (the naive baseline) with ServerProcess's readiness and stop."""

    def __init__(self, module: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str]) -> None:
        self.tls_ca = None
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115  # closed in __exit__
        ports = ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *argv, *ports], stdout=self._log, stderr=subprocess.STDOUT, env=env
        )


_METRIC = re.compile(r"^(rlhf_reward_(?:padded|real)_tokens_total) ([0-9.e+]+)$", re.M)


def scrape_tokens(http_url: str) -> dict[str, float]:
    """Padded and real token counters of ``serve reward`` (for the padding share of a run)."""
    import httpx

    text = httpx.get(http_url + "/metrics", timeout=10.0).text
    return {m.group(1): float(m.group(2)) for m in _METRIC.finditer(text)}


def padding_share(before: dict[str, float], after: dict[str, float]) -> float | None:
    key_p, key_r = "rlhf_reward_padded_tokens_total", "rlhf_reward_real_tokens_total"
    padded = after.get(key_p, 0.0) - before.get(key_p, 0.0)
    real = after.get(key_r, 0.0) - before.get(key_r, 0.0)
    return 1.0 - real / padded if padded > 0 else None


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


class Bench:
    """One benchmark run; :meth:`run` returns the results dictionary written to results.json."""

    def __init__(self, cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.progress = progress or (lambda msg: None)
        self.env = subprocess_env(cfg.threads)
        self.texts: list[BenchText] = []
        self.groups: list[GrpoGroup] = []
        self.servers: dict[str, ServerProcess] = {}
        self.limit_runs: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.grpo_runs: list[dict[str, Any]] = []
        self.last_scores: dict[tuple[str, str], list[float | None]] = {}

    # -- set-up --------------------------------------------------------------------------------

    def load_inputs(self) -> None:
        cfg = self.cfg
        limit = model_max_tokens(cfg.model_dir)
        if cfg.max_tokens > limit:
            raise ValueError(f"--max-tokens {cfg.max_tokens} is over the model's maximum length {limit}")
        tok = load_tokenizer(cfg.model_dir)
        self.texts = load_texts(
            tok, cfg.texts, num_texts=cfg.num_texts, max_tokens=cfg.max_tokens, data_dir=cfg.data_dir, seed=cfg.seed
        )
        if cfg.grpo:
            self.groups = load_grpo_groups(
                tok,
                num_groups=cfg.grpo_prompts,
                group_size=cfg.grpo,
                max_tokens=cfg.grpo_max_tokens or cfg.max_tokens,
                min_prompt_tokens=cfg.grpo_min_prompt_tokens,
                data_dir=cfg.data_dir,
                seed=cfg.seed,
            )

    def _spawn_limit(self) -> subprocess.Popen[str]:
        cfg = self.cfg
        argv = [sys.executable, "-m", "benchmarks.inprocess", "--model", str(cfg.model_dir), "--dtype", cfg.dtype]
        argv += ["--device", cfg.device]
        if cfg.threads is not None:
            argv += ["--threads", str(cfg.threads)]
        log = open(cfg.out / "logs" / "limit.log", "wb")  # noqa: SIM115  # lives as long as the worker
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env, text=True, bufsize=1
        )

    def _server_argv(self, budget: int, extra: Sequence[str] = ()) -> list[str]:
        cfg = self.cfg
        argv = ["--model", str(cfg.model_dir), "--dtype", cfg.dtype, "--device", cfg.device]
        if cfg.threads is not None:
            argv += ["--threads", str(cfg.threads)]
        return [*argv, "--max-batch-tokens", str(budget), *cfg.server_args, *extra]

    def _spawn(self, name: str, budget: int) -> ServerProcess:
        cfg = self.cfg
        log = cfg.out / "logs" / f"{name}.log"
        if name == "ours":
            return ServerProcess.reward(self._server_argv(budget), log_path=log, env=self.env)
        if name == NO_PREFIX:
            return ServerProcess.reward(self._server_argv(budget, ["--no-prefix-sharing"]), log_path=log, env=self.env)
        argv = ["--model", str(cfg.model_dir), "--dtype", cfg.dtype, "--device", cfg.device]
        if cfg.threads is not None:
            argv += ["--threads", str(cfg.threads)]
        return _ModuleServer("benchmarks.naive_server", argv, log_path=log, env=self.env)

    def _start_servers(self, names: Sequence[str], budget: int) -> None:
        """Start together (loading only: nothing is measured meanwhile), then wait for each."""
        if names:
            self.progress(f"starting {', '.join(names)}")
        for name in names:
            self.servers[name] = self._spawn(name, budget)
        for name in names:
            self.servers[name].wait_ready(timeout=self.cfg.timeout)

    def _stop_servers(self) -> None:
        for srv in self.servers.values():  # SIGTERM to all first: their drains overlap
            if srv.proc.poll() is None:
                srv.proc.send_signal(signal.SIGTERM)
        for srv in self.servers.values():
            srv.__exit__(None, None, None)

    # -- measuring -----------------------------------------------------------------------------

    def _measure(
        self, name: str, transport: str, load: Load, items: list[dict[str, Any]], requests: Any = None
    ) -> tuple[RunResult, float | None]:
        srv = self.servers[name]
        scrape = name != "naive"
        try:
            before = scrape_tokens(srv.http_url) if scrape else {}
            res = asyncio.run(
                run_load(
                    items,
                    load,
                    transport,
                    http_url=srv.http_url,
                    grpc_target=srv.grpc_target,
                    requests=requests,
                    timeout=self.cfg.timeout,
                )
            )
            pad = padding_share(before, scrape_tokens(srv.http_url)) if scrape else None
        except Exception as exc:  # the warm-up request or /metrics failed: the server is unusable
            raise RuntimeError(
                f"{name} over {transport} ({load.name}) failed: {type(exc).__name__}: {exc}\n"
                f"last lines of {srv.log_path}:\n{srv.log_tail(15)}"
            ) from exc
        return res, pad

    def _round(self, r: int, worker: LimitWorker, first_limit: list[dict[str, Any]] | None) -> None:
        cfg = self.cfg
        budgets = cfg.budgets
        if first_limit is None and cfg.limit_best_only:
            first = [x for x in self.limit_runs if x["round"] == 0]
            budgets = [max(first, key=lambda x: x["samples_per_s"])["budget"]]
        results = first_limit if first_limit is not None else worker.measure(budgets)
        for lr in results:
            self.limit_runs.append({"round": r, **lr})
        self.progress(
            f"round {r + 1}: limit " + ", ".join(f"{x['budget']}: {x['samples_per_s']:.2f}/s" for x in results)
        )
        items = [t.wire() for t in self.texts]
        for name in cfg.servers:
            for transport in cfg.transports:
                for load in cfg.loads:
                    res, pad = self._measure(name, transport, load, items)
                    self.last_scores[(name, f"{transport}/{load.name}")] = res.scores
                    self.runs.append(
                        {
                            "round": r,
                            "server": name,
                            "transport": transport,
                            "load": load.name,
                            "padding": pad,
                            **res.summary(),
                        }
                    )
                    self.progress(
                        f"round {r + 1}: {name} {transport} {load.name}: {res.samples_per_s:.2f}/s, {res.errors} errors"
                    )
        if cfg.grpo:
            flat = [w for g in self.groups for w in g.wire()]
            reqs = chunks(flat, cfg.grpo)
            load = Load(cfg.grpo_clients, cfg.grpo)
            for name in ("ours", NO_PREFIX):
                for transport in cfg.transports:
                    res, pad = self._measure(name, transport, load, flat, reqs)
                    self.last_scores[(name, f"grpo/{transport}")] = res.scores
                    self.grpo_runs.append(
                        {
                            "round": r,
                            "server": name,
                            "transport": transport,
                            "load": load.name,
                            "padding": pad,
                            **res.summary(),
                        }
                    )
                    self.progress(f"round {r + 1}: grpo {name} {transport}: {res.samples_per_s:.2f}/s")

    def _parity(self) -> dict[str, Any]:
        cfg = self.cfg
        n = min(cfg.parity, len(self.texts))
        text_items = [t.wire() for t in self.texts[:n]]
        out: dict[str, Any] = {"texts": n, "max_abs_diff": {}}
        ref = reference_scores(cfg.model_dir, text_items, dtype=cfg.dtype, threads=cfg.threads)
        for (name, key), scores in self.last_scores.items():
            if key.startswith("grpo/"):
                continue
            out["max_abs_diff"][f"{name} {key}"] = _max_diff(ref, scores[:n])
        if cfg.grpo:
            flat = [w for g in self.groups for w in g.wire()][: max(n, cfg.grpo)]
            gref = reference_scores(cfg.model_dir, flat, dtype=cfg.dtype, threads=cfg.threads)
            out["grpo_items"] = len(flat)
            for (name, key), scores in self.last_scores.items():
                if key.startswith("grpo/"):
                    out["max_abs_diff"][f"{name} {key}"] = _max_diff(gref, scores[: len(flat)])
        diffs = list(out["max_abs_diff"].values())
        out["tolerance"] = cfg.parity_tolerance
        out["ok"] = all(d is not None and d <= cfg.parity_tolerance for d in diffs)
        return out

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        (cfg.out / "logs").mkdir(parents=True, exist_ok=True)
        self.progress("loading texts")
        self.load_inputs()
        self.progress("starting the in-process limit worker")
        proc = self._spawn_limit()
        worker: LimitWorker | None = None
        try:
            # The naive server loads beside the limit worker; ours waits for the first limit
            # measurement when its --max-batch-tokens is "auto" (the best budget).
            self._start_servers(["naive"] if "naive" in cfg.servers else [], 0)
            worker = LimitWorker(proc)
            worker.set_texts([t.text for t in self.texts])
            first = worker.measure(cfg.budgets)
            budget = cfg.max_batch_tokens or max(first, key=lambda x: x["samples_per_s"])["budget"]
            ours = ["ours"] if "ours" in cfg.servers or cfg.grpo else []
            self._start_servers([*ours, *([NO_PREFIX] if cfg.grpo else [])], int(budget))
            for r in range(cfg.repeats):
                self._round(r, worker, first if r == 0 else None)
        finally:
            if worker is not None:
                worker.close()
            elif proc.poll() is None:
                proc.kill()
                proc.wait()
            self._stop_servers()
        results = self._results(int(budget))
        if cfg.parity:
            self.progress("parity against the unbatched reference")
            results["parity"] = self._parity()
        return results

    # -- aggregation ---------------------------------------------------------------------------

    def _results(self, server_budget: int) -> dict[str, Any]:
        cfg = self.cfg
        by_budget = {b: _median([x["samples_per_s"] for x in self.limit_runs if x["budget"] == b]) for b in cfg.budgets}
        best = max(by_budget, key=lambda b: by_budget[b])
        limit_by_round = {x["round"]: x for x in self.limit_runs if x["budget"] == best}
        summary = []
        for name in cfg.servers:
            for transport in cfg.transports:
                for load in cfg.loads:
                    runs = [
                        x for x in self.runs if (x["server"], x["transport"], x["load"]) == (name, transport, load.name)
                    ]
                    summary.append(_summarise(runs, limit_by_round, server=name, transport=transport, load=load.name))
        lens = sorted(t.num_tokens for t in self.texts)
        out: dict[str, Any] = {
            "command": cfg.command,
            "machine": machine(),
            "config": {
                "model": cfg.model,
                "model_dir": str(cfg.model_dir),
                "texts": cfg.texts,
                "num_texts": len(self.texts),
                "max_tokens": cfg.max_tokens,
                "loads": [ld.name for ld in cfg.loads],
                "transports": cfg.transports,
                "servers": cfg.servers,
                "budgets": cfg.budgets,
                "server_max_batch_tokens": server_budget,
                "repeats": cfg.repeats,
                "dtype": cfg.dtype,
                "device": cfg.device,
                "threads": cfg.threads,
                "server_args": cfg.server_args,
            },
            "texts": {
                "count": len(lens),
                "min_tokens": lens[0],
                "median_tokens": _median(lens),
                "max_tokens": lens[-1],
                "total_tokens": sum(lens),
            },
            "limit": {
                "best_budget": best,
                "samples_per_s_by_budget": {str(b): v for b, v in by_budget.items()},
                "best_samples_per_s": by_budget[best],
                "best_tokens_per_s": _median([x["tokens_per_s"] for x in limit_by_round.values()]),
                "runs": self.limit_runs,
            },
            "summary": summary,
            "runs": self.runs,
        }
        if cfg.grpo:
            grpo_summary = []
            for transport in cfg.transports:
                on = [x for x in self.grpo_runs if x["server"] == "ours" and x["transport"] == transport]
                off = [x for x in self.grpo_runs if x["server"] == NO_PREFIX and x["transport"] == transport]
                ratios = [
                    a["samples_per_s"] / b["samples_per_s"] for a, b in zip(on, off, strict=True) if b["samples_per_s"]
                ]
                grpo_summary.append(
                    {
                        "transport": transport,
                        "prefix_sharing_samples_per_s": _median([x["samples_per_s"] for x in on]),
                        "no_prefix_sharing_samples_per_s": _median([x["samples_per_s"] for x in off]),
                        "speedup": _median(ratios),
                        "errors": sum(x["errors"] for x in on + off),
                    }
                )
            out["grpo"] = {
                "group_size": cfg.grpo,
                "prompts": len(self.groups),
                "clients": cfg.grpo_clients,
                "max_tokens": cfg.grpo_max_tokens or cfg.max_tokens,
                "min_prompt_tokens": cfg.grpo_min_prompt_tokens,
                "prompt_tokens_mean": _mean([g.prompt_tokens for g in self.groups]),
                "item_tokens_mean": _mean([t for g in self.groups for t in g.item_tokens]),
                "summary": grpo_summary,
                "runs": self.grpo_runs,
            }
        return out


def _mean(xs: list[int]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def _summarise(runs: list[dict[str, Any]], limit_by_round: dict[int, dict[str, Any]], **key: str) -> dict[str, Any]:
    ratios = [
        x["samples_per_s"] / limit_by_round[x["round"]]["samples_per_s"]
        for x in runs
        if limit_by_round.get(x["round"], {}).get("samples_per_s")
    ]
    pads = [x["padding"] for x in runs if x["padding"] is not None]
    return {
        **key,
        "samples_per_s": _median([x["samples_per_s"] for x in runs]),
        "tokens_per_s": _median([x["tokens_per_s"] for x in runs]),
        "p50_ms": _median([x["p50_ms"] for x in runs]),
        "p99_ms": _median([x["p99_ms"] for x in runs]),
        "errors": sum(x["errors"] for x in runs),
        "samples": sum(x["samples"] for x in runs),
        "ratio_to_limit": _median(ratios),
        "ratios": ratios,
        "padding": _median(pads) if pads else None,
    }


def _max_diff(ref: Sequence[float], got: Sequence[float | None]) -> float | None:
    """Largest |Δ| over the items; None (reported as a failure) when any item has no score."""
    if any(g is None for g in got) or len(got) != len(ref):
        return None
    return max((abs(a - float(b)) for a, b in zip(ref, got, strict=True) if b is not None), default=0.0)
