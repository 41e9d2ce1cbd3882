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

Tokenization never runs on the event loop: rendering, tokenizing and decoding run in a small pool
of threads (``tokenize_workers``), each with its own tokenizer copy
(:class:`~services.runtime.tokenizers.PerThread`), so a long prompt delays only its own verdict.
A verdict takes its admission permit before it is tokenized: verdicts waiting to be tokenized
(or generating a rationale) count with the batcher's queue against ``max_queue_items``, and
beyond it a verdict is refused at once (a rate-limited :class:`UpstreamError`, as a full batcher
queue is). A prompt over ``max_prompt_chars`` characters (default: the model's maximum length ×
16) is refused before it is tokenized.

Message contents are tokenized as plain text (:mod:`services.judge.backends.local_tokens`): a
special or added token of the model's tokenizer that a candidate text, a rubric or a prompt
spells out reaches the model as the ids of its characters; only the chat template's own special
tokens are special. Prompts whose contents hold none get exactly the ids they always had.

Lifecycle: :meth:`start` (or the first :meth:`verdict`, lazily) starts the batcher on the
running event loop; :meth:`aclose` stops it. Use one backend from one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from services.common.errors import ErrorCode, ServiceError
from services.judge.backends.base import BackendInfo, UpstreamError
from services.judge.backends.local_tokens import ChatTokenizer
from services.judge.types import Usage, VerdictQuery, VerdictReply
from services.runtime.batcher import Batcher, BatcherConfig
from services.runtime.device import Dtype
from services.runtime.items import EncodedItem
from services.runtime.tokenizers import DEFAULT_TOKENIZE_WORKERS, PerThread, tokenize_pool

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CUE = "\n\nVerdict:"
# The default prompt budget: characters per token of the model's maximum length. English runs at
# about 4; 16 leaves room for runs of spaces or symbols that merge into long tokens, and still
# refuses, before tokenizing, a prompt that could never fit.
CHARS_PER_TOKEN = 16

T = TypeVar("T")


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
        max_queue_items: int = 8192,
        max_prompt_chars: int | None = None,
        tokenize_workers: int = DEFAULT_TOKENIZE_WORKERS,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from services.runtime.device import resolve_device, resolve_dtype, torch_dtype, weights_revision
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
        self.dtype = resolve_dtype(dtype, self.device)  # the cache key holds the dtype that really runs
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model_dir}: the local judge needs a tokenizer with a chat template")
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(self.dtype))
        self.model: Any = model.to(self.device).eval()
        config = self.model.config
        self.max_length = model_max_length(self.tokenizer, config, max_length)
        self.verdict_cue = verdict_cue
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_ms = max_wait_ms
        if max_queue_items < 1 or tokenize_workers < 1:
            raise ValueError("max_queue_items and tokenize_workers must be at least 1")
        self.max_queue_items = max_queue_items
        self.max_prompt_chars = max_prompt_chars or self.max_length * CHARS_PER_TOKEN
        self.tokenize_workers = tokenize_workers
        pad = self.tokenizer.pad_token_id
        self._pad_with = int(pad if pad is not None else (config.pad_token_id or 0))
        self._softcap = getattr(config, "final_logit_softcapping", None)
        self._eos_ids = self._end_of_turn_ids()
        self._readouts: dict[tuple[str, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        # self.tokenizer is the prototype: every call tokenizes with this thread's own copy
        self._chat = PerThread(ChatTokenizer(self.tokenizer))
        self._waiting = 0  # verdicts holding a permit: tokenizing or generating, not yet queued
        self.info = BackendInfo(
            backend="local",
            model=model_id or _meta_model_id(model_dir) or model_dir.name,
            snapshot=weights_revision(model_dir),
        )
        self.calls_per_verdict = 1
        self._batcher: Batcher | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tokenize: ThreadPoolExecutor | None = None

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
            self._tokenize = tokenize_pool(self.tokenize_workers, "judge-tokenize")
            self._batcher = Batcher(
                self.forward,
                BatcherConfig(
                    max_batch_tokens=self.max_batch_tokens,
                    max_wait_ms=self.max_wait_ms,
                    max_queue_items=self.max_queue_items,
                ),
                executor=self._executor,
            )
            await self._batcher.start()
            await self._copy_tokenizers(self._tokenize)

    async def _copy_tokenizers(self, pool: ThreadPoolExecutor) -> None:
        """Give every tokenize worker its tokenizer copy now: a copy holds the GIL for ~0.1 s,
        which would stall the event loop if the first long request paid for it."""
        barrier = threading.Barrier(self.tokenize_workers)

        def copy_then_wait() -> None:
            self._chat.get()
            # held until every worker has its own: each of these tasks lands on its own thread
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait(timeout=10)

        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(pool, copy_then_wait) for _ in range(self.tokenize_workers)))

    async def warmup(self) -> None:
        """One tiny verdict through the batcher (for readiness)."""
        from services.runtime.chat import ChatMessage

        await self.verdict(VerdictQuery(messages=(ChatMessage("user", "Answer A or B."),), choices=("A", "B")))

    async def aclose(self) -> None:
        batcher, executor, tokenize = self._batcher, self._executor, self._tokenize
        self._batcher, self._executor, self._tokenize = None, None, None
        if batcher is not None:
            await batcher.stop()
        for pool in (executor, tokenize):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    # -- stage 1: choices, render, tokenize (the tokenize pool: each thread its own tokenizer) --------

    def check_choices(self, choices: Sequence[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(readout_ids, owner)``: every single-token spelling of each choice (bare, then with a
        leading space) and the index of the choice each id belongs to. Raises ChoiceTokenError."""
        key = tuple(choices)
        cached = self._readouts.get(key)
        if cached is not None:
            return cached
        if not key or len(set(key)) != len(key):
            raise ChoiceTokenError(f"choices must be distinct and non-empty, got {list(key)}")
        tokenizer = self._chat.get().tokenizer
        ids: list[int] = []
        owner: list[int] = []
        for i, choice in enumerate(key):
            found = False
            for spelling in dict.fromkeys((choice, " " + choice.lstrip())):
                toks = tokenizer.encode(spelling, add_special_tokens=False)
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
        """The query's messages in the model's chat template, with the generation prompt."""
        return self._chat.get().render(_messages(query))

    def encode(self, query: VerdictQuery) -> EncodedItem:
        """The verdict forward's item: the rendered prompt's ids (message contents as plain text)
        with the choices' readout ids."""
        readout, _ = self.check_choices(query.choices)
        ids, _, _ = self._prompt_ids(query)
        self._check_length(len(ids))
        return EncodedItem(tuple(ids), truncated=False, readout_ids=readout)

    def _prompt_ids(self, query: VerdictQuery) -> tuple[list[int], str, list[tuple[int, int]]]:
        """(ids, rendered text, where the message contents lie in it); over ``max_prompt_chars``
        characters, refused before anything is rendered or tokenized."""
        chars = sum(len(m.content) for m in query.messages)
        if chars > self.max_prompt_chars:
            raise UpstreamError(
                f"local: the judge prompt has {chars} characters, over the limit of {self.max_prompt_chars}",
                retryable=False,
            )
        chat = self._chat.get()
        messages = _messages(query)
        rendered = chat.render(messages)
        spans = chat.content_spans(messages, rendered)
        return chat.encode(rendered, spans), rendered, spans

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

    def _end_of_turn_ids(self) -> list[int]:
        # Stop at the end of the assistant turn: the tokenizer's and the config's eos, and
        # ChatML's "<|im_end|>" when the vocabulary has it.
        candidates: list[Any] = [self.tokenizer.eos_token_id, self.model.config.eos_token_id]
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if end != self.tokenizer.unk_token_id:
            candidates.append(end)
        flat = [e for c in candidates for e in (c if isinstance(c, list | tuple) else [c])]
        return sorted({int(e) for e in flat if isinstance(e, int)})

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy ``generate`` after ``ids`` up to the end of the assistant turn (end tokens dropped)."""
        import torch

        eos_ids = self._eos_ids
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

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a tokenize worker: never on the event loop."""
        await self.start()
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, functools.partial(fn, *args))

    @contextlib.contextmanager
    def _permit(self) -> Iterator[None]:
        """Admission, before any tokenization: refused at once when the verdicts holding a permit
        and those in the batcher's queue already reach ``max_queue_items``."""
        batcher = self._batcher
        queued = batcher.queue_depth if batcher is not None else 0
        if self._waiting + queued >= self.max_queue_items:
            raise UpstreamError(
                f"local: server overloaded: {self._waiting} verdicts being tokenized and {queued} queued "
                f"(limit {self.max_queue_items})",
                retryable=True,
                retry_after=batcher.retry_after() if batcher is not None else None,
                rate_limited=True,
            )
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1

    def _submit(self, item: EncodedItem) -> asyncio.Future[np.ndarray]:
        if self._batcher is None:
            raise UpstreamError("local: the backend is closed", retryable=True)
        try:
            (future,) = self._batcher.submit([item])
        except ServiceError as exc:
            raise _upstream(exc) from None
        return future

    def _probs(self, query: VerdictQuery, row: np.ndarray) -> dict[str, float]:
        _, owner = self.check_choices(query.choices)
        per_choice = np.full(len(query.choices), -np.inf, dtype=np.float64)
        for col, i in enumerate(owner):
            per_choice[i] = np.logaddexp(per_choice[i], float(row[col]))
        shifted = np.exp(per_choice - per_choice.max())
        probs = shifted / shifted.sum()
        return {c: float(p) for c, p in zip(query.choices, probs, strict=True)}

    async def verdict(self, query: VerdictQuery) -> VerdictReply:
        await self.start()
        rationale: str | None = None
        with self._permit():
            if query.rationale:
                prompt_ids, rendered, spans, budget = await self._in_pool(self._rationale_prompt, query)
                loop = asyncio.get_running_loop()
                new_ids = await loop.run_in_executor(
                    self._executor, self.generate_ids, prompt_ids, max(1, min(query.max_tokens, budget))
                )
                rationale, item = await self._in_pool(self._after_rationale, query, rendered, spans, new_ids)
                completion_tokens = len(new_ids) + 1
            else:
                item = await self._in_pool(self.encode, query)
                completion_tokens = 1
            # queued in the same step as the permit goes back: the item is never counted twice
            # nor missing from the count
            future = self._submit(item)
        try:
            row = await future
        except ServiceError as exc:
            raise _upstream(exc) from None
        probs = self._probs(query, row)
        choice = max(query.choices, key=lambda c: probs[c])
        usage = Usage(prompt_tokens=item.num_tokens, completion_tokens=completion_tokens, calls=1)
        raw = (rationale + self.verdict_cue + " " if rationale is not None else "") + choice
        return VerdictReply(choice=choice, probs=probs, soft=True, raw=raw, rationale=rationale, usage=usage)

    def _rationale_prompt(self, query: VerdictQuery) -> tuple[list[int], str, list[tuple[int, int]], int]:
        """(prompt ids, rendered prompt, content spans, token budget of the rationale)."""
        self.check_choices(query.choices)
        prompt_ids, rendered, spans = self._prompt_ids(query)
        self._check_length(len(prompt_ids) + 1)
        budget = self.max_length - len(prompt_ids) - len(self._chat.get().ids(self.verdict_cue)) - 1
        return prompt_ids, rendered, spans, budget

    def _after_rationale(
        self, query: VerdictQuery, rendered: str, spans: list[tuple[int, int]], new_ids: list[int]
    ) -> tuple[str, EncodedItem]:
        """The rationale's text and the verdict item: prompt + rationale + cue, the rationale (model
        text that may spell out a special token) as plain text like the message contents."""
        chat = self._chat.get()
        rationale = chat.decode(new_ids)
        text = rendered + rationale + self.verdict_cue
        ids = chat.encode(text, [*spans, (len(rendered), len(rendered) + len(rationale))])
        self._check_length(len(ids))
        return rationale, EncodedItem(tuple(ids), truncated=False, readout_ids=self.check_choices(query.choices)[0])


def _messages(query: VerdictQuery) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in query.messages]


def _upstream(exc: ServiceError) -> UpstreamError:
    """The batcher's refusal or failure as a provider error (a full queue is a rate limit)."""
    return UpstreamError(
        f"local: {exc.message}",
        retryable=exc.code in (ErrorCode.UNAVAILABLE, ErrorCode.RESOURCE_EXHAUSTED),
        retry_after=exc.retry_after,
        rate_limited=exc.code == ErrorCode.RESOURCE_EXHAUSTED,
    )


def _meta_model_id(model_dir: Path) -> str | None:
    path = model_dir / "rlhf_feedback.json"
    if path.is_file():
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("model_id"):
            return str(data["model_id"])
    return None
