"""Build a judge backend from the server's settings (``--backend``, ``--model``, ``--base-url``, ...).

Defaults: ``local`` with no model serves the embedded SmolLM2-135M-Instruct judge; ``openai``,
``openai-compatible`` and ``anthropic`` need ``--model`` (passed to the provider as is);
``openai-compatible`` needs ``--base-url``. API keys come from the SDKs' own environment
variables (``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``) unless ``api_key`` is given. SDKs are
imported only for the backend that is built.
"""

from __future__ import annotations

from typing import Literal, cast

from services.judge.backends.base import JudgeBackend
from services.runtime.device import Dtype

BackendName = Literal["local", "openai", "anthropic", "openai-compatible", "scripted"]
BACKENDS: tuple[str, ...] = ("local", "openai", "anthropic", "openai-compatible", "scripted")


class BackendConfigError(ValueError):
    """The settings do not describe a usable backend (message says which flag to fix)."""


def build_backend(
    name: BackendName | str,
    *,
    model: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 60.0,
    soft_mode: Literal["verbalised", "samples"] = "verbalised",
    samples: int = 5,
    top_logprobs: int = 20,
    temperature: float | None = None,
    dtype: Dtype = "float32",
    device: str = "auto",
    threads: int | None = None,
    max_batch_tokens: int = 8192,
    max_queue_items: int = 8192,
    max_prompt_chars: int | None = None,
) -> JudgeBackend:
    """One backend. ``soft_mode``/``samples`` apply to ``anthropic``; ``top_logprobs`` to the
    openai backends; ``dtype``/``device``/``threads``/``max_batch_tokens``/``max_queue_items``/
    ``max_prompt_chars`` to ``local`` (whose ``model`` is a checkpoint folder; the engine enforces
    ``max_prompt_chars`` for every backend). ``temperature`` None means each backend's default (0
    for openai; the provider's default for anthropic)."""
    if name == "local":
        if base_url:
            raise BackendConfigError("--base-url does not apply to the local backend (did you mean openai-compatible?)")
        from services.judge.backends.local_backend import LocalBackend

        try:
            return LocalBackend(
                model, dtype=dtype, device=device, threads=threads, max_batch_tokens=max_batch_tokens,
                max_queue_items=max_queue_items, max_prompt_chars=max_prompt_chars,
            )  # fmt: skip
        except (FileNotFoundError, ValueError) as exc:
            raise BackendConfigError(f"the local backend cannot load --model {model or '(default)'}: {exc}") from None
    if name in ("openai", "openai-compatible"):
        if not model:
            raise BackendConfigError(f"the {name} backend needs --model (the provider's model name, passed as is)")
        if name == "openai-compatible" and not base_url:
            raise BackendConfigError(
                "the openai-compatible backend needs --base-url (e.g. http://127.0.0.1:8000/v1 for vLLM)"
            )
        from services.judge.backends.openai_backend import OpenAIBackend

        try:
            return OpenAIBackend(
                model,
                base_url=base_url,
                api_key=api_key,
                name=cast(Literal["openai", "openai-compatible"], name),
                timeout_s=timeout_s,
                temperature=0.0 if temperature is None else temperature,
                top_logprobs=top_logprobs,
            )
        except ValueError as exc:
            raise BackendConfigError(str(exc)) from None
    if name == "anthropic":
        if not model:
            raise BackendConfigError("the anthropic backend needs --model (e.g. claude-sonnet-4-5, passed as is)")
        from services.judge.backends.anthropic_backend import AnthropicBackend

        try:
            return AnthropicBackend(
                model,
                api_key=api_key,
                base_url=base_url,
                timeout_s=timeout_s,
                mode=soft_mode,
                samples=samples,
                temperature=temperature,
            )
        except ValueError as exc:
            raise BackendConfigError(str(exc)) from None
    if name == "scripted":
        try:
            from services.judge.backends import scripted
        except ImportError:
            raise BackendConfigError("the scripted backend is not available in this build") from None
        factory = getattr(scripted, "build", None) or getattr(scripted, "ScriptedBackend", None)
        if factory is None:
            raise BackendConfigError("the scripted backend module has no ScriptedBackend")
        backend: JudgeBackend = factory()
        return backend
    raise BackendConfigError(f"unknown judge backend {name!r}; choose one of {', '.join(BACKENDS)}")
