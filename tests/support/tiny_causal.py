"""A tiny random causal LM (Llama, 2 layers) with a ChatML template: the local judge's test model."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.support.tiny_models import CHATML, CORPUS, bpe_tokenizer


def make_tiny_causal_llama(out: Path, *, max_position: int = 256, seed: int = 0) -> Path:
    """A 2-layer ``LlamaForCausalLM`` (hidden 64) with a byte-level BPE tokenizer trained on a
    small corpus (every single character, ``A``/``B``/digits included, is one token), a ChatML
    chat template, ``<|im_end|>`` as eos and ``<pad>`` as the pad token."""
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [*CORPUS, "Response A is better. Response B is worse. Verdict: A", "Verdict: B"] * 2
    fast = bpe_tokenizer(corpus, eos="<|im_end|>", bos="<|im_start|>", pad="<pad>")
    fast.chat_template = CHATML
    fast.model_max_length = max_position
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # visible differences between verdict tokens
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
