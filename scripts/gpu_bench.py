"""GPU benchmark: a random-initialised 1B-class Llama reward model served in bf16 on CUDA.

    python scripts/gpu_bench.py                 # on a GPU machine (no download, ~2-4 minutes)
    python scripts/gpu_bench.py --dry-run       # CPU, tiny config, seconds: the same code path

What it does:

1. builds a ``LlamaForSequenceClassification`` (num_labels 1) from a config — hidden 2048,
   16 layers, 32 heads (8 KV heads), MLP 8192, vocabulary 32000: about 1.0B parameters — with
   seeded random weights, and a byte-level BPE tokenizer trained here on synthetic text (no
   download, no packaged model needed); saves both to a temporary folder;
2. starts ``rlhf-feedback serve reward --dtype bfloat16 --device cuda`` on it;
3. drives it with the bench's load generator: C clients × K items per request, every text
   exactly ``--seq-len`` (2048) tokens, after a warm-up; then measures the in-process limit
   (the same backend in this process, token-budget batches, no server) for comparison;
4. prints real tokens/s, samples/s, latency and the model FLOPs utilisation:
   FLOPs per sequence of L tokens = 2·N·L + 4·layers·hidden·L² (PaLM's forward count: every
   non-embedding weight once, both attention matmuls, the causal mask not discounted), MFU =
   achieved FLOP/s ÷ the GPU's dense bf16 peak (H100/H200 SXM 989 TFLOP/s; ``--peak-tflops``).

Nothing in CI depends on the GPU path; ``tests/benchmarks/test_gpu_bench.py`` runs ``--dry-run``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched against torch.cuda.get_device_name().
PEAKS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0), ("A10", 125.0))
DRY_RUN_PEAK = 1.0  # nominal, so that the dry run exercises the MFU line; the number means nothing

FULL: dict[str, Any] = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
}
TINY: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
}
_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their can has more when will would what so if out up about into them "
    "reward model score answer question helpful harmless assistant human policy gradient batch token server "
    "request response prompt training sample value function river mountain city garden window kitchen music "
    "number seven twelve hundred quickly slowly carefully because although however therefore meanwhile"
)
WORDS = tuple(_WORD_TEXT.split())  # a small vocabulary: synthetic text of any length


@dataclass(frozen=True)
class Shape:
    params: int  # non-embedding parameters (what the matmuls touch), score head included
    layers: int
    hidden: int


def flops(shape: Shape, lengths: list[int]) -> float:
    """Forward FLOPs of scoring sequences of these lengths (PaLM's count, see the module doc)."""
    return float(sum(2 * shape.params * n + 4 * shape.layers * shape.hidden * n * n for n in lengths))


def peak_tflops(device: str, explicit: float | None) -> tuple[float, str]:
    if explicit is not None:
        return explicit, "--peak-tflops"
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name()
        for key, value in PEAKS:
            if key in name:
                return value, f"{name} dense bf16"
        raise SystemExit(f"gpu_bench: unknown GPU {name!r}; pass --peak-tflops")
    return DRY_RUN_PEAK, "nominal dry-run peak"


def build_tokenizer(vocab_size: int, max_length: int) -> Any:
    """Byte-level BPE trained on the synthetic corpus (seconds; no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(64)) for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 1000), special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    fast.model_max_length = max_length
    return fast


def build_model(out: Path, dims: dict[str, Any], *, seq_len: int, device: str) -> Shape:
    """Random-initialised (seed 0) reward model + tokenizer saved to ``out``; bf16 on CUDA."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    max_len = max(seq_len, 256)
    tok = build_tokenizer(dims["vocab_size"], max_len)
    config = LlamaConfig(
        **{**dims, "vocab_size": max(dims["vocab_size"], len(tok))},
        max_position_embeddings=max_len,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        use_cache=False,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):  # initialise where it will run: seconds on a GPU for 1B weights
        model: Any = LlamaForSequenceClassification(config)
        model = model.to(dtype)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    embed = model.get_input_embeddings().weight.numel()
    shape = Shape(
        sum(p.numel() for p in model.parameters()) - embed, int(dims["num_hidden_layers"]), int(dims["hidden_size"])
    )
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return shape


def make_texts(model_dir: Path, n: int, seq_len: int) -> list[Any]:
    """``n`` synthetic texts of exactly ``seq_len`` tokens (or a token fewer where a cut would not round-trip)."""
    from benchmarks.models import load_tokenizer
    from benchmarks.texts import truncate_left

    tok = load_tokenizer(model_dir)
    rng = random.Random(1)
    texts: list[Any] = []
    while len(texts) < n:
        words = " ".join(rng.choice(WORDS) for _ in range(seq_len * 2))
        cut = truncate_left(tok, words, seq_len)
        if cut is not None:
            texts.append(cut)
    return texts


def serve_and_measure(args: argparse.Namespace, model_dir: Path, texts: list[Any]) -> list[Any]:
    from benchmarks.loadgen import Load, run_load
    from benchmarks.models import subprocess_env
    from clients.process import ServerProcess

    argv = ["--model", str(model_dir), "--dtype", args.dtype, "--device", args.device]
    argv += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    env = {**subprocess_env(args.threads or None), "PYTHONPATH": str(ROOT)}
    log = Path(args.workdir) / "server.log"
    items = [t.wire() for t in texts]
    load = Load(args.clients, args.items)
    results = []
    with ServerProcess.reward(argv, log_path=log, env=env) as srv:
        srv.wait_ready(timeout=600)
        for _ in range(args.repeats):
            res = asyncio.run(run_load(items, load, args.transport, http_url=srv.http_url, grpc_target=srv.grpc_target))
            if res.errors:
                raise SystemExit(f"gpu_bench: {res.errors} errors, first: {res.first_error}\n{srv.log_tail()}")
            results.append(res)
    return results


def limit(args: argparse.Namespace, model_dir: Path, texts: list[Any]) -> Any:
    from benchmarks.inprocess import measure
    from services.runtime.backends.torch_backend import TorchRewardBackend
    from services.runtime.items import RewardInput

    backend = TorchRewardBackend(model_dir, dtype=args.dtype, device=args.device, threads=args.threads or None)
    encoded = backend.encode([RewardInput.of_text(t.text) for t in texts])
    return max(
        (measure(backend, encoded, args.max_batch_tokens) for _ in range(args.repeats)), key=lambda r: r.samples_per_s
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for details.")
    p.add_argument("--dry-run", action="store_true", help="Tiny config, CPU, float32, short texts: seconds.")
    p.add_argument("--seq-len", type=int, help="Tokens per input. [2048; dry run 64]")
    p.add_argument("--num-texts", type=int, help="Texts per measured run. [512; dry run 16]")
    p.add_argument("--clients", type=int, default=16, help="Concurrent clients. [16]")
    p.add_argument("--items", type=int, default=4, help="Items per request. [4]")
    p.add_argument("--max-batch-tokens", type=int, help="Server and limit token budget. [16384; dry run 256]")
    p.add_argument("--transport", choices=["http", "grpc"], default="grpc", help="[grpc]")
    p.add_argument("--repeats", type=int, default=3, help="Measured runs (best reported, all printed). [3]")
    p.add_argument("--peak-tflops", type=float, help="Peak dense bf16 TFLOP/s (default: by GPU name).")
    p.add_argument("--no-limit", action="store_true", help="Skip the in-process limit.")
    p.add_argument("--workdir", help="Keep the model and the server log here (default: a temporary folder).")
    args = p.parse_args(argv)

    dry = args.dry_run
    args.seq_len = args.seq_len or (64 if dry else 2048)
    args.num_texts = args.num_texts or (16 if dry else 512)
    args.max_batch_tokens = args.max_batch_tokens or (256 if dry else 16384)
    args.device = "cpu" if dry else "cuda"
    args.dtype = "float32" if dry else "bfloat16"
    args.threads = 1 if dry else 0
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("gpu_bench: no CUDA device; use --dry-run to check the script on CPU", file=sys.stderr)
            return 2
    peak, peak_src = peak_tflops(args.device, args.peak_tflops)

    keep = args.workdir is not None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    args.workdir = str(work)
    try:
        started = time.monotonic()
        shape = build_model(work / "model", TINY if dry else FULL, seq_len=args.seq_len, device=args.device)
        print(
            f"model: {shape.params / 1e6:,.1f}M non-embedding parameters, {shape.layers} layers, hidden {shape.hidden} "
            f"({time.monotonic() - started:.0f}s to build)"
        )
        texts = make_texts(work / "model", args.num_texts, args.seq_len)
        lengths = [t.num_tokens for t in texts]
        print(
            f"load: {len(texts)} texts × {statistics.median(lengths):.0f} tokens, {args.clients} clients × "
            f"{args.items} items over {args.transport}, --max-batch-tokens {args.max_batch_tokens}, "
            f"{args.dtype} on {args.device}"
        )
        runs = serve_and_measure(args, work / "model", texts)
        total = flops(shape, lengths)
        for i, r in enumerate(runs):
            print(
                f"run {i + 1}: {r.tokens_per_s:,.0f} tokens/s, {r.samples_per_s:.1f} samples/s, "
                f"p50 {r.latency_ms(50):.0f} ms, p99 {r.latency_ms(99):.0f} ms"
            )
        best = max(runs, key=lambda r: r.tokens_per_s)
        achieved = total / best.seconds / 1e12
        print(f"tokens/s: {best.tokens_per_s:,.0f} (server, best of {len(runs)})")
        print(f"MFU: {100 * achieved / peak:.1f}% ({achieved:.1f} TFLOP/s of {peak:.0f} TFLOP/s, {peak_src})")
        if not args.no_limit:
            lim = limit(args, work / "model", texts)
            lim_tf = total / lim.seconds / 1e12
            print(
                f"in-process limit: {lim.tokens_per_s:,.0f} tokens/s, MFU {100 * lim_tf / peak:.1f}%; "
                f"server / limit = {best.tokens_per_s / lim.tokens_per_s:.2f}"
            )
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
