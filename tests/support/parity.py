"""Parity helpers: the unbatched ``transformers`` reference a served score must equal.

:class:`Reference` renders an item by the contract of DESIGN.md, written out independently of
``services/runtime/rendering.py``, and scores it alone, unpadded; :func:`check` compares one served
result with it. :func:`json_items` covers every item form, from 1 token to past the maximum of the
tiny models (96 / 64 positions). Used by the torch parity tests and the ONNX backend tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.support.tiny_models import CORPUS

TOL = 1e-5

WORDS = " ".join(CORPUS[:6]).split()


def text_of(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


def json_items() -> list[dict[str, Any]]:
    """Items of every form, from 1 token to well past the maximum (96 / 64 positions)."""
    items: list[dict[str, Any]] = [{"text": "a"}, {"text": "dog"}]
    items += [{"text": text_of(n)} for n in (2, 5, 11, 23, 40, 70, 120)]
    items += [{"text": "  leading and trailing spaces stay  \n"}]
    items += [{"prompt": text_of(n), "response": text_of(m)} for n, m in ((1, 1), (3, 9), (20, 4), (60, 5), (2, 90))]
    items += [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text_of(6)}],
            "response": text_of(7),
        },
        {"messages": [{"role": "user", "content": text_of(4)}, {"role": "assistant", "content": text_of(12)}]},
        {"messages": [{"role": "user", "content": text_of(80)}, {"role": "assistant", "content": text_of(3)}]},
    ]
    return items


class Reference:
    """The unbatched forward, with the contract's rendering written out independently."""

    def __init__(self, model_dir: Path) -> None:
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.max_len = min(self.tok.model_max_length, self.model.config.max_position_embeddings)
        self.templated = bool(self.tok.chat_template)

    def encode(self, item: dict[str, Any]) -> dict[str, list[int]]:
        tok = self.tok
        if "text" in item:
            return dict(tok(item["text"], add_special_tokens=False))
        if self.templated:
            prompt = item.get("prompt")
            conv = item.get("messages") or (
                [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
            ) + [{"role": "assistant", "content": item["response"]}]
            return dict(tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False))
        if "messages" in item:
            return dict(tok("".join(f"{m['role']}: {m['content']}\n" for m in item["messages"])))
        prompt = item["prompt"]
        if not isinstance(prompt, str):
            prompt = "".join(f"{m['role']}: {m['content']}\n" for m in prompt)
        return dict(tok(prompt, item["response"]))

    @torch.inference_mode()
    def score(self, ids: list[int], token_type_ids: list[int] | None) -> float:
        kw = {"input_ids": torch.tensor([ids])}
        if token_type_ids is not None:
            kw["token_type_ids"] = torch.tensor([token_type_ids])
        return float(self.model(**kw).logits[0, 0])


def check(ref: Reference, item: dict[str, Any], score: float, num_tokens: int, truncated: bool) -> None:
    enc = ref.encode(item)
    ids = enc["input_ids"]
    tt = enc.get("token_type_ids")
    if len(ids) <= ref.max_len:
        assert not truncated and num_tokens == len(ids)
        assert abs(score - ref.score(ids, tt)) <= TOL, item
    else:
        # Past the maximum: flagged, cut to the maximum; score equals the unbatched forward of the
        # kept ids, which end exactly where the full rendering ends (the response is kept).
        assert truncated and num_tokens == ref.max_len
