"""A Hugging Face causal LM in process: the embedded default judge (SmolLM2-135M-Instruct).

A verdict is read in one forward pass: the query's messages are rendered with the model's own
chat template (``add_generation_prompt=True``) and tokenized with ``add_special_tokens=False``;
the next-token log-probabilities at the last position are read for each choice's token and
renormalised over the choices. A choice counts through every single-token spelling of it, bare
(``"A"``) and with a leading space (``" A"``); a choice with no single-token spelling is an
error (:class:`ChoiceTokenError`), checked once per choice set (:meth:`LocalBackend.check_choices`).

Forwards of concurrent verdicts are batched by the reward service's token-budget
:class:`~services.runtime.batcher.Batcher` (shared code): right padding with an attention
mask, the hidden state at each item's last real position, the output projection only there.

Rationale queries first generate up to ``query.max_tokens`` tokens greedily (one at a time,
on the same worker thread as the batches), then append ``verdict_cue`` to the reply and read
the verdict in one more forward pass, through the batcher.

Lifecycle: :meth:`start` (or the first :meth:`verdict`, lazily) starts the batcher on the
running event loop; :meth:`aclose` stops it. Use one backend from one event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from services.common.errors import ErrorCode, ServiceError
from services.judge.backends.base import BackendInfo, UpstreamError
from services.judge.types import Usage, VerdictQuery, VerdictReply
from services.runtime.batcher import Batcher, BatcherConfig
from services.runtime.device import Dtype
from services.runtime.items import EncodedItem

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CUE = "\n\nVerdict:"


class ChoiceTokenError(ValueError):
    """A verdict choice that the model's tokenizer cannot read as one token."""


class LocalBackend:
    """``LocalBackend()`` loads the embedded SmolLM2 judge; ``LocalBackend(dir)`` any causal LM folder."""

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        dtype: Dtype = "float32",
        device: str = "auto",
        threads: int | None = None,
        max_batch_tokens: int = 8192,
        max_wait_ms: float = 2.0,
        max_length: int | None = None,
        model_id: str | None = None,
        verdict_cue: str = DEFAULT_CUE,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from services.runtime.device import resolve_device, torch_dtype, weights_revision
        from services.runtime.rendering import model_max_length

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if model_dir is None:
            from services.runtime.default_model import backbone_dir

            model_dir = backbone_dir()
            model_id = model_id or DEFAULT_MODEL_ID
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} is not a Hugging Face checkpoint folder (no config.json)")
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model_dir}: the local judge needs a tokenizer with a chat template")
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype))
        self.model: Any = model.to(self.device).eval()
        config = self.model.config
        self.max_length = model_max_length(self.tokenizer, config, max_length)
        self.verdict_cue = verdict_cue
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_ms = max_wait_ms
        pad = self.tokenizer.pad_token_id
        self._pad_with = int(pad if pad is not None else (config.pad_token_id or 0))
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._readouts: dict[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.info = BackendInfo(
            backend="local",
            model=model_id or _meta_model_id(model_dir) or model_dir.name,
            snapshot=weights_revision(model_dir),
        )
        self.calls_per_verdict = 1
        self._batcher: Batcher | None = None
        self._executor: ThreadPoolExecutor | None = None

    def sampling_key(self) -> dict[str, object]:
        return {
            "backend": "local",
            "model": self.info.model,
            "snapshot": self.info.snapshot,
            "dtype": self.dtype,
            "decoding": "greedy",
            "soft_labels": "next-token logprobs",
            "verdict_cue": self.verdict_cue,
        }

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batcher on the running loop (idempotent; ``verdict`` calls it lazily)."""
        if self._batcher is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="judge-forward")
            self._batcher = Batcher(
                self.forward,
                BatcherConfig(max_batch_tokens=self.max_batch_tokens, max_wait_ms=self.max_wait_ms),
                executor=self._executor,
            )
            await self._batcher.start()

    async def warmup(self) -> None:
        """One tiny verdict through the batcher (for readiness)."""
        from services.runtime.chat import ChatMessage

        await self.verdict(VerdictQuery(messages=(ChatMessage("user", "Answer A or B."),), choices=("A", "B")))

    async def aclose(self) -> None:
        batcher, executor = self._batcher, self._executor
        self._batcher, self._executor = None, None
        if batcher is not None:
            await batcher.stop()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    # -- stage 1: choices, render, tokenize -------------------------------------------------------

    def check_choices(self, choices: Sequence[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(readout_ids, owner)``: every single-token spelling of each choice (bare, then with a
        leading space) and the index of the choice each id belongs to. Raises ChoiceTokenError."""
        key = tuple(choices)
        cached = self._readouts.get(key)
        if cached is not None:
            return cached
        if not key or len(set(key)) != len(key):
            raise ChoiceTokenError(f"choices must be distinct and non-empty, got {list(key)}")
        ids: list[int] = []
        owner: list[int] = []
        for i, choice in enumerate(key):
            found = False
            for spelling in dict.fromkeys((choice, " " + choice.lstrip())):
                toks = self.tokenizer.encode(spelling, add_special_tokens=False)
                if len(toks) == 1:
                    if toks[0] in ids:
                        raise ChoiceTokenError(f"choices {list(key)} share the token id {toks[0]}")
                    ids.append(int(toks[0]))
                    owner.append(i)
                    found = True
            if not found:
                raise ChoiceTokenError(
                    f"verdict choice {choice!r} is not a single token for this tokenizer "
                    f"(as {choice!r} nor as {' ' + choice.lstrip()!r}); use single-token choices"
                )
        self._readouts[key] = (tuple(ids), tuple(owner))
        return self._readouts[key]

    def render(self, query: VerdictQuery) -> str:
        messages = [{"role": m.role, "content": m.content} for m in query.messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, query: VerdictQuery, *, suffix: str = "") -> EncodedItem:
        """The verdict forward's item: rendered prompt (+ ``suffix``) with the choices' readout ids."""
        readout, _ = self.check_choices(query.choices)
        ids = self._ids(self.render(query) + suffix)
        self._check_length(len(ids))
        return EncodedItem(tuple(ids), truncated=False, readout_ids=readout)

    def _check_length(self, n: int) -> None:
        if n > self.max_length:
            raise UpstreamError(
                f"local: the judge prompt has {n} tokens, over the model's maximum of {self.max_length}",
                retryable=False,
            )

    # -- stage 2: forward (batcher thread) ----------------------------------------------------------

    def forward(self, batch: Sequence[EncodedItem]) -> np.ndarray:
        """``[n, width]`` next-token logprobs (full-vocabulary log-softmax) of each item's readout
        ids at its last position; rows padded with -inf to the widest readout."""
        import torch

        with torch.inference_mode():
            n = len(batch)
            lengths = [it.num_tokens for it in batch]
            width = max(lengths)
            ids = torch.full((n, width), self._pad_with, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for row, it in enumerate(batch):
                ids[row, : it.num_tokens] = torch.tensor(it.input_ids, dtype=torch.long)
                mask[row, : it.num_tokens] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            backbone = getattr(self.model, self.model.base_model_prefix)
            hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
            rows = torch.arange(n, device=self.device)
            last = torch.tensor([k - 1 for k in lengths], device=self.device)
            logits = self.model.get_output_embeddings()(hidden[rows, last]).float()
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            logprobs = torch.log_softmax(logits, dim=-1).cpu().numpy()
        cols = max(len(it.readout_ids or ()) for it in batch)
        out = np.full((n, cols), -np.inf, dtype=np.float32)
        for row, it in enumerate(batch):
            readout = list(it.readout_ids or ())
            out[row, : len(readout)] = logprobs[row, readout]
        return out

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy ``generate`` after ``ids`` up to the end of the assistant turn (end tokens dropped)."""
        import torch

        # Stop at the end of the assistant turn: the tokenizer's and the config's eos, and
        # ChatML's "<|im_end|>" when the vocabulary has it.
        candidates: list[Any] = [self.tokenizer.eos_token_id, self.model.config.eos_token_id]
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if end != self.tokenizer.unk_token_id:
            candidates.append(end)
        flat = [e for c in candidates for e in (c if isinstance(c, list | tuple) else [c])]
        eos_ids = sorted({int(e) for e in flat if isinstance(e, int)})
        with torch.inference_mode():
            inputs = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            out = self.model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=eos_ids or None,
                pad_token_id=self._pad_with,
            )
        new = [int(t) for t in out[0, len(ids) :].tolist()]
        while new and new[-1] in eos_ids:
            new.pop()
        return new

    # -- verdicts -----------------------------------------------------------------------------------

    async def _readout(self, item: EncodedItem) -> np.ndarray:
        await self.start()
        assert self._batcher is not None
        try:
            (future,) = self._batcher.submit([item])
            return await future
        except ServiceError as exc:
            retryable = exc.code in (ErrorCode.UNAVAILABLE, ErrorCode.RESOURCE_EXHAUSTED)
            raise UpstreamError(
                f"local: {exc.message}",
                retryable=retryable,
                retry_after=exc.retry_after,
                rate_limited=exc.code == ErrorCode.RESOURCE_EXHAUSTED,
            ) from None

    def _probs(self, query: VerdictQuery, row: np.ndarray) -> dict[str, float]:
        _, owner = self.check_choices(query.choices)
        per_choice = np.full(len(query.choices), -np.inf, dtype=np.float64)
        for col, i in enumerate(owner):
            per_choice[i] = np.logaddexp(per_choice[i], float(row[col]))
        shifted = np.exp(per_choice - per_choice.max())
        probs = shifted / shifted.sum()
        return {c: float(p) for c, p in zip(query.choices, probs, strict=True)}

    async def verdict(self, query: VerdictQuery) -> VerdictReply:
        rationale: str | None = None
        if query.rationale:
            self.check_choices(query.choices)
            prompt = self.render(query)
            prompt_ids = self._ids(prompt)
            budget = self.max_length - len(prompt_ids) - len(self._ids(self.verdict_cue)) - 1
            self._check_length(len(prompt_ids) + 1)
            await self.start()
            loop = asyncio.get_running_loop()
            new_ids = await loop.run_in_executor(
                self._executor, self.generate_ids, prompt_ids, max(1, min(query.max_tokens, budget))
            )
            rationale = str(self.tokenizer.decode(new_ids, skip_special_tokens=True))
            item = EncodedItem(
                tuple(self._ids(prompt + rationale + self.verdict_cue)),
                truncated=False,
                readout_ids=self.check_choices(query.choices)[0],
            )
            self._check_length(item.num_tokens)
            completion_tokens = len(new_ids) + 1
        else:
            item = self.encode(query)
            completion_tokens = 1
        row = await self._readout(item)
        probs = self._probs(query, row)
        choice = max(query.choices, key=lambda c: probs[c])
        usage = Usage(prompt_tokens=item.num_tokens, completion_tokens=completion_tokens, calls=1)
        raw = (rationale + self.verdict_cue + " " if rationale is not None else "") + choice
        return VerdictReply(choice=choice, probs=probs, soft=True, raw=raw, rationale=rationale, usage=usage)


def _meta_model_id(model_dir: Path) -> str | None:
    path = model_dir / "rlhf_feedback.json"
    if path.is_file():
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("model_id"):
            return str(data["model_id"])
    return None
