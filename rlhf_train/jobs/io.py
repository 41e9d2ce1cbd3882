"""Files of the offline jobs (``label``, ``score``): input readers, the crash-safe journal, and the
atomic writers of the final outputs.

Inputs: JSON Lines (``.jsonl``), a JSON array (``.json``) or Parquet (``.parquet``), read whole and
checked before any work starts (a bad row stops the job with its line number, exit 2).

Resuming (the design)
---------------------
A job's only mutable state is its **journal**, ``<output>.journal``: an append-only JSON Lines
file. Its first line is a header (the job and the settings that shape its output); every other
line is the complete result of one input row::

    {"k": <row key>, "out": [data rows], "rej": [reject rows], "stats": {...}}

- **A row is done when its line is in the journal, and only then.** Its data rows and its rejects
  travel in that one line, written by one ``write`` and ``fsync``-ed before the job moves on, so a
  crash can never leave a row half written (its pairs without its rejects, or the reverse).
- **A torn tail is dropped**: after a ``SIGKILL`` mid-``write`` the last line may be cut short (no
  newline, or not JSON); on resume it is truncated away and that row is simply done again.
- **Keys, not positions**: a row key is the SHA-256 of the row's canonical JSON content (plus its
  occurrence number when the same content appears again), so resuming never depends on file paths,
  on the order rows finished in, or on which run did them. A key found twice counts once.
- **Outputs are derived, never appended to**: when a run ends, the output (JSONL or Parquet) and
  the rejects file are rebuilt from the journal in input order, each written to a temporary file and
  ``os.replace``-d into place, so they are either the previous complete version or the new one.
  When every input row is done, the journal is compacted (rows dropped, keys and statistics kept):
  a later run of the same command finds the job complete and only prints its summary.

A run killed at any instant and run again therefore ends with every input row's results exactly
once, in input order, identical to an uninterrupted run's (given the same judgments, which the
judge service's cache provides).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

JOURNAL_VERSION = 1
INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
OUTPUT_SUFFIXES = (".jsonl", ".parquet")


class JobError(Exception):
    """The job cannot go on (exit 1), or, with ``exit_code = 2``, was asked for something impossible."""

    exit_code = 1


class InputError(JobError):
    """A bad input file, a bad flag or a journal written by other settings (exit 2)."""

    exit_code = 2


# -- JSON ------------------------------------------------------------------------------------------


def _json_default(x: Any) -> Any:
    if isinstance(x, bytes | bytearray):
        return x.decode("utf-8", errors="replace")
    if isinstance(x, set | frozenset | tuple):
        return list(x)
    return str(x)  # datetimes, decimals and friends from Parquet


def canonical_json(x: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept: the form row keys and ids are hashed from."""
    return json.dumps(x, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def content_hash(x: Any) -> str:
    """SHA-256 (hex) of ``x``'s canonical JSON."""
    return hashlib.sha256(canonical_json(x).encode("utf-8")).hexdigest()


def dumps_line(x: Any) -> bytes:
    return orjson.dumps(x, default=_json_default, option=orjson.OPT_APPEND_NEWLINE)


# -- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRow:
    """One input row and where it came from (``"line 12"`` in JSONL, ``"row 12"`` in Parquet)."""

    index: int
    where: str
    data: Any


def _suffix(path: Path, allowed: Sequence[str], what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise InputError(f"{path}: unsupported {what} format {suffix or '(no extension)'!r}; use {', '.join(allowed)}")
    return suffix


def output_format(path: Path) -> str:
    """``"jsonl"`` or ``"parquet"``, from the file extension."""
    return _suffix(path, OUTPUT_SUFFIXES, "output").lstrip(".")


def read_rows(path: Path) -> list[SourceRow]:
    """Every row of a ``.jsonl``, ``.json`` (an array) or ``.parquet`` file; blank JSONL lines are skipped.

    Raises :class:`InputError` naming the file and line for anything unreadable.
    """
    suffix = _suffix(path, INPUT_SUFFIXES, "input")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if suffix == ".parquet":
        return _read_parquet(path)
    rows: list[SourceRow] = []
    if suffix == ".json":
        try:
            data = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: a .json input is an array of rows (use .jsonl for JSON Lines)")
        return [SourceRow(i, f"item {i}", x) for i, x in enumerate(data)]
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                rows.append(SourceRow(len(rows), f"line {lineno}", orjson.loads(raw)))
            except orjson.JSONDecodeError as exc:
                raise InputError(f"{path}: line {lineno}: not valid JSON: {exc}") from None
    return rows


def _read_parquet(path: Path) -> list[SourceRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises a zoo of types for damaged files
        raise InputError(f"{path}: not a readable Parquet file: {exc}") from None
    return [SourceRow(i, f"row {i}", x) for i, x in enumerate(table.to_pylist())]


# -- outputs ---------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_atomically(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    """Write ``rows`` to ``path`` atomically (a temporary file, fsync, rename); the row count."""
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("wb") as fh:
        for row in rows:
            fh.write(dumps_line(row))
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    _replace_atomically(tmp, path)
    return n


def write_parquet(path: Path, rows: Sequence[Mapping[str, Any]], schema: Any = None) -> int:
    """Write ``rows`` as one Parquet table, atomically; ``schema`` (a ``pyarrow.Schema``) or inferred."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows), schema=schema) if rows or schema is not None else pa.table({})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    _replace_atomically(tmp, path)
    return table.num_rows


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]], schema: Any = None) -> int:
    """Write the final output in the format its extension names."""
    if output_format(path) == "parquet":
        return write_parquet(path, rows, schema)
    return write_jsonl(path, rows)


# -- the journal ---------------------------------------------------------------------------------


@dataclass
class ResumeState:
    """What a journal says: the finished rows by key, whether the job completed (compacted)."""

    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = False
    dropped_tail: bool = False


def _read_journal(path: Path) -> tuple[dict[str, Any] | None, ResumeState, int]:
    """Header, records and the byte length of the valid prefix (a torn last line is not in it).

    The header is None when not even it was written whole (a kill while the journal was created):
    nothing was done yet."""
    data = path.read_bytes()
    state = ResumeState()
    header: dict[str, Any] | None = None
    pos = 0
    lines = data.split(b"\n")
    # Every complete line ends with "\n": the last piece is b"" or a torn line.
    complete_lines, tail = lines[:-1], lines[-1]
    state.dropped_tail = bool(tail)
    for n, raw in enumerate(complete_lines, start=1):
        try:
            rec = orjson.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except (orjson.JSONDecodeError, ValueError):
            if n == len(complete_lines):  # a damaged last line: treat as torn
                state.dropped_tail = True
                break
            raise InputError(
                f"{path}: line {n} is damaged; remove the file (or pass --restart) to start over"
            ) from None
        pos += len(raw) + 1
        if header is None:
            if rec.get("journal") != "rlhf-feedback":
                raise InputError(f"{path}: not a journal of rlhf-feedback (first line {raw[:80]!r})")
            header = rec
            continue
        if rec.get("complete"):
            state.complete = True
            continue
        key = rec.get("k")
        if isinstance(key, str) and key not in state.done:  # a key seen twice counts once
            state.done[key] = rec
    return header, state, pos


class Journal:
    """The append-only journal of one job (see the module docstring)."""

    def __init__(self, path: Path, fd: int, header: dict[str, Any]) -> None:
        self.path = path
        self._fd = fd
        self.header = header

    @classmethod
    def open(cls, path: Path, *, job: str, config: Mapping[str, Any]) -> tuple[Journal, ResumeState]:
        """Open (resume) or create the journal; ``InputError`` when it was written by other settings."""
        header = {"journal": "rlhf-feedback", "version": JOURNAL_VERSION, "job": job, "config": dict(config)}
        old, state, valid = _read_journal(path) if path.exists() else (None, ResumeState(), 0)
        if old is not None:
            if old.get("job") != job or old.get("version") != JOURNAL_VERSION:
                raise InputError(
                    f"{path} belongs to a {old.get('job')!r} job (version {old.get('version')}), not this {job!r} one; "
                    "pass --restart to start over"
                )
            want = json.loads(canonical_json(dict(config)))
            if old.get("config") != want:
                have = old.get("config") or {}
                diff = ", ".join(
                    f"{k}: {have.get(k)!r} then, {want.get(k)!r} now"
                    for k in sorted(set(have) | set(want))
                    if have.get(k) != want.get(k)
                )
                raise InputError(
                    f"{path} was written with other settings ({diff}); rerun with the same flags to resume, "
                    "or pass --restart to start over"
                )
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            if os.fstat(fd).st_size != valid:
                os.ftruncate(fd, valid)  # drop the torn tail before appending after it
                os.fsync(fd)
            return cls(path, fd, old), state
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, dumps_line(header))
        os.fsync(fd)
        _fsync_dir(path.parent)
        return cls(path, fd, json.loads(canonical_json(header))), ResumeState()

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append finished rows durably: one ``write`` of whole lines, then ``fsync``."""
        if not records:
            return
        buf = b"".join(dumps_line(r) for r in records)
        view = memoryview(buf)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def compact(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace the journal by its header, ``{k, stats}`` per row and a ``complete`` mark."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as fh:
            fh.write(dumps_line(self.header))
            for r in records:
                fh.write(dumps_line({"k": r["k"], "stats": r.get("stats", {})}))
            fh.write(dumps_line({"complete": True}))
            fh.flush()
            os.fsync(fh.fileno())
        os.close(self._fd)
        _replace_atomically(tmp, self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".journal")


def default_rejects_path(output: Path) -> Path:
    """``<output stem>.rejects.jsonl`` next to the output."""
    return output.with_name(output.stem + ".rejects.jsonl")


def start_fresh(paths: Iterable[Path]) -> None:
    """``--restart``: remove the journal and outputs (and any temporary files) of an earlier run."""
    for p in paths:
        for q in (p, p.with_name(p.name + ".tmp")):
            with contextlib.suppress(FileNotFoundError):
                q.unlink()


def check_fresh_outputs(journal: Path, outputs: Iterable[Path]) -> None:
    """Without a journal, refuse to overwrite an existing output that some other run produced."""
    if journal.exists():
        return
    for p in outputs:
        if p.exists():
            raise InputError(
                f"{p} already exists and there is no journal ({journal.name}) to resume from; "
                "pass --restart to overwrite it, or choose another --output"
            )


def in_input_order(done: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> Iterator[Mapping[str, Any]]:
    """The finished records of the rows in ``order`` (row keys in input order), skipping unfinished ones."""
    for key in order:
        rec = done.get(key)
        if rec is not None:
            yield rec


# -- the run loop shared by the jobs -------------------------------------------------------------


class UnitFailed(Exception):
    """A unit of work failed for now (the service was unreachable...): it stays pending for a rerun."""


@dataclass
class RunOutcome:
    committed: int = 0  # rows committed this run
    failed: int = 0  # rows left pending because their unit failed
    first_failure: str | None = None
    aborted: str | None = None


def exit_code(job: str, outcome: RunOutcome | None, *, pending: int, verb: str) -> int:
    """The job's exit status, saying on stderr why it is not 0 (rows still pending: rerun resumes)."""
    if outcome is not None and outcome.aborted:
        print(f"rlhf-feedback {job}: stopped: {outcome.aborted}; rerun the same command to resume", file=sys.stderr)
        return 1
    if pending:
        first = f" (first: {outcome.first_failure})" if outcome is not None and outcome.first_failure else ""
        print(
            f"rlhf-feedback {job}: {pending} rows could not be {verb}{first}; rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


class Progress:
    """A tqdm bar over input rows (rate and ETA), its postfix from ``postfix()``; silent when ``quiet``."""

    def __init__(self, *, total: int, initial: int, desc: str, quiet: bool, postfix: Any = None) -> None:
        self._postfix = postfix
        self._bar: Any = None
        if not quiet:
            import sys

            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True, smoothing=0.1
            )
            self._refresh()

    def _refresh(self) -> None:
        if self._bar is not None and self._postfix is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._refresh()
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._refresh()
            self._bar.close()


async def run_units(
    units: Sequence[Any],
    work: Any,
    *,
    journal: Journal,
    state: ResumeState,
    concurrency: int,
    progress: Progress,
    on_commit: Any = None,
    rows_of: Any = None,
    max_failures_in_a_row: int = 20,
) -> RunOutcome:
    """Run ``await work(unit) -> list[record]`` for every unit, ``concurrency`` at a time, and commit
    each unit's records to the journal as soon as they exist (several finished units share one
    ``fsync``). ``work`` raises :class:`UnitFailed` to leave its rows pending, :class:`JobError` to
    stop the job. ``rows_of(unit)`` counts a unit's rows (default 1); ``on_commit(records)`` sees
    every committed batch (the statistics behind the progress bar's postfix)."""
    import asyncio

    outcome = RunOutcome()
    queue: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue()
    pending = iter(units)
    in_a_row = 0
    abort: list[BaseException] = []

    async def committer() -> None:
        while True:
            first = await queue.get()
            if first is None:
                return
            batch = list(first)
            stop = False
            while not queue.empty():
                more = queue.get_nowait()
                if more is None:
                    stop = True
                    break
                batch.extend(more)
            await asyncio.to_thread(journal.append, batch)
            for rec in batch:
                state.done.setdefault(rec["k"], rec)
            outcome.committed += len(batch)
            if on_commit is not None:
                on_commit(batch)
            progress.update(len(batch))
            if stop:
                return

    async def worker() -> None:
        nonlocal in_a_row
        for unit in pending:
            if abort:
                return
            try:
                records = await work(unit)
            except UnitFailed as exc:
                n = rows_of(unit) if rows_of is not None else 1
                outcome.failed += n
                outcome.first_failure = outcome.first_failure or str(exc)
                in_a_row += 1
                if in_a_row >= max_failures_in_a_row and not abort:
                    abort.append(JobError(f"{in_a_row} units failed in a row, the last with: {exc}"))
                continue
            except JobError as exc:
                abort.append(exc)
                return
            in_a_row = 0
            if records:
                queue.put_nowait(records)

    writer = asyncio.ensure_future(committer())
    workers = [asyncio.ensure_future(worker()) for _ in range(max(1, min(concurrency, len(units))))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        queue.put_nowait(None)
        await writer  # everything finished so far reaches the journal, even when aborting
    if abort:
        outcome.aborted = str(abort[0])
        if isinstance(abort[0], JobError) and abort[0].exit_code == 2:
            raise abort[0]
    return outcome


__all__ = [
    "InputError",
    "JobError",
    "Journal",
    "Progress",
    "ResumeState",
    "RunOutcome",
    "SourceRow",
    "UnitFailed",
    "canonical_json",
    "check_fresh_outputs",
    "content_hash",
    "default_rejects_path",
    "in_input_order",
    "journal_path",
    "output_format",
    "read_rows",
    "run_units",
    "start_fresh",
    "write_jsonl",
    "write_parquet",
    "write_rows",
]
