"""``scripts/gpu_bench.py``: its dry run (CPU, tiny config) goes through the whole GPU code path."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.paths import ROOT

SCRIPT = ROOT / "scripts" / "gpu_bench.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # a subprocess serving and measuring (~6 s)
def test_dry_run_serves_measures_and_prints_tokens_per_s_and_mfu(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--repeats", "1", "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,  # the script finds the project by its own path, not the working directory
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    tokens = re.search(r"^tokens/s: ([\d,]+) \(server", out, re.M)
    mfu = re.search(r"^MFU: ([\d.]+)% \(([\d.]+) TFLOP/s of 1 TFLOP/s", out, re.M)
    assert tokens is not None and mfu is not None, out
    assert int(tokens.group(1).replace(",", "")) > 0
    assert "load: 16 texts × 64 tokens" in out  # every text is cut to exactly --seq-len tokens
    assert re.search(r"^in-process limit: [\d,]+ tokens/s, MFU [\d.]+%; server / limit = [\d.]+$", out, re.M)
    assert (tmp_path / "w" / "model" / "config.json").is_file()  # --workdir keeps the model


def test_flops_count_weights_once_and_both_attention_matmuls() -> None:
    mod = _module()
    shape = mod.Shape(params=100, layers=2, hidden=8)
    # 2·N·L per sequence + 4·layers·hidden·L²: (2·100·10 + 4·2·8·100) + (2·100·20 + 4·2·8·400)
    assert mod.flops(shape, [10, 20]) == 2000 + 6400 + 4000 + 25600


def test_peak_is_explicit_or_nominal_on_cpu() -> None:
    mod = _module()
    assert mod.peak_tflops("cpu", 123.0) == (123.0, "--peak-tflops")
    assert mod.peak_tflops("cpu", None) == (mod.DRY_RUN_PEAK, "nominal dry-run peak")
    assert dict(mod.PEAKS)["H100"] == pytest.approx(989.4)


def test_full_config_is_one_billion_class() -> None:
    mod = _module()
    d = mod.FULL
    h, i, layers, v = d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"], d["vocab_size"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    total = layers * per_layer + v * h
    assert 0.9e9 < total < 1.3e9
