"""The ``label`` and ``score`` jobs never write through a symbolic link planted next to their output
(issue 12): a link at the output, the rejects file, the journal or one of their ``.tmp`` files is
refused with exit 2 and a message naming it, and the link's target keeps its bytes (a dangling
link's target is not created). The job's services are unreachable here: every refusal happens
before any request, and a run that gets past the checks fails with exit 1 having written only its
journal and (empty) outputs, which is exactly where the links are planted."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from rlhf_feedback.cli import main
from rlhf_train.jobs.io import (
    InputError,
    Journal,
    check_fresh_outputs,
    read_rows,
    start_fresh,
    write_bytes_atomically,
    write_jsonl,
    write_parquet,
)
from rlhf_train.jobs.label import write_dataset_info

UNREACHABLE = "http://127.0.0.1:9"
SECRET = b"precious bytes that no job may touch\n"


def rows(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"Question {i}?", "completions": [f"[BAD] {i}", f"[GOOD] {i}"]} for i in range(n)]


def write_input(path: Path, n: int = 2) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(n)), encoding="utf-8")
    return path


def run_job(job: str, inp: Path, out: Path, *extra: str) -> int:
    flag = "--judge" if job == "label" else "--reward"
    return main([job, flag, UNREACHABLE, "--input", str(inp), "--output", str(out), "--max-retries", "0", "--quiet",
                 *extra])  # fmt: skip


def plant(link: Path, target: Path) -> None:
    target.write_bytes(SECRET)
    link.symlink_to(target)


def assert_refused(err: str, link: Path) -> None:
    assert str(link) in err and "is a symbolic link" in err and "nothing was written" in err, err


# -- the jobs, end to end --------------------------------------------------------------------------

# Names relative to the output ``o.jsonl``; label's rejects file is ``o.rejects.jsonl``.
SCORE_NAMES = ["o.jsonl", "o.jsonl.tmp", "o.jsonl.journal", "o.jsonl.journal.tmp"]
LABEL_NAMES = [*SCORE_NAMES, "o.rejects.jsonl", "o.rejects.jsonl.tmp"]
CASES = [("label", n) for n in LABEL_NAMES] + [("score", n) for n in SCORE_NAMES]


@pytest.mark.parametrize(("job", "name"), CASES)
def test_a_link_planted_before_the_first_run_exits_2(
    job: str, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_input(tmp_path / "in.jsonl")
    victim = tmp_path / "victim.txt"
    link = tmp_path / name
    plant(link, victim)
    assert run_job(job, inp, tmp_path / "o.jsonl") == 2
    assert_refused(capsys.readouterr().err, link)
    assert victim.read_bytes() == SECRET and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.jsonl", "victim.txt", name])  # nothing else


@pytest.mark.parametrize(("job", "name"), CASES)
def test_a_link_planted_between_runs_exits_2_and_the_job_resumes_once_it_is_gone(
    job: str, name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_input(tmp_path / "in.jsonl")
    out = tmp_path / "o.jsonl"
    assert run_job(job, inp, out) == 1  # the service is down: a journal and empty outputs, rows pending
    journal = tmp_path / "o.jsonl.journal"
    journal_bytes = journal.read_bytes()
    link = tmp_path / name
    link.unlink(missing_ok=True)
    victim = tmp_path / "victim.txt"
    plant(link, victim)
    capsys.readouterr()

    assert run_job(job, inp, out) == 2
    assert_refused(capsys.readouterr().err, link)
    assert victim.read_bytes() == SECRET and link.is_symlink()
    if not journal.is_symlink():
        assert journal.read_bytes() == journal_bytes  # the journal was not even opened for writing

    link.unlink()
    if link == journal:
        journal.write_bytes(journal_bytes)  # the journal the link stood in for
    assert run_job(job, inp, out) == 1  # resumes (the service is still down): rows still pending
    assert "2 rows could not be" in capsys.readouterr().err
    assert victim.read_bytes() == SECRET


@pytest.mark.parametrize("job", ["label", "score"])
def test_a_dangling_link_is_refused_and_its_target_not_created(
    job: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_input(tmp_path / "in.jsonl")
    for name in ("o.jsonl.journal", "o.jsonl.tmp", "o.jsonl"):
        link = tmp_path / name
        link.symlink_to(tmp_path / "created-through-the-link")
        assert run_job(job, inp, tmp_path / "o.jsonl") == 2
        assert_refused(capsys.readouterr().err, link)
        assert not (tmp_path / "created-through-the-link").exists()
        link.unlink()


@pytest.mark.parametrize("job", ["label", "score"])
def test_restart_removes_the_links_not_their_targets(
    job: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = write_input(tmp_path / "in.jsonl")
    victims = []
    for i, name in enumerate(("o.jsonl", "o.jsonl.tmp", "o.jsonl.journal", "o.jsonl.journal.tmp")):
        victims.append(tmp_path / f"victim{i}.txt")
        plant(tmp_path / name, victims[-1])
    assert run_job(job, inp, tmp_path / "o.jsonl", "--restart") == 1  # past the checks: the service is down
    assert all(v.read_bytes() == SECRET for v in victims)
    assert not (tmp_path / "o.jsonl").is_symlink() and (tmp_path / "o.jsonl").read_bytes() == b""
    assert not (tmp_path / "o.jsonl.journal").is_symlink()
    assert not (tmp_path / "o.jsonl.tmp").exists() and not (tmp_path / "o.jsonl.journal.tmp").exists()


@pytest.mark.parametrize("job", ["label", "score"])
def test_linked_input_and_linked_output_directory_still_work(
    job: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only the last component of the files the job writes matters: datasets are often links."""
    real_inp = write_input(tmp_path / "data.jsonl", n=3)
    inp = tmp_path / "in.jsonl"
    inp.symlink_to(real_inp)
    (tmp_path / "real-out").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real-out")
    assert run_job(job, inp, tmp_path / "out" / "o.jsonl") == 1  # got as far as the service
    assert "3 rows could not be" in capsys.readouterr().err
    assert (tmp_path / "real-out" / "o.jsonl").read_bytes() == b""
    assert (tmp_path / "real-out" / "o.jsonl.journal").stat().st_size > 0
    assert [r.data for r in read_rows(inp)] == rows(3)


# -- the writers on their own (a link planted while the job runs, after its up-front checks) -------


def test_write_jsonl_refuses_a_linked_tmp_and_leaves_no_output(tmp_path: Path) -> None:
    out, victim = tmp_path / "o.jsonl", tmp_path / "victim.txt"
    plant(tmp_path / "o.jsonl.tmp", victim)
    with pytest.raises(InputError, match=r"o\.jsonl\.tmp is a symbolic link \(pointing to .*victim\.txt\)"):
        write_jsonl(out, [{"a": 1}])
    assert victim.read_bytes() == SECRET and not out.exists()


def test_write_parquet_refuses_a_linked_tmp(tmp_path: Path) -> None:
    out, victim = tmp_path / "o.parquet", tmp_path / "victim.txt"
    plant(tmp_path / "o.parquet.tmp", victim)
    with pytest.raises(InputError, match="is a symbolic link"):
        write_parquet(out, [{"a": 1}])
    assert victim.read_bytes() == SECRET and not out.exists()


def test_a_stale_regular_tmp_is_replaced(tmp_path: Path) -> None:
    """A killed run leaves a regular ``.tmp`` behind: it is removed and the write goes on."""
    import pyarrow.parquet as pq

    (tmp_path / "o.jsonl.tmp").write_bytes(b'{"half a row')
    assert write_jsonl(tmp_path / "o.jsonl", [{"a": 1}, {"a": 2}]) == 2
    assert (tmp_path / "o.jsonl").read_bytes() == b'{"a":1}\n{"a":2}\n'
    (tmp_path / "o.parquet.tmp").write_bytes(b"PAR1 torn")
    assert write_parquet(tmp_path / "o.parquet", [{"a": 1}, {"a": 2}]) == 2
    assert pq.read_table(tmp_path / "o.parquet").to_pylist() == [{"a": 1}, {"a": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "o.parquet"]


def test_a_tmp_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "o.jsonl.tmp").mkdir()
    with pytest.raises(InputError, match=r"o\.jsonl\.tmp is a directory; nothing was written"):
        write_jsonl(tmp_path / "o.jsonl", [{"a": 1}])


def test_a_failed_write_removes_its_tmp(tmp_path: Path) -> None:
    def boom() -> Any:
        yield {"a": 1}
        raise RuntimeError("the rows ran out")

    with pytest.raises(RuntimeError):
        write_jsonl(tmp_path / "o.jsonl", boom())
    assert list(tmp_path.iterdir()) == []


def test_journal_open_refuses_a_link_existing_or_dangling(tmp_path: Path) -> None:
    path, victim = tmp_path / "o.jsonl.journal", tmp_path / "victim.txt"
    plant(path, victim)
    with pytest.raises(InputError, match=r"o\.jsonl\.journal is a symbolic link"):
        Journal.open(path, job="score", config={})
    assert victim.read_bytes() == SECRET
    path.unlink()
    path.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="is a symbolic link"):
        Journal.open(path, job="score", config={})
    assert not (tmp_path / "nowhere").exists()


def test_journal_compaction_refuses_a_linked_tmp_and_stays_resumable(tmp_path: Path) -> None:
    path, victim = tmp_path / "o.jsonl.journal", tmp_path / "victim.txt"
    j, _ = Journal.open(path, job="score", config={})
    j.append([{"k": "a", "out": [{"x": 1}], "stats": {}}])
    plant(tmp_path / "o.jsonl.journal.tmp", victim)  # planted while the job runs
    with pytest.raises(InputError, match=r"o\.jsonl\.journal\.tmp is a symbolic link"):
        j.compact([{"k": "a", "stats": {}}])
    j.close()
    assert victim.read_bytes() == SECRET
    j, state = Journal.open(path, job="score", config={})
    j.close()
    assert sorted(state.done) == ["a"] and not state.complete


def test_journal_compaction_replaces_a_stale_tmp(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl.journal"
    j, _ = Journal.open(path, job="score", config={})
    j.append([{"k": "a", "out": [{"x": 1}], "stats": {"n": 1}}])
    (tmp_path / "o.jsonl.journal.tmp").write_bytes(b"left by a killed compaction")
    j.compact([{"k": "a", "stats": {"n": 1}}])
    j.append([{"k": "b", "stats": {}}])  # the reopened journal appends
    j.close()
    lines = [json.loads(x) for x in path.read_bytes().splitlines()]
    assert lines[1:] == [{"k": "a", "stats": {"n": 1}}, {"complete": True}, {"k": "b", "stats": {}}]
    assert not (tmp_path / "o.jsonl.journal.tmp").exists()


def test_check_fresh_outputs_names_the_first_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    plant(tmp_path / "r.jsonl.tmp", victim)
    with pytest.raises(InputError, match=r"r\.jsonl\.tmp is a symbolic link"):
        check_fresh_outputs(tmp_path / "o.jsonl.journal", [tmp_path / "o.jsonl", tmp_path / "r.jsonl"])
    start_fresh([tmp_path / "r.jsonl"])
    assert not (tmp_path / "r.jsonl.tmp").is_symlink() and victim.read_bytes() == SECRET
    check_fresh_outputs(tmp_path / "o.jsonl.journal", [tmp_path / "o.jsonl", tmp_path / "r.jsonl"])


def test_dataset_info_tmp_link_is_refused(tmp_path: Path) -> None:
    info, victim = tmp_path / "dataset_info.json", tmp_path / "victim.txt"
    info.write_text('{"other": {"file_name": "x.jsonl"}}\n', encoding="utf-8")
    plant(tmp_path / "dataset_info.json.tmp", victim)
    with pytest.raises(InputError, match=r"dataset_info\.json\.tmp is a symbolic link"):
        write_dataset_info(info, "mine", tmp_path / "o.jsonl")
    assert victim.read_bytes() == SECRET
    assert json.loads(info.read_text(encoding="utf-8")) == {"other": {"file_name": "x.jsonl"}}
    os.unlink(tmp_path / "dataset_info.json.tmp")
    write_dataset_info(info, "mine", tmp_path / "o.jsonl")
    assert set(json.loads(info.read_text(encoding="utf-8"))) == {"other", "mine"}


def test_write_bytes_atomically_over_a_linked_destination_replaces_the_link(tmp_path: Path) -> None:
    """Renaming onto a link replaces the link itself: the target is never opened (the jobs refuse a
    linked output up front anyway, so the user's link is not silently turned into a file)."""
    victim = tmp_path / "victim.txt"
    plant(tmp_path / "f", victim)
    write_bytes_atomically(tmp_path / "f", b"new")
    assert not (tmp_path / "f").is_symlink() and (tmp_path / "f").read_bytes() == b"new"
    assert victim.read_bytes() == SECRET
