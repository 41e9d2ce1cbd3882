"""Ray Data pipelines on a local Ray (``ray.init(num_cpus=2)``): issue 14's "Done when" for Ray.

- 2,000 HH-RLHF rows scored by :class:`RewardScorer` through two real ``serve reward`` replicas
  (one over HTTP, one over gRPC) of a tiny random Llama, one SIGKILLed midway: every row exactly
  once in the Parquet output, each with a score within 1e-5 of the unbatched ``transformers``
  forward; the same rows through :class:`LocalRewardScorer` give the same scores.
- :class:`JudgeLabeler` rows equal ``rlhf-feedback label``'s rows (and rejects) for the same
  scripted judge replies, and the Parquet data set loads with TRL's columns.
"""

from __future__ import annotations

import json
import math
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clients.process import ServerProcess
from rlhf_feedback.cli import main
from rlhf_train.hh_rlhf import load_pairs
from rlhf_train.integrations.ray import JudgeLabeler, LocalRewardScorer, RewardScorer, pairs_only, rejects_only
from tests.support.parity import TOL, Reference
from tests.support.paths import SHARED_DATA
from tests.support.servers import BackgroundLoop, start_uvicorn, stop_uvicorn
from tests.support.tiny_models import make_tiny_llama

ray = pytest.importorskip("ray")

HH_DIR = SHARED_DATA / "hh-rlhf"
N_ROWS = 2000
MAX_TOKENS = 1024  # rows whose rendering fits (no truncation), so the reference is the whole sequence

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    pytest.mark.skipif(not HH_DIR.is_dir(), reason="needs ../shared/data/hh-rlhf"),
]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Positions for the longest HH dialogue kept (MAX_TOKENS): nothing is truncated.
    return make_tiny_llama(tmp_path_factory.mktemp("rm") / "tiny", max_position=2 * MAX_TOKENS)


def hh_rows(ref: Reference) -> list[dict[str, Any]]:
    """The first N_ROWS HH pairs (prompt messages + the chosen response) that fit MAX_TOKENS."""
    pairs, _ = load_pairs(HH_DIR)
    rows: list[dict[str, Any]] = []
    for p in pairs:
        item = {"prompt": [{"role": m.role, "content": m.content} for m in p.prompt], "response": p.chosen}
        if len(ref.encode(item)["input_ids"]) <= MAX_TOKENS:
            rows.append({"row_id": len(rows), **item})
        if len(rows) == N_ROWS:
            return rows
    raise AssertionError(f"only {len(rows)} HH rows fit {MAX_TOKENS} tokens")


def served_requests(srv: ServerProcess) -> float:
    text = httpx.get(srv.http_url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("rlhf_reward_requests_total{")
    )


def test_two_replicas_one_killed_every_row_once_with_exact_scores(local_ray: Any, tiny: Path, tmp_path: Path) -> None:
    ref = Reference(tiny)
    rows = hh_rows(ref)
    argv = ["--model", str(tiny), "--threads", "1", "--log-level", "warning"]
    a = ServerProcess.reward(argv, log_path=tmp_path / "a.log")
    b = ServerProcess.reward(argv, log_path=tmp_path / "b.log")
    try:
        a.wait_ready(120)
        b.wait_ready(120)
        table = pa.Table.from_pylist(rows)
        ds = ray.data.from_arrow([table.slice(i, 100) for i in range(0, N_ROWS, 100)])  # 20 blocks
        scored = ds.map_batches(
            RewardScorer,
            fn_constructor_kwargs={"url": [a.http_url, f"grpc://{b.grpc_target}"], "max_retries": 10},
            batch_size=25,
            batch_format="pyarrow",
            concurrency=2,
            num_cpus=0.5,
        )
        killed: dict[str, float] = {}

        def kill_a_midway() -> None:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                try:
                    if served_requests(a) >= 8:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            killed["b_before"] = served_requests(b)
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()

        killer = threading.Thread(target=kill_a_midway, daemon=True)
        killer.start()
        scored.write_parquet(str(tmp_path / "scored"))
        killer.join(10)
        assert a.proc.returncode == -signal.SIGKILL
        # The kill came midway: the surviving replica took requests after it.
        assert served_requests(b) > killed["b_before"]
        out = pq.read_table(tmp_path / "scored").to_pylist()
    finally:
        a.terminate()
        b.terminate()

    assert len(out) == N_ROWS
    assert sorted(r["row_id"] for r in out) == list(range(N_ROWS))  # every row exactly once
    assert all(r["error"] is None and r["score"] is not None and r["truncated"] is False for r in out)
    assert {r["reward_model"]["id"] for r in out} == {"tiny"}

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: one thread is faster than contended ones
    try:
        expected = {}
        for r in rows:
            enc = ref.encode({"prompt": r["prompt"], "response": r["response"]})
            expected[r["row_id"]] = ref.score(enc["input_ids"], None)
    finally:
        torch.set_num_threads(threads)
    worst = max(abs(r["score"] - expected[r["row_id"]]) for r in out)
    assert worst <= TOL, worst
    print(f"RAY served: {len(out)} rows, worst |score - unbatched forward| = {worst:.2e}")

    # The same rows through the model loaded in the actors: the same scores, no server.
    local = ds.map_batches(
        LocalRewardScorer,
        fn_constructor_kwargs={"model": str(tiny), "threads": 1},
        batch_size=100,
        batch_format="pyarrow",
        concurrency=2,
        num_cpus=1,
    ).take_all()
    assert sorted(r["row_id"] for r in local) == list(range(N_ROWS))
    served = {r["row_id"]: r["score"] for r in out}
    local_worst = max(abs(r["score"] - expected[r["row_id"]]) for r in local)
    local_vs_served = max(abs(r["score"] - served[r["row_id"]]) for r in local)
    assert local_worst <= TOL and local_vs_served <= TOL, (local_worst, local_vs_served)
    print(f"RAY local: worst vs unbatched {local_worst:.2e}, vs served {local_vs_served:.2e}")


# -- JudgeLabeler == label ---------------------------------------------------------------------------------


def scripted_policy(query: Any, sections: dict[str, str]) -> Any:
    """The scripted judge's ``always_better`` rule, plus: a response marked ``[abstain]`` gets an
    unparseable reply (the judge abstains)."""
    from services.judge.backends.base import UnparseableReply
    from services.judge.backends.scripted import default_score
    from services.judge.types import Usage, VerdictReply

    a, b = sections.get("RESPONSE_A", ""), sections.get("RESPONSE_B", "")
    if "[abstain]" in a + b:
        raise UnparseableReply("Both are fine.", "no verdict token in the reply")
    p = 1 / (1 + math.exp(-(default_score(a) - default_score(b))))
    choice = "A" if p >= 0.5 else "B"
    usage = Usage(prompt_tokens=sum(len(m.content) for m in query.messages) // 4, completion_tokens=1)
    return VerdictReply(choice, {"A": p, "B": 1 - p}, True, choice, None, usage)


@pytest.fixture(scope="module")
def scripted_judge() -> Iterator[str]:
    from services.judge.backends.scripted import ScriptedBackend
    from services.judge.transports.http import create_http_app
    from tests.support.judge import judge_engine, judge_settings

    bg = BackgroundLoop()
    settings = judge_settings()
    engine = judge_engine(ScriptedBackend(policy=scripted_policy), settings)
    bg.run(engine.start())
    server, task, port = bg.run(start_uvicorn(create_http_app(engine, settings, api_key=None)))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        bg.run(stop_uvicorn(server, task))
        bg.run(engine.stop())
        bg.close()


def label_rows() -> list[dict[str, Any]]:
    """Two and three completions, with and without a system message, ties, weak wins, abstentions."""
    rows: list[dict[str, Any]] = []
    for i in range(40):
        # Messages in every row: one JSONL column is one Arrow type for Ray's reader.
        prompt = [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]
        if i % 3 == 0:
            prompt = [{"role": "system", "content": "Be brief."}, *prompt]
        good, bad = f"{2 * i} [good] [good]", f"{2 * i + 1} [bad]"
        if i % 5 == 1:
            comps = [f"{i} tie", f"{i} tye"]  # equal scores: a tie
        elif i % 5 == 2:
            comps = [bad, f"{2 * i} [abstain]"]
        elif i % 5 == 3:
            comps = [f"{i} [good]", f"{i} plain", good]  # three: rank, then best vs worst
        elif i % 5 == 4:
            comps = [f"{2 * i} [good]", f"{2 * i} meh"]  # p = 0.73: below --min-confidence 0.5
        else:
            comps = [bad, good]
        rows.append({"prompt": prompt, "completions": comps})
    return rows


def without_input(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "input"} for r in rows]


def test_judge_labeler_rows_equal_label_rows(local_ray: Any, scripted_judge: str, tmp_path: Path) -> None:
    rows = label_rows()
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "label.parquet"
    code = main(["label", "--judge", scripted_judge, "--input", str(inp), "--output", str(out), "--quiet",
                 "--min-confidence", "0.5"])  # fmt: skip
    assert code == 0
    label_pairs = pq.read_table(out).to_pylist()
    label_rejects = [json.loads(x) for x in (tmp_path / "label.rejects.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in label_rejects}
    assert kinds == {"tie", "abstain", "low_confidence"}, kinds
    assert len(label_pairs) == 16  # i % 5 in (0, 3): 8 + 8

    ds = ray.data.read_json(str(inp)).repartition(4)
    labelled = ds.map_batches(
        JudgeLabeler,
        fn_constructor_kwargs={"url": scripted_judge, "min_confidence": 0.5},
        batch_size=10,
        batch_format="pyarrow",
        concurrency=1,
        num_cpus=0.5,
    ).materialize()
    pairs = labelled.map_batches(pairs_only, batch_format="pyarrow")
    rejects = labelled.map_batches(rejects_only, batch_format="pyarrow").take_all()

    # Parquet out, loaded as TRL loads a preference data set.
    pairs.write_parquet(str(tmp_path / "pairs"))
    mine = pq.read_table(tmp_path / "pairs").to_pylist()
    by_id = {r["id"]: r for r in label_pairs}
    assert sorted(r["id"] for r in mine) == sorted(by_id)
    assert all(r == by_id[r["id"]] for r in mine)
    by_id_rej = {r["id"]: r for r in without_input(label_rejects)}
    assert sorted(r["id"] for r in rejects) == sorted(by_id_rej)
    assert all(r == by_id_rej[r["id"]] for r in without_input(rejects))

    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    hf = load_dataset("parquet", data_files=str(tmp_path / "pairs" / "*.parquet"), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(hf.column_names)  # DPOTrainer's / RewardTrainer's columns
    assert "margin" not in hf.column_names  # RewardTrainer would subtract it in its loss
    example = hf[0]
    assert is_conversational(example)
    tok = AutoTokenizer.from_pretrained(make_tiny_llama(tmp_path / "tok"))
    rendered = maybe_apply_chat_template(example, tok)
    assert re.search(r"\[good\]", rendered["chosen"]) and "<|im_start|>user" in rendered["prompt"]
