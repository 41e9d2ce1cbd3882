"""Tiny random reward models built from configs (real loading code, seconds to run, no hub)."""

from __future__ import annotations

import inspect
import string
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Reward models score a prompt and a response; higher is better.",
    "How do I bake bread? Mix flour, water, salt and yeast, then knead and wait.",
    "Human: what is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "I cannot help with that request, but here is something safer you could try instead.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation !?.,;:'\"()[]{}<>-_/\\|@#$%^&*+=~` matter.",
] * 20


def bpe_tokenizer(corpus: list[str], *, eos: str, bos: str, pad: str) -> Any:
    """A byte-level BPE tokenizer (vocabulary 400) trained on ``corpus``, with the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos, pad_token=pad, unk_token=None)


def make_tiny_llama(out: Path, *, pad_is_eos: bool = True, max_position: int = 96, seed: int = 0) -> Path:
    """A 2-layer Llama reward model with a ChatML template; pad == eos by default (the hard case)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    fast = bpe_tokenizer(
        CORPUS, eos="<|endoftext|>", bos="<|endoftext|>", pad="<|endoftext|>" if pad_is_eos else "<pad>"
    )
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
        num_labels=1,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # a visible signal, not near-zero scores
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def make_tiny_bert(out: Path, *, num_labels: int = 1, max_position: int = 64, seed: int = 0) -> Path:
    """A 2-layer BERT reward model with a WordPiece vocabulary written here (no chat template)."""
    import transformers
    from transformers import BertConfig, BertForSequenceClassification

    BertTokenizerFast = getattr(transformers, "BertTokenizerFast")  # noqa: B009  # lazy alias, unknown to mypy

    words = sorted({w.strip(string.punctuation).lower() for line in CORPUS for w in line.split()} - {""})
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *words]
    out.mkdir(parents=True, exist_ok=True)
    tokens = list(dict.fromkeys(vocab))
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    # transformers 5 takes the vocabulary itself (``vocab``) and silently ignores ``vocab_file``,
    # which left only the 5 special tokens: every word was [UNK]. 4.x takes ``vocab_file``.
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        source: dict[str, Any] = {"vocab": {t: i for i, t in enumerate(tokens)}}
    else:
        source = {"vocab_file": str(out / "vocab.txt")}
    tok = BertTokenizerFast(**source, do_lower_case=True, model_max_length=max_position)
    assert tok.convert_tokens_to_ids("fox") == tokens.index("fox"), "the tiny BERT vocabulary did not load"
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_position,
        num_labels=num_labels,
    )
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 1.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
