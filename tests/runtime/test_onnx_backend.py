"""ONNX Runtime backend: ``export-onnx`` output served through the engine equals the unbatched
``transformers`` forward (tiny Llama with pad == eos, tiny BERT with sentence pairs), the
``--check`` path, int8, and clear errors for folders that are not exports."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from clients.process import ServerProcess
from rlhf_feedback.cli import main
from services.reward.engine.service import RewardEngine
from services.reward.loading import load_backend
from services.reward.settings import RewardSettings
from services.reward.transports.http import create_http_app
from services.runtime.backends.onnx_backend import MANIFEST_FILE, NotAnExportError, OnnxRewardBackend
from services.runtime.items import RewardInput
from services.runtime.onnx_export import cached_export, export_onnx, load_source
from tests.support.parity import TOL, Reference, check, json_items, text_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama_export(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "llama"
    export_onnx(tiny_llama_dir, out)
    return out


@pytest.fixture(scope="module")
def bert_export(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exports") / "bert"
    export_onnx(tiny_bert_dir, out)
    return out


@pytest.fixture(params=["llama", "bert"])
async def onnx_http(
    request: pytest.FixtureRequest, tiny_llama_dir: Path, tiny_bert_dir: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Path, OnnxRewardBackend]]:
    source = tiny_llama_dir if request.param == "llama" else tiny_bert_dir
    export = request.getfixturevalue(f"{request.param}_export")
    backend = OnnxRewardBackend(export, device="cpu", threads=1)
    # A small budget and a wait window so that items of concurrent requests share batches.
    settings = RewardSettings(max_batch_tokens=512, max_wait_ms=20)
    engine = RewardEngine(lambda: backend, settings.engine_config())
    await engine.start()
    app = create_http_app(engine, settings, api_key=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        yield http, source, backend
    await engine.stop()


async def test_engine_scores_equal_unbatched_transformers(
    onnx_http: tuple[httpx.AsyncClient, Path, OnnxRewardBackend],
) -> None:
    http, source, backend = onnx_http
    ref = Reference(source)
    items = json_items()
    # Three orders in flight together: every item rides in a different batch composition.
    orders = [items, items[::-1], items[1::2] + items[::2]]
    responses = await asyncio.gather(*(http.post("/v1/score", json={"inputs": o}) for o in orders))
    truncated = 0
    for order, resp in zip(orders, responses, strict=True):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"]["revision"] == backend.info.revision
        for item, r in zip(order, body["results"], strict=True):
            check(ref, item, r["score"], r["num_tokens"], r["truncated"])
            truncated += r["truncated"]
    assert truncated > 0, "the items must include some past the maximum"
    (card,) = (await http.get("/v1/models")).json()["data"]
    assert (card["backend"], card["dtype"], card["device"]) == ("onnx", "float32", "cpu")


def test_export_folder_is_self_contained(llama_export: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere"
    shutil.copytree(llama_export, moved)  # nothing refers back to the source checkpoint
    manifest = json.loads((moved / MANIFEST_FILE).read_text())
    assert manifest["kind"] == "decoder" and manifest["dtype"] == "float32" and manifest["quantized"] is None
    assert manifest["inputs"] == ["input_ids", "attention_mask", "position_ids", "read_positions"]
    assert manifest["source_revision"] == load_source(tiny_llama_dir).info.revision
    backend = OnnxRewardBackend(moved, device="cpu", threads=1)
    assert backend.info.backend == "onnx" and backend.info.has_chat_template
    ref = Reference(tiny_llama_dir)
    # pad == eos: an item ending in the pad token is read at its last non-pad token
    inputs = [RewardInput(text=text_of(n)) for n in (1, 9, 40)] + [RewardInput(text="a dog<|endoftext|>")]
    encoded = backend.encode(inputs)
    assert encoded[-1].input_ids[-1] == backend.pad_token_id
    got = backend.forward(encoded)
    for enc, score in zip(encoded, got[:, 0], strict=True):
        assert abs(float(score) - ref.score(list(enc.input_ids), None)) <= TOL


def test_cli_export_with_check_passes_and_reports(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bert-onnx"
    assert (
        main(["export-onnx", "--model", str(tiny_bert_dir), "--out", str(out), "--check", "24", "--threads", "1"]) == 0
    )
    printed = capsys.readouterr().out
    assert "check: 24 items, max |Δ|" in printed
    max_diff = float(printed.split("max |Δ| ")[1].split(",")[0])
    assert max_diff <= 1e-4
    assert json.loads((out / MANIFEST_FILE).read_text())["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert (out / "vocab.txt").is_file() and not list(out.glob("*.safetensors"))
    # Exporting again over an earlier export replaces it.
    assert main(["export-onnx", "--model", str(tiny_bert_dir), "--out", str(out)]) == 0


def test_cli_check_fails_with_exit_1_when_the_export_disagrees(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_forward = OnnxRewardBackend.forward

    def off_by_a_bit(self: OnnxRewardBackend, batch: Any) -> np.ndarray:
        return real_forward(self, batch) + np.float32(1e-3)

    monkeypatch.setattr(OnnxRewardBackend, "forward", off_by_a_bit)
    code = main(["export-onnx", "--model", str(tiny_llama_dir), "--out", str(tmp_path / "x"), "--check", "8"])
    assert code == 1
    assert "check FAILED" in capsys.readouterr().err


def test_cli_int8_export_warns_and_serves(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "int8"
    code = main(
        ["export-onnx", "--model", str(tiny_llama_dir), "--out", str(out), "--quantize", "int8", "--check", "8"]
    )
    assert code == 0  # int8 is never held to the float32 tolerance; the warning says what to do instead
    captured = capsys.readouterr()
    assert "bench agreement" in captured.err
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["dtype"] == "int8" and manifest["quantized"] == "int8-dynamic"
    backend = OnnxRewardBackend(out, device="cpu", threads=1)
    assert backend.info.dtype == "int8"
    fp32 = load_source(tiny_llama_dir)
    items = backend.encode([RewardInput(text=text_of(n)) for n in (3, 10, 30)])
    got, want = backend.forward(items)[:, 0], fp32.forward(items)[:, 0]
    assert np.all(np.isfinite(got)) and not np.allclose(got, want, atol=1e-6)  # really quantized
    assert np.corrcoef(got, want)[0, 1] > 0.9


def test_cli_refuses_an_unrelated_nonempty_out_folder(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export-onnx", "--model", str(tiny_llama_dir), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an empty folder or an earlier export" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["export-onnx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_backend_onnx_on_a_checkpoint_folder_says_to_export_first(tiny_llama_dir: Path, llama_export: Path) -> None:
    with pytest.raises(NotAnExportError, match="rlhf-feedback export-onnx"):
        load_backend(RewardSettings(backend="onnx", model=tiny_llama_dir, device="cpu"))
    with pytest.raises(ValueError, match="--dtype bfloat16 does not apply to --backend onnx"):
        load_backend(RewardSettings(backend="onnx", model=llama_export, dtype="bfloat16"))
    backend = load_backend(RewardSettings(backend="onnx", model=llama_export, device="cpu", threads=1))
    assert isinstance(backend, OnnxRewardBackend)


def test_cached_export_is_made_once(tiny_llama_dir: Path, tmp_path: Path) -> None:
    first = cached_export(tiny_llama_dir, root=tmp_path)
    stamp = (first / "model.onnx").stat().st_mtime_ns
    assert cached_export(tiny_llama_dir, root=tmp_path) == first
    assert (first / "model.onnx").stat().st_mtime_ns == stamp


@pytest.mark.slow  # a server process
@pytest.mark.timeout(180)
def test_serve_reward_backend_onnx_process(bert_export: Path, tiny_bert_dir: Path, tmp_path: Path) -> None:
    srv = ServerProcess.reward(
        ["--backend", "onnx", "--model", str(bert_export), "--threads", "1"], log_path=tmp_path / "server.log"
    )
    try:
        srv.wait_ready(timeout=120)
        items = [{"prompt": text_of(3), "response": text_of(9)}, {"text": text_of(20)}, {"text": "dog"}]
        resp = httpx.post(f"{srv.http_url}/v1/score", json={"inputs": items}, timeout=60)
        assert resp.status_code == 200, resp.text
        ref = Reference(tiny_bert_dir)
        for item, r in zip(items, resp.json()["results"], strict=True):
            check(ref, item, r["score"], r["num_tokens"], r["truncated"])
    finally:
        srv.terminate()


@pytest.mark.slow  # a server process
@pytest.mark.timeout(180)
def test_serve_reward_backend_onnx_on_a_checkpoint_exits_with_the_reason(tiny_llama_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    srv = ServerProcess.reward(["--backend", "onnx", "--model", str(tiny_llama_dir)], log_path=log)
    try:
        assert srv.proc.wait(timeout=120) != 0
    finally:
        srv.terminate()
    assert "is not an ONNX export" in log.read_text() and "export-onnx" in log.read_text()
