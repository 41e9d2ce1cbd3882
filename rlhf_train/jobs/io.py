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

Symbolic links
--------------
The files a job writes next to its output (the output, the rejects file, the journal and their
``.tmp`` files) are never opened through a symbolic link: a link planted at one of them (say
``out.jsonl.tmp -> ~/.bashrc``) would otherwise have the job truncate and overwrite the link's
target. :func:`check_fresh_outputs` refuses such a link before any work starts (exit 2, nothing
written), and every open repeats the check itself (``O_NOFOLLOW``; temporary files are created
with ``O_EXCL``), so a link planted while the job runs is refused too. Only the last path component
counts: the output's directory may be a link, and so may the *input* file (datasets often are).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
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


# -- opening files without following symbolic links ---------------------------------------------

# Windows has neither flag; there the lstat checks below still refuse links.
_O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC: int = getattr(os, "O_CLOEXEC", 0)


def _symlink_error(path: Path) -> InputError:
    try:
        target = f" (pointing to {os.readlink(path)})"
    except OSError:
        target = ""
    return InputError(
        f"{path} is a symbolic link{target}; the job does not write through symbolic links, so nothing was "
        "written. Remove the link (or pass --restart, which removes it without touching its target), "
        "or choose another --output"
    )


def _not_regular_error(path: Path, mode: int) -> InputError:
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    return InputError(f"{path} is {kind}; nothing was written. Remove it, or choose another --output")


def refuse_symlink(path: Path) -> None:
    """``InputError`` (exit 2) when ``path`` itself (not its directory) is a symbolic link."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise _symlink_error(path)


def _open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that fails with :func:`_symlink_error` when ``path`` is a symbolic link."""
    try:
        return os.open(path, flags | _O_NOFOLLOW | _O_CLOEXEC, mode)
    except OSError as exc:
        # Linux says ELOOP, the BSDs EMLINK; lstat tells a link from a genuine loop further up.
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            refuse_symlink(path)
        raise


def _create_exclusive(path: Path) -> int:
    """Create ``path`` anew for writing (``O_EXCL``, so never through a link) and return its descriptor.

    A regular file already there is a leftover of a killed run and is removed first; a symbolic
    link (or anything else) is refused, untouched."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for _ in range(3):
        try:
            return _open_nofollow(path, flags)
        except FileExistsError:
            pass
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # gone in between: try again
        if stat.S_ISLNK(st.st_mode):
            raise _symlink_error(path)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular_error(path, st.st_mode)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    raise JobError(f"{path} keeps reappearing; is another run writing the same output?")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while chunk := os.read(fd, 1 << 24):
        chunks.append(chunk)
    return b"".join(chunks)


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


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Any]:
    """A binary file object on a new ``<path>.tmp`` (never a link's target), fsync-ed and renamed
    over ``path`` on success, removed on failure."""
    tmp = _tmp_path(path)
    fd = _create_exclusive(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _replace_atomically(tmp, path)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically, through a new ``.tmp`` that no symbolic link can redirect."""
    with _atomic_file(path) as fh:
        fh.write(data)


def write_jsonl(path: Path, rows: Iterable[Any]) -> int:
    """Write ``rows`` to ``path`` atomically (a temporary file, fsync, rename); the row count."""
    n = 0
    with _atomic_file(path) as fh:
        for row in rows:
            fh.write(dumps_line(row))
            n += 1
    return n


def write_parquet(path: Path, rows: Sequence[Mapping[str, Any]], schema: Any = None) -> int:
    """Write ``rows`` as one Parquet table, atomically; ``schema`` (a ``pyarrow.Schema``) or inferred."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(list(rows), schema=schema) if rows or schema is not None else pa.table({})
    # A file object, not the path: pyarrow would open a path through a link.
    with _atomic_file(path) as fh:
        pq.write_table(table, fh)
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


def _read_journal(path: Path, data: bytes) -> tuple[dict[str, Any] | None, ResumeState, int]:
    """Header, records and the byte length of the valid prefix (a torn last line is not in it) of
    the journal ``path`` whose bytes are ``data``.

    The header is None when not even it was written whole (a kill while the journal was created):
    nothing was done yet."""
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
        path.parent.mkdir(parents=True, exist_ok=True)
        # One descriptor, opened without following a link, for reading, truncating and appending:
        # the file checked is the file written.
        fd = _open_nofollow(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
        try:
            return cls._open_fd(path, fd, header, job=job, config=config)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _open_fd(
        cls, path: Path, fd: int, header: dict[str, Any], *, job: str, config: Mapping[str, Any]
    ) -> tuple[Journal, ResumeState]:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular_error(path, st.st_mode)
        data = _read_all(fd)
        old, state, valid = _read_journal(path, data) if data else (None, ResumeState(), 0)
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
            if len(data) != valid:
                os.ftruncate(fd, valid)  # drop the torn tail before appending after it
                os.fsync(fd)
            return cls(path, fd, old), state
        if data:
            os.ftruncate(fd, 0)  # a header torn by a kill: nothing was done yet
        _write_all(fd, dumps_line(header))
        os.fsync(fd)
        _fsync_dir(path.parent)
        return cls(path, fd, json.loads(canonical_json(header))), ResumeState()

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append finished rows durably: one ``write`` of whole lines, then ``fsync``."""
        if not records:
            return
        _write_all(self._fd, b"".join(dumps_line(r) for r in records))
        os.fsync(self._fd)

    def compact(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace the journal by its header, ``{k, stats}`` per row and a ``complete`` mark."""
        with _atomic_file(self.path) as fh:
            fh.write(dumps_line(self.header))
            for r in records:
                fh.write(dumps_line({"k": r["k"], "stats": r.get("stats", {})}))
            fh.write(dumps_line({"complete": True}))
        os.close(self._fd)
        self._fd = -1  # so that close() cannot close a reused number if the reopen fails
        self._fd = _open_nofollow(self.path, os.O_RDWR | os.O_APPEND)

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
    """``--restart``: remove the journal and outputs (and any temporary files) of an earlier run.

    A symbolic link among them is removed itself; its target is never opened."""
    for p in paths:
        for q in (p, _tmp_path(p)):
            with contextlib.suppress(FileNotFoundError):
                q.unlink()


def check_fresh_outputs(journal: Path, outputs: Iterable[Path]) -> None:
    """Before any work: refuse a symbolic link at the journal, an output or any of their ``.tmp``
    files (nothing is written through one), then, without a journal, refuse to overwrite an existing
    output that some other run produced."""
    outputs = list(outputs)
    for p in (journal, *outputs):
        refuse_symlink(p)
        refuse_symlink(_tmp_path(p))
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
    "refuse_symlink",
    "run_units",
    "start_fresh",
    "write_bytes_atomically",
    "write_jsonl",
    "write_parquet",
    "write_rows",
]
