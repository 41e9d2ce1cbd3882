"""Ray Data integration: callable classes for ``Dataset.map_batches`` (``pip install 'rlhf-feedback[ray]'``).

::

    import ray
    from rlhf_train.integrations.ray import JudgeLabeler, RewardScorer, pairs_only

    ds = ray.data.read_parquet("rollouts.parquet")           # prompt, response
    scored = ds.map_batches(
        RewardScorer,
        fn_constructor_kwargs={"url": ["grpc://rm-0:50051", "grpc://rm-1:50051"]},
        batch_format="pyarrow", batch_size=64,
        concurrency=8,            # actors = service replicas x requests in flight per replica
        num_cpus=0.25,            # an actor waits on the network: don't reserve a whole CPU for it
    )
    scored.write_parquet("scored/")                          # + score, truncated, error, reward_model

- :class:`RewardScorer` scores each row through the reward service with the project's clients
  (HTTP or gRPC, several endpoints, chunking and retries of :class:`clients.RewardClient`).
- :class:`LocalRewardScorer` loads the reward model inside the actor with the service's own
  runtime (rendering, truncation, the token-budget batcher, prefix sharing): the same scores as
  ``serve reward`` with no server at all. On a GPU cluster give each actor a GPU
  (``num_gpus=1``; the actor uses ``cuda`` when it sees one).
- :class:`JudgeLabeler` turns rows of a prompt and 2..N completions into exactly the preference
  rows ``rlhf-feedback label`` writes (it runs label's own per-row code), rejects included as rows
  flagged by ``reject_kind``; :func:`pairs_only` / :func:`rejects_only` (or :func:`split_labels`)
  separate the two.

Batches: any format Ray hands over is accepted (``pyarrow.Table``, ``pandas.DataFrame``, or a
dict of numpy arrays), and every class returns a ``pyarrow.Table`` with typed columns, so every
block has the same schema even when a block's scores are all null (a pandas block of all-``None``
would otherwise become a null-typed column and break ``write_parquet``). ``batch_format="pyarrow"``
avoids a conversion. Input columns pass through unchanged (a column named like an output column
is replaced).

Failures are never made-up numbers: an item that could not be scored has ``score`` null and its
reason (``"CODE: message"``) in ``error``; ``on_error="raise"`` raises instead, so that Ray's task
retries (``max_retries`` / ``retry_exceptions``) or ``DataContext.max_errored_blocks`` decide.
Authentication failures always raise: no row can succeed.

Nothing here imports ``ray``: the classes are plain picklable callables (connections open lazily in
the process that uses them), and written against Ray 2.60's ``map_batches`` contract (a class is
constructed once per actor with ``fn_constructor_kwargs``, then called once per batch).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlhf_train.jobs.io import content_hash
from rlhf_train.jobs.label import (
    LabelItem,
    LabelOptions,
    arrow_schema,
    as_completion,
    as_messages,
    label_item,
    pair_id,
    parse_row,
)

OnError = Literal["row", "raise"]
SCORE = "score"
TRUNCATED = "truncated"
ERROR = "error"
MODEL = "reward_model"
# The columns JudgeLabeler adds to label's own output columns (null on data rows).
REJECT_KIND = "reject_kind"
REJECT_COLUMNS = (REJECT_KIND, "reject_reason", "reject_pair", "completions", "input")
REJECT_FILE_FIELDS = ("id", "kind", "reason", "input", "pair", "preference", "prompt", "completions", "judge")
_MODEL_TYPE = pa.struct([("id", pa.string()), ("revision", pa.string())])

Wire = dict[str, Any]
ItemResult = tuple[float | None, bool | None, str | None]  # score, truncated, error


class RowsFailedError(RuntimeError):
    """Raised with ``on_error="raise"`` when some items of a batch could not be scored or judged."""


# -- batches in, tables out --------------------------------------------------------------------------


def _plain(x: Any) -> Any:
    """Python values from what Ray's numpy / pandas batches hold (object arrays of arrays of dicts)."""
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()] if x.dtype == object else x.tolist()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def as_table(batch: Any) -> pa.Table:
    """A ``pyarrow.Table`` from a batch in any of Ray's formats (pyarrow, pandas, dict of numpy)."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, Mapping):
        return pa.table({k: pa.array(_plain(v)) for k, v in batch.items()})
    import pandas as pd

    if isinstance(batch, pd.DataFrame):
        try:
            return pa.Table.from_pandas(batch, preserve_index=False)  # NaN in object columns → null
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # object columns Arrow cannot infer by itself
            return pa.table({k: pa.array([_plain(v) for v in batch[k].tolist()]) for k in batch.columns})
    raise TypeError(f"a batch is a pyarrow.Table, a pandas.DataFrame or a dict of numpy arrays, not {type(batch)}")


def _column(table: pa.Table, name: str) -> list[Any]:
    if name not in table.column_names:
        raise KeyError(f"the batch has no column {name!r} (columns: {', '.join(table.column_names)})")
    return list(table.column(name).to_pylist())


def _with(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, values) if i >= 0 else table.append_column(name, values)


# -- what to score in a row ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where a row's reward input is: exactly one of ``text``, ``messages``, or ``prompt`` with
    ``response`` (one completion; the default) or with ``completions`` (a list: then ``score``,
    ``truncated`` and ``error`` are lists aligned with it).

    A prompt is a string or chat messages; a response a string, one assistant message, or a list
    holding one (TRL's conversational format), read exactly as ``rlhf-feedback score`` reads them.
    """

    prompt: str = "prompt"
    response: str = "response"
    completions: str | None = None
    messages: str | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if sum(c is not None for c in (self.completions, self.messages, self.text)) > 1:
            raise ValueError("give at most one of completions_column, messages_column and text_column")

    @property
    def listwise(self) -> bool:
        return self.completions is not None

    def rows(self, table: pa.Table) -> list[list[Wire] | str]:
        """Each row's wire items (the reward client's item forms), or why the row has none."""
        if self.text is not None:
            return [_guard(_text_item, v) for v in _column(table, self.text)]
        if self.messages is not None:
            return [_guard(_messages_item, v) for v in _column(table, self.messages)]
        prompts = _column(table, self.prompt)
        if self.completions is not None:
            comps = _column(table, self.completions)
            return [_guard(_completions, p, c) for p, c in zip(prompts, comps, strict=True)]
        responses = _column(table, self.response)
        return [_guard(_pair_item, p, r) for p, r in zip(prompts, responses, strict=True)]


def _guard(build: Callable[..., list[Wire]], *args: Any) -> list[Wire] | str:
    try:
        return build(*args)
    except ValueError as exc:
        return f"INVALID_ARGUMENT: {exc}"


def _text_item(v: Any) -> list[Wire]:
    return [{"text": _text(v)}]


def _messages_item(v: Any) -> list[Wire]:
    return [{"messages": as_messages(v, "messages")}]


def _pair_item(p: Any, r: Any) -> list[Wire]:
    return [{"prompt": _prompt(p), "response": as_completion(r, "response")}]


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"text must be a string, not {type(v).__name__}")
    return v


def _prompt(v: Any) -> str | list[dict[str, str]]:
    if v is None:
        raise ValueError("the row has no prompt")
    return v if isinstance(v, str) else as_messages(v, "prompt")


def _completions(prompt: Any, comps: Any) -> list[Wire]:
    if not isinstance(comps, list) or not comps:
        raise ValueError("completions must be a non-empty list")
    p = _prompt(prompt)
    return [{"prompt": p, "response": as_completion(c, f"completions[{i}]")} for i, c in enumerate(comps)]


class _ScorerBase:
    """Turns a batch into items, scores them (subclasses), and puts the results back per row."""

    def __init__(self, columns: Columns, on_error: OnError, model_column: str | None) -> None:
        if on_error not in ("row", "raise"):
            raise ValueError("on_error is 'row' (null score + reason) or 'raise'")
        self.columns = columns
        self.on_error: OnError = on_error
        self.model_column = model_column

    def _score_items(self, items: Sequence[Wire]) -> tuple[list[ItemResult], dict[str, str] | None]:
        raise NotImplementedError

    def __call__(self, batch: Any) -> pa.Table:
        """Score one batch; the input columns plus ``score``, ``truncated``, ``error`` (and the model)."""
        table = as_table(batch)
        rows = self.columns.rows(table)
        flat = [w for r in rows if not isinstance(r, str) for w in r]
        results, model = self._score_items(flat) if flat else ([], None)
        if self.on_error == "raise":
            failed = [e for _, _, e in results if e is not None and not e.startswith("INVALID_ARGUMENT")]
            if failed:
                raise RowsFailedError(f"{len(failed)} of {len(results)} items have no score; first: {failed[0]}")
        scores: list[Any] = []
        truncated: list[Any] = []
        errors: list[Any] = []
        pos = 0
        for r in rows:
            if isinstance(r, str):  # the row itself is unreadable
                scores.append(None)
                truncated.append(None)
                errors.append([r] if self.columns.listwise else r)
                continue
            mine = results[pos : pos + len(r)]
            pos += len(r)
            if self.columns.listwise:
                scores.append([s for s, _, _ in mine])
                truncated.append([t for _, t, _ in mine])
                errors.append([e for _, _, e in mine])
            else:
                ((s, t, e),) = mine
                scores.append(s)
                truncated.append(t)
                errors.append(e)
        wrap = pa.list_ if self.columns.listwise else (lambda t: t)
        table = _with(table, SCORE, pa.array(scores, wrap(pa.float64())))
        table = _with(table, TRUNCATED, pa.array(truncated, wrap(pa.bool_())))
        table = _with(table, ERROR, pa.array(errors, wrap(pa.string())))
        if self.model_column is not None:
            table = _with(table, self.model_column, pa.array([model] * table.num_rows, _MODEL_TYPE))
        return table


# -- through the reward service ----------------------------------------------------------------------


class RewardScorer(_ScorerBase):
    """Scores rows through the reward service (``Dataset.map_batches(RewardScorer, ...)``).

    ``url``: one URL or a list (``http(s)://``, ``grpc(s)://``, ``dns:///``): the client spreads
    chunks over them and moves a failed attempt to the next, so a replica that dies mid-job costs
    retries, not rows. Each actor sends one batch at a time, cut into chunks of the server's
    request size, ``max_concurrency`` chunks in flight; Ray's ``concurrency`` (actors) times that
    is what the replicas see. ``priority`` defaults to ``"batch"`` (yields to online trainer
    traffic on a shared service). Column options: :class:`Columns`. The ``reward_model`` column
    (``{id, revision}``; ``model_column=None`` leaves it out) says which model scored the row;
    scores of two different models never mix in one actor (it raises).

    Invalid items (an empty text, a bad message) get ``INVALID_ARGUMENT`` in ``error`` and their
    neighbours are still scored; items whose requests failed after the client's retries get the
    failure's code and message.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        prompt_column: str = "prompt",
        response_column: str = "response",
        completions_column: str | None = None,
        messages_column: str | None = None,
        text_column: str | None = None,
        model_column: str | None = MODEL,
        api_key: str | None = None,
        timeout: float | None = 120.0,
        max_retries: int = 8,
        chunk_size: int | None = None,
        max_concurrency: int = 2,
        priority: Literal["online", "batch"] = "batch",
        tls_ca: str | None = None,
        on_error: OnError = "row",
    ) -> None:
        super().__init__(
            Columns(prompt_column, response_column, completions_column, messages_column, text_column),
            on_error,
            model_column,
        )
        self.url = url if isinstance(url, str) else list(url)
        self._client_kwargs: dict[str, Any] = {
            "api_key": api_key,
            "timeout": timeout,
            "max_retries": max_retries,
            "chunk_size": chunk_size,
            "max_concurrency": max_concurrency,
            "priority": priority,
            "tls_ca": tls_ca,
        }
        self._client: Any = None
        self._pinned: tuple[str, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None  # connections belong to the process that opened them
        return state

    def _get_client(self) -> Any:
        if self._client is None:
            from clients import RewardClient

            self._client = RewardClient(self.url, **self._client_kwargs)
        return self._client

    def _score_items(self, items: Sequence[Wire]) -> tuple[list[ItemResult], dict[str, str] | None]:
        out: list[ItemResult | None] = [None] * len(items)
        model = self._score_indices(items, list(range(len(items))), out)
        assert all(r is not None for r in out)
        return [r for r in out if r is not None], model

    def _score_indices(
        self, items: Sequence[Wire], todo: list[int], out: list[ItemResult | None]
    ) -> dict[str, str] | None:
        """Score ``items[todo]``; an invalid item is answered alone and the rest sent again."""
        from clients.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError, RlhfFeedbackError

        todo = list(todo)
        while todo:
            try:
                res = self._get_client().score([items[i] for i in todo])
            except (AuthenticationError, PermissionDeniedError):
                raise
            except InvalidRequestError as exc:
                reason = f"{exc.code}: {exc.message}"
                if len(todo) == 1:
                    out[todo[0]] = (None, None, reason)
                    return None
                if exc.item is not None and 0 <= exc.item < len(todo):
                    out[todo.pop(exc.item)] = (None, None, reason)
                    continue
                model = None
                for i in todo:  # the server did not say which: one by one
                    model = self._score_indices(items, [i], out) or model
                return model
            except RlhfFeedbackError as exc:
                if self.on_error == "raise":
                    raise
                for i in todo:
                    out[i] = (None, None, f"{exc.code}: {exc.message}")
                return None
            for k, i in enumerate(todo):
                s = res[k]
                err = res.errors.get(k)
                out[i] = (s, res.truncated[k] if s is not None else None, None if s is not None else str(err))
            return self._pin(res.model)
        return None

    def _pin(self, model: Any) -> dict[str, str] | None:
        if model is None:
            return None
        ref = (model.id, model.revision)
        if self._pinned is None:
            self._pinned = ref
        elif ref != self._pinned:
            raise RuntimeError(
                f"the reward service now serves {ref[0]}@{ref[1]}, not {self._pinned[0]}@{self._pinned[1]} as "
                "before; scores of different models must not mix"
            )
        return {"id": ref[0], "revision": ref[1]}


# -- in the actor, no server -----------------------------------------------------------------------------


class LocalRewardScorer(_ScorerBase):
    """Loads the reward model in the actor and scores rows with the service's own runtime.

    The same code path as ``serve reward``: :class:`~services.runtime.backends.torch_backend.TorchRewardBackend`
    renders, truncates and tokenizes (the model's chat template, the same maximum length), and the
    service's token-budget :class:`~services.runtime.batcher.Batcher` forms the batches (length
    sorted, items of one prompt sharing their prefix), so a row's score equals the service's (and
    the unbatched ``transformers`` forward) within float rounding. ``model``: a Hugging Face
    sequence-classification folder (None: the embedded default model). ``device="auto"`` uses
    ``cuda`` when the actor sees a GPU: give each actor one with ``map_batches(..., num_gpus=1)``;
    on CPU, set ``threads`` to the actor's ``num_cpus``. A vector head's ``score`` is the
    ``head_weights``-weighted sum of its outputs (default: their mean), as ``--head-weights``.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        prompt_column: str = "prompt",
        response_column: str = "response",
        completions_column: str | None = None,
        messages_column: str | None = None,
        text_column: str | None = None,
        model_column: str | None = MODEL,
        dtype: Literal["auto", "float32", "float16", "bfloat16"] = "float32",
        device: str = "auto",
        max_length: int | None = None,
        threads: int | None = None,
        model_id: str | None = None,
        max_batch_tokens: int = 8192,
        prefix_sharing: bool = True,
        head_weights: Sequence[float] | None = None,
        on_error: OnError = "row",
    ) -> None:
        from services.runtime.backends.torch_backend import TorchRewardBackend
        from services.runtime.heads import head_weights as runtime_head_weights

        super().__init__(
            Columns(prompt_column, response_column, completions_column, messages_column, text_column),
            on_error,
            model_column,
        )
        if model is None:
            from services.runtime.default_model import default_model_dir

            model = default_model_dir()
        self.backend = TorchRewardBackend(
            model,
            dtype=dtype,
            device=device,
            max_length=max_length,
            threads=threads,
            model_id=model_id,
            prefix_sharing=prefix_sharing,
        )
        self.max_batch_tokens = max_batch_tokens
        self._weights = runtime_head_weights(head_weights, self.backend.info.num_labels, flag="head_weights")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="local-reward-forward")
        info = self.backend.info
        self._model = {"id": info.id, "revision": info.revision}

    def _score_items(self, items: Sequence[Wire]) -> tuple[list[ItemResult], dict[str, str] | None]:
        from services.runtime.items import RewardInput

        out: list[ItemResult | None] = [None] * len(items)
        inputs: list[RewardInput] = []
        where: list[int] = []
        for i, w in enumerate(items):
            try:
                inputs.append(_reward_input(w))
                where.append(i)
            except ValueError as exc:
                out[i] = (None, None, f"INVALID_ARGUMENT: {exc}")
        encoded = self._encode(inputs, where, out)
        rows = asyncio.run(self._forward([e for _, e in encoded]))
        for (i, enc), row in zip(encoded, rows, strict=True):
            if isinstance(row, BaseException):
                out[i] = (None, None, _reason(row))
                continue
            vec = np.asarray(row, dtype=np.float32).reshape(-1)
            score = float(vec[0]) if self._weights is None else float(np.float32(np.dot(self._weights, vec)))
            out[i] = (score, enc.truncated, None)
        return [r if r is not None else (None, None, "INTERNAL: not scored") for r in out], self._model

    def _encode(self, inputs: list[Any], where: list[int], out: list[ItemResult | None]) -> list[tuple[int, Any]]:
        try:
            encoded = list(zip(where, self.backend.encode(inputs), strict=True))
        except Exception:  # one bad item: find it, keep the others
            encoded = []
            for i, x in zip(where, inputs, strict=True):
                try:
                    encoded.append((i, self.backend.encode([x])[0]))
                except Exception as exc:
                    out[i] = (None, None, f"INVALID_ARGUMENT: {exc}")
        if self.backend.shares_prefixes:
            encoded = _grouped(encoded, inputs, where)
        return encoded

    async def _forward(self, encoded: list[Any]) -> list[Any]:
        from services.runtime.backends.base import shared_prefix_fn
        from services.runtime.batcher import Batcher, BatcherConfig
        from services.runtime.items import Priority

        if not encoded:
            return []
        config = BatcherConfig(max_batch_tokens=self.max_batch_tokens, max_queue_items=max(8192, len(encoded)))
        batcher = Batcher(
            self.backend.forward, config, executor=self._executor, shared_prefix=shared_prefix_fn(self.backend)
        )
        await batcher.start()
        try:
            futures = batcher.submit(encoded, priority=Priority.BATCH)
            return list(await asyncio.gather(*futures, return_exceptions=True))
        finally:
            await batcher.stop()


def _reward_input(w: Wire) -> Any:
    from services.runtime.chat import ROLES, ChatMessage
    from services.runtime.items import RewardInput

    def msgs(ms: Sequence[Mapping[str, str]], what: str) -> tuple[ChatMessage, ...]:
        if not ms:
            raise ValueError(f"{what} is empty")
        for m in ms:
            if m["role"] not in ROLES:
                raise ValueError(f"unknown role {m['role']!r}; expected one of {sorted(ROLES)}")
        return tuple(ChatMessage(m["role"], m["content"]) for m in ms)

    if "text" in w:
        if w["text"] == "":
            raise ValueError("text is empty")
        return RewardInput(text=w["text"])
    if "messages" in w:
        return RewardInput(messages=msgs(w["messages"], "messages"))
    p = w["prompt"]
    return RewardInput(prompt=p if isinstance(p, str) else msgs(p, "prompt"), response=w["response"])


def _grouped(encoded: list[tuple[int, Any]], inputs: list[Any], where: list[int]) -> list[tuple[int, Any]]:
    """Items with the same prompt form a group whose prefix the backend runs once (as the service
    groups the items of one request)."""
    by_index = dict(zip(where, inputs, strict=True))
    keys = [_prompt_key(by_index[i]) for i, _ in encoded]
    counts: dict[object, int] = {}
    for k in keys:
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    ids = {k: g for g, k in enumerate(k for k, c in counts.items() if c > 1)}
    return [
        (i, dataclasses.replace(e, group=ids[k]) if k in ids else e) for (i, e), k in zip(encoded, keys, strict=True)
    ]


def _prompt_key(x: Any) -> object | None:
    if x.prompt is not None:
        return ("prompt", x.prompt)
    if x.messages is not None and len(x.messages) > 1:
        return ("messages", x.messages[:-1])
    return None


def _reason(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if code is not None and hasattr(code, "value"):
        return f"{code.value}: {getattr(exc, 'message', str(exc))}"
    return f"INTERNAL: {type(exc).__name__}: {exc}"


# -- judge labels ------------------------------------------------------------------------------------------


class JudgeLabeler:
    """Rows of a prompt and 2..N completions → the preference rows ``rlhf-feedback label`` writes.

    Input columns: ``prompt`` (a string or messages) and ``completions`` (a list of at least two),
    or ``chosen`` + ``rejected`` (re-label a pair), read by label's own parser. Each row is judged
    by label's own code (:func:`rlhf_train.jobs.label.label_item`: ``compare`` for two
    completions; ``rank`` then best vs worst, or every pair with ``pairs="all"``), so for the same
    judge replies the data rows are exactly label's: ``id``, ``prompt``, ``chosen``,
    ``rejected``, ``preference``, ``consistent``, ``judge`` (``margin`` with ``margin=True``,
    LLaMA-Factory's two message columns with ``llama_factory=True``), in label's Parquet types.

    Rejects (ties, abstentions, low confidence, invalid rows, and with ``on_error="row"`` rows the
    judge could not be reached for, kind ``error``) are rows of the same table with ``chosen`` /
    ``rejected`` null and ``reject_kind``, ``reject_reason``, ``reject_pair`` and ``completions``
    set; :func:`pairs_only` and :func:`rejects_only` separate them (the latter into label's
    rejects-file fields). ``input`` holds ``id_column``'s value when given (label's line number).

    One difference from ``label``: a job has no global row order here, so a row repeated in the
    input gets the same ``id`` each time (label numbers repeats); deduplicate first if that matters.
    ``concurrency``: rows judged at once per batch (label's ``--concurrency``).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        pairs: Literal["best-worst", "all"] = "best-worst",
        protocol: Literal["both_orders", "single"] = "both_orders",
        min_confidence: float = 0.0,
        rubric: str | None = None,
        margin: bool = False,
        llama_factory: bool = False,
        prompt_column: str = "prompt",
        completions_column: str = "completions",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        id_column: str | None = None,
        concurrency: int = 8,
        api_key: str | None = None,
        timeout: float | None = 300.0,
        max_retries: int = 8,
        on_error: OnError = "row",
    ) -> None:
        if on_error not in ("row", "raise"):
            raise ValueError("on_error is 'row' (a reject of kind 'error') or 'raise'")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError("min_confidence is a confidence |2p - 1| between 0 and 1")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.url = url if isinstance(url, str) else list(url)
        self.opts = LabelOptions(
            pairs=pairs,
            protocol=protocol,
            min_confidence=float(min_confidence),
            rubric=rubric,
            llama_factory=llama_factory,
            margin=margin,
        )
        self.columns = (prompt_column, completions_column, chosen_column, rejected_column)
        self.id_column = id_column
        self.concurrency = concurrency
        self.on_error: OnError = on_error
        self._client_kwargs: dict[str, Any] = {"api_key": api_key, "timeout": timeout, "max_retries": max_retries}
        self.schema = labels_schema(self.opts)

    def __call__(self, batch: Any) -> pa.Table:
        """Label one batch: label's data rows and the rejects, in input order."""
        table = as_table(batch)
        prompt_col, comps_col, chosen_col, rejected_col = self.columns
        n = table.num_rows
        names = table.column_names
        prompts = _column(table, prompt_col)
        comps = _column(table, comps_col) if comps_col in names else [None] * n
        chosen = _column(table, chosen_col) if chosen_col in names else None
        rejected = _column(table, rejected_col) if rejected_col in names else None
        ids = _column(table, self.id_column) if self.id_column is not None else [None] * n
        work: list[LabelItem | dict[str, Any]] = []
        for i in range(n):
            data: dict[str, Any] = {"prompt": prompts[i]}
            if comps[i] is not None:
                data["completions"] = comps[i]
            if chosen is not None and rejected is not None and comps[i] is None:
                data["chosen"], data["rejected"] = chosen[i], rejected[i]
            where = "" if ids[i] is None else str(ids[i])
            try:
                prompt, completions = parse_row(data)
            except ValueError as exc:
                work.append(_invalid_row(data, where, str(exc)))
                continue
            content: dict[str, Any] = {"prompt": prompt, "completions": completions}
            work.append(LabelItem(i, where, content_hash(content), content, prompt, completions))
        items = [w for w in work if isinstance(w, LabelItem)]
        records = iter(asyncio.run(self._label(items)) if items else [])
        rows: list[dict[str, Any]] = []
        for w in work:
            if not isinstance(w, LabelItem):
                rows.append(w)
                continue
            rec = next(records)
            for out in rec["out"]:
                row = {k: v for k, v in out.items() if self.opts.margin or k != "margin"}
                rows.append({**row, "input": w.where or None})
            rows.extend(_reject_row(r) for r in rec["rej"])
        return pa.Table.from_pylist(rows, schema=self.schema)

    async def _label(self, items: Sequence[LabelItem]) -> list[dict[str, Any]]:
        from clients import AsyncJudgeClient
        from rlhf_train.jobs.io import UnitFailed

        client = AsyncJudgeClient(self.url, **self._client_kwargs)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(item: LabelItem) -> dict[str, Any]:
            async with gate:
                try:
                    return await label_item(client, item, self.opts)
                except UnitFailed as exc:
                    if self.on_error == "raise":
                        raise RowsFailedError(str(exc)) from None
                    return {"out": [], "rej": [_error_reject(item, str(exc))]}

        try:
            return list(await asyncio.gather(*(one(it) for it in items)))
        finally:
            await client.aclose()


def labels_schema(opts: LabelOptions) -> pa.Schema:
    """JudgeLabeler's output: label's Parquet schema plus the reject columns (null on data rows)."""
    base = arrow_schema(opts)
    return pa.schema(
        [
            *base,
            pa.field(REJECT_KIND, pa.string()),
            pa.field("reject_reason", pa.string()),
            pa.field("reject_pair", pa.list_(pa.int64())),
            pa.field("completions", pa.list_(pa.string())),
            pa.field("input", pa.string()),
        ]
    )


def _reject_row(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": r["id"],
        "prompt": r["prompt"],
        "preference": r.get("preference"),
        "judge": r.get("judge"),
        REJECT_KIND: r["kind"],
        "reject_reason": r["reason"],
        "reject_pair": r.get("pair"),
        "completions": r.get("completions"),
        "input": r.get("input") or None,
    }


def _invalid_row(data: Mapping[str, Any], where: str, reason: str) -> dict[str, Any]:
    # label refuses such an input file up front (exit 2); a pipeline keeps going and says why.
    prompt = data.get("prompt")
    try:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else as_messages(prompt, "prompt")
    except ValueError:
        messages = None
    return {
        "id": content_hash(dict(data)),
        "prompt": messages,
        REJECT_KIND: "invalid",
        "reject_reason": f"invalid: {reason}",
        "input": where or None,
    }


def _error_reject(item: LabelItem, reason: str) -> dict[str, Any]:
    prompt = [{"role": "user", "content": item.prompt}] if isinstance(item.prompt, str) else list(item.prompt)
    return {
        "id": item.key,
        "kind": "error",
        "reason": f"error: {reason}",
        "input": item.where,
        "pair": None,
        "preference": None,
        "prompt": prompt,
        "completions": item.completions,
        "judge": None,
    }


def pairs_only(batch: Any) -> pa.Table:
    """JudgeLabeler's data rows with exactly label's output columns (``map_batches(pairs_only)``)."""
    table = as_table(batch)
    kept = table.filter(pc.is_null(table.column(REJECT_KIND)))
    return kept.drop_columns([c for c in REJECT_COLUMNS if c in kept.column_names])


def rejects_only(batch: Any) -> pa.Table:
    """JudgeLabeler's rejects with label's rejects-file fields (id, kind, reason, input, pair, ...)."""
    table = as_table(batch)
    t = table.filter(pc.is_valid(table.column(REJECT_KIND)))
    columns = {
        "id": t.column("id"),
        "kind": t.column(REJECT_KIND),
        "reason": t.column("reject_reason"),
        "input": t.column("input"),
        "pair": t.column("reject_pair"),
        "preference": t.column("preference"),
        "prompt": t.column("prompt"),
        "completions": t.column("completions"),
        "judge": t.column("judge"),
    }
    return pa.table(columns)


def split_labels(ds: Any) -> tuple[Any, Any]:
    """``(pairs, rejects)`` of a Ray ``Dataset`` that JudgeLabeler produced (two lazy datasets)."""
    return (
        ds.map_batches(pairs_only, batch_format="pyarrow"),
        ds.map_batches(rejects_only, batch_format="pyarrow"),
    )


def reward_pairs(batch: Any, *, prompt_column: str = "prompt", completions_column: str = "completions") -> pa.Table:
    """Best vs worst completion by reward, from RewardScorer's list-wise output, as TRL preference rows.

    Rows ``{prompt, completions, score: [..]}`` become ``{id, prompt, chosen, rejected,
    score_chosen, score_rejected}`` in TRL's conversational format with an explicit prompt (the
    ``id`` is label's pair id for that row and pair). A row with fewer than two scored completions,
    or whose best and worst scores are equal, gives no pair.
    """
    table = as_table(batch)
    prompts = _column(table, prompt_column)
    comps = _column(table, completions_column)
    scores = _column(table, SCORE)
    rows: list[dict[str, Any]] = []
    for p, cs, ss in zip(prompts, comps, scores, strict=True):
        if not cs or not ss:
            continue
        scored = [(s, i) for i, s in enumerate(ss) if s is not None]
        if len(scored) < 2:
            continue
        best = max(scored, key=lambda t: (t[0], -t[1]))
        worst = min(scored, key=lambda t: (t[0], t[1]))
        if best[0] == worst[0]:
            continue
        prompt = _prompt(p)
        texts = [as_completion(c, f"completions[{i}]") for i, c in enumerate(cs)]
        item = LabelItem(0, "", "", {"prompt": prompt, "completions": texts}, prompt, texts)
        rows.append(
            {
                "id": pair_id(item, best[1], worst[1]),
                "prompt": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
                "chosen": [{"role": "assistant", "content": texts[best[1]]}],
                "rejected": [{"role": "assistant", "content": texts[worst[1]]}],
                "score_chosen": best[0],
                "score_rejected": worst[0],
            }
        )
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt", pa.list_(message)),
            ("chosen", pa.list_(message)),
            ("rejected", pa.list_(message)),
            ("score_chosen", pa.float64()),
            ("score_rejected", pa.float64()),
        ]
    )
    return pa.Table.from_pylist(rows, schema=schema)


__all__ = [
    "Columns",
    "JudgeLabeler",
    "LocalRewardScorer",
    "RewardScorer",
    "RowsFailedError",
    "as_table",
    "labels_schema",
    "pairs_only",
    "rejects_only",
    "reward_pairs",
    "split_labels",
]
