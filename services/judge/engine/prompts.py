"""Judge prompts from versioned template files, with fenced, escaped candidate texts.

A template set is a folder of ``.md`` files (``pairwise``, ``pairwise_reference``, ``grade``,
``grade_reference``, ``criteria``), each split into named sections by ``=== name ===`` lines.
``{{name}}`` placeholders are filled in one pass over the template text, so a placeholder that
appears inside a candidate text is never expanded. The template hash (sha256 of every file of
the set, 12 hex digits) goes into every response and every cache key.

Fences: each data section (request, reference, responses) sits between ``<<<NAME_nonce>>>`` and
``<<<END_NAME_nonce>>>``. The nonce comes from a hash of the whole item, so it is stable (the
cache key stays stable) yet unknowable to the author of a response (it depends on that very
text). On top of that, data texts are escaped: runs of three or more ``<`` or ``>`` become
``‹``/``›`` runs, so nothing inside data can even look like a fence line, and chat-template role
markers (``<|im_start|>`` and the like) are broken up (``<|`` → ``< |``, ``|>`` → ``| >``).
The system message tells the judge that fenced text is data, never instructions.
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


def escape_data(text: str) -> str:
    """Make a data text unable to close or open a fence, or to forge a chat-template role turn."""
    text = re.sub(r"<{3,}", lambda m: "‹" * len(m.group()), text)
    text = re.sub(r">{3,}", lambda m: "›" * len(m.group()), text)
    return text.replace("<|", "< |").replace("|>", "| >")


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

    def criteria(self, rubric: str | None, principle: str | None) -> str:
        t = self._templates["criteria"]
        parts = []
        if rubric is not None:
            parts.append(_fill(t.section("rubric"), {"rubric": rubric}))
        if principle is not None:
            parts.append(_fill(t.section("principle"), {"principle": principle}))
        return "\n".join(parts) if parts else t.section("default")

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
