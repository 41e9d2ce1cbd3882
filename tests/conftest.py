"""Shared fixtures: tiny random reward models saved once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_models import make_tiny_bert, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-layer Llama reward model, ChatML template, pad == eos, 96 positions."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-layer BERT reward model, no chat template, 64 positions."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
