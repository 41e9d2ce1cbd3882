"""The verdict cache: SQLite in WAL mode, safe across threads and processes.

Keyed by a sha256 of a canonical JSON of everything that can change a reply (backend, model
snapshot, template hash, the backend's sampling parameters, rubric/principle, candidate order,
the rendered messages holding the texts, the verdict choices). Only successful
:class:`VerdictReply` values are stored: abstentions and errors never are, so a later request
retries them.

Each thread gets its own connection (sqlite3 connections are not shared across threads); the
WAL journal lets readers run beside one writer, across processes too, and ``busy_timeout``
makes a writer wait for the lock instead of failing. Rows are written with ``INSERT OR IGNORE``,
so two processes racing on one key keep the first reply and neither corrupts the file.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.judge.types import Usage, VerdictReply

SCHEMA_VERSION = 1


def reply_to_json(reply: VerdictReply) -> str:
    u = reply.usage
    return json.dumps(
        {
            "choice": reply.choice,
            "probs": reply.probs,
            "soft": reply.soft,
            "raw": reply.raw,
            "rationale": reply.rationale,
            "usage": [u.prompt_tokens, u.completion_tokens, u.cost_usd, u.calls],
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def reply_from_json(text: str) -> VerdictReply:
    d = json.loads(text)
    pt, ct, cost, calls = d["usage"]
    probs = d["probs"]
    return VerdictReply(
        choice=d["choice"],
        probs=None if probs is None else {str(k): float(v) for k, v in probs.items()},
        soft=bool(d["soft"]),
        raw=d["raw"],
        rationale=d["rationale"],
        usage=Usage(int(pt), int(ct), float(cost), int(calls)),
    )


class JudgeCache:
    """``get``/``put`` are blocking (run them off the loop); ``aget``/``aput`` do that for you."""

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 30_000, threads: int = 4) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="judge-cache")
        self._closed = False
        self._conn()  # create the file and schema now, so a bad path fails at start

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise RuntimeError("judge cache is closed")
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None,
                               check_same_thread=False)  # fmt: skip
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS verdicts ("
            " key TEXT PRIMARY KEY, reply TEXT NOT NULL, created REAL NOT NULL, version INTEGER NOT NULL)"
        )
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn

    def get(self, key: str) -> VerdictReply | None:
        row = (
            self._conn()
            .execute("SELECT reply FROM verdicts WHERE key = ? AND version = ?", (key, SCHEMA_VERSION))
            .fetchone()
        )
        return None if row is None else reply_from_json(row[0])

    def put(self, key: str, reply: VerdictReply) -> None:
        if not isinstance(reply, VerdictReply):  # never an abstain, never an error
            raise TypeError("only successful verdicts are cached")
        self._conn().execute(
            "INSERT OR IGNORE INTO verdicts (key, reply, created, version) VALUES (?, ?, ?, ?)",
            (key, reply_to_json(reply), time.time(), SCHEMA_VERSION),
        )

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])

    async def aget(self, key: str) -> VerdictReply | None:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.get, key)

    async def aput(self, key: str, reply: VerdictReply) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.put, key, reply)

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()
