"""The runtime's item model: what goes into a backend and what a backend says about its model.

An engine hands :class:`RewardInput` (or a ready :class:`EncodedItem`) to the runtime; the
runtime renders, tokenizes, truncates and batches them, and runs the backend's forward pass.
Nothing here knows a transport, a queue policy or a service.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.runtime.chat import ChatMessage, Prompt


class Priority(str, enum.Enum):
    """Online work (rollouts a trainer is waiting for) is batched before bulk work."""

    ONLINE = "online"
    BATCH = "batch"


@dataclass(frozen=True)
class RewardInput:
    """One thing to score, in exactly one of four forms.

    - ``text``: already rendered; tokenized as is, no special tokens added (unless
      ``add_special_tokens``: then exactly as ``tokenizer(text)`` with its defaults, BOS and all,
      as vLLM's pooling API does for its ``input`` strings).
    - ``prompt`` + ``response``: rendered with the reward model's own chat template
      (or as a sentence pair when it has none).
    - ``messages``: a whole conversation, rendered with the chat template.
    - ``token_ids``: already tokenized (vLLM's pooling API takes them); scored as given, the
      first ids dropped past the maximum length like a long ``text``.
    """

    text: str | None = None
    prompt: Prompt | None = None
    response: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    add_special_tokens: bool = False

    @staticmethod
    def of_text(text: str) -> RewardInput:
        return RewardInput(text=text)

    @staticmethod
    def of_pair(prompt: Prompt | Sequence[ChatMessage], response: str) -> RewardInput:
        p = prompt if isinstance(prompt, str) else tuple(prompt)
        return RewardInput(prompt=p, response=response)

    @staticmethod
    def of_messages(messages: Sequence[ChatMessage]) -> RewardInput:
        return RewardInput(messages=tuple(messages))


@dataclass(frozen=True)
class EncodedItem:
    """A tokenized, truncated input ready for a backend's forward pass.

    ``prompt_tokens`` counts the leading tokens that belong to the prompt (0 for ``text``
    items); items of one request with equal prompts share ``group`` so that a decoder backend
    can run their common prefix once (the engine sets it, only for a backend that shares).
    ``readout_ids`` are token ids whose next-token log probabilities a verdict backend reads
    (the local judge's ``A``/``B``); None for rewards.
    """

    input_ids: tuple[int, ...]
    truncated: bool
    token_type_ids: tuple[int, ...] | None = None
    prompt_tokens: int = 0
    group: int | None = None
    readout_ids: tuple[int, ...] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about the loaded model, reported by ``/v1/models`` and ``GetModelInfo``."""

    id: str
    revision: str
    architecture: str
    backend: str
    dtype: str
    device: str
    max_length: int
    num_labels: int
    label_names: tuple[str, ...] = field(default_factory=tuple)
    has_chat_template: bool = False
