"""``rlhf-feedback bench agreement`` on a tiny Llama and a small synthetic pair set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import agreement
from rlhf_feedback.cli import main
from services.runtime.items import EncodedItem
from tests.support.tiny_models import CORPUS

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def write_pairs(path: Path, n: int) -> Path:
    rows: list[dict[str, Any]] = []
    for i in range(n):
        rows.append(
            {
                "prompt": CORPUS[i % 6][: 20 + 3 * i],
                "chosen": CORPUS[(i + 1) % 6][: 8 + 4 * i],
                "rejected": CORPUS[(i + 3) % 6][: 5 + 2 * i],
            }
        )
    rows.append(
        {
            "id": "conversation",
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is bread?"}],
            "chosen": [{"role": "assistant", "content": "Flour, water, salt and yeast, baked."}],
            "rejected": {"role": "assistant", "content": "No."},
        }
    )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_cli(model: Path, pairs: Path, out: Path, cache: Path, backends: str) -> int:
    return main(
        [
            "bench", "agreement", "--model", str(model), "--pairs-file", str(pairs), "--out", str(out),
            "--cache", str(cache), "--backends", backends, "--threads", "1", "--timing-items", "8", "--quiet",
        ]
    )  # fmt: skip


@pytest.mark.slow  # ~1.5 s
def test_report_fields_and_reference_cache(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = write_pairs(tmp_path / "pairs.jsonl", 11)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert run_cli(tiny_llama_dir, pairs, out, cache, "torch-bfloat16,onnx-float32") == 0
    report = json.loads((out / "results.json").read_text())
    assert report["pairs"] == 12 and report["reference_cached_items"] == 0
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == ["torch-float32", "torch-bfloat16", "onnx-float32"]

    onnx = rows["onnx-float32"]
    assert onnx["max_abs_diff"] < 1e-4 and onnx["agreement"] == 1.0 and onnx["agree"] == onnx["pairs"] == 12
    assert onnx["meets_criterion"] and onnx["same_tokens"] and onnx["dtype"] == "float32"
    assert onnx["large_margin_pairs"] > 0 and onnx["large_margin_agreement"] == 1.0

    bf16 = rows["torch-bfloat16"]
    assert bf16["dtype"] == "bfloat16"
    assert 1e-4 < bf16["max_abs_diff"] < 1.0  # really a different precision, still close
    assert bf16["mean_abs_diff"] <= bf16["max_abs_diff"]
    assert 0 < bf16["agreement"] <= 1.0 and len(bf16["disagreements"]) == bf16["pairs"] - bf16["agree"]
    for r in rows.values():
        assert r["throughput_seq_s"] > 0 and r["speedup_vs_fp32"] > 0
    assert rows["torch-float32"]["speedup_vs_fp32"] == 1.0

    table = (out / "results.md").read_text()
    assert "| onnx-float32 |" in table and "100.0% (12/12)" in table
    assert "| onnx-float32 |" in capsys.readouterr().out

    # A rerun with another backend reuses every cached reference score.
    assert run_cli(tiny_llama_dir, pairs, tmp_path / "out2", cache, "onnx-int8") == 0
    again = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert again["reference_cached_items"] == 24
    assert [r["name"] for r in again["results"]] == ["torch-float32", "onnx-int8"]
    assert again["results"][1]["dtype"] == "int8"


def test_compare_counts_flips_and_large_margins() -> None:
    info = type("Info", (), {"dtype": "x", "device": "cpu"})()
    # pairs: margins 1.0, -0.05, 0.3 under the reference
    ref = np.array([[1.0], [0.0], [0.0], [0.05], [0.5], [0.2]], dtype=np.float32)
    # the candidate flips the small-margin pair only
    got = np.array([[1.0], [0.1], [0.06], [0.05], [0.5], [0.2]], dtype=np.float32)
    r = agreement.compare("c", info, ["a", "b", "c"], ref, got, margin=0.1, seq_s=None, same_tokens=True)
    assert (r.agree, r.pairs, r.large_margin_agree, r.large_margin_pairs) == (2, 3, 2, 2)
    assert r.disagreements == ["b"] and r.large_margin_agreement == 1.0
    assert r.max_abs_diff == pytest.approx(0.1) and not r.meets_criterion  # 66.7% < 99%


def test_batches_respect_the_token_budget() -> None:
    items = [EncodedItem(tuple(range(n)), truncated=False) for n in (5, 100, 7, 30, 600, 1)]
    seen = []
    for idx in agreement.batches(items, 64):
        longest = max(items[i].num_tokens for i in idx)
        assert len(idx) == 1 or len(idx) * longest <= 64
        seen += idx
    assert sorted(seen) == list(range(len(items)))


def test_bad_input_is_one_line_and_exit_2(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\n')
    assert run_cli(tiny_llama_dir, bad, tmp_path / "o", tmp_path / "c", "onnx-float32") == 2
    assert "bad.jsonl:1: expected {prompt, chosen, rejected}" in capsys.readouterr().err
    good = write_pairs(tmp_path / "p.jsonl", 2)
    assert run_cli(tiny_llama_dir, good, tmp_path / "o", tmp_path / "c", "onnx-fp64") == 2
    assert "unknown backend(s) onnx-fp64" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
