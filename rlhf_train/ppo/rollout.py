"""Prompts, the policy's forward pass (log-probabilities, entropies, values) and rollouts.

A rollout is one batch of prompts with the policy's sampled responses and everything PPO needs
from the moment of generation: the generating policy's log-probabilities (PPO's "old"
log-probabilities), the frozen reference's log-probabilities (for the KL penalty) and the value
head's estimates (the "old" values of the clipped value loss). Computing them all at
generation time lets the learner start its update the moment the batch's scores arrive.

Layout of a batch: ``[left padding][prompt][response][right padding]``; every prompt ends at
the same column ``prompt_len``, so response token ``t`` of every row sits at column
``prompt_len + t`` and is predicted by the logits at column ``prompt_len + t - 1``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_train.ppo.config import PPOInputError
from rlhf_train.ppo.losses import entropy_from_logits

Messages = list[dict[str, str]]


# -- prompts ---------------------------------------------------------------------------------------


def load_prompts(path: Path) -> list[Messages]:
    """Rows ``{"prompt": str | [messages]}`` of a JSONL file as chat messages (a string becomes one user turn)."""
    if not path.is_file():
        raise PPOInputError(f"{path}: no such file")
    prompts: list[Messages] = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PPOInputError(f"{path}: line {n}: not JSON ({exc.msg})") from None
            prompts.append(_as_messages(row, f"{path}: line {n}"))
    if not prompts:
        raise PPOInputError(f"{path}: no prompts")
    return prompts


def _as_messages(row: Any, where: str) -> Messages:
    if not isinstance(row, dict) or "prompt" not in row:
        raise PPOInputError(f"{where}: a row is an object with a 'prompt'")
    p = row["prompt"]
    if isinstance(p, str):
        if not p:
            raise PPOInputError(f"{where}: the prompt is empty")
        return [{"role": "user", "content": p}]
    if isinstance(p, list) and p:
        out = []
        for i, m in enumerate(p):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise PPOInputError(f"{where}: prompt[{i}] must be a message with string 'role' and 'content'")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise PPOInputError(f"{where}: 'prompt' must be a string or a non-empty list of messages")


class PromptStream:
    """An endless, reproducible stream of prompts: epoch ``e`` visits them in the order of a
    permutation seeded by ``(seed, e)``. The stream's whole state is ``cursor`` (prompts taken so
    far), which checkpoints store."""

    def __init__(self, prompts: Sequence[Messages], *, seed: int, cursor: int = 0) -> None:
        self.prompts = list(prompts)
        self.seed = seed
        self.cursor = cursor
        self._epoch = -1
        self._order: list[int] = []

    def take(self, n: int) -> list[Messages]:
        out = []
        for _ in range(n):
            epoch, i = divmod(self.cursor, len(self.prompts))
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(len(self.prompts), generator=g).tolist()
                self._epoch = epoch
            out.append(self.prompts[self._order[i]])
            self.cursor += 1
        return out


# -- the policy's forward pass --------------------------------------------------------------------


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` counts them under left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Forward:
    logprobs: torch.Tensor  # [B, R] log-probability of each response token (temperature applied)
    entropy: torch.Tensor | None  # [B, R]
    values: torch.Tensor | None  # [B, R]


def forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    *,
    temperature: float,
    value_head: torch.nn.Module | None = None,
    with_entropy: bool = False,
) -> Forward:
    """Log-probabilities of the response tokens under ``model`` (and values from ``value_head``,
    a linear layer on the last hidden state)."""
    kwargs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids(attention_mask),
        "output_hidden_states": value_head is not None,
        "use_cache": False,
    }
    width = input_ids.shape[1] - prompt_len + 1  # the logits that predict response tokens (and one spare)
    try:
        # Only the response's logits: the LM head over a 49k vocabulary is a fifth of a small model's work.
        out = model(**kwargs, logits_to_keep=width)
    except TypeError:  # a model class without logits_to_keep
        out = model(**kwargs)
    logits = out.logits[:, -width:-1, :].float() / temperature
    targets = input_ids[:, prompt_len:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = entropy_from_logits(logits) if with_entropy else None
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1][:, prompt_len - 1 : -1, :]
        values = value_head(hidden.to(value_head.weight.dtype)).squeeze(-1)
    return Forward(logprobs, entropy, values)


def make_value_head(hidden_size: int, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    """The value head: one linear layer on the policy's last hidden state, zero-initialised so the
    first values are 0 rather than noise."""
    head = torch.nn.Linear(hidden_size, 1, dtype=dtype)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


# -- rollouts ----------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One generated batch and what the update needs from the moment of generation (see module doc)."""

    prompts: list[Messages]
    responses: list[str]
    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_len: int
    mask: torch.Tensor  # [B, R] float: response tokens, closing eos included
    old_logprobs: torch.Tensor  # [B, R]
    ref_logprobs: torch.Tensor  # [B, R]
    values: torch.Tensor  # [B, R]
    entropy: float  # mean per-token entropy of the generating policy
    generate_s: float

    def state(self) -> dict[str, Any]:
        """Plain data for ``torch.save`` (a checkpoint keeps the batch that was in flight)."""
        return dict(vars(self))

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> Rollout:
        return cls(**d)


class Tokens:
    """Renders chat prompts with the policy tokenizer's template and pads them on the left."""

    def __init__(self, tokenizer: Any, *, max_prompt_tokens: int) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise PPOInputError("the policy's tokenizer has no chat template; prompts are rendered with it")
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise PPOInputError("the policy's tokenizer has neither a pad nor an eos token")
        self.pad_id = int(pad)

    def encode(self, prompts: Sequence[Messages]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for messages in prompts:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(ids[-self.max_prompt_tokens :])  # keep the end: the generation prompt
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, width - len(r) :] = 1
        return input_ids, attention_mask


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for v in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return ids


def generate_rollout(
    policy: Any,
    ref: Any,
    value_head: torch.nn.Module,
    tokens: Tokens,
    prompts: list[Messages],
    *,
    max_new_tokens: int,
    temperature: float,
) -> Rollout:
    """Sample one response per prompt from ``policy`` and compute the rollout's log-probabilities,
    reference log-probabilities and values."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        r = _generate(policy, ref, value_head, tokens, prompts, max_new_tokens=max_new_tokens, temperature=temperature)
    # Inference-mode tensors can't take part in autograd later: plain copies for the update.
    for name in ("input_ids", "attention_mask", "mask", "old_logprobs", "ref_logprobs", "values"):
        setattr(r, name, getattr(r, name).clone())
    r.generate_s = time.perf_counter() - t0
    return r


def _generate(
    policy: Any,
    ref: Any,
    value_head: torch.nn.Module,
    tokens: Tokens,
    prompts: list[Messages],
    *,
    max_new_tokens: int,
    temperature: float,
) -> Rollout:
    from transformers import GenerationConfig

    prompt_ids, prompt_mask = tokens.encode(prompts)
    prompt_len = prompt_ids.shape[1]
    stops = eos_ids(policy, tokens.tokenizer)
    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokens.pad_id,
        eos_token_id=sorted(stops) or None,
    )
    seqs = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    response = seqs[:, prompt_len:]
    # A response ends at its first eos (kept: the policy learns when to stop); what follows is padding.
    is_stop = torch.zeros_like(response, dtype=torch.bool)
    for s in stops:
        is_stop |= response == s
    after_stop = (is_stop.long().cumsum(dim=1) - is_stop.long()) > 0
    mask = (~after_stop).float()
    response = response.masked_fill(after_stop, tokens.pad_id)
    input_ids = torch.cat([prompt_ids, response], dim=1)
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)

    own = forward(
        policy, input_ids, attention_mask, prompt_len, temperature=temperature, value_head=value_head, with_entropy=True
    )
    theirs = forward(ref, input_ids, attention_mask, prompt_len, temperature=temperature)
    assert own.values is not None and own.entropy is not None
    texts = []
    for row, m in zip(response, mask, strict=True):
        keep = [int(t) for t, on in zip(row, m, strict=True) if on and int(t) not in stops]
        texts.append(tokens.tokenizer.decode(keep, skip_special_tokens=True))
    entropy = float((own.entropy * mask).sum() / mask.sum().clamp(min=1.0))
    return Rollout(
        prompts=prompts,
        responses=texts,
        input_ids=input_ids,
        attention_mask=attention_mask,
        prompt_len=prompt_len,
        mask=mask,
        old_logprobs=own.logprobs * mask,
        ref_logprobs=theirs.logprobs * mask,
        values=own.values * mask,
        entropy=entropy,
        generate_s=0.0,
    )


__all__ = [
    "Forward",
    "PromptStream",
    "Rollout",
    "Tokens",
    "forward",
    "generate_rollout",
    "load_prompts",
    "make_value_head",
    "position_ids",
]
