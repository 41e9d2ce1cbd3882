"""Truncation parity: the renderer's cut-before-tokenize rule against tokenizing everything.

    python scripts/check_truncation_parity.py                           # HH-RLHF, 1,000 rows per file, 128 and 256
    python scripts/check_truncation_parity.py --max-length 16 32 64     # more items through a window
    python scripts/check_truncation_parity.py --adversarial --huge-reference   # + hostile strings (~2 min, 10 GiB)

``services/runtime/rendering.py`` tokenizes only a tail window of a long item (its module
docstring). This script checks that the result is what the rule before it gave: tokenize the
whole rendering (with offsets), then keep the last ``max_length`` tokens. :func:`reference_encode`
is that old rule, copied here unchanged as the oracle. For the first ``--rows`` rows of each
HH-RLHF test file (``../shared/data/hh-rlhf``) it encodes the chosen and the rejected
conversation as a ``messages`` item, as a ``prompt``+``response`` item (the parsed prompt and the
final assistant turn) and as raw ``text``, with the embedded default model's tokenizer (SmolLM2),
and prints per maximum length: items, truncated items, items cut through a window, differences
(ids, ``truncated``, ``prompt_tokens``, ``token_type_ids``), both rules' time and the longest
string the tokenizer was given. ``--adversarial`` adds hostile strings (no spaces, newlines,
emoji, CJK) and the 60 MiB conversation of issue 12 (241 messages × 256 KiB), with time and RSS.
Exit status 1 when any item differs.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import random
import resource
import sys
import time
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_train.hh_rlhf import HH_FILES, Malformed, parse_dialogue, parse_pair  # noqa: E402
from services.runtime.chat import ChatMessage  # noqa: E402
from services.runtime.items import EncodedItem, RewardInput  # noqa: E402
from services.runtime.rendering import Renderer, _Window  # noqa: E402

HH_DIR = ROOT.parent / "shared" / "data" / "hh-rlhf"


# -- the oracle: the rule before the window (tokenize everything, then cut) -------------------------


def _dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _lines(messages: Sequence[ChatMessage]) -> str:
    return "".join(f"{m.role}: {m.content}\n" for m in messages)


def _item(enc: Any, *, truncated: bool, prompt_tokens: int) -> EncodedItem:
    tt = enc.get("token_type_ids")
    return EncodedItem(
        tuple(enc["input_ids"]),
        truncated=truncated,
        token_type_ids=tuple(tt) if tt is not None else None,
        prompt_tokens=prompt_tokens,
    )


def _cut(ids: list[int], boundary: int, limit: int) -> EncodedItem:
    excess = len(ids) - limit
    if excess <= 0:
        return EncodedItem(tuple(ids), truncated=False, prompt_tokens=boundary)
    return EncodedItem(tuple(ids[excess:]), truncated=True, prompt_tokens=max(0, boundary - excess))


def reference_encode(tok: Any, max_length: int, item: RewardInput) -> EncodedItem:
    """One item by the rule before cut-before-tokenize (``services/runtime/rendering.py`` at the
    commit before it, per item), tokenizing the whole rendering. Needs ``tok.truncation_side``
    "left" (the renderer sets it)."""
    if item.text is not None:
        ids = tok(item.text, add_special_tokens=False)["input_ids"]
        keep = ids[-max_length:] if len(ids) > max_length else ids
        return EncodedItem(tuple(keep), truncated=len(keep) < len(ids))
    if tok.chat_template:
        if item.messages is not None:
            conversation = list(item.messages)
            head = conversation[:-1]
            generation_prompt = conversation[-1].role == "assistant"
        else:
            assert item.prompt is not None and item.response is not None
            head = [ChatMessage("user", item.prompt)] if isinstance(item.prompt, str) else list(item.prompt)
            conversation = [*head, ChatMessage("assistant", item.response)]
            generation_prompt = True
        rendered = str(tok.apply_chat_template(_dicts(conversation), tokenize=False))
        prefix = ""
        if head:
            prefix = str(tok.apply_chat_template(_dicts(head), tokenize=False, add_generation_prompt=generation_prompt))
            if not rendered.startswith(prefix):
                prefix = ""
        enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
        boundary = bisect_right(enc["offset_mapping"], len(prefix), key=lambda o: o[1]) if prefix else 0
        return _cut(list(enc["input_ids"]), boundary, max_length)
    if item.messages is not None:
        prefix = _lines(item.messages[:-1])
        text = prefix + _lines(item.messages[-1:])
        full = tok(text)
        body = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        boundary = sum(1 for _, end in body["offset_mapping"] if end <= len(prefix))
        if len(full["input_ids"]) <= max_length:
            return _item(full, truncated=False, prompt_tokens=boundary)
        cut = tok(text, truncation=True, max_length=max_length)
        excess = len(full["input_ids"]) - len(cut["input_ids"])
        return _item(cut, truncated=True, prompt_tokens=max(0, boundary - excess))
    assert item.prompt is not None and item.response is not None
    prompt = item.prompt if isinstance(item.prompt, str) else _lines(item.prompt)
    response = item.response
    full = tok(prompt, response)
    p_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
    if len(full["input_ids"]) <= max_length:
        return _item(full, truncated=False, prompt_tokens=p_len)
    if len(full["input_ids"]) - max_length < p_len:
        cut = tok(prompt, response, truncation="only_first", max_length=max_length)
        excess = len(full["input_ids"]) - len(cut["input_ids"])
        return _item(cut, truncated=True, prompt_tokens=p_len - excess)
    alone = tok("", response)
    if len(alone["input_ids"]) <= max_length:
        return _item(alone, truncated=True, prompt_tokens=0)
    cut = tok("", response, truncation="only_second", max_length=max_length)
    return _item(cut, truncated=True, prompt_tokens=0)


# -- instrumentation --------------------------------------------------------------------------------


class RecordingTokenizer:
    """A tokenizer that remembers the longest string any call was given (rendering is not a call)."""

    def __init__(self, tokenizer: Any) -> None:
        object.__setattr__(self, "_inner", tokenizer)
        object.__setattr__(self, "longest", 0)

    def __call__(self, text: Any, pair: Any = None, **kw: Any) -> Any:
        for part in (text, pair):
            for s in [part] if isinstance(part, str) else part or ():
                object.__setattr__(self, "longest", max(self.longest, len(s)))
        return self._inner(text, pair, **kw) if pair is not None else self._inner(text, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


class CountingRenderer(Renderer):
    """The renderer, counting the strings it cut through a window rather than tokenized whole."""

    windowed = 0

    def _window(self, text: str, need: int) -> _Window:
        window = super()._window(text, need)
        self.windowed += not window.whole
        return window


# -- items ------------------------------------------------------------------------------------------


def hh_items(data_dir: Path, rows: int) -> list[RewardInput]:
    """Per row of each HH test file, the chosen and rejected dialogue as ``messages`` and as
    ``text``, and the parsed prompt with each final response as ``prompt``+``response``."""
    items: list[RewardInput] = []
    for name in HH_FILES:
        with gzip.open(data_dir / f"{name}.test.jsonl.gz", "rt", encoding="utf-8") as fh:
            for _, line in zip(range(rows), fh, strict=False):
                row = json.loads(line)
                for dialogue in (row["chosen"], row["rejected"]):
                    items.append(RewardInput(text=dialogue))
                    with contextlib.suppress(Malformed):  # a dialogue that does not start with Human
                        items.append(RewardInput(messages=parse_dialogue(dialogue, chat_form=False)))
                try:
                    prompt, chosen, rejected = parse_pair(row["chosen"], row["rejected"], chat_form=False)
                except Malformed:
                    continue
                items += [RewardInput(prompt=prompt, response=chosen), RewardInput(prompt=prompt, response=rejected)]
    return items


def hostile_strings(size: int, seed: int = 0) -> dict[str, str]:
    """Strings a window can only cut inside a long run: no spaces, only newlines, emoji, CJK."""
    rng = random.Random(seed)
    letters = [chr(c) for c in range(0x41, 0x7B) if chr(c).isalpha()] + [chr(c) for c in range(0xC0, 0x24F)]
    symbols = [chr(c) for c in range(0x21, 0x40)] + [chr(c) for c in range(0x2000, 0x206F) if not chr(c).isspace()]
    emoji = [chr(c) for c in range(0x1F300, 0x1F5FF)]
    cjk = [chr(c) for c in range(0x4E00, 0x9FFF)]
    pool = letters + symbols + emoji + cjk
    return {
        "a * n": "a" * size,
        "a * (n+1)": "a" * (size + 1),
        "random unicode, no spaces": "".join(rng.choice(pool) for _ in range(size)),
        "newlines": "\n" * size,
        "emoji": "".join(rng.choice(emoji) for _ in range(size)),
        "emoji and spaces": " ".join(rng.choice(emoji) * rng.randint(1, 4) for _ in range(size // 3)),
        "CJK, no spaces": "".join(rng.choice(cjk) for _ in range(size)),
        "digits": "".join(rng.choice("0123456789") for _ in range(size)),
    }


def huge_conversation(messages: int = 241, content_bytes: int = 256 * 1024) -> tuple[ChatMessage, ...]:
    """Issue 12's attack 1: alternating turns of ordinary words, ending on the assistant."""
    sentence = "the quick brown fox jumps over the lazy dog while it rains in the {} valleys. "
    turns = []
    for i in range(messages):
        chunk = sentence.format(i)
        content = (chunk * (content_bytes // len(chunk) + 1))[:content_bytes]
        turns.append(ChatMessage("assistant" if i % 2 == 0 else "user", content))
    return tuple(turns)


# -- the check ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    items: int = 0
    truncated: int = 0
    windowed: int = 0
    differences: list[int] = field(default_factory=list)
    seconds: float = 0.0
    reference_seconds: float = 0.0
    longest: int = 0


def _safe(call: Any) -> EncodedItem | str:
    try:
        result: EncodedItem = call()
        return result
    except Exception as exc:  # both rules reject an item with no tokens: compare the refusals too
        return f"{type(exc).__name__}: {exc}"


def compare(tokenizer: Any, max_length: int, items: Sequence[RewardInput], *, chunk: int = 64) -> Outcome:
    """Encode ``items`` with the renderer (requests of ``chunk`` items) and with the oracle."""
    recording = RecordingTokenizer(tokenizer)
    renderer = CountingRenderer(recording, max_length)
    got: list[EncodedItem | str] = []
    started = time.perf_counter()
    for at in range(0, len(items), chunk):
        part = items[at : at + chunk]
        encoded = _safe(lambda part=part: renderer.encode(part))
        got += encoded if isinstance(encoded, list) else [_safe(lambda x=x: renderer.encode([x])[0]) for x in part]
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    want = [_safe(lambda x=x: reference_encode(tokenizer, max_length, x)) for x in items]
    reference_seconds = time.perf_counter() - started
    return Outcome(
        items=len(items),
        truncated=sum(1 for w in want if isinstance(w, EncodedItem) and w.truncated),
        windowed=renderer.windowed,
        differences=[i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w],
        seconds=seconds,
        reference_seconds=reference_seconds,
        longest=recording.longest,
    )


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_huge(tokenizer: Any, max_length: int, *, reference: bool) -> dict[str, Any]:
    """Time and peak RSS growth of encoding the 60 MiB conversation (run first: the peak is the
    process's); with ``reference``, the old rule's too (minutes and gigabytes)."""
    conversation = huge_conversation()
    item = RewardInput(messages=conversation)
    recording = RecordingTokenizer(tokenizer)
    renderer = Renderer(recording, max_length)
    before = _peak_rss_mib()
    started = time.perf_counter()
    (got,) = renderer.encode([item])
    report: dict[str, Any] = {
        "content_mib": sum(len(m.content) for m in conversation) / 2**20,
        "seconds": time.perf_counter() - started,
        "peak_rss_growth_mib": _peak_rss_mib() - before,
        "longest_string": recording.longest,
        "tokens": got.num_tokens,
        "truncated": got.truncated,
    }
    if reference:
        started = time.perf_counter()
        want = reference_encode(tokenizer, max_length, item)
        report["reference_seconds"] = time.perf_counter() - started
        report["reference_peak_rss_growth_mib"] = _peak_rss_mib() - before
        report["identical"] = got == want
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HH_DIR, help="folder with the HH-RLHF *.test.jsonl.gz files")
    parser.add_argument("--rows", type=int, default=1000, help="first rows of each file")
    parser.add_argument("--max-length", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--adversarial", action="store_true", help="hostile strings and the 60 MiB conversation")
    parser.add_argument("--hostile-size", type=int, default=2_000_000, help="characters per hostile string")
    parser.add_argument("--huge-reference", action="store_true", help="also the old rule on the 60 MiB conversation")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from services.runtime.default_model import backbone_dir

    tokenizer = AutoTokenizer.from_pretrained(backbone_dir())
    tokenizer.truncation_side = "left"
    failed = False
    if args.adversarial:
        huge = measure_huge(tokenizer, args.max_length[0], reference=args.huge_reference)
        print(f"60 MiB conversation, max_length {args.max_length[0]}: " + json.dumps(huge, default=str))
        failed |= huge.get("identical") is False

    items = hh_items(args.data, args.rows)
    print(f"HH-RLHF: first {args.rows} rows of {', '.join(HH_FILES)}: {len(items)} items (messages, pair, text)")
    for max_length in args.max_length:
        out = compare(tokenizer, max_length, items)
        failed |= bool(out.differences)
        print(
            f"max_length {max_length}: {out.items} items, {out.truncated} truncated, {out.windowed} cut through a"
            f" window, {len(out.differences)} differences (first: {out.differences[:5]}); {out.seconds:.2f} s"
            f" (old rule {out.reference_seconds:.2f} s); longest string tokenized {out.longest} characters"
        )

    if args.adversarial:
        for name, text in hostile_strings(args.hostile_size).items():
            for max_length in args.max_length:
                out = compare(tokenizer, max_length, [RewardInput(text=text)])
                print(
                    f"hostile {name!r} ({len(text)} chars), max_length {max_length}: "
                    f"{'identical' if not out.differences else 'DIFFERS'}; {out.seconds:.3f} s "
                    f"(old rule {out.reference_seconds:.3f} s); longest string tokenized {out.longest}"
                )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
