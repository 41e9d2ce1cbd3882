"""Sample several answers per prompt from a causal LM (the demo's first step: candidate pairs for ``label``).

Writes rows in the form ``rlhf-feedback label`` reads: ``{"prompt": [messages], "completions": [str, ...]}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm


@dataclass(frozen=True)
class GenerateOptions:
    """How answers are sampled (defaults suit a 135M model on a 2-core CPU)."""

    num_answers: int = 2
    max_new_tokens: int = 48
    temperature: float = 0.9
    top_p: float = 0.95
    batch_size: int = 16
    seed: int = 0
    threads: int | None = None


def _as_messages(prompt: Any) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    raise ValueError(f"a prompt must be a string or a list of {{role, content}} messages, got {prompt!r:.80}")


def read_prompts(path: Path) -> list[list[dict[str, str]]]:
    """Prompts from a JSONL file of ``{"prompt": str | [messages]}`` rows."""
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"{path}:{n}: expected an object with a 'prompt' field")
        prompts.append(_as_messages(row["prompt"]))
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def generate_answers(
    policy_dir: Path, prompts: Sequence[list[dict[str, str]]], options: GenerateOptions, *, progress: bool = True
) -> list[list[str]]:
    """``options.num_answers`` sampled answers for each prompt, in prompt order (seeded, reproducible)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.padding_side = "left"  # generation continues from the right end of every row
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    rendered = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    jobs = [(i, text) for i, text in enumerate(rendered) for _ in range(options.num_answers)]
    answers: list[list[str]] = [[] for _ in prompts]
    with tqdm(total=len(jobs), desc="generating", unit="answer", disable=not progress) as bar:
        for start in range(0, len(jobs), options.batch_size):
            chunk = jobs[start : start + options.batch_size]
            enc = tok([t for _, t in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    do_sample=True,
                    temperature=options.temperature,
                    top_p=options.top_p,
                    max_new_tokens=options.max_new_tokens,
                    pad_token_id=tok.pad_token_id,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for (i, _), text in zip(chunk, tok.batch_decode(new, skip_special_tokens=True), strict=True):
                answers[i].append(text.strip())
            bar.update(len(chunk))
    return answers


def write_candidates(path: Path, prompts: Sequence[list[dict[str, str]]], answers: Sequence[list[str]]) -> int:
    """Write ``label`` input rows; prompts whose answers came out identical or empty are left out."""
    kept = 0
    with path.open("w", encoding="utf-8") as fh:
        for prompt, outs in zip(prompts, answers, strict=True):
            distinct = list(dict.fromkeys(o for o in outs if o))
            if len(distinct) < 2:
                continue
            fh.write(json.dumps({"prompt": prompt, "completions": distinct}, ensure_ascii=False) + "\n")
            kept += 1
    return kept
