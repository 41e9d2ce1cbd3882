"""Which model the bench serves, and the unbatched reference scores it checks servers against.

``default``: the embedded SmolLM2-135M reward model. ``tiny``: a random-initialised 4-layer
Llama reward model (hidden 256, seeded) with SmolLM2's tokenizer, so texts tokenize like the
real model's and the bench measures server overhead rather than arithmetic. Anything else is
a local checkpoint folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TINY_FORMAT = 1
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}


def resolve_model(spec: str) -> Path:
    """The checkpoint folder for ``default``, ``tiny`` or a path (FileNotFoundError if missing)."""
    from services.runtime import default_model

    if spec == "default":
        return default_model.default_model_dir()
    if spec == "tiny":
        return tiny_model_dir()
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint folder (no config.json)")
    return path


def tiny_model_dir(seed: int = 0) -> Path:
    """Build (once, into the cache) the tiny benchmark reward model."""
    from services.runtime import default_model

    backbone = default_model.backbone_dir()
    final = default_model.cache_dir() / f"bench-tiny-rm-{backbone.name.rsplit('-', 1)[-1]}-s{seed}-f{TINY_FORMAT}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        _write_tiny(backbone, tmp, seed)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_tiny(backbone: Path, out: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(backbone)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        use_cache=False,
        **TINY_CONFIG,
    )
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # scores of order 1, so parity differences are visible
    model.save_pretrained(out)
    tok.save_pretrained(out)


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoTokenizer.from_pretrained(model_dir)


def model_max_tokens(model_dir: Path) -> int:
    """The longest input the server accepts unchanged (its default ``--max-length``)."""
    from transformers import AutoConfig

    from services.runtime.rendering import model_max_length

    return model_max_length(load_tokenizer(model_dir), AutoConfig.from_pretrained(model_dir), None)


def reference_scores(
    model_dir: Path, items: Sequence[dict[str, Any]], *, dtype: str = "float32", threads: int | None = None
) -> list[float]:
    """transformers' own score for each item alone: one unpadded sequence per forward,
    ids from the same rendering rules as the server (``text`` verbatim, pairs via the template)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from services.runtime.chat import ChatMessage
    from services.runtime.device import torch_dtype
    from services.runtime.items import RewardInput
    from services.runtime.rendering import Renderer, model_max_length

    if threads is not None:
        torch.set_num_threads(threads)
    tok = load_tokenizer(model_dir)  # also silences transformers' progress bars
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch_dtype(dtype)).eval()
    renderer = Renderer(tok, model_max_length(tok, model.config, None))
    inputs = [
        RewardInput.of_text(w["text"])
        if "text" in w
        else RewardInput.of_pair(tuple(ChatMessage(m["role"], m["content"]) for m in w["prompt"]), w["response"])
        for w in items
    ]
    out = []
    with torch.inference_mode():
        for enc in renderer.encode(inputs):
            ids = torch.tensor([enc.input_ids], dtype=torch.long)
            out.append(float(model(input_ids=ids).logits.float()[0, 0]))
    return out


def subprocess_env(threads: int | None) -> dict[str, str]:
    """The environment of every measured process: idle OpenMP threads sleep instead of spinning
    (several-fold faster on a small shared machine), and the same thread count everywhere."""
    env = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return {**os.environ, **env}
