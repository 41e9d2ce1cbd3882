"""The batch jobs' SQLite store: jobs, their verdict queries, and the provider batches (chunks).

WAL, one connection guarded by a lock, every call off the event loop (:meth:`BatchStore.run`).
What is recorded when, and why that makes a restart safe, is in :mod:`services.judge.engine.batches`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from services.judge.types import Usage, VerdictQuery
from services.runtime.chat import ChatMessage

T = TypeVar("T")
MAX_FAILURE_REASONS = 20  # distinct failure reasons a job's status lists


def store_path_for(cache_path: Path) -> Path:
    """The batch store beside the verdict cache: ``judge-cache.sqlite`` → ``judge-cache.batches.sqlite``."""
    return cache_path.with_name(cache_path.stem + ".batches.sqlite")


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, idem TEXT UNIQUE NOT NULL, created REAL NOT NULL,"
    " provider TEXT NOT NULL, requests INTEGER NOT NULL, cached INTEGER NOT NULL, invalid TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS job_queries (job TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (job, key))",
    "CREATE TABLE IF NOT EXISTS queries (key TEXT PRIMARY KEY, query TEXT NOT NULL, params TEXT NOT NULL,"
    " state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, chunk TEXT, reason TEXT,"
    " prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,"
    " cost REAL NOT NULL DEFAULT 0, list_cost REAL NOT NULL DEFAULT 0)",
    "CREATE INDEX IF NOT EXISTS queries_state ON queries (state)",
    "CREATE TABLE IF NOT EXISTS chunks (id TEXT PRIMARY KEY, provider TEXT NOT NULL, intent REAL NOT NULL,"
    " batch_id TEXT, state TEXT NOT NULL, status TEXT, n INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS chunk_queries (chunk TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (chunk, key))",
)


def query_to_json(q: VerdictQuery) -> str:
    return json.dumps(
        {"m": [[m.role, m.content] for m in q.messages], "c": list(q.choices), "r": q.rationale, "t": q.max_tokens},
        ensure_ascii=False,
    )


def query_from_json(text: str) -> VerdictQuery:
    d = json.loads(text)
    return VerdictQuery(tuple(ChatMessage(r, c) for r, c in d["m"]), tuple(d["c"]), bool(d["r"]), int(d["t"]))


@dataclass(frozen=True)
class Chunk:
    id: str
    provider: str
    intent: float
    batch_id: str | None
    state: str  # intent | submitted | processed
    status: str | None
    n: int


class BatchStore:
    """Jobs, queries and provider batches in SQLite (WAL; one connection guarded by a lock).

    Blocking: the manager calls it through :meth:`run` (a worker thread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")  # a recorded intent must survive a power cut
        for stmt in _SCHEMA:
            self._db.execute(stmt)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            return fn(*args)

    @contextlib.contextmanager
    def _tx(self) -> Any:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ---------------------------------------------------------------------------------------

    def job_by_idem(self, idem: str) -> str | None:
        row = self._db.execute("SELECT id FROM jobs WHERE idem = ?", (idem,)).fetchone()
        return None if row is None else str(row[0])

    def add_job(
        self,
        idem: str,
        provider: str,
        requests: int,
        cached: int,
        invalid_items: list[dict[str, Any]],
        queries: Mapping[str, tuple[str, str]],
    ) -> str:
        """Store a job and its uncached queries (key → (query json, params json)); returns its id."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE idem = ?", (idem,)).fetchone()
            if row is not None:  # a concurrent POST with the same key won
                return str(row[0])
            job = "batch_" + uuid.uuid4().hex[:24]
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job, idem, time.time(), provider, requests, cached, json.dumps(invalid_items)),
            )
            for key, (qjson, pjson) in queries.items():
                db.execute("INSERT OR IGNORE INTO job_queries VALUES (?, ?)", (job, key))
                state = db.execute("SELECT state FROM queries WHERE key = ?", (key,)).fetchone()
                if state is not None and state[0] in ("pending", "submitted"):
                    continue  # another job has it in flight: share it
                db.execute(
                    "INSERT OR REPLACE INTO queries (key, query, params, state, attempts)"
                    " VALUES (?, ?, ?, 'pending', 0)",
                    (key, qjson, pjson),
                )
            return job

    def job(self, job: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT id, idem, created, provider, requests, cached, invalid FROM jobs WHERE id = ?", (job,)
        ).fetchone()
        if row is None:
            return None
        states: Counter[str] = Counter()
        usage = [0, 0, 0.0, 0.0, 0]
        reasons: Counter[str] = Counter()
        for state, reason, pt, ct, cost, list_cost, attempts in self._db.execute(
            "SELECT q.state, q.reason, q.prompt_tokens, q.completion_tokens, q.cost, q.list_cost, q.attempts"
            " FROM job_queries j JOIN queries q ON q.key = j.key WHERE j.job = ?",
            (job,),
        ):
            states[state] += 1
            usage[0] += pt
            usage[1] += ct
            usage[2] += cost
            usage[3] += list_cost
            usage[4] += attempts
            if state == "failed" and reason:
                reasons[reason] += 1
        chunks = self._db.execute(
            "SELECT DISTINCT c.batch_id, c.status, c.n, c.state FROM job_queries j"
            " JOIN chunk_queries cq ON cq.key = j.key JOIN chunks c ON c.id = cq.chunk WHERE j.job = ?"
            " ORDER BY c.intent",
            (job,),
        ).fetchall()
        total = sum(states.values())
        busy = states["pending"] + states["submitted"]
        return {
            "id": row[0],
            "idempotency_key": row[1],
            "created_at": row[2],
            "provider": row[3],
            "status": "in_progress" if busy else "completed",
            "requests": row[4],
            "invalid": json.loads(row[6]),
            "queries": {
                "total": total + row[5],
                "cached": row[5],
                "pending": states["pending"],
                "submitted": states["submitted"],
                "done": states["done"],
                "failed": states["failed"],
            },
            "provider_batches": [
                {"id": bid, "status": status or state, "requests": n} for bid, status, n, state in chunks
            ],
            "failures": [{"reason": r, "count": c} for r, c in reasons.most_common(MAX_FAILURE_REASONS)],
            "usage": {
                "prompt_tokens": usage[0],
                "completion_tokens": usage[1],
                "cost_usd": usage[2],
                "interactive_cost_usd": usage[3],
                "requests_submitted": usage[4],
            },
        }

    # -- chunks -------------------------------------------------------------------------------------

    def pending(self) -> list[tuple[str, str]]:
        return [
            (str(k), str(p)) for k, p in self._db.execute("SELECT key, params FROM queries WHERE state = 'pending'")
        ]

    def chunks(self, state: str) -> list[Chunk]:
        rows = self._db.execute(
            "SELECT id, provider, intent, batch_id, state, status, n FROM chunks WHERE state = ? ORDER BY intent",
            (state,),
        ).fetchall()
        return [Chunk(*r) for r in rows]

    def known_batch_ids(self) -> set[str]:
        return {str(r[0]) for r in self._db.execute("SELECT batch_id FROM chunks WHERE batch_id IS NOT NULL")}

    def record_intent(self, provider: str, keys: Sequence[str], n: int) -> Chunk:
        chunk = Chunk("chunk_" + uuid.uuid4().hex[:24], provider, time.time(), None, "intent", None, n)
        with self._tx() as db:
            db.execute(
                "INSERT INTO chunks VALUES (?, ?, ?, NULL, 'intent', NULL, ?)",
                (chunk.id, provider, chunk.intent, n),
            )
            for key in keys:
                db.execute("INSERT INTO chunk_queries VALUES (?, ?)", (chunk.id, key))
                db.execute(
                    "UPDATE queries SET state = 'submitted', chunk = ?, attempts = attempts + 1 WHERE key = ?",
                    (chunk.id, key),
                )
        return chunk

    def chunk_queries(self, chunk: str) -> list[tuple[str, str, str, int]]:
        """(key, query json, params json, attempts) of the queries this chunk is still responsible for."""
        return [
            (str(k), str(q), str(p), int(a))
            for k, q, p, a in self._db.execute(
                "SELECT key, query, params, attempts FROM queries WHERE chunk = ? AND state = 'submitted'", (chunk,)
            )
        ]

    def set_submitted(self, chunk: str, batch_id: str) -> None:
        self._db.execute("UPDATE chunks SET batch_id = ?, state = 'submitted' WHERE id = ?", (batch_id, chunk))

    def set_status(self, chunk: str, status: str) -> None:
        self._db.execute("UPDATE chunks SET status = ? WHERE id = ?", (status, chunk))

    def finish_chunk(
        self,
        chunk: str,
        status: str,
        done: Sequence[tuple[str, Usage, float]],
        retry: Sequence[tuple[str, str]],
        failed: Sequence[tuple[str, str]],
    ) -> None:
        with self._tx() as db:
            for key, usage, list_cost in done:
                db.execute(
                    "UPDATE queries SET state = 'done', reason = NULL, prompt_tokens = prompt_tokens + ?,"
                    " completion_tokens = completion_tokens + ?, cost = cost + ?, list_cost = list_cost + ?"
                    " WHERE key = ? AND chunk = ?",
                    (usage.prompt_tokens, usage.completion_tokens, usage.cost_usd, list_cost, key, chunk),
                )
            for key, reason in retry:
                db.execute(
                    "UPDATE queries SET state = 'pending', reason = ? WHERE key = ? AND chunk = ?", (reason, key, chunk)
                )
            for key, reason in failed:
                db.execute(
                    "UPDATE queries SET state = 'failed', reason = ? WHERE key = ? AND chunk = ?", (reason, key, chunk)
                )
            db.execute("UPDATE chunks SET state = 'processed', status = ? WHERE id = ?", (status, chunk))
