"""The Ray Data callables on their own (no Ray): batch formats, per-row failures, list-wise scoring,
pickling, typed columns. Scored by :class:`FakeReward` (``len(response)``; ``FAIL`` → a per-item
DEADLINE_EXCEEDED, ``HTTP400`` → the request refused as invalid) in a background loop."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest

from clients.errors import ConnectionFailedError
from rlhf_train.integrations.ray import (
    JudgeLabeler,
    RewardScorer,
    RowsFailedError,
    as_table,
    labels_schema,
    pairs_only,
    rejects_only,
    reward_pairs,
)
from rlhf_train.jobs.label import LabelOptions
from tests.support.servers import BackgroundLoop, FakeReward

DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeReward]:
    bg = BackgroundLoop()
    srv = FakeReward(bg)
    try:
        yield srv
    finally:
        srv.stop()
        bg.close()


def batch() -> pa.Table:
    return pa.table(
        {
            "row_id": [0, 1, 2, 3],
            "prompt": ["p0", "p1", None, "p3"],
            "response": ["abc", "x FAIL", "orphan", "abcdef"],
        }
    )


def test_every_batch_format_gives_the_same_typed_table(fake: FakeReward) -> None:
    scorer = RewardScorer(fake.url)
    t = batch()
    as_numpy = {k: np.asarray(v, dtype=object) for k, v in t.to_pydict().items()}
    outs = [scorer(t), scorer(t.to_pandas()), scorer(as_numpy)]
    for out in outs[1:]:
        assert out.column("score").to_pylist() == outs[0].column("score").to_pylist()
    out = outs[0]
    assert out.column_names == ["row_id", "prompt", "response", "score", "truncated", "error", "reward_model"]
    assert out.schema.field("score").type == pa.float64()
    assert out.column("score").to_pylist() == [3.0, None, None, 6.0]
    errors = out.column("error").to_pylist()
    assert errors[0] is None and errors[3] is None
    assert errors[1] == "DEADLINE_EXCEEDED: too slow"  # the service's per-item error, not a made-up score
    assert errors[2] == "INVALID_ARGUMENT: the row has no prompt"  # never sent
    assert out.column("truncated").to_pylist() == [False, None, None, False]
    assert out.column("reward_model").to_pylist()[0] == {"id": "fake-rm", "revision": "r1"}
    assert len(fake.bodies[-1]["inputs"]) == 3


def test_an_invalid_item_fails_alone(fake: FakeReward) -> None:
    t = pa.table({"prompt": ["a", "b", "c"], "response": ["ok", "HTTP400 here", "fine"]})
    out = RewardScorer(fake.url)(t)
    assert out.column("score").to_pylist() == [2.0, None, 4.0]
    assert out.column("error").to_pylist()[1] == "INVALID_ARGUMENT: bad item"


def test_unreachable_service_gives_null_scores_with_the_reason_or_raises() -> None:
    t = pa.table({"prompt": ["a", "b"], "response": ["x", "y"]})
    out = RewardScorer(DEAD, max_retries=0, timeout=5)(t)
    assert out.column("score").to_pylist() == [None, None]
    assert out.schema.field("score").type == pa.float64()  # typed even when the whole block failed
    assert all(e.startswith("CONNECTION_FAILED: ") for e in out.column("error").to_pylist())
    with pytest.raises(ConnectionFailedError):
        RewardScorer(DEAD, max_retries=0, timeout=5, on_error="raise")(t)


def test_on_error_raise_on_a_failed_item(fake: FakeReward) -> None:
    with pytest.raises(RowsFailedError, match="1 of 3 items"):
        RewardScorer(fake.url, on_error="raise")(_three())


def _three() -> pa.Table:
    return pa.table({"prompt": ["a", "b", "c"], "response": ["ok", "x FAIL", "fine"]})


def test_listwise_completions_and_reward_pairs(fake: FakeReward) -> None:
    t = pa.table(
        {
            "prompt": ["p", "q", "r"],
            "completions": [["a", "abc", "ab"], ["same", "same"], ["zz", "y FAIL"]],
        }
    )
    out = RewardScorer(fake.url, completions_column="completions")(t)
    assert out.column("score").to_pylist() == [[1.0, 3.0, 2.0], [4.0, 4.0], [2.0, None]]
    assert out.column("error").to_pylist()[2] == [None, "DEADLINE_EXCEEDED: too slow"]
    pairs = reward_pairs(out).to_pylist()
    assert len(pairs) == 1  # q: equal scores; r: one scored completion
    (row,) = pairs
    assert row["chosen"] == [{"role": "assistant", "content": "abc"}]
    assert row["rejected"] == [{"role": "assistant", "content": "a"}]
    assert row["prompt"] == [{"role": "user", "content": "p"}]
    assert (row["score_chosen"], row["score_rejected"]) == (3.0, 1.0)


def test_messages_and_text_columns(fake: FakeReward) -> None:
    t = pa.table({"conv": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]})
    assert RewardScorer(fake.url, messages_column="conv")(t).column("score").to_pylist() == [5.0]
    t = pa.table({"t": ["four", None]})
    out = RewardScorer(fake.url, text_column="t")(t)
    assert out.column("score").to_pylist() == [4.0, None]
    assert out.column("error").to_pylist()[1].startswith("INVALID_ARGUMENT: text must be a string")
    with pytest.raises(ValueError, match="at most one"):
        RewardScorer(fake.url, text_column="t", messages_column="conv")


def test_a_missing_column_is_a_pipeline_error(fake: FakeReward) -> None:
    with pytest.raises(KeyError, match="no column 'response'"):
        RewardScorer(fake.url)(pa.table({"prompt": ["a"]}))


def test_scorer_pickles_after_use_without_its_connections(fake: FakeReward) -> None:
    scorer = RewardScorer([fake.url, DEAD])
    scorer(_three())
    assert scorer._client is not None
    copy = pickle.loads(pickle.dumps(scorer))
    assert copy._client is None
    assert copy(_three()).column("score").to_pylist()[0] == 2.0


def test_pandas_batches_with_nested_messages_convert() -> None:
    t = pa.table({"prompt": [[{"role": "user", "content": "hi"}]], "n": [1]})
    assert as_table(t.to_pandas()).to_pylist() == t.to_pylist()


def test_judge_labeler_invalid_rows_and_unreachable_judge_are_rejects() -> None:
    t = pa.table(
        {
            "prompt": ["p", "q"],
            "completions": [["only one"], ["a", "b"]],
            "row": ["r0", "r1"],
        }
    )
    out = JudgeLabeler(DEAD, max_retries=0, timeout=5, id_column="row")(t)
    assert out.schema == labels_schema(LabelOptions())
    rejects = rejects_only(out).to_pylist()
    assert [r["kind"] for r in rejects] == ["invalid", "error"]
    assert rejects[0]["reason"] == "invalid: 'completions' must be a list of at least 2 completions"
    assert rejects[0]["input"] == "r0" and rejects[1]["input"] == "r1"
    assert rejects[1]["completions"] == ["a", "b"]
    assert pairs_only(out).num_rows == 0
    assert pairs_only(out).column_names == ["id", "prompt", "chosen", "rejected", "preference", "consistent", "judge"]
    with pytest.raises(RowsFailedError):
        JudgeLabeler(DEAD, max_retries=0, timeout=5, on_error="raise")(t)
