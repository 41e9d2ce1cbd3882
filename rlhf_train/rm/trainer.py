"""Bradley-Terry reward-model training: :func:`train_reward_model` (``rlhf-feedback train rm``).

Both modes see every pair through the reward service's own torch backend
(:class:`~services.runtime.backends.torch_backend.TorchRewardBackend`): its renderer turns the
``RewardInput`` a client would send into tokens, and its pooling reads the hidden state at the
position the served model reads. What is trained is therefore exactly what is served.

- ``freeze_backbone``: the pooled hidden states are computed once (cached on disk by token ids,
  per model and dtype, so a rerun is instant) and a linear head without bias is fit with
  L-BFGS on ``-logsigmoid(w·(f_chosen - f_rejected) - margin) + λ/2·|w'|²``; λ is chosen on the
  validation slice of the training split, then the head is refit on train + validation
  (:func:`rlhf_train.rm.bradley_terry.fit_bt`).
- full fine-tuning: AdamW on the whole sequence-classification model, both responses of a pair
  in the same batch, loss ``-logsigmoid(r_chosen - r_rejected - margin)``.

Outputs: a Hugging Face sequence-classification checkpoint that ``serve reward --model`` loads
as is, or (``head_only``) the head alone in the format of ``services/runtime/default_head``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_train.jobs.io import InputError
from rlhf_train.rm.bradley_terry import DEFAULT_L2_GRID, bt_loss, fit_bt, pairwise_accuracy
from rlhf_train.rm.data import LoadedData, PrefPair, load_preferences
from rlhf_train.rm.features import FEATURE_CACHE_FORMAT, FeatureCache, item_key, token_batches
from services.runtime.items import EncodedItem, RewardInput

log = logging.getLogger("rlhf_train.rm")

HEAD_TENSOR = "score.weight"
META_FILE = "rlhf_feedback.json"
FALLBACK_L2 = 1e-2  # when the training split has no validation slice to choose λ on


@dataclass(frozen=True)
class RmOptions:
    """Everything ``train rm`` takes; the CLI flags map one to one."""

    data: Path
    out: Path
    model: Path | None = None  # None: the embedded SmolLM2-135M-Instruct backbone
    model_id: str | None = None  # recorded in rlhf_feedback.json; default: the output folder's name
    freeze_backbone: bool = False
    head_only: bool = False
    use_margin: bool = False
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    seed: int = 0
    dtype: str = "float32"  # feature extraction (freeze_backbone); full fine-tuning trains in float32
    device: str = "auto"
    max_length: int | None = None  # None: the model's own maximum, as the service uses
    threads: int | None = None
    batch_tokens: int = 4096  # padded tokens per feature-extraction / evaluation batch
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    feature_cache: Path | None = None
    epochs: int = 1
    lr: float = 1e-5
    batch_size: int = 8  # pairs per micro-batch
    grad_accum: int = 1
    weight_decay: float = 0.0
    quiet: bool = False


@dataclass
class RmResult:
    """What a run produced. ``test_items``/``test_scores`` are the held-out pairs and the trained
    model's scores for them (``[n, 2]``: chosen, rejected), for checks against the served model."""

    mode: str  # "freeze-backbone" or "full"
    out: Path
    metrics_path: Path
    model_dir: Path | None  # the checkpoint (None with head_only)
    head_path: Path | None  # head.safetensors (head_only)
    train_pairs: int
    test_pairs: int
    train_acc: float
    test_acc: float
    train_loss: float
    test_loss: float
    length_baseline_test_acc: float
    seconds: float
    l2: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    test_items: list[tuple[RewardInput, RewardInput]] = field(default_factory=list)
    test_scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.float32))


# -- small helpers ---------------------------------------------------------------------------------


def _progress(total: int, desc: str, unit: str, quiet: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=quiet)


def _validate(opts: RmOptions) -> None:
    if not 0.0 < opts.test_fraction < 1.0:
        raise InputError("--test-fraction must be between 0 and 1 (exclusive): a held-out split is required")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise InputError("--val-fraction must be in [0, 1)")
    if opts.head_only and not opts.freeze_backbone:
        raise InputError("--head-only needs --freeze-backbone (full fine-tuning changes the backbone too)")
    if opts.freeze_backbone and not opts.l2_grid:
        raise InputError("--l2-grid needs at least one value")
    if opts.epochs < 1 or opts.batch_size < 1 or opts.grad_accum < 1:
        raise InputError("--epochs, --batch-size and --grad-accum must be at least 1")
    if opts.lr <= 0:
        raise InputError("--lr must be positive")
    if opts.max_length is not None and opts.max_length < 8:
        raise InputError("--max-length must be at least 8")
    if opts.batch_tokens < 1:
        raise InputError("--batch-tokens must be positive")


def _check_splits(data: LoadedData, opts: RmOptions) -> None:
    n_test = data.count("test")
    n_train = data.count("train") + data.count("val")
    if n_test == 0:
        raise InputError(
            f"the held-out split is empty ({len(data.pairs)} pairs, --test-fraction {opts.test_fraction}): "
            "add data or raise --test-fraction"
        )
    if n_train == 0:
        raise InputError(
            f"the training split is empty ({len(data.pairs)} pairs, --test-fraction {opts.test_fraction}): "
            "add data or lower --test-fraction"
        )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


# -- the base model ----------------------------------------------------------------------------------


@dataclass
class _Base:
    folder: Path  # a sequence-classification folder the torch backend loads
    default_backbone: bool
    cache_name: str  # names the feature-cache folder (with the dtype)


@contextlib.contextmanager
def _base_model(opts: RmOptions) -> Iterator[_Base]:
    """A ``num_labels=1`` sequence-classification folder over ``--model`` (or the default backbone).

    A causal LM (or a classifier with another head) gets a temporary folder that links to its
    files with a rewritten ``config.json``; the score head is then initialised at load time.
    """
    from services.runtime import default_model

    if opts.model is None:
        backbone = default_model.backbone_dir()
        # Features do not depend on the head: a zero head over the backbone, assembled (and
        # cached) exactly as the served default model is.
        zero = np.zeros(default_model.HIDDEN_SIZE, dtype=np.float32)
        folder = default_model.assemble_model_dir(zero, model_id="features-only", allow_zero=True)
        # The cache is named by the backbone's folder, as the run that made the committed head named
        # it (the former rlhf_train/reward_head.py script): its features are reused.
        yield _Base(folder, True, backbone.name)
        return
    model = Path(opts.model)
    config_path = model / "config.json"
    if not config_path.is_file():
        raise InputError(f"--model {model}: not a Hugging Face checkpoint folder (no config.json)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    from services.runtime.device import weights_revision

    cache_name = f"{_slug(model.resolve().name)}-{weights_revision(model)}"
    archs = [str(a) for a in config.get("architectures") or []]
    is_classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    if is_classifier and int(config.get("num_labels", len(config.get("id2label") or {}) or 2)) == 1:
        yield _Base(model, False, cache_name)
        return
    pad = config.get("pad_token_id")
    if pad is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    new_config = {
        **config,
        "architectures": [a.replace("ForCausalLM", "ForSequenceClassification") for a in archs] or None,
        "num_labels": 1,
        "id2label": {"0": "reward"},
        "label2id": {"reward": 0},
        "pad_token_id": pad,
    }
    new_config.pop("problem_type", None)
    with tempfile.TemporaryDirectory(prefix="rlhf-rm-base-") as tmp:
        folder = Path(tmp)
        for entry in model.iterdir():
            if entry.name != "config.json":
                (folder / entry.name).symlink_to(entry.resolve())
        (folder / "config.json").write_text(json.dumps(new_config, indent=2) + "\n", encoding="utf-8")
        yield _Base(folder, False, cache_name)


# -- features and scores ----------------------------------------------------------------------------


def _encode(backend: Any, pairs: Sequence[PrefPair], quiet: bool) -> list[EncodedItem]:
    """``[chosen_0, rejected_0, chosen_1, ...]`` with the service's renderer."""
    from services.common.errors import ServiceError

    items = [x for p in pairs for x in (p.chosen, p.rejected)]
    out: list[EncodedItem] = []
    chunk = 256
    with _progress(len(items), "tokenize", "seq", quiet) as bar:
        for i in range(0, len(items), chunk):
            try:
                out.extend(backend.encode(items[i : i + chunk]))
            except ServiceError as exc:  # the service would refuse this item too
                where = i + exc.item if exc.item is not None else i
                pair = pairs[where // 2]
                raise InputError(f"{pair.source}: {pair.where}: {exc.message}") from None
            bar.update(min(chunk, len(items) - i))
    return out


def extract_features(
    backend: Any, encoded: Sequence[EncodedItem], cache: FeatureCache, *, batch_tokens: int, quiet: bool
) -> tuple[np.ndarray, dict[str, float]]:
    """``[len(encoded), hidden]`` float32 features at the served read position; only what the
    cache lacks is computed (and added to it)."""
    keys = [item_key(it) for it in encoded]
    todo = {k: it for k, it in zip(keys, encoded, strict=True) if k not in cache.data}
    started = time.monotonic()
    tokens = sum(it.num_tokens for it in todo.values())
    with _progress(tokens, "features", "tok", quiet or not todo) as bar:
        last_flush = started
        for batch in token_batches(list(todo.items()), batch_tokens):
            feats = backend.features([it for _, it in batch])
            cache.add([k for k, _ in batch], np.asarray(feats, dtype=np.float32))
            bar.update(sum(it.num_tokens for _, it in batch))
            if time.monotonic() - last_flush > 60.0:  # an interrupted run keeps what it computed
                cache.flush()
                last_flush = time.monotonic()
    cache.flush()
    stats = {
        "computed_sequences": float(len(todo)),
        "cached_sequences": float(len(set(keys)) - len(todo)),
        "computed_tokens": float(tokens),
        "seconds": time.monotonic() - started,
    }
    return np.stack([cache.data[k] for k in keys]).astype(np.float32), stats


def _score_all(backend: Any, encoded: Sequence[EncodedItem], *, batch_tokens: int, quiet: bool) -> np.ndarray:
    """Scores of every item by the backend's own forward (the served code path), in order."""
    scores = np.zeros(len(encoded), dtype=np.float32)
    indexed = [(str(i), it) for i, it in enumerate(encoded)]
    with _progress(len(encoded), "evaluate", "seq", quiet) as bar:
        for batch in token_batches(indexed, batch_tokens):
            out = backend.forward([it for _, it in batch])[:, 0]
            for (i, _), s in zip(batch, out, strict=True):
                scores[int(i)] = s
            bar.update(len(batch))
    return scores


# -- the run ----------------------------------------------------------------------------------------


def train_reward_model(opts: RmOptions) -> RmResult:
    """Train a Bradley-Terry reward model as :class:`RmOptions` says and write it to ``opts.out``.

    Raises :class:`~rlhf_train.jobs.io.InputError` for bad data or options (the CLI's exit 2).
    """
    t0 = time.monotonic()
    _validate(opts)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads hurt on shared CPUs
    import torch

    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    data = load_preferences(
        Path(opts.data),
        seed=opts.seed,
        test_fraction=opts.test_fraction,
        val_fraction=opts.val_fraction,
        use_margin=opts.use_margin,
    )
    _check_splits(data, opts)
    pairs = data.pairs
    log.info(
        "%d pairs (train %d, validation %d, held out %d); skipped %s",
        len(pairs),
        data.count("train"),
        data.count("val"),
        data.count("test"),
        data.skipped or "none",
    )
    from services.runtime.backends.torch_backend import TorchRewardBackend

    with _base_model(opts) as base:
        torch.manual_seed(opts.seed)  # a fresh score head is initialised while loading
        backend = TorchRewardBackend(
            base.folder,
            dtype=opts.dtype if opts.freeze_backbone else "float32",  # type: ignore[arg-type]
            device=opts.device,
            max_length=opts.max_length,
            threads=opts.threads,
            # Items are encoded here without request groups, so nothing is shared anyway; off
            # makes sure gradients only ever flow through the plain forward.
            prefix_sharing=False,
        )
        encoded = _encode(backend, pairs, opts.quiet)
        split = np.array([p.split for p in pairs])
        offsets = np.array([p.margin for p in pairs], dtype=np.float32)
        w: np.ndarray | None = None
        if opts.freeze_backbone:
            w, scores, extra = _train_frozen(backend, base, encoded, split, offsets, opts)
        else:
            scores, extra = _train_full(backend, encoded, split, offsets, opts)
        model_id = opts.model_id or opts.out.resolve().name
        opts.out.mkdir(parents=True, exist_ok=True)
        model_dir = head_path = None
        if opts.head_only:
            assert w is not None
            head_path = _write_head(opts.out, w, base.default_backbone)
        elif w is not None:
            model_dir = _write_frozen_checkpoint(opts.out, base, w, model_id)
        else:
            model_dir = _write_full_checkpoint(opts.out, backend, base, model_id)

    s_c, s_r = scores[0::2], scores[1::2]
    margins = s_c - s_r
    te = split == "test"
    fit = ~te
    longer = np.array([len(p.chosen_text) - len(p.rejected_text) for p in pairs], dtype=np.float64)
    lengths = np.array([it.num_tokens for it in encoded])
    results: dict[str, Any] = {
        "train_pairs": int(fit.sum()),
        "test_pairs": int(te.sum()),
        "train_acc": pairwise_accuracy(margins[fit]),
        "train_loss": bt_loss(margins[fit], offsets[fit] if opts.use_margin else None),
        "test_acc": pairwise_accuracy(margins[te]),
        "test_loss": bt_loss(margins[te], offsets[te] if opts.use_margin else None),
        "length_baseline_test_acc": pairwise_accuracy(longer[te]),
        "length_baseline_train_acc": pairwise_accuracy(longer[fit]),
        "test_score_mean": float(np.concatenate([s_c[te], s_r[te]]).mean()),
        "test_score_std": float(np.concatenate([s_c[te], s_r[te]]).std()),
    }
    mode = "freeze-backbone" if opts.freeze_backbone else "full"
    seconds = time.monotonic() - t0
    metrics: dict[str, Any] = {
        "model_id": model_id,
        "mode": mode,
        "base_model": str(opts.model) if opts.model is not None else "embedded SmolLM2-135M-Instruct backbone",
        "data": {
            "path": str(opts.data),
            "rows": data.rows,
            "pairs": len(pairs),
            "skipped": data.skipped,
            "counts": {sp: data.count(sp) for sp in ("train", "val", "test")},
        },
        "split": {"seed": opts.seed, "test_fraction": opts.test_fraction, "val_fraction": opts.val_fraction},
        "tokens": {
            "max_length": backend.info.max_length,
            "truncated": int(sum(it.truncated for it in encoded)),
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
        },
        "use_margin": opts.use_margin,
        **extra,
        "results": results,
        "seconds_total": seconds,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": backend.info.device,
        },
    }
    if head_path is not None and w is not None:
        metrics["head_sha256"] = hashlib.sha256(head_path.read_bytes()).hexdigest()
    metrics_path = opts.out / "metrics.json"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if opts.head_only:
        (opts.out / "MODEL_CARD.md").write_text(render_head_card(metrics), encoding="utf-8")
    test_idx = np.flatnonzero(te)
    return RmResult(
        mode=mode,
        out=opts.out,
        metrics_path=metrics_path,
        model_dir=model_dir,
        head_path=head_path,
        train_pairs=int(fit.sum()),
        test_pairs=int(te.sum()),
        train_acc=results["train_acc"],
        test_acc=results["test_acc"],
        train_loss=results["train_loss"],
        test_loss=results["test_loss"],
        length_baseline_test_acc=results["length_baseline_test_acc"],
        seconds=seconds,
        l2=extra.get("l2"),
        metrics=metrics,
        test_items=[(pairs[i].chosen, pairs[i].rejected) for i in test_idx],
        test_scores=np.stack([s_c[te], s_r[te]], axis=1).astype(np.float32),
    )


def _train_frozen(
    backend: Any, base: _Base, encoded: list[EncodedItem], split: np.ndarray, offsets: np.ndarray, opts: RmOptions
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Features once, then the BT head; returns the head, every item's score and the metrics part."""
    from services.runtime.default_model import cache_dir

    if not backend.is_decoder:
        raise InputError(
            "--freeze-backbone reads the last-token hidden state of a decoder model; "
            "this model is an encoder: drop --freeze-backbone to fine-tune it"
        )
    folder = opts.feature_cache or (
        cache_dir() / "features" / f"{base.cache_name}-{opts.dtype}-v{FEATURE_CACHE_FORMAT}"
    )
    cache = FeatureCache(folder)
    feats, fstats = extract_features(backend, encoded, cache, batch_tokens=opts.batch_tokens, quiet=opts.quiet)
    diff = feats[0::2] - feats[1::2]
    m = offsets if opts.use_margin else None
    tr, va = split == "train", split == "val"
    grid: list[dict[str, float]] = []
    if tr.any() and va.any() and len(opts.l2_grid) > 1:
        for l2 in opts.l2_grid:
            w = fit_bt(diff[tr], l2, margin=None if m is None else m[tr])
            m_va = diff[va] @ w
            grid.append(
                {
                    "l2": l2,
                    "train_acc": pairwise_accuracy(diff[tr] @ w),
                    "val_acc": pairwise_accuracy(m_va),
                    "val_loss": bt_loss(m_va, None if m is None else m[va]),
                }
            )
            log.info("l2=%g validation accuracy %.4f loss %.4f", l2, grid[-1]["val_acc"], grid[-1]["val_loss"])
        best = max(grid, key=lambda g: (g["val_acc"], -g["val_loss"]))["l2"]
        how = "validation"
    else:
        best = opts.l2_grid[0] if len(opts.l2_grid) == 1 else FALLBACK_L2
        how = "given" if len(opts.l2_grid) == 1 else "fallback (no validation pairs)"
    fit = tr | va
    w = fit_bt(diff[fit], best, margin=None if m is None else m[fit])
    if not np.isfinite(w).all() or not np.any(w):
        raise InputError("the head fit gave no usable weights: are chosen and rejected distinguishable at all?")
    scores = feats @ w
    extra = {
        "features": {"dtype": opts.dtype, "cache": str(folder), **fstats},
        "l2_grid": grid,
        "l2": float(best),
        "l2_choice": how,
    }
    return w.astype(np.float32), scores.astype(np.float32), extra


def _pair_scores(backend: Any, batch: Sequence[EncodedItem]) -> Any:
    """Scores with gradients, through the backend's served path (same padding, positions and
    read position as serving)."""
    return backend.logits(batch)[:, 0]


def _train_full(
    backend: Any, encoded: list[EncodedItem], split: np.ndarray, offsets: np.ndarray, opts: RmOptions
) -> tuple[np.ndarray, dict[str, Any]]:
    """AdamW on the whole model; returns every item's score after training and the metrics part."""
    import torch

    model = backend.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    train_idx = np.flatnonzero(split != "test")
    rng = np.random.default_rng(opts.seed)
    steps_per_epoch = (len(train_idx) + opts.batch_size - 1) // opts.batch_size
    history: list[dict[str, float]] = []
    started = time.monotonic()
    model.train()
    with _progress(steps_per_epoch * opts.epochs, "train", "batch", opts.quiet) as bar:
        for epoch in range(opts.epochs):
            order = rng.permutation(train_idx)
            total, n = 0.0, 0
            optimizer.zero_grad(set_to_none=True)
            for step in range(steps_per_epoch):
                idx = order[step * opts.batch_size : (step + 1) * opts.batch_size]
                batch = [encoded[2 * i] for i in idx] + [encoded[2 * i + 1] for i in idx]
                r = _pair_scores(backend, batch).float()
                r_c, r_r = r[: len(idx)], r[len(idx) :]
                z = r_c - r_r
                if opts.use_margin:
                    z = z - torch.from_numpy(offsets[idx]).to(z.device)
                loss = -torch.nn.functional.logsigmoid(z).mean()
                (loss / opts.grad_accum).backward()
                if (step + 1) % opts.grad_accum == 0 or step + 1 == steps_per_epoch:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                total += float(loss.detach()) * len(idx)
                n += len(idx)
                bar.set_postfix(epoch=epoch + 1, loss=f"{total / n:.4f}", refresh=False)
                bar.update(1)
            history.append({"epoch": epoch + 1, "train_loss_running": total / max(1, n)})
            log.info("epoch %d: running train loss %.4f", epoch + 1, total / max(1, n))
    model.eval()
    train_seconds = time.monotonic() - started
    scores = _score_all(backend, encoded, batch_tokens=opts.batch_tokens, quiet=opts.quiet)
    extra = {
        "training": {
            "epochs": opts.epochs,
            "lr": opts.lr,
            "batch_size": opts.batch_size,
            "grad_accum": opts.grad_accum,
            "weight_decay": opts.weight_decay,
            "steps": steps_per_epoch * opts.epochs,
            "history": history,
            "seconds": train_seconds,
        }
    }
    return scores, extra


# -- outputs ------------------------------------------------------------------------------------------


def head_bytes(weight: np.ndarray) -> bytes:
    """A head file's bytes: one float32 tensor ``score.weight`` ``[1, hidden]`` (default_head's format)."""
    from safetensors.numpy import save

    arr = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).reshape(1, -1))
    return save({HEAD_TENSOR: arr}, metadata={"format": "pt"})


def _write_head(out: Path, w: np.ndarray, default_backbone: bool) -> Path:
    data = head_bytes(w)
    if default_backbone:
        from services.runtime.default_model import load_head

        load_head(data)  # exactly what the service accepts as the embedded default head
    path = out / "head.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def _write_meta(out: Path, model_id: str) -> None:
    (out / META_FILE).write_text(json.dumps({"model_id": model_id}, indent=2) + "\n", encoding="utf-8")


def _write_frozen_checkpoint(out: Path, base: _Base, w: np.ndarray, model_id: str) -> Path:
    """The base model with the fitted head, in float32 whatever dtype the features used."""
    if base.default_backbone:
        from services.runtime.default_model import assemble_model_dir

        assembled = assemble_model_dir(w, model_id=model_id)
        _remove_weights(out)
        for entry in assembled.iterdir():
            if entry.is_file() and not entry.name.startswith("."):
                target = out / entry.name
                target.unlink(missing_ok=True)
                try:  # the 540 MB backbone shard: a hard link where the file system allows
                    os.link(entry, target)
                except OSError:
                    shutil.copyfile(entry, target)
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(base.folder, dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.copy_(torch.from_numpy(w.reshape(1, -1)))
        bias = getattr(model.score, "bias", None)
        if bias is not None:
            bias.zero_()
    _save_checkpoint(out, model, AutoTokenizer.from_pretrained(base.folder), model_id)
    return out


def _write_full_checkpoint(out: Path, backend: Any, base: _Base, model_id: str) -> Path:
    from transformers import AutoTokenizer

    # A fresh tokenizer: the renderer switched the loaded one to left truncation.
    _save_checkpoint(out, backend.model, AutoTokenizer.from_pretrained(base.folder), model_id)
    return out


def _remove_weights(out: Path) -> None:
    """An earlier run's weight files in ``out`` would mix in (transformers prefers a single file)."""
    for pattern in ("model*.safetensors*", "pytorch_model*.bin*"):
        for stale in out.glob(pattern):
            stale.unlink()


def _save_checkpoint(out: Path, model: Any, tokenizer: Any, model_id: str) -> None:
    _remove_weights(out)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _write_meta(out, model_id)


def render_head_card(m: dict[str, Any]) -> str:
    """A short model card for a ``--head-only`` output, from its metrics."""
    r = m["results"]
    c = m["data"]["counts"]
    pct = lambda x: f"{100.0 * x:.1f}%"  # noqa: E731
    feats, tokens = m["features"], m["tokens"]
    lines = [
        f"# {m['model_id']} (head)",
        "",
        "A linear Bradley-Terry head `score.weight` [1, hidden] (float32, no bias) on frozen features of",
        f"{m['base_model']}, trained by `rlhf-feedback train rm --freeze-backbone --head-only`. Assemble it",
        "with its backbone (`services.runtime.default_model.assemble_model_dir`) to serve it.",
        "",
        "## Data",
        "",
        f"`{m['data']['path']}`: {m['data']['pairs']} pairs (train {c['train']}, validation {c['val']},",
        f"held out {c['test']}); skipped rows: {m['data']['skipped'] or 'none'}. Split by a seeded hash of",
        f"the prompt (seed {m['split']['seed']}).",
        "",
        "## Method",
        "",
        f"Features in {feats['dtype']} at the position the served model reads, at most",
        f"{tokens['max_length']} tokens ({tokens['truncated']} sequences truncated). L2 strength",
        f"λ = {m['l2']:g} ({m['l2_choice']}), then refit on train + validation.",
        "",
        "## Results",
        "",
        "| pairs | BT head | longer answer wins |",
        "|---|---|---|",
        f"| held out ({r['test_pairs']}) | **{pct(r['test_acc'])}** | {pct(r['length_baseline_test_acc'])} |",
        f"| train + validation ({r['train_pairs']}) | {pct(r['train_acc'])} | {pct(r['length_baseline_train_acc'])} |",
        "",
        f"Held-out BT loss {r['test_loss']:.4f} (ln 2 = 0.6931 is chance).",
        "",
    ]
    return "\n".join(lines)
