"""Judge prompts from versioned template files, with fenced, escaped candidate texts.

A template set is a folder of ``.md`` files (``pairwise``, ``pairwise_reference``, ``grade``,
``grade_reference``, ``criteria``), each split into named sections by ``=== name ===`` lines.
``{{name}}`` placeholders are filled in one pass over the template text, so a placeholder that
appears inside a candidate text is never expanded. The template hash (sha256 of every file of
the set, 12 hex digits) goes into every response and every cache key.

Fences: each data section (request, reference, responses) and each criteria block (the request's
rubric, a principle) sits between ``<<<NAME_nonce>>>`` and ``<<<END_NAME_nonce>>>``. The nonce
comes from a hash of the whole item, so it is stable (the cache key stays stable) yet unknowable
to the author of a response, rubric or principle (it depends on that very text). On top of that,
every text a request brings (prompt, responses, reference, rubric, principles) is escaped
(:func:`escape_data`): runs of three or more ``<`` or ``>`` become ``‹``/``›`` runs, so nothing
inside can even look like a fence line, and chat-template turn markers are broken up (``<|`` →
``< |``, ``|>`` → ``| >`` for ChatML and Llama 3; ``< start_of_turn>`` for Gemma; ``[ INST]`` and
``<< SYS>>`` for Llama 2 and Mistral). The system message tells the judge that fenced text never
instructs it: data is evaluated, a rubric or principle only names the criteria.

Escaping is what a remote model sees. The local backend also tokenizes every special or added
token of its model that appears in a message's content as plain text (see
:mod:`services.judge.backends.local_tokens`), whatever its spelling.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from services.judge.types import JudgePrompt
from services.runtime.chat import ChatMessage

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
KINDS = ("pairwise", "pairwise_reference", "grade", "grade_reference", "criteria")
_SECTION = re.compile(r"^=== ([a-z_]+) ===[ \t]*$", re.MULTILINE)
_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")


# Turn markers of the chat formats whose markers are not "<|...|>": Gemma's, and Llama 2's and
# Mistral's. A server that renders a chat template and honours special tokens inside message
# content (vLLM does) would read them as real turns; a space after the opening bracket makes them
# plain text for every tokenizer, and a reader still sees what was written.
_TURN_MARKERS = re.compile(r"<(?=/?(?:start_of_turn|end_of_turn)>)|\[(?=/?(?:INST|SYSTEM_PROMPT)\])|<<(?=/?SYS>>)")


def escape_data(text: str) -> str:
    """Make a request's text unable to close or open a fence, or to forge a chat-template turn."""
    # Each rule only where it can apply: a substring test is ~50x cheaper than a substitution
    # pass, and a prompt of a million characters is escaped on the event loop.
    if "<<<" in text:
        text = re.sub(r"<{3,}", lambda m: "‹" * len(m.group()), text)
    if ">>>" in text:
        text = re.sub(r">{3,}", lambda m: "›" * len(m.group()), text)
    if "_of_turn>" in text or "INST]" in text or "SYSTEM_PROMPT]" in text or "SYS>>" in text:
        text = _TURN_MARKERS.sub(lambda m: m.group() + " ", text)
    if "|" in text:
        text = text.replace("<|", "< |").replace("|>", "| >")
    return text


def render_prompt(prompt: JudgePrompt) -> str:
    """A judge prompt as text: a string as is, messages as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.role}: {m.content}" for m in prompt)


def canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(obj: object) -> str:
    return hashlib.sha256(canonical(obj).encode("utf-8")).hexdigest()


def prompt_json(prompt: JudgePrompt) -> object:
    return prompt if isinstance(prompt, str) else [[m.role, m.content] for m in prompt]


@dataclass(frozen=True)
class _Template:
    sections: dict[str, str]

    def section(self, name: str) -> str:
        try:
            return self.sections[name]
        except KeyError:
            raise ValueError(f"template section {name!r} is missing") from None


def _parse(text: str, name: str) -> _Template:
    parts = _SECTION.split(text)
    if parts[0].strip():
        raise ValueError(f"template {name}: text before the first '=== section ===' line")
    sections = {parts[i]: parts[i + 1].strip("\n") for i in range(1, len(parts), 2)}
    return _Template(sections)


def _fill(template: str, values: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise ValueError(f"template placeholder {{{{{key}}}}} has no value")
        return values[key]

    return _PLACEHOLDER.sub(sub, template)


class TemplateSet:
    """One versioned set of judge templates, loaded once at engine start."""

    def __init__(self, name_or_path: str = "default") -> None:
        folder = Path(name_or_path)
        if not folder.is_dir():
            folder = TEMPLATES_DIR / name_or_path
        if not folder.is_dir():
            raise ValueError(
                f"judge template set {name_or_path!r} not found (not a folder, nor one under {TEMPLATES_DIR})"
            )
        digest = hashlib.sha256()
        self._templates: dict[str, _Template] = {}
        for kind in KINDS:
            path = folder / f"{kind}.md"
            text = path.read_text(encoding="utf-8")
            digest.update(f"{kind}\0{len(text)}\0".encode())
            digest.update(text.encode("utf-8"))
            self._templates[kind] = _parse(text, str(path))
        self.name = name_or_path
        self.hash = digest.hexdigest()[:12]
        for kind in KINDS[:4]:
            for section in ("system", "user", "verdict", "verdict_rationale"):
                self._templates[kind].section(section)

    def criteria(self, rubric: str | None, principle: str | None, *, nonce: str | None = None) -> str:
        """The criteria section: the default, or the rubric and the principle, escaped and fenced
        with ``nonce`` (the item's: required with a rubric or a principle)."""
        t = self._templates["criteria"]
        if rubric is None and principle is None:
            return t.section("default")
        if nonce is None:
            raise ValueError("a rubric or a principle is fenced: criteria() needs the item's nonce")
        parts = []
        if rubric is not None:
            parts.append(_fill(t.section("rubric"), {"rubric": escape_data(rubric), "nonce": nonce}))
        if principle is not None:
            parts.append(_fill(t.section("principle"), {"principle": escape_data(principle), "nonce": nonce}))
        return "\n".join(parts)

    def _render(self, kind: str, values: dict[str, str], rationale: bool) -> tuple[ChatMessage, ...]:
        t = self._templates[kind]
        values = dict(values)
        values["verdict"] = _fill(t.section("verdict_rationale" if rationale else "verdict"), values)
        return (
            ChatMessage("system", _fill(t.section("system"), values)),
            ChatMessage("user", _fill(t.section("user"), values)),
        )

    def pairwise(
        self,
        *,
        prompt: JudgePrompt,
        first: str,
        second: str,
        reference: str | None,
        criteria: str,
        nonce: str,
        rationale: bool,
    ) -> tuple[ChatMessage, ...]:
        values = {
            "nonce": nonce,
            "criteria": criteria,
            "prompt": escape_data(render_prompt(prompt)),
            "response_a": escape_data(first),
            "response_b": escape_data(second),
        }
        kind = "pairwise"
        if reference is not None:
            kind = "pairwise_reference"
            values["reference"] = escape_data(reference)
        return self._render(kind, values, rationale)

    def grade(
        self,
        *,
        prompt: JudgePrompt,
        response: str,
        reference: str | None,
        criteria: str,
        scale: tuple[int, int],
        nonce: str,
        rationale: bool,
    ) -> tuple[ChatMessage, ...]:
        values = {
            "nonce": nonce,
            "criteria": criteria,
            "prompt": escape_data(render_prompt(prompt)),
            "response": escape_data(response),
            "lo": str(scale[0]),
            "hi": str(scale[1]),
        }
        kind = "grade"
        if reference is not None:
            kind = "grade_reference"
            values["reference"] = escape_data(reference)
        return self._render(kind, values, rationale)
