"""judge-eval: loaders (synthetic and the real shared sets), metrics on hand-computed cases, the
HTTP client's retries, and an end-to-end run against a tiny in-test judge on loopback."""

from __future__ import annotations

import gzip
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from rlhf_feedback import cli
from rlhf_train.eval import command as eval_command
from rlhf_train.eval.judge_eval import (
    DatasetError,
    Example,
    Judgment,
    Label,
    annotator_metrics,
    calibration,
    compute_metrics,
    first_position_counts,
    first_position_delta,
    load_dataset,
    parse_hh_dialogue,
    render_report,
    swap_slots,
)
from tests.support.paths import SHARED_DATA

SHARED = SHARED_DATA


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- loaders -----------------------------------------------------------------------------------


def test_jsonl_loader(tmp_path: Path) -> None:
    f = _write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Say hi", "response_a": "hi", "response_b": "hello", "label": "a"},
            {"prompt": [{"role": "user", "content": "Q"}], "response_a": "x", "response_b": "y", "label": "TIE"},
            {"prompt": "p", "response_a": " keep  spaces ", "response_b": "", "label": "b", "subset": "s1", "id": "r3"},
        ],
    )
    ds = load_dataset(f, "jsonl")
    assert [e.label for e in ds.examples] == ["a", "tie", "b"]
    assert ds.examples[1].prompt == [{"role": "user", "content": "Q"}]
    assert ds.examples[2].response_a == " keep  spaces "  # verbatim
    assert ds.examples[2].subset == "s1" and ds.examples[2].id == "r3"
    assert len({e.id for e in ds.examples}) == 3

    _write_jsonl(f, [{"prompt": "p", "response_a": "a", "response_b": "b", "label": 1}])
    with pytest.raises(DatasetError, match="label"):
        load_dataset(f, "jsonl")


def test_pandalm_loader(tmp_path: Path) -> None:
    rows = [
        {
            "idx": 0,
            "instruction": "Do X.",
            "input": "",
            "response1": "r1",
            "response2": "r2",
            "annotator1": 1,
            "annotator2": 1,
            "annotator3": 2,
        },
        {
            "idx": 1,
            "instruction": "Do Y.",
            "input": "data",
            "response1": True,
            "response2": "r2",
            "annotator1": 0,
            "annotator2": 2,
            "annotator3": 2,
        },
        {
            "idx": 2,
            "instruction": "Do Z.",
            "input": "",
            "response1": "a",
            "response2": "b",
            "annotator1": 0,
            "annotator2": 1,
            "annotator3": 2,
        },
        {
            "idx": 3,
            "instruction": "Do W.",
            "input": "",
            "response1": "a",
            "response2": "b",
            "annotator1": 0,
            "annotator2": 0,
            "annotator3": 1,
        },
    ]
    f = tmp_path / "testset.json"
    f.write_text(json.dumps(rows), encoding="utf-8")
    ds = load_dataset(f, "pandalm")
    assert [e.label for e in ds.examples] == ["a", "b", "tie", "tie"]  # majority; no majority -> tie
    assert ds.examples[0].prompt == "Do X."
    assert ds.examples[1].prompt == "Do Y.\n\ndata"
    assert ds.examples[1].response_a == "True"  # JSON true in the real file: read as text, noted
    assert sum(ds.notes.values()) == 1
    assert ds.examples[2].annotators == ("tie", "a", "b")


def test_llmbar_loader_file_and_folder(tmp_path: Path) -> None:
    row = {"input": "Write a haiku.", "output_1": "o1", "output_2": "o2"}
    (tmp_path / "LLMBar_Natural.json").write_text(json.dumps([{**row, "label": 1}, {**row, "label": 2}]))
    (tmp_path / "LLMBar_Adversarial_X.json").write_text(json.dumps([{**row, "output_1": "z", "label": 2}]))
    (tmp_path / "other.json").write_text("not json")
    ds = load_dataset(tmp_path, "llmbar")
    assert len(ds.examples) == 3
    assert sorted({e.subset for e in ds.examples}) == ["Adversarial_X", "Natural"]
    one = load_dataset(tmp_path / "LLMBar_Natural.json", "llmbar")
    assert [e.label for e in one.examples] == ["a", "b"]
    assert one.examples[0].prompt == "Write a haiku." and one.examples[0].response_b == "o2"


def test_hh_loader(tmp_path: Path) -> None:
    def dlg(final: str) -> str:
        return f"\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Help me?\n\nAssistant: {final}"

    rows = [{"chosen": dlg(f"Sure, #{i}."), "rejected": dlg(f"No #{i}.")} for i in range(40)]
    rows.append({"chosen": dlg("Same"), "rejected": dlg("Same")})
    rows.append({"chosen": dlg("A\n\nHuman: more\n\nAssistant: x"), "rejected": dlg("B")})
    f = tmp_path / "hh.jsonl.gz"
    with gzip.open(f, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    ds = load_dataset(f, "hh-rlhf", seed=3)
    assert len(ds.examples) == 40 and sum(ds.skipped.values()) == 2
    ex = ds.examples[0]
    assert ex.prompt == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Help me?"},
    ]
    for e in ds.examples:
        chosen = e.response_a if e.label == "a" else e.response_b
        assert chosen.startswith("Sure"), e
    labels = [e.label for e in ds.examples]
    assert 8 <= labels.count("a") <= 32  # a seeded half, not all one side
    assert labels == [e.label for e in load_dataset(f, "hh-rlhf", seed=3).examples]  # deterministic
    assert parse_hh_dialogue("\n\nHuman: a\n\nAssistant:  two spaces") == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": " two spaces"},
    ]


def test_limit_is_a_seeded_sample(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "response_a": "a", "response_b": "b", "label": "a"} for i in range(50)]
    f = _write_jsonl(tmp_path / "d.jsonl", rows)
    s1 = [e.prompt for e in load_dataset(f, "jsonl", limit=10, seed=1).examples]
    assert len(set(s1)) == 10 and s1 == [e.prompt for e in load_dataset(f, "jsonl", limit=10, seed=1).examples]
    assert s1 == sorted(s1, key=lambda p: int(str(p)[1:]))  # file order kept
    assert s1 != [e.prompt for e in load_dataset(f, "jsonl", limit=10, seed=2).examples]


REAL = [
    ("pandalm/testset-v1.json", "pandalm"),
    ("llmbar/LLMBar_Natural.json", "llmbar"),
    ("llmbar/LLMBar_Adversarial_Neighbor.json", "llmbar"),
    ("hh-rlhf/helpful-base.test.jsonl.gz", "hh-rlhf"),
    ("hh-rlhf/harmless-base.test.jsonl.gz", "hh-rlhf"),
]


@pytest.mark.parametrize(("rel", "fmt"), REAL)
def test_real_files_first_records_parse(tmp_path: Path, rel: str, fmt: str) -> None:
    src = SHARED / rel
    if not src.exists():
        pytest.skip(f"{src} not present")
    if src.suffix == ".gz":
        with gzip.open(src, "rt", encoding="utf-8") as fh:
            lines = [next(fh) for _ in range(5)]
        dst = tmp_path / src.name
        with gzip.open(dst, "wt", encoding="utf-8") as out:
            out.writelines(lines)
    else:
        dst = tmp_path / src.name
        dst.write_text(json.dumps(json.loads(src.read_text(encoding="utf-8"))[:5]), encoding="utf-8")
    ds = load_dataset(dst, fmt)
    assert 4 <= len(ds.examples) <= 5
    for e in ds.examples:
        assert e.label in ("a", "b", "tie") and e.response_a and e.response_b and e.prompt
        if fmt == "hh-rlhf":
            assert isinstance(e.prompt, list) and e.prompt[-1]["role"] == "user"
        if fmt == "pandalm":
            assert len(e.annotators) == 3


# -- metrics -----------------------------------------------------------------------------------


def _ex(label: Label, a: str = "aa", b: str = "b", subset: str = "", ann: tuple[Label, ...] = ()) -> Example:
    return Example(
        id=f"{label}{a}{b}", prompt="p", response_a=a, response_b=b, label=label, subset=subset, annotators=ann
    )


def _ok(p: float, winner: Label, consistent: bool = True, swapped: bool = False) -> Judgment:
    return Judgment(status="ok", preference=p, winner=winner, consistent=consistent, swapped=swapped)


def test_metrics_hand_computed() -> None:
    pairs = [
        (_ex("a"), _ok(0.9, "a")),  # right; longer (a) wins
        (_ex("a"), _ok(0.2, "b", consistent=False, swapped=True)),  # wrong; shorter wins; slot 0 (b) won
        (_ex("b"), _ok(0.5, "tie")),  # judge tie on decided pair: a miss
        (_ex("tie"), _ok(0.52, "tie")),  # tie on tie: counts for tie-aware accuracy only
        (_ex("tie"), _ok(0.8, "a", consistent=False)),  # wrong on tie
        (_ex("b"), Judgment(status="abstain", reason="unparseable")),
        (_ex("a"), Judgment(status="error", reason="HTTP 400")),
    ]
    m = compute_metrics(pairs, "both_orders")
    assert m["n"] == 7 and m["judged"] == 5
    assert m["abstain_rate"] == pytest.approx(1 / 7) and m["abstain_reasons"] == {"unparseable": 1}
    assert m["errors"] == 1 and m["error_rate"] == pytest.approx(1 / 7)
    assert m["agreement"] == {"value": pytest.approx(1 / 3), "n": 3}
    assert m["agreement_when_decided"] == {"value": pytest.approx(1 / 2), "n": 2}
    assert m["tie_aware_accuracy"] == {"value": pytest.approx(2 / 5), "n": 5}
    assert m["soft_agreement"]["value"] == pytest.approx((0.9 + 0.2 + 0.5) / 3)
    assert m["judge_tie_rate"] == pytest.approx(2 / 5)
    assert m["mean_confidence"] == pytest.approx((0.8 + 0.6 + 0 + 0.04 + 0.6) / 5)
    c = 3 / 5
    assert m["position_consistency"]["value"] == pytest.approx(c)
    assert m["first_position"]["lower"] == pytest.approx(c / 2)
    assert m["first_position"]["upper"] == pytest.approx(1 - c / 2)
    assert m["first_position"]["position_decided_rate"] == pytest.approx(1 - c)
    # winners a (slot0 a), b (swapped: slot0 is b), a (slot0 a): all three won by slot 0
    assert m["slot0_win_rate"] == {"value": 1.0, "n": 3}
    # judge winners: a (longer), b (shorter), a (longer) -> 2/3; humans among judged non-tie: a, a, b -> 2/3
    assert m["length"]["longer_wins_judge"] == {"value": pytest.approx(2 / 3), "n": 3}
    assert m["length"]["longer_wins_human"] == {"value": pytest.approx(2 / 3), "n": 3}
    assert m["length"]["length_bias"] == pytest.approx(0.0)
    assert m["calibration"]["n"] == 3
    assert m["calibration"]["brier"] == pytest.approx(((0.9 - 1) ** 2 + (0.2 - 1) ** 2 + 0.5**2) / 3)

    single = compute_metrics(pairs, "single")
    assert single["position_consistency"]["value"] is None and single["first_position"] is None


def test_calibration_bins_and_ece() -> None:
    points = [(0.05, 0.0), (0.15, 0.0), (0.15, 1.0), (0.95, 1.0), (1.0, 1.0), (0.95, 0.0)]
    cal = calibration(points, bins=10)
    bins = cal["bins"]
    assert [b["n"] for b in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 3]  # 1.0 lands in the last bin
    assert bins[1]["mean_pred"] == pytest.approx(0.15) and bins[1]["observed"] == pytest.approx(0.5)
    assert bins[9]["mean_pred"] == pytest.approx((0.95 + 1.0 + 0.95) / 3)
    assert bins[9]["observed"] == pytest.approx(2 / 3)
    assert bins[2]["mean_pred"] is None
    ece = (1 / 6) * 0.05 + (2 / 6) * abs(0.15 - 0.5) + (3 / 6) * abs(2.9 / 3 - 2 / 3)
    assert cal["ece"] == pytest.approx(ece)
    assert cal["brier"] == pytest.approx(sum((p - y) ** 2 for p, y in points) / 6)
    perfect = calibration([(0.0, 0.0), (1.0, 1.0)])
    assert perfect["ece"] == pytest.approx(0.0) and perfect["brier"] == pytest.approx(0.0)
    assert calibration([])["ece"] is None


def test_annotator_metrics_and_ceiling() -> None:
    pairs = [
        (_ex("a", ann=("a", "a", "a")), _ok(0.9, "a")),
        (_ex("a", ann=("a", "a", "b")), _ok(0.1, "b")),
        (_ex("b", ann=("tie", "b", "b")), _ok(0.2, "b")),
    ]
    m = annotator_metrics(pairs)
    assert m is not None
    # annotator1 vs majority(others): a|a ok, a|(a,b)->tie excluded, tie|(b,b)=b miss -> 1/2
    assert m["annotator1"]["ceiling"]["agreement"] == {"value": 0.5, "n": 2}
    # annotator3 vs majority(a1,a2): a|a ok, b|a miss, b|(tie,b)->tie excluded -> 1/2
    assert m["annotator3"]["ceiling"]["agreement"] == {"value": 0.5, "n": 2}
    # judge vs annotator3: a==a, b==b, b==b -> 1
    assert m["annotator3"]["judge"]["agreement"] == {"value": 1.0, "n": 3}
    assert m["annotator1"]["judge"]["agreement"] == {"value": 0.5, "n": 2}
    assert m["mean"]["ceiling_agreement"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert annotator_metrics([(_ex("a"), _ok(0.9, "a"))]) is None


def test_first_position_from_metrics_text() -> None:
    text = (
        "# TYPE rlhf_judge_first_position_total counter\n"
        'rlhf_judge_first_position_total{outcome="first"} 30.0\n'
        'rlhf_judge_first_position_total{outcome="second"} 10.0\n'
        'rlhf_judge_first_position_created{outcome="first"} 1.7e9\n'
    )
    after = first_position_counts(text)
    assert after == {"first": 30.0, "second": 10.0}
    assert first_position_counts("up 1\n") is None
    d = first_position_delta({"first": 10.0, "second": 5.0}, after)
    assert d["value"] == pytest.approx(20 / 25) and d["n"] == 25
    assert first_position_delta(None, None)["value"] is None


# -- the client --------------------------------------------------------------------------------


def test_parse_compare_maps_swapped_answers_back() -> None:
    body = {
        "preference": 0.8,
        "winner": 0,
        "consistent": True,
        "judge": {"backend": "x"},
        "usage": {"calls": 2},
        "cached": True,
    }
    j = eval_command.parse_compare(body, swapped=True)
    assert j.status == "ok" and j.preference == pytest.approx(0.2) and j.winner == "b" and j.cached
    assert eval_command.parse_compare({**body, "winner": None}, swapped=False).winner == "tie"
    ab = eval_command.parse_compare({"abstain": {"reason": "unparseable reply"}}, swapped=False)
    assert ab.status == "abstain" and ab.reason == "unparseable reply"
    assert eval_command.parse_compare({"winner": 0}, swapped=False).status == "error"
    assert eval_command.parse_compare({**body, "preference": 1.5}, swapped=False).status == "error"
    assert eval_command.retry_after_seconds("2.5") == 2.5
    assert eval_command.retry_after_seconds(None) is None
    assert eval_command.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert eval_command.retry_after_seconds("soon") is None


async def test_judge_one_retries_then_gives_up_or_records_error() -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if "bad" in request.content.decode():
            return httpx.Response(422, json={"error": {"code": "invalid_argument", "message": "nope"}})
        return httpx.Response(503, headers={"Retry-After": "1.5"})

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://judge") as client:
        j = await eval_command.judge_one(
            client, _ex("a"), "single", seed=0, max_retries=2, max_retry_wait=60, sleep=fake_sleep
        )
        assert j.status == "error" and "gave up after 3 attempts" in (j.reason or "") and j.attempts == 3
        assert sleeps == [1.5, 1.5] and len(calls) == 3
        calls.clear()
        bad = Example(id="x", prompt="bad", response_a="a", response_b="b", label="a")
        j = await eval_command.judge_one(
            client, bad, "single", seed=0, max_retries=2, max_retry_wait=60, sleep=fake_sleep
        )
        assert j.status == "error" and j.reason == "HTTP 422 invalid_argument: nope" and len(calls) == 1


# -- end to end --------------------------------------------------------------------------------


def _fake_judge_app(state: dict[str, Any]) -> Any:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"backend": "fake", "model": "longer-wins", "template_hash": "t0"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        fp = state["first_position"]
        return PlainTextResponse(
            "# HELP rlhf_judge_first_position_total Single-order verdicts.\n"
            "# TYPE rlhf_judge_first_position_total counter\n"
            f'rlhf_judge_first_position_total{{outcome="first"}} {fp["first"]}\n'
            f'rlhf_judge_first_position_total{{outcome="second"}} {fp["second"]}\n'
            "rlhf_judge_other_total 7.0\n"
        )

    @app.post("/v1/compare")
    async def compare(request: Request) -> Any:
        body = await request.json()
        state["requests"].append(body)
        if not state["throttled"]:
            state["throttled"] = True
            return JSONResponse({"error": {"code": "overloaded", "message": "busy"}}, 429, {"Retry-After": "0.05"})
        if body["prompt"] == "abstain me":
            return {"abstain": {"reason": "unparseable reply"}}
        if body["prompt"] == "reject me":
            return JSONResponse({"error": {"code": "invalid_argument", "message": "bad"}}, 400)
        a, b = body["responses"]
        # the single protocol shows the request order; both_orders shows both
        for first, second in [(a, b), (b, a)] if body["protocol"] == "both_orders" else [(a, b)]:
            if len(first) != len(second):
                state["first_position"]["first" if len(first) > len(second) else "second"] += 1
        p = len(a) / (len(a) + len(b))
        winner = None if abs(p - 0.5) < 0.05 else (0 if p > 0.5 else 1)
        return {
            "preference": p,
            "winner": winner,
            "consistent": True,
            "judge": {"backend": "fake", "model": "longer-wins", "template_hash": "t0"},
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 1,
                "cost_usd": 0.0,
                "calls": 2 if body["protocol"] == "both_orders" else 1,
            },
            "cached": False,
        }

    return app


@pytest.fixture
def fake_judge() -> Iterator[tuple[str, dict[str, Any]]]:
    import uvicorn

    state: dict[str, Any] = {"requests": [], "throttled": False, "first_position": {"first": 0, "second": 0}}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_fake_judge_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake judge did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.mark.slow  # ~1 s
def test_judge_eval_end_to_end(
    tmp_path: Path, fake_judge: tuple[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, state = fake_judge
    rows = []
    for i in range(12):
        long, short = "a much longer answer " * (1 + i % 3), f"short {i}"
        human_long = i % 4 != 0  # humans prefer the longer one 3 times in 4
        if i % 2:
            rows.append(
                {"prompt": f"q{i}", "response_a": long, "response_b": short, "label": "a" if human_long else "b"}
            )
        else:
            rows.append(
                {"prompt": f"q{i}", "response_a": short, "response_b": long, "label": "b" if human_long else "a"}
            )
    rows.append({"prompt": "tied", "response_a": "same len", "response_b": "SAME LEN", "label": "tie"})
    rows.append({"prompt": "abstain me", "response_a": "x", "response_b": "yy", "label": "a"})
    rows.append({"prompt": "reject me", "response_a": "x", "response_b": "yy", "label": "a"})
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"

    code = cli.main(
        [
            "judge-eval",
            "--judge",
            url,
            "--data",
            str(data),
            "--format",
            "jsonl",
            "--output-dir",
            str(out),
            "--concurrency",
            "3",
            "--quiet",
            "--seed",
            "7",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["protocols"]) == {"both_orders", "single"}
    assert report["judge"] == {"backend": "fake", "model": "longer-wins", "template_hash": "t0"}
    # every pair once per protocol, plus the one 429 that was retried
    assert len(state["requests"]) == 2 * 15 + 1
    assert sum(r["protocol"] == "single" for r in state["requests"]) == 15
    assert {tuple(sorted(r["responses"])) for r in state["requests"]} >= {tuple(sorted(["x", "yy"]))}
    for name, m in ((p, report["protocols"][p]["overall"]) for p in report["protocols"]):
        assert m["n"] == 15 and m["judged"] == 13 and m["abstains"] == 1 and m["errors"] == 1, name
        assert m["error_reasons"] == {"HTTP 400 invalid_argument: bad": 1}
        assert m["agreement"] == {"value": pytest.approx(9 / 12), "n": 12}
        assert m["tie_aware_accuracy"] == {"value": pytest.approx(10 / 13), "n": 13}
        assert m["length"]["longer_wins_judge"]["value"] == 1.0
        assert m["length"]["longer_wins_human"]["value"] == pytest.approx(9 / 12)
        assert m["length"]["length_bias"] == pytest.approx(0.25)
        assert 0 < m["calibration"]["n"] == 12 and m["calibration"]["ece"] is not None
        assert m["usage"]["calls"] == 13 * (2 if name == "both_orders" else 1)
    assert sum(report["protocols"][p]["overall"]["retries"] for p in report["protocols"]) == 1
    both, single = report["protocols"]["both_orders"]["overall"], report["protocols"]["single"]["overall"]
    assert both["position_consistency"]["value"] == 1.0
    # the server's counter, read before and after each protocol: both orders of 12 unequal pairs
    assert both["first_position_server"]["value"] == 0.5 and both["first_position_server"]["n"] == 24
    # single: this fake shows the request order, so the counter equals the request-slot-0 win rate
    assert single["first_position_server"]["n"] == 12
    assert single["first_position_server"]["value"] == pytest.approx(single["slot0_win_rate"]["value"])
    # the request slots were swapped for a seeded part of the rows, and mapped back
    examples = load_dataset(data, "jsonl").examples
    swapped = [swap_slots(e, 7) for e in examples]
    assert 0 < sum(swapped) < len(swapped)
    png = (out / "calibration.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (out / "report.md").read_text()
    assert "| agreement (excl. human ties) |" in md and "both_orders" in md and "single" in md
    lines = (out / "judgments.jsonl").read_text().splitlines()
    assert len(lines) == 30
    stdout = capsys.readouterr().out
    assert "agreement (excl. human ties)" in stdout and "75.0% (n=12)" in stdout


def test_judge_eval_bad_data_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p"}])
    code = cli.main(["judge-eval", "--judge", "http://127.0.0.1:9", "--data", str(bad), "--format", "jsonl"])
    assert code == 2 and "response_a" in capsys.readouterr().err


def test_render_report_without_network() -> None:
    pairs = [(_ex("a", subset="s"), _ok(0.9, "a")), (_ex("b", subset="t"), _ok(0.4, "b"))]
    from rlhf_train.eval.judge_eval import DEFINITIONS, build_protocol_report

    report: dict[str, Any] = {
        "data": {"name": "d", "format": "llmbar", "n": 2, "skipped": {}},
        "judge": {"backend": "fake"},
        "protocols": {p: build_protocol_report(pairs, p) for p in ("both_orders", "single")},
        "definitions": DEFINITIONS,
    }
    text = render_report(report, markdown=False)
    assert "per subset" in text and "overall" in text
    assert math.isfinite(report["protocols"]["single"]["overall"]["calibration"]["brier"])
    json.dumps(report)  # serialisable as is
