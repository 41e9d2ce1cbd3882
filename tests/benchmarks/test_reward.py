"""``rlhf-feedback bench reward``: the load generator, the limit, the naive server and the report.

One end-to-end run (both servers, both transports, the limit per budget, parity) on the tiny
Llama fixture with a JSONL text file; the rest are unit tests of the pieces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import report
from benchmarks.inprocess import budget_batches
from benchmarks.loadgen import Load, chunks, percentile
from benchmarks.models import load_tokenizer
from benchmarks.readme import markers
from benchmarks.runner import Bench, BenchConfig, padding_share
from benchmarks.texts import TextsError, load_grpo_groups, load_texts, truncate_left
from rlhf_feedback.cli import main as cli_main
from services.runtime.items import EncodedItem
from tests.support.paths import SHARED_DATA
from tests.support.tiny_models import CORPUS

HH_DIR = SHARED_DATA / "hh-rlhf"
NUM_TEXTS = 12


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench-texts") / "texts.jsonl"
    rows: list[dict[str, Any]] = [{"text": " ".join(CORPUS[i : i + 1 + i % 4])} for i in range(8)]
    rows += [{"prompt": "How do I bake bread?", "response": CORPUS[i]} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bench_results(tiny_llama_dir: Path, texts_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = BenchConfig(
        model="tiny-fixture",
        model_dir=tiny_llama_dir,
        out=tmp_path_factory.mktemp("bench-out"),
        texts=str(texts_file),
        num_texts=NUM_TEXTS,
        max_tokens=90,  # the fixture model reads 96 positions; HH turns are long in its tiny vocabulary
        loads=[Load(3, 2), Load(4, 1)],
        transports=["http", "grpc"],
        servers=["ours", "naive"],
        budgets=[64, 256],
        repeats=1,
        threads=1,
        parity=NUM_TEXTS,
        # The GRPO load needs real HH prompts; without the shared data only its test skips.
        grpo=4 if HH_DIR.is_dir() else 0,
        grpo_prompts=3,
        grpo_clients=2,
        data_dir=HH_DIR,
        command="rlhf-feedback bench reward --quick",
    )
    results = Bench(cfg).run()
    results["_out"] = str(cfg.out)
    return results


@pytest.mark.slow  # the bench_results run (~7 s)
def test_every_text_is_scored_once_by_every_server_and_transport(bench_results: dict[str, Any]) -> None:
    runs = bench_results["runs"]
    assert {(r["server"], r["transport"], r["load"]) for r in runs} == {
        (s, t, ld) for s in ("ours", "naive") for t in ("http", "grpc") for ld in ("3x2", "4x1")
    }
    for r in runs:
        assert r["samples"] == NUM_TEXTS and r["errors"] == 0, r
        assert r["requests"] == (6 if r["load"] == "3x2" else 12)
        assert r["real_tokens"] == bench_results["texts"]["total_tokens"]
        assert r["samples_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        # Padding comes from ours' /metrics counters; the naive server has none.
        if r["server"] == "ours":
            assert r["padding"] is not None and 0.0 <= r["padding"] < 1.0
        else:
            assert r["padding"] is None
    assert len(bench_results["summary"]) == 8
    for s in bench_results["summary"]:
        assert s["ratio_to_limit"] > 0 and len(s["ratios"]) == 1


@pytest.mark.slow  # the bench_results run (~7 s)
def test_the_limit_is_measured_per_budget_and_the_best_one_wins(bench_results: dict[str, Any]) -> None:
    lim = bench_results["limit"]
    runs = lim["runs"]
    assert sorted(r["budget"] for r in runs) == [64, 256]
    total = bench_results["texts"]["total_tokens"]
    for r in runs:
        assert r["samples"] == NUM_TEXTS and r["real_tokens"] == total
        assert total <= r["padded_tokens"]
    small = next(r for r in runs if r["budget"] == 64)
    big = next(r for r in runs if r["budget"] == 256)
    assert small["batches"] > big["batches"]  # a smaller budget means more, smaller batches
    by = lim["samples_per_s_by_budget"]
    assert lim["best_samples_per_s"] == max(by.values()) and by[str(lim["best_budget"])] == max(by.values())
    assert bench_results["config"]["server_max_batch_tokens"] == lim["best_budget"]  # auto


@pytest.mark.slow  # the bench_results run (~7 s)
def test_scores_match_the_unbatched_reference(bench_results: dict[str, Any]) -> None:
    parity = bench_results["parity"]
    assert parity["texts"] == NUM_TEXTS
    assert len(parity["max_abs_diff"]) == (12 if "grpo" in bench_results else 8)
    assert all(d is not None and d < 1e-4 for d in parity["max_abs_diff"].values()), parity
    assert parity["ok"] is True


@pytest.mark.slow  # the bench_results run (~7 s)
@pytest.mark.skipif(not HH_DIR.is_dir(), reason="needs ../shared/data/hh-rlhf")
def test_grpo_load_compares_prefix_sharing_on_and_off(bench_results: dict[str, Any]) -> None:
    g = bench_results["grpo"]
    assert g["group_size"] == 4 and g["prompts"] == 3
    assert {(r["server"], r["transport"]) for r in g["runs"]} == {("ours", t) for t in ("http", "grpc")} | {
        ("ours-no-prefix", t) for t in ("http", "grpc")
    }
    for r in g["runs"]:
        assert r["samples"] == 12 and r["requests"] == 3 and r["errors"] == 0
    for s in g["summary"]:
        on, off = s["prefix_sharing_samples_per_s"], s["no_prefix_sharing_samples_per_s"]
        assert on > 0 and off > 0 and s["speedup"] == pytest.approx(on / off)
    grpo_diffs = {k: v for k, v in bench_results["parity"]["max_abs_diff"].items() if "grpo/" in k}
    assert len(grpo_diffs) == 4 and all(v is not None and v < 1e-4 for v in grpo_diffs.values())
    assert "GRPO-shaped load: 3 real HH prompts × G = 4" in report.markdown(bench_results)


@pytest.mark.slow  # the bench_results run (~7 s)
def test_report_files_and_readme_block(bench_results: dict[str, Any], tmp_path: Path) -> None:
    out = Path(bench_results["_out"])
    paths = report.write_all(bench_results, out)
    data = json.loads(paths["json"].read_text())
    assert data["summary"] == bench_results["summary"]
    md = paths["markdown"].read_text()
    assert md.count("\n| ours |") == 4 and md.count("\n| naive |") == 4
    assert "| limit: token budget | 64 | 256 |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    readme = tmp_path / "README.md"
    start, end = markers("reward")
    readme.write_text(f"# x\n\nbefore\n{start}\nold table\n{end}\nafter\n")
    report.update_readme(readme, bench_results)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert "Reproduce: `rlhf-feedback bench reward --quick`" in text
    assert f"{bench_results['machine']['cores']} cores" in text and "torch " in text
    report.update_readme(readme, bench_results)  # idempotent: one block, replaced again
    assert readme.read_text() == text

    start, end = markers("reward-tiny")  # a second block beside the first stays apart
    readme.write_text(text + f"{start}\nold tiny\n{end}\n")
    report.update_readme(readme, bench_results, "reward-tiny")
    both = readme.read_text()
    assert both.startswith(text) and "old tiny" not in both and both.count("Reproduce:") == 2

    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench:reward:start"):
        report.update_readme(bare, bench_results)


# -- pieces ------------------------------------------------------------------------------------


def test_load_parsing_and_request_cutting() -> None:
    assert Load.parse("32x8") == Load(32, 8) and Load.parse("64X1").name == "64x1"
    for bad in ("32", "0x4", "ax2", "3x-1"):
        with pytest.raises(ValueError):
            Load.parse(bad)
    reqs = chunks(list(range(10)), 4)
    assert [off for off, _ in reqs] == [0, 4, 8] and [len(c) for _, c in reqs] == [4, 4, 2]


def test_percentile_interpolates_like_numpy() -> None:
    values = [0.1, 0.4, 0.2, 0.3]
    assert percentile(values, 50) == pytest.approx(0.25)
    assert percentile(values, 99) == pytest.approx(0.397)
    assert percentile([], 50) == 0.0


def test_budget_batches_stay_within_the_budget_sorted_by_length() -> None:
    items = [EncodedItem(tuple(range(n)), truncated=False) for n in (5, 30, 12, 7, 100, 12, 3)]
    batches = budget_batches(items, 32)
    assert sum(len(b) for b in batches) == len(items)
    flat = [it.num_tokens for b in batches for it in b]
    assert flat == sorted(flat)
    for b in batches:
        assert len(b) * max(it.num_tokens for it in b) <= 32 or len(b) == 1
    assert [it.num_tokens for it in batches[-1]] == [100]  # over the budget: alone


def test_padding_share_from_counter_deltas() -> None:
    before = {"rlhf_reward_padded_tokens_total": 100.0, "rlhf_reward_real_tokens_total": 90.0}
    after = {"rlhf_reward_padded_tokens_total": 300.0, "rlhf_reward_real_tokens_total": 270.0}
    assert padding_share(before, after) == pytest.approx(0.1)
    assert padding_share(after, after) is None


def test_truncate_left_keeps_the_end_with_exact_token_counts(tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(tiny_llama_dir)
    text = " ".join(CORPUS[:6])
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    cut = truncate_left(tok, text, 20)
    assert cut is not None and 19 <= cut.num_tokens <= 20
    assert text.endswith(cut.text) and len(cut.text) < len(text)
    assert len(tok(cut.text, add_special_tokens=False)["input_ids"]) == cut.num_tokens
    whole = truncate_left(tok, text, n)
    assert whole is not None and whole.text == text and whole.num_tokens == n


def test_jsonl_texts_render_pairs_and_cycle_a_small_file(tiny_llama_dir: Path, texts_file: Path) -> None:
    tok = load_tokenizer(tiny_llama_dir)
    texts = load_texts(tok, str(texts_file), num_texts=30, max_tokens=40)
    assert len(texts) == 30 and all(t.num_tokens <= 40 for t in texts)
    assert any("<|im_start|>assistant" in t.text for t in texts)  # pairs go through the chat template
    assert texts == [texts[i % 12] for i in range(30)]  # 12 rows, cycled in the same order


def test_bad_jsonl_rows_are_one_line_errors(tmp_path: Path, tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(tiny_llama_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(TextsError, match=r"bad\.jsonl:2"):
        load_texts(tok, str(bad), num_texts=2, max_tokens=40)
    with pytest.raises(TextsError, match="no such file"):
        load_texts(tok, str(tmp_path / "missing.jsonl"), num_texts=2, max_tokens=40)


@pytest.mark.slow  # ~1 s: tokenizes HH turns
@pytest.mark.skipif(not HH_DIR.is_dir(), reason="needs ../shared/data/hh-rlhf")
def test_hh_texts_and_grpo_groups_fit_the_cap(tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(tiny_llama_dir)
    texts = load_texts(tok, "hh", num_texts=10, max_tokens=80, data_dir=HH_DIR, seed=3)
    assert len(texts) == 10 and max(t.num_tokens for t in texts) <= 80
    assert texts == load_texts(tok, "hh", num_texts=10, max_tokens=80, data_dir=HH_DIR, seed=3)  # seeded
    groups = load_grpo_groups(tok, num_groups=3, group_size=5, max_tokens=96, data_dir=HH_DIR)
    assert len(groups) == 3
    for g in groups:
        items = g.wire()
        assert len(items) == 5 and len({json.dumps(it["prompt"]) for it in items}) == 1
        assert items[0]["prompt"][0]["role"] == "user" and items[0]["prompt"][-1]["role"] == "user"


def test_cli_rejects_bad_flags_with_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli_main(["bench", "reward", "--model", str(tmp_path), "--quick"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli_main(["bench", "reward", "--loads", "8", "--model", str(tmp_path)]) == 2
    assert "CLIENTSxITEMS" in capsys.readouterr().err
    assert cli_main(["bench", "reward", "--transports", "http,ws", "--model", str(tmp_path)]) == 2
    assert "--transports" in capsys.readouterr().err
