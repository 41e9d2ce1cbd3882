"""Backend agreement: does a faster backend prefer the same responses as float32 torch?

For ``n`` real preference pairs, the chosen and the rejected response are scored with float32
torch (the reference) and with each candidate backend (torch bfloat16/float16, ONNX Runtime
float32/int8). Per backend: max and mean |Δscore| over every item, score correlation, pairwise
agreement (the same response preferred as by float32) overall and on the pairs whose float32
margin exceeds a threshold (where a numerics change must never flip the preference), and
throughput on one common timed subset of the items, so that speed-ups compare like with like.

Reference scores are cached on disk per model revision, device and token ids, so a rerun with
other backends or more pairs only scores what is new. ONNX exports are made once into the cache.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import hashlib
import json
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.runtime.backends.base import RewardBackend
from services.runtime.chat import ChatMessage, Prompt
from services.runtime.items import EncodedItem, RewardInput

REFERENCE = "torch-float32"
BACKENDS = ("torch-bfloat16", "torch-float16", "onnx-float32", "onnx-int8")
DEFAULT_BACKENDS = ("torch-bfloat16", "torch-float16", "onnx-float32")
MIN_AGREEMENT = 0.99  # the bar: overall agreement, and 100% above the margin threshold
CACHE_FORMAT = 1


class AgreementInputError(ValueError):
    """Bad input (pairs file, backend names): reported as one line, exit 2."""


# -- pairs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    """One human judgment: ``chosen`` was preferred to ``rejected`` as the answer to ``prompt``."""

    id: str
    prompt: Prompt
    chosen: str
    rejected: str

    def inputs(self) -> tuple[RewardInput, RewardInput]:
        return RewardInput.of_pair(self.prompt, self.chosen), RewardInput.of_pair(self.prompt, self.rejected)


def hh_pairs(data_dir: Path, n: int, *, seed: int = 0) -> list[PreferencePair]:
    """``n`` pairs drawn (seeded) from the HH-RLHF helpful-base and harmless-base test files."""
    from rlhf_train.hh_rlhf import load_pairs

    try:
        pairs, _ = load_pairs(data_dir)
    except FileNotFoundError as exc:
        raise AgreementInputError(str(exc)) from None
    chosen = random.Random(seed).sample(pairs, min(n, len(pairs)))
    return [PreferencePair(f"{p.source}:{p.index}", p.prompt, p.chosen, p.rejected) for p in chosen]


def file_pairs(path: Path, n: int) -> list[PreferencePair]:
    """The first ``n`` rows of a ``.jsonl`` (or ``.jsonl.gz``) file of
    ``{"prompt": str | [messages], "chosen": str, "rejected": str, "id"?: str}``
    (``chosen``/``rejected`` may also be one assistant message, or a list holding one)."""
    if not path.is_file():
        raise AgreementInputError(f"--pairs-file {path} does not exist")
    opener: Any = gzip.open if path.suffix == ".gz" else open
    out: list[PreferencePair] = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if len(out) >= n:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(
                    PreferencePair(
                        str(row.get("id", f"{path.name}:{line_no}")),
                        _prompt(row["prompt"]),
                        _response(row["chosen"]),
                        _response(row["rejected"]),
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise AgreementInputError(
                    f"{path}:{line_no}: expected {{prompt, chosen, rejected}} ({type(exc).__name__}: {exc})"
                ) from None
    if not out:
        raise AgreementInputError(f"--pairs-file {path} holds no pairs")
    return out


def _prompt(value: Any) -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return tuple(ChatMessage(str(m["role"]), str(m["content"])) for m in value)
    raise ValueError("prompt must be a string or a non-empty list of {role, content} messages")


def _response(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = value["content"]
    if not isinstance(value, str) or not value:
        raise ValueError("chosen/rejected must be a non-empty string or one assistant message")
    return value


# -- backends ----------------------------------------------------------------------------------


def parse_backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown or not names:
        raise AgreementInputError(
            f"unknown backend(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(BACKENDS)}"
        )
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class RunConfig:
    model_dir: Path
    device: str = "cpu"
    threads: int | None = None
    max_length: int | None = None
    batch_tokens: int = 512
    margin: float = 0.1
    timing_items: int = 128
    cache: Path | None = None  # None: no reference cache; ONNX exports then go to the default cache
    seed: int = 0
    progress: bool = True


def open_backend(name: str, config: RunConfig) -> RewardBackend:
    """``torch-<dtype>`` or ``onnx-<float32|int8>`` of ``config.model_dir`` (ONNX exported once, cached)."""
    kind, _, dtype = name.partition("-")
    if kind == "torch":
        from services.runtime.backends.torch_backend import TorchRewardBackend

        return TorchRewardBackend(
            config.model_dir,
            dtype=dtype,  # type: ignore[arg-type]  # one of DTYPES, checked by parse_backends
            device=config.device,
            max_length=config.max_length,
            threads=config.threads,
            prefix_sharing=False,  # items are scored one batch at a time; sharing is not measured here
        )
    from services.runtime.backends.onnx_backend import OnnxRewardBackend
    from services.runtime.onnx_export import cached_export

    root = config.cache / "onnx" if config.cache is not None else None
    export = cached_export(config.model_dir, quantize="int8" if dtype == "int8" else None, root=root)
    return OnnxRewardBackend(export, device=config.device, max_length=config.max_length, threads=config.threads)


def batches(items: Sequence[EncodedItem], budget: int) -> Iterator[list[int]]:
    """Indices of ``items``, shortest first, in batches whose padded size (rows × longest) stays
    within ``budget`` tokens (a longer item runs alone)."""
    order = sorted(range(len(items)), key=lambda i: items[i].num_tokens)
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * items[i].num_tokens > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def score_all(
    backend: RewardBackend, items: Sequence[EncodedItem], budget: int, *, desc: str, progress: bool
) -> tuple[np.ndarray, float]:
    """Scores ``[len(items), num_labels]`` in input order, and the seconds spent in ``forward``."""
    from tqdm import tqdm

    out = np.zeros((len(items), backend.info.num_labels), dtype=np.float32)
    spent = 0.0
    with tqdm(total=len(items), desc=desc, unit="seq", disable=not progress, dynamic_ncols=True) as bar:
        for idx in batches(items, budget):
            t0 = time.perf_counter()
            out[idx] = backend.forward([items[i] for i in idx])
            spent += time.perf_counter() - t0
            bar.update(len(idx))
    return out, spent


def throughput(backend: RewardBackend, items: Sequence[EncodedItem], budget: int) -> float | None:
    """Sequences per second over ``items`` (after one warm-up batch); None when there are none."""
    if not items:
        return None
    first = next(batches(items, budget))
    backend.forward([items[i] for i in first])  # warm-up: lazy init, allocator, thread pool
    _, seconds = score_all(backend, items, budget, desc="", progress=False)
    return len(items) / seconds if seconds > 0 else None


# -- reference cache ---------------------------------------------------------------------------


def item_key(item: EncodedItem) -> str:
    data = np.asarray(item.input_ids, dtype=np.int64).tobytes()
    if item.token_type_ids:
        data += b"|" + np.asarray(item.token_type_ids, dtype=np.int64).tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


class ReferenceCache:
    """Float32 reference scores of one model revision on one device type, by token ids."""

    def __init__(self, folder: Path | None, revision: str, device: str) -> None:
        self.path = folder / f"reference-{revision}-{device.split(':')[0]}-v{CACHE_FORMAT}.npz" if folder else None
        self.scores: dict[str, np.ndarray] = {}
        if self.path is not None and self.path.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError), np.load(self.path) as z:
                self.scores = dict(zip(z["keys"].tolist(), z["scores"], strict=True))

    def save(self) -> None:
        if self.path is None or not self.scores:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp.npz")
        keys = sorted(self.scores)
        np.savez(tmp, keys=np.asarray(keys), scores=np.stack([self.scores[k] for k in keys]).astype(np.float32))
        os.replace(tmp, self.path)


# -- metrics -----------------------------------------------------------------------------------


@dataclass
class BackendResult:
    """One row of the report (the reference row has zero differences by definition)."""

    name: str
    dtype: str
    device: str
    max_abs_diff: float
    mean_abs_diff: float
    score_correlation: float | None
    agreement: float
    agree: int
    pairs: int
    large_margin_agreement: float | None
    large_margin_agree: int
    large_margin_pairs: int
    pairwise_accuracy: float  # chosen > rejected (vs the human label), for context
    throughput_seq_s: float | None
    speedup_vs_fp32: float | None = None
    same_tokens: bool = True
    meets_criterion: bool = False
    disagreements: list[str] = field(default_factory=list)  # pair ids (the first 20)


def scalar(scores: np.ndarray) -> np.ndarray:
    """One score per item: the only label, or the mean of several (the service's default)."""
    return scores[:, 0] if scores.shape[1] == 1 else scores.mean(axis=1)


def compare(
    name: str,
    info: Any,
    pair_ids: Sequence[str],
    ref: np.ndarray,
    got: np.ndarray,
    *,
    margin: float,
    seq_s: float | None,
    same_tokens: bool,
) -> BackendResult:
    """``ref``/``got``: ``[2 × pairs, num_labels]``, chosen and rejected interleaved."""
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    r, g = scalar(ref).astype(np.float64), scalar(got).astype(np.float64)
    ref_margin, got_margin = r[0::2] - r[1::2], g[0::2] - g[1::2]
    same = np.sign(ref_margin) == np.sign(got_margin)
    large = np.abs(ref_margin) > margin
    corr = float(np.corrcoef(r, g)[0, 1]) if r.std() > 0 and g.std() > 0 else None
    n_large = int(large.sum())
    agreement = float(same.mean())
    large_agreement = float(same[large].mean()) if n_large else None
    return BackendResult(
        name=name,
        dtype=info.dtype,
        device=info.device,
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        score_correlation=corr,
        agreement=agreement,
        agree=int(same.sum()),
        pairs=len(same),
        large_margin_agreement=large_agreement,
        large_margin_agree=int(same[large].sum()),
        large_margin_pairs=n_large,
        pairwise_accuracy=float((got_margin > 0).mean()),
        throughput_seq_s=seq_s,
        same_tokens=same_tokens,
        meets_criterion=agreement >= MIN_AGREEMENT and (large_agreement is None or large_agreement == 1.0),
        disagreements=[pair_ids[i] for i in np.flatnonzero(~same)[:20]],
    )


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Report:
    model: dict[str, str]
    pairs: int
    source: str
    config: dict[str, Any]
    reference_cached_items: int
    results: list[BackendResult]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def run(pairs: Sequence[PreferencePair], backends: Sequence[str], config: RunConfig, *, source: str) -> Report:
    """Score ``pairs`` with the reference and every backend; the report (nothing written)."""
    import torch

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    pair_ids = [p.id for p in pairs]
    inputs = [x for p in pairs for x in p.inputs()]  # chosen, rejected, chosen, ...
    rng = random.Random(config.seed)
    timed = sorted(rng.sample(range(len(inputs)), min(config.timing_items, len(inputs))))

    ref_backend = open_backend(REFERENCE, config)
    ref_items = ref_backend.encode(inputs)
    cache = ReferenceCache(
        config.cache / "agreement" if config.cache else None, ref_backend.info.revision, config.device
    )
    keys = [item_key(it) for it in ref_items]
    missing = [i for i, k in enumerate(keys) if k not in cache.scores]
    cached = len(ref_items) - len(missing)
    if missing:
        todo = [ref_items[i] for i in missing]
        scores, _ = score_all(ref_backend, todo, config.batch_tokens, desc=REFERENCE, progress=config.progress)
        for i, row in zip(missing, scores, strict=True):
            cache.scores[keys[i]] = row
        cache.save()
    ref = np.stack([cache.scores[k] for k in keys])
    ref_seq_s = throughput(ref_backend, [ref_items[i] for i in timed], config.batch_tokens)
    results = [
        compare(
            REFERENCE, ref_backend.info, pair_ids, ref, ref, margin=config.margin, seq_s=ref_seq_s, same_tokens=True
        )
    ]
    model = {"dir": str(config.model_dir), "id": ref_backend.info.id, "revision": ref_backend.info.revision}
    del ref_backend
    gc.collect()

    for name in backends:
        backend = open_backend(name, config)
        items = backend.encode(inputs)
        same_tokens = all(a.input_ids == b.input_ids for a, b in zip(items, ref_items, strict=True))
        got, _ = score_all(backend, items, config.batch_tokens, desc=name, progress=config.progress)
        seq_s = throughput(backend, [items[i] for i in timed], config.batch_tokens)
        results.append(
            compare(name, backend.info, pair_ids, ref, got, margin=config.margin, seq_s=seq_s, same_tokens=same_tokens)
        )
        del backend
        gc.collect()

    for row in results:
        if row.throughput_seq_s and ref_seq_s:
            row.speedup_vs_fp32 = row.throughput_seq_s / ref_seq_s
    return Report(
        model=model,
        pairs=len(pairs),
        source=source,
        config={
            "device": config.device,
            "threads": config.threads if config.threads is not None else torch.get_num_threads(),
            "max_length": config.max_length,
            "batch_tokens": config.batch_tokens,
            "margin_threshold": config.margin,
            "timing_items": len(timed),
            "seed": config.seed,
            "min_agreement": MIN_AGREEMENT,
        },
        reference_cached_items=cached,
        results=results,
    )


# -- output ------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown(report: Report) -> str:
    """The report as a Markdown table (plus the settings it was measured with)."""
    m = report.config["margin_threshold"]
    lines = [
        f"Model `{report.model['id']}` (revision {report.model['revision']}), {report.pairs} pairs from "
        f"{report.source}; reference torch float32; device {report.config['device']}, "
        f"{report.config['threads']} threads, batch budget {report.config['batch_tokens']} tokens; "
        f"throughput over the same {report.config['timing_items']} items for every backend.",
        "",
        f"| backend | max abs Δ | mean abs Δ | corr | agreement | agreement, abs fp32 margin > {m:g} | seq/s "
        f"| × fp32 | ≥ {100 * MIN_AGREEMENT:g}% and 100% above margin |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in report.results:
        corr = "n/a" if r.score_correlation is None else f"{r.score_correlation:.4f}"
        seq = "n/a" if r.throughput_seq_s is None else f"{r.throughput_seq_s:.2f}"
        speed = "n/a" if r.speedup_vs_fp32 is None else f"{r.speedup_vs_fp32:.2f}×"
        tokens = "" if r.same_tokens else " (tokens differ!)"
        lines.append(
            f"| {r.name}{tokens} | {r.max_abs_diff:.3g} | {r.mean_abs_diff:.3g} | {corr} | {_pct(r.agreement)} "
            f"({r.agree}/{r.pairs}) | {_pct(r.large_margin_agreement)} ({r.large_margin_agree}/{r.large_margin_pairs}) "
            f"| {seq} | {speed} | {'yes' if r.meets_criterion else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def write(report: Report, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "results.json", out / "results.md"
    js.write_text(report.to_json(), encoding="utf-8")
    md.write_text(markdown(report), encoding="utf-8")
    return js, md
