"""Judge quality against human labels: dataset loaders, metrics, report tables and the reliability plot.

Pure: no network, no service. ``rlhf-feedback judge-eval`` (:mod:`rlhf_train.eval.command`)
sends the pairs to a judge service and hands the answers to :func:`compute_metrics`.

Orientation. Every :class:`Example` has a ``response_a`` and a ``response_b`` and a human
``label`` in ``{"a", "b", "tie"}``. A :class:`Judgment` is always stored in that orientation
(``preference`` = P(response_a better)), whatever order the request carried: the command puts
``response_b`` in the request's first slot for a seeded half of the rows (``swapped``) and maps
the answer back.

Metric definitions (``DEFINITIONS`` below is written into every report):

- ``agreement``: over judged pairs (not abstained, no error) with a non-tie human label, the share
  where the judge's winner equals the label; a judge tie (``winner: null``) counts as a miss.
- ``agreement_when_decided``: the same, over pairs where the judge also named a winner.
- ``tie_aware_accuracy``: over all judged pairs, judge winner == human label, where a judge tie on a
  human tie counts as correct (and a judge tie on a decided pair, or a winner on a tie, as wrong).
- ``soft_agreement``: over judged, non-tie pairs, the mean probability the judge gave the human
  choice (``p`` if the label is a, ``1 - p`` if b).
- ``position_consistency`` (both_orders only): share of judged pairs the service marked
  ``consistent`` (both presentation orders named the same winner).
- ``first_position`` (both_orders): the service returns only the order-averaged preference, so the
  share of presentations won by the response shown first is not observable exactly. A consistent
  pair was won once by the first-shown and once by the second-shown response (1 of 2); an
  inconsistent pair was decided by position in both orders (2 of 2 if the judge favours the first
  slot, 0 of 2 if the second). With consistency ``c`` the first-position rate therefore lies in
  ``[c/2, 1 - c/2]``; we report those bounds and ``position_decided_rate = 1 - c``.
- ``first_position_server`` (both protocols): the exact first-position rate, where the judge service
  exposes it: the command reads the service's ``rlhf_judge_first_position_total{outcome}`` counter
  from ``GET /metrics`` before and after each protocol's run, and reports
  ``first / (first + second)`` of the difference. It counts every single-order verdict the service
  produced in between (cache hits included; a verdict of exactly 0.5 is neither), so it is exact
  only while judge-eval is the service's only client.
- ``slot0_win_rate`` (both protocols): over judged pairs with a winner, the share won by the response
  in the request's first slot. The command puts response a in that slot for a seeded half of the
  rows, so this is not confounded by the dataset's label balance. For ``single`` the service picks
  the shown order itself (at random) and maps the verdict back, so this rate is the first-position
  rate only if the service shows the request order; with correct randomisation it should be about
  0.5 and a departure points at the service's order mapping, not at the judge.
- ``length``: ``longer_wins_judge`` = over judged pairs where the judge named a winner and the two
  responses differ in length (Python ``len``, characters), the share where the longer one won;
  ``longer_wins_human`` = the same for the human label over the judged pairs with a non-tie label;
  ``length_bias`` = judge minus human (positive: the judge likes length more than people do).
- ``mean_confidence``: mean of ``|2p - 1|`` over judged pairs.
- ``calibration``: over judged, non-tie pairs, predicted ``p`` = P(a better) against the outcome
  ``y`` = 1 if the human chose a. Ten equal-width bins of ``p`` ([0, 0.1), ..., [0.9, 1.0]);
  ``brier`` = mean((p - y)^2); ``ece`` = sum over bins of (bin count / N) * |mean p - mean y|.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhf_train import hh_rlhf
from services.runtime.chat import ChatMessage

Label = Literal["a", "b", "tie"]
Format = Literal["pandalm", "llmbar", "hh-rlhf", "jsonl"]
FORMATS: tuple[str, ...] = ("pandalm", "llmbar", "hh-rlhf", "jsonl")
Message = dict[str, str]
Prompt = str | list[Message]

DEFINITIONS: dict[str, str] = {
    "agreement": "judged pairs with a non-tie human label: share where judge winner == label (judge tie = miss)",
    "agreement_when_decided": "as agreement, only over pairs where the judge named a winner",
    "tie_aware_accuracy": "all judged pairs: judge winner == label, a judge tie on a human tie counts as correct",
    "soft_agreement": "judged non-tie pairs: mean probability the judge gave the human choice",
    "position_consistency": "both_orders: share of judged pairs the service marked consistent",
    "first_position": "both_orders: bounds [c/2, 1 - c/2] on the share of presentations won by the first-shown "
    "response, c = position consistency (the service returns only the order-averaged preference)",
    "first_position_server": "share of single-order verdicts won by the first-shown response, from the difference "
    "of the service's rlhf_judge_first_position_total counter (GET /metrics) across the run; exact only when "
    "judge-eval is the service's only client",
    "hard_label_rate": "judged pairs whose preference is a hard label (soft: false in the answer)",
    "slot0_win_rate": "judged pairs with a winner: share won by the response in the request's first slot "
    "(response a there for a seeded half of rows); for single this is the first-position rate only if the "
    "service shows the request order, ~0.5 if it randomises correctly",
    "longer_wins_judge": "judged pairs with a judge winner and unequal lengths (characters): share won by the longer",
    "longer_wins_human": "judged pairs with a non-tie human label and unequal lengths: share where humans chose the "
    "longer",
    "length_bias": "longer_wins_judge - longer_wins_human",
    "mean_confidence": "mean |2p - 1| over judged pairs",
    "calibration": "judged non-tie pairs, p = P(a better) vs y = [human chose a], 10 equal-width bins; "
    "brier = mean (p - y)^2; ece = sum_bins n_b/N |mean p_b - mean y_b|",
    "abstain_rate": "abstain answers / pairs sent",
    "error_rate": "pairs with no answer (HTTP error after retries, malformed reply) / pairs sent",
}


class DatasetError(ValueError):
    """The data file does not match the format it was given as."""


@dataclass(frozen=True)
class Example:
    """One human-labelled pair. ``annotators``: the individual labels where the set has them (PandaLM)."""

    id: str
    prompt: Prompt
    response_a: str
    response_b: str
    label: Label
    subset: str = ""
    annotators: tuple[Label, ...] = ()


@dataclass
class Dataset:
    name: str
    format: str
    examples: list[Example]
    skipped: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class Judgment:
    """The judge's answer for one example, in the example's orientation (``preference`` = P(a better)).

    ``winner`` is ``"tie"`` when the service returned ``winner: null``. ``swapped`` records that
    ``response_b`` was sent in the request's first slot.
    """

    status: Literal["ok", "abstain", "error"]
    swapped: bool = False
    preference: float | None = None
    winner: Label | None = None
    consistent: bool | None = None
    soft: bool | None = None
    reason: str | None = None
    cached: bool = False
    usage: Mapping[str, float] = field(default_factory=dict)
    attempts: int = 1
    judge: Mapping[str, Any] = field(default_factory=dict)


# -- helpers -----------------------------------------------------------------------------------


def example_id(prompt: Prompt, a: str, b: str) -> str:
    """A stable id from the pair's content (not from paths or row numbers)."""
    blob = json.dumps([prompt, a, b], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def seeded_coin(seed: int, salt: str, key: str) -> bool:
    """A deterministic fair coin from (seed, salt, key): the same row gets the same side every run."""
    digest = hashlib.sha256(f"{seed}\x00{salt}\x00{key}".encode()).digest()
    return digest[0] & 1 == 1


def swap_slots(example: Example, seed: int) -> bool:
    """Whether ``response_b`` goes into the request's first slot for this example."""
    return seeded_coin(seed, "slot", example.id)


def prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def _majority(labels: Sequence[Label]) -> Label:
    """The label at least half of ``labels`` agree on (strictly more than any other); else tie."""
    counts = Counter(labels).most_common()
    if not counts:
        return "tie"
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "tie"
    return counts[0][0] if counts[0][1] * 2 > len(labels) or len(labels) == 1 else "tie"


def _read_json_or_jsonl(path: Path) -> list[Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list")
        return data
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
    return rows


def _need_str(row: Mapping[str, Any], key: str, where: str, notes: Counter[str] | None = None) -> str:
    """``row[key]`` as text. With ``notes``, a JSON scalar (PandaLM has ``true`` where the text was
    "True") is turned into Python's text for it and counted; otherwise only strings pass."""
    value = row.get(key)
    if isinstance(value, str):
        return value
    if notes is not None and isinstance(value, bool | int | float):
        notes[f"{key}: JSON {type(value).__name__} read as text"] += 1
        return str(value)
    raise DatasetError(f"{where}: field {key!r} must be a string")


# -- loaders -----------------------------------------------------------------------------------


def load_jsonl(path: Path) -> Dataset:
    """Rows ``{"prompt": str | messages, "response_a", "response_b", "label": "a"|"b"|"tie"}``.

    Optional ``subset`` (reported separately) and ``id`` fields are kept.
    """
    examples = []
    for i, row in enumerate(_read_json_or_jsonl(path), 1):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object")
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            if not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt):
                raise DatasetError(f"{where}: prompt messages need 'role' and 'content'")
            prompt = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        elif not isinstance(prompt, str):
            raise DatasetError(f"{where}: 'prompt' must be a string or a list of messages")
        a, b = _need_str(row, "response_a", where), _need_str(row, "response_b", where)
        label = str(row.get("label", "")).lower()
        if label not in ("a", "b", "tie"):
            raise DatasetError(f"{where}: 'label' must be 'a', 'b' or 'tie', got {row.get('label')!r}")
        examples.append(
            Example(
                id=str(row.get("id") or example_id(prompt, a, b)),
                prompt=prompt,
                response_a=a,
                response_b=b,
                label=label,  # type: ignore[arg-type]
                subset=str(row.get("subset") or ""),
            )
        )
    return Dataset(name=path.stem, format="jsonl", examples=examples)


_PANDALM = {0: "tie", 1: "a", 2: "b"}


def load_pandalm(path: Path) -> Dataset:
    """PandaLM test set: prompt = instruction (+ blank line + input when non-empty); the label is the
    majority of annotator1..3 (0 = tie, 1 = response1, 2 = response2; no majority = tie).
    A few responses are JSON ``true`` (the text "True" mangled upstream): read as "True", counted in ``notes``."""
    examples, notes = [], Counter[str]()
    for i, row in enumerate(_read_json_or_jsonl(path), 1):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object")
        instruction = _need_str(row, "instruction", where)
        extra = row.get("input") or ""
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        a, b = _need_str(row, "response1", where, notes), _need_str(row, "response2", where, notes)
        votes: list[Label] = []
        for k in ("annotator1", "annotator2", "annotator3"):
            if row.get(k) not in _PANDALM:
                raise DatasetError(f"{where}: {k} must be 0, 1 or 2, got {row.get(k)!r}")
            votes.append(_PANDALM[row[k]])  # type: ignore[arg-type]
        examples.append(
            Example(
                id=str(row["idx"]) if "idx" in row else example_id(prompt, a, b),
                prompt=prompt,
                response_a=a,
                response_b=b,
                label=_majority(votes),
                annotators=tuple(votes),
            )
        )
    return Dataset(name=path.stem, format="pandalm", examples=examples, notes=notes)


def load_llmbar(path: Path) -> Dataset:
    """LLMBar: ``input``, ``output_1``, ``output_2``, ``label`` 1|2. A folder loads every
    ``LLMBar_*.json`` in it, each file a subset (``Natural``, ``Adversarial_GPTInst``, ...)."""
    files = sorted(path.glob("LLMBar_*.json")) if path.is_dir() else [path]
    if not files:
        raise DatasetError(f"{path}: no LLMBar_*.json files")
    examples = []
    for file in files:
        subset = file.stem.removeprefix("LLMBar_")
        for i, row in enumerate(_read_json_or_jsonl(file), 1):
            where = f"{file}: row {i}"
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected an object")
            prompt = _need_str(row, "input", where)
            a, b = _need_str(row, "output_1", where), _need_str(row, "output_2", where)
            if row.get("label") not in (1, 2):
                raise DatasetError(f"{where}: 'label' must be 1 or 2, got {row.get('label')!r}")
            examples.append(
                Example(
                    id=f"{subset}:{example_id(prompt, a, b)}",
                    prompt=prompt,
                    response_a=a,
                    response_b=b,
                    label="a" if row["label"] == 1 else "b",
                    subset=subset,
                )
            )
    name = path.name if path.is_dir() else path.stem
    return Dataset(name=name, format="llmbar", examples=examples)


def _as_messages(messages: Iterable[ChatMessage]) -> list[Message]:
    return [{"role": m.role, "content": m.content} for m in messages]


def parse_hh_dialogue(text: str) -> list[Message]:
    """An HH-RLHF dialogue as messages, by :func:`rlhf_train.hh_rlhf.parse_dialogue` with judge-eval's
    rules (turns need not alternate, a turn may be empty); :class:`~rlhf_train.hh_rlhf.Malformed`
    unless it starts with ``\\n\\nHuman:``."""
    return _as_messages(hh_rlhf.parse_dialogue(text, chat_form=False))


def load_hh_rlhf(path: Path, *, seed: int = 0) -> Dataset:
    """HH-RLHF ``{"chosen", "rejected"}`` dialogues (.jsonl or .jsonl.gz).

    Parsed by :func:`rlhf_train.hh_rlhf.parse_pair` with judge-eval's rules: the prompt is the
    shared dialogue up to the last ``\\n\\nAssistant:``, as messages; the responses are the two
    final assistant turns, which may be empty (the judge judges an empty answer) but may not run on
    into further turns. The chosen one goes to position a for a seeded half of the rows (a hash of
    the seed and the pair) and to b for the rest, so the label is not always "a". Rows the parser
    rejects are skipped and counted by its reason.
    """
    examples, skipped = [], Counter[str]()
    for i, row in enumerate(_read_json_or_jsonl(path), 1):
        where = f"{path}: row {i}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected an object")
        chosen, rejected = _need_str(row, "chosen", where), _need_str(row, "rejected", where)
        try:
            parsed, good, bad = hh_rlhf.parse_pair(chosen, rejected, chat_form=False, single_turn=True)
        except hh_rlhf.Malformed as exc:
            skipped[str(exc)] += 1
            continue
        messages = _as_messages(parsed)
        chosen_first = seeded_coin(seed, "hh-position", json.dumps([chosen, rejected], ensure_ascii=False))
        a, b = (good, bad) if chosen_first else (bad, good)
        examples.append(
            Example(
                id=example_id(messages, good, bad),
                prompt=messages,
                response_a=a,
                response_b=b,
                label="a" if chosen_first else "b",
            )
        )
    name = path.name.removesuffix(".gz").removesuffix(".jsonl")
    return Dataset(name=name, format="hh-rlhf", examples=examples, skipped=skipped)


def load_dataset(path: Path, fmt: str, *, seed: int = 0, limit: int | None = None) -> Dataset:
    """Load ``path`` as ``fmt``; with ``limit``, keep a seeded random sample of that many rows
    (in file order), so a folder of subsets is sampled across all of them."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if fmt == "pandalm":
        ds = load_pandalm(path)
    elif fmt == "llmbar":
        ds = load_llmbar(path)
    elif fmt == "hh-rlhf":
        ds = load_hh_rlhf(path, seed=seed)
    elif fmt == "jsonl":
        ds = load_jsonl(path)
    else:
        raise DatasetError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if limit is not None and limit < len(ds.examples):
        keep = sorted(random.Random(seed).sample(range(len(ds.examples)), max(limit, 0)))
        ds.examples = [ds.examples[i] for i in keep]
    return ds


# -- metrics -----------------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def _rate(flags: Iterable[bool]) -> dict[str, Any]:
    vals = [bool(f) for f in flags]
    return {"value": (sum(vals) / len(vals)) if vals else None, "n": len(vals)}


def calibration(points: Sequence[tuple[float, float]], bins: int = 10) -> dict[str, Any]:
    """Reliability of predicted probabilities ``p`` against 0/1 outcomes ``y``.

    Equal-width bins over [0, 1] (the last one closed); per bin: count, mean p, mean y.
    ``brier`` = mean (p - y)^2; ``ece`` = sum_b (n_b / N) |mean p_b - mean y_b|.
    """
    edges = [i / bins for i in range(bins + 1)]
    members: list[list[tuple[float, float]]] = [[] for _ in range(bins)]
    for p, y in points:
        idx = min(int(p * bins), bins - 1) if p >= 0 else 0
        members[idx].append((p, y))
    total = len(points)
    out_bins, ece = [], 0.0
    for i, mem in enumerate(members):
        mean_p = _mean(p for p, _ in mem)
        mean_y = _mean(y for _, y in mem)
        if mean_p is not None and mean_y is not None:
            ece += len(mem) / total * abs(mean_p - mean_y)
        out_bins.append({"lo": edges[i], "hi": edges[i + 1], "n": len(mem), "mean_pred": mean_p, "observed": mean_y})
    return {
        "n": total,
        "bins": out_bins,
        "brier": _mean((p - y) ** 2 for p, y in points),
        "ece": ece if total else None,
    }


def _p(j: Judgment) -> float:
    """The preference of a judged pair (``compute_metrics`` only calls this on ``ok`` judgments)."""
    return 0.5 if j.preference is None else float(j.preference)


def _slot0_won(j: Judgment) -> bool:
    slot0: Label = "b" if j.swapped else "a"
    return j.winner == slot0


def _longer(ex: Example) -> Label | None:
    la, lb = len(ex.response_a), len(ex.response_b)
    return None if la == lb else ("a" if la > lb else "b")


def compute_metrics(pairs: Sequence[tuple[Example, Judgment]], protocol: str, *, bins: int = 10) -> dict[str, Any]:
    """Every figure of the report for one protocol over ``pairs`` (see the module docstring)."""
    n = len(pairs)
    ok = [(e, j) for e, j in pairs if j.status == "ok" and j.preference is not None]
    abstains = [j for _, j in pairs if j.status == "abstain"]
    errors = [j for _, j in pairs if j.status == "error"]
    decided_h = [(e, j) for e, j in ok if e.label != "tie"]
    both_decided = [(e, j) for e, j in decided_h if j.winner != "tie"]
    judge_won = [(e, j) for e, j in ok if j.winner in ("a", "b")]

    out: dict[str, Any] = {
        "protocol": protocol,
        "n": n,
        "judged": len(ok),
        "abstains": len(abstains),
        "abstain_rate": len(abstains) / n if n else None,
        "abstain_reasons": dict(Counter(j.reason or "?" for j in abstains).most_common(10)),
        "errors": len(errors),
        "error_rate": len(errors) / n if n else None,
        "error_reasons": dict(Counter(j.reason or "?" for j in errors).most_common(10)),
        "human_labels": dict(Counter(e.label for e, _ in pairs)),
        "judge_winners": dict(Counter(j.winner or "?" for _, j in ok)),
        "judge_tie_rate": (sum(j.winner == "tie" for _, j in ok) / len(ok)) if ok else None,
        "agreement": _rate(j.winner == e.label for e, j in decided_h),
        "agreement_when_decided": _rate(j.winner == e.label for e, j in both_decided),
        "tie_aware_accuracy": _rate(j.winner == e.label for e, j in ok),
        "soft_agreement": {
            "value": _mean((_p(j) if e.label == "a" else 1 - _p(j)) for e, j in decided_h),
            "n": len(decided_h),
        },
        "mean_confidence": _mean(abs(2 * _p(j) - 1) for _, j in ok),
        "slot0_win_rate": _rate(_slot0_won(j) for _, j in judge_won),
        "cached_rate": (sum(j.cached for _, j in ok) / len(ok)) if ok else None,
        "hard_label_rate": _rate(j.soft is False for _, j in ok if j.soft is not None),
        "retries": sum(max(j.attempts - 1, 0) for _, j in pairs),
    }

    if protocol == "both_orders":
        cons = [j.consistent for _, j in ok if j.consistent is not None]
        c = (sum(cons) / len(cons)) if cons else None
        out["position_consistency"] = {"value": c, "n": len(cons)}
        out["first_position"] = {
            "lower": c / 2 if c is not None else None,
            "upper": 1 - c / 2 if c is not None else None,
            "position_decided_rate": 1 - c if c is not None else None,
            "n": len(cons),
        }
    else:
        out["position_consistency"] = {"value": None, "n": 0}
        out["first_position"] = None

    judge_len = [(_longer(e), j.winner) for e, j in judge_won if _longer(e) is not None]
    human_len = [(_longer(e), e.label) for e, _ in decided_h if _longer(e) is not None]
    lj = _rate(longer == w for longer, w in judge_len)
    lh = _rate(longer == lab for longer, lab in human_len)
    out["length"] = {
        "longer_wins_judge": lj,
        "longer_wins_human": lh,
        "length_bias": (lj["value"] - lh["value"]) if lj["value"] is not None and lh["value"] is not None else None,
    }

    out["calibration"] = calibration(
        [(_p(j), 1.0 if e.label == "a" else 0.0) for e, j in decided_h],
        bins=bins,
    )

    usage: dict[str, float] = {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0, "calls": 0}
    for _, j in pairs:
        for k in usage:
            v = j.usage.get(k)
            if isinstance(v, int | float):
                usage[k] += v
    out["usage"] = usage
    return out


FIRST_POSITION_METRIC = "rlhf_judge_first_position"


def first_position_counts(metrics_text: str) -> dict[str, float] | None:
    """``{"first": n, "second": m}`` from a Prometheus text exposition, or None if it has no
    ``rlhf_judge_first_position_total`` samples (or is not parseable)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                if sample.name == FIRST_POSITION_METRIC + "_total" and sample.labels.get("outcome") in (
                    "first",
                    "second",
                ):
                    counts[sample.labels["outcome"]] = counts.get(sample.labels["outcome"], 0.0) + sample.value
    except (ValueError, TypeError):
        return None
    if not counts:
        return None
    return {"first": counts.get("first", 0.0), "second": counts.get("second", 0.0)}


def first_position_delta(before: Mapping[str, float] | None, after: Mapping[str, float] | None) -> dict[str, Any]:
    """The first-position rate of the verdicts counted between two :func:`first_position_counts`."""
    if after is None:
        return {"value": None, "n": 0, "source": "unavailable (no rlhf_judge_first_position_total in GET /metrics)"}
    base = before or {"first": 0.0, "second": 0.0}
    first = after["first"] - base["first"]
    second = after["second"] - base["second"]
    n = round(first + second)
    return {
        "value": first / (first + second) if first + second > 0 else None,
        "n": n,
        "source": "GET /metrics rlhf_judge_first_position_total (difference across the run)",
    }


def annotator_metrics(pairs: Sequence[tuple[Example, Judgment]]) -> dict[str, Any] | None:
    """PandaLM-style sets with individual annotators: the judge against each annotator, and the human
    ceiling (each annotator against the majority of the other two; two that disagree make a tie).

    Per annotator ``k``: ``judge`` = judge vs annotator k; ``judge_vs_others`` = judge vs the
    majority of the other annotators (the same reference the ceiling uses, for a like-for-like
    comparison); ``ceiling`` = annotator k vs that majority. Each with ``agreement`` (non-tie
    reference, a tie prediction is a miss) and ``tie_aware_accuracy``. The ceiling is over every
    example, the judge figures over judged ones.
    """
    if not pairs or not all(e.annotators for e, _ in pairs):
        return None
    count = min(len(e.annotators) for e, _ in pairs)
    per: dict[str, Any] = {}

    def both(items: list[tuple[Label | None, Label]]) -> dict[str, Any]:
        return {
            "agreement": _rate(p == ref for p, ref in items if ref != "tie"),
            "tie_aware_accuracy": _rate(p == ref for p, ref in items),
        }

    for k in range(count):
        others = [(e, j, _majority([lab for i, lab in enumerate(e.annotators) if i != k])) for e, j in pairs]
        judged = [(e, j, ref) for e, j, ref in others if j.status == "ok"]
        per[f"annotator{k + 1}"] = {
            "judge": both([(j.winner, e.annotators[k]) for e, j, _ in judged]),
            "judge_vs_others": both([(j.winner, ref) for _, j, ref in judged]),
            "ceiling": both([(e.annotators[k], ref) for e, _, ref in others]),
        }

    def avg(path: tuple[str, str]) -> float | None:
        vals = [per[a][path[0]][path[1]]["value"] for a in per]
        return _mean(v for v in vals if v is not None)

    per["mean"] = {
        "judge_agreement": avg(("judge", "agreement")),
        "judge_vs_others_agreement": avg(("judge_vs_others", "agreement")),
        "ceiling_agreement": avg(("ceiling", "agreement")),
        "judge_tie_aware": avg(("judge", "tie_aware_accuracy")),
        "ceiling_tie_aware": avg(("ceiling", "tie_aware_accuracy")),
    }
    return per


def build_protocol_report(
    pairs: Sequence[tuple[Example, Judgment]], protocol: str, *, bins: int = 10
) -> dict[str, Any]:
    """Overall metrics, per-subset metrics when the set has subsets, annotator figures when it has them."""
    report: dict[str, Any] = {"overall": compute_metrics(pairs, protocol, bins=bins)}
    subsets = sorted({e.subset for e, _ in pairs if e.subset})
    if subsets:
        report["subsets"] = {
            s: compute_metrics([(e, j) for e, j in pairs if e.subset == s], protocol, bins=bins) for s in subsets
        }
    ann = annotator_metrics(pairs)
    if ann is not None:
        report["annotators"] = ann
    return report


# -- tables ------------------------------------------------------------------------------------


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _num(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _rate_cell(r: Mapping[str, Any] | None) -> str:
    if not r or r.get("value") is None:
        return "—"
    return f"{_pct(r['value'])} (n={r['n']})"


def summary_rows(metrics_by_protocol: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) comparing protocols side by side, from each protocol's ``overall`` metrics."""
    protocols = list(metrics_by_protocol)
    header = ["metric", *protocols]

    def first_position(m: Mapping[str, Any]) -> str:
        fp = m.get("first_position")
        if not fp or fp.get("lower") is None:
            return "n/a"
        return f"{_pct(fp['lower'])} – {_pct(fp['upper'])}"

    def usage(m: Mapping[str, Any]) -> str:
        u = m["usage"]
        return f"{int(u['calls'])} calls, {int(u['prompt_tokens'] + u['completion_tokens'])} tok, ${u['cost_usd']:.4f}"

    lines: list[tuple[str, Any]] = [
        ("pairs", lambda m: str(m["n"])),
        ("judged", lambda m: str(m["judged"])),
        ("abstain rate", lambda m: _pct(m["abstain_rate"])),
        ("errors", lambda m: str(m["errors"])),
        ("agreement (excl. human ties)", lambda m: _rate_cell(m["agreement"])),
        ("agreement when judge decides", lambda m: _rate_cell(m["agreement_when_decided"])),
        ("tie-aware accuracy", lambda m: _rate_cell(m["tie_aware_accuracy"])),
        ("soft agreement", lambda m: _pct(m["soft_agreement"]["value"])),
        ("judge tie rate", lambda m: _pct(m["judge_tie_rate"])),
        ("position consistency", lambda m: _rate_cell(m["position_consistency"])),
        ("first-position rate (server counter)", lambda m: _rate_cell(m.get("first_position_server"))),
        ("first-position bounds from consistency", first_position),
        ("request-slot-0 win rate", lambda m: _rate_cell(m["slot0_win_rate"])),
        ("longer wins: judge", lambda m: _rate_cell(m["length"]["longer_wins_judge"])),
        ("longer wins: humans", lambda m: _rate_cell(m["length"]["longer_wins_human"])),
        ("length bias (judge − humans)", lambda m: _num(m["length"]["length_bias"])),
        ("mean confidence |2p−1|", lambda m: _num(m["mean_confidence"])),
        ("Brier score", lambda m: _num(m["calibration"]["brier"])),
        ("ECE (10 bins)", lambda m: _num(m["calibration"]["ece"])),
        ("hard labels (soft: false)", lambda m: _rate_cell(m["hard_label_rate"])),
        ("cached", lambda m: _pct(m["cached_rate"])),
        ("retries", lambda m: str(m["retries"])),
        ("usage", usage),
    ]
    rows = [[name, *(fn(metrics_by_protocol[p]) for p in protocols)] for name, fn in lines]
    return header, rows


def subset_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Agreement per subset (LLMBar files), protocols side by side."""
    protocols = list(report["protocols"])
    names = sorted({s for p in protocols for s in report["protocols"][p].get("subsets", {})})
    if not names:
        return None
    header = ["subset", "n", *(f"agreement {p}" for p in protocols), *(f"consistency {p}" for p in protocols)]
    rows = []
    for s in [*names, None]:
        per = [
            report["protocols"][p]["overall"] if s is None else report["protocols"][p]["subsets"].get(s)
            for p in protocols
        ]
        n = next((m["n"] for m in per if m), 0)
        rows.append(
            [
                "overall" if s is None else s,
                str(n),
                *(_rate_cell(m["agreement"]) if m else "—" for m in per),
                *(_rate_cell(m["position_consistency"]) if m else "—" for m in per),
            ]
        )
    return header, rows


def annotator_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Judge vs each annotator and the human ceiling (PandaLM), protocols side by side."""
    protocols = [p for p in report["protocols"] if "annotators" in report["protocols"][p]]
    if not protocols:
        return None
    first = report["protocols"][protocols[0]]["annotators"]
    anns = [a for a in first if a != "mean"]
    header = [
        "annotator",
        "ceiling (vs other two)",
        *(f"judge vs annotator ({p})" for p in protocols),
        *(f"judge vs other two ({p})" for p in protocols),
    ]
    rows = []
    for a in anns:
        rows.append(
            [
                a,
                _rate_cell(first[a]["ceiling"]["agreement"]),
                *(_rate_cell(report["protocols"][p]["annotators"][a]["judge"]["agreement"]) for p in protocols),
                *(
                    _rate_cell(report["protocols"][p]["annotators"][a]["judge_vs_others"]["agreement"])
                    for p in protocols
                ),
            ]
        )
    rows.append(
        [
            "mean",
            _pct(first["mean"]["ceiling_agreement"]),
            *(_pct(report["protocols"][p]["annotators"]["mean"]["judge_agreement"]) for p in protocols),
            *(_pct(report["protocols"][p]["annotators"]["mean"]["judge_vs_others_agreement"]) for p in protocols),
        ]
    )
    return header, rows


def render_text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in out)


def render_markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(c: str) -> str:
        return str(c).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_report(report: Mapping[str, Any], *, markdown: bool) -> str:
    """The summary (and subset / annotator tables where they apply) as plain text or Markdown."""
    render = render_markdown_table if markdown else render_text_table
    protocols = report["protocols"]
    parts = []
    title = f"judge-eval: {report['data']['name']} ({report['data']['format']}, {report['data']['n']} pairs)"
    judge = report.get("judge") or {}
    refs = judge.get("distinct") or [judge]
    judge_desc = " | ".join(
        ", ".join(f"{k}={v}" for k, v in ref.items() if isinstance(v, str | int | float)) for ref in refs
    )
    judge_desc = f"{judge_desc or '?'} at {report.get('judge_url', '?')}"
    parts.append(f"# {title}\n\njudge: {judge_desc}" if markdown else f"{title}\njudge: {judge_desc}")
    parts.append(render(*summary_rows({p: protocols[p]["overall"] for p in protocols})))
    subs = subset_rows(report)
    if subs:
        parts.append(("## Per subset\n\n" if markdown else "per subset:\n") + render(*subs))
    anns = annotator_rows(report)
    if anns:
        parts.append(("## Annotators and the human ceiling\n\n" if markdown else "annotators:\n") + render(*anns))
    skipped = report["data"].get("skipped") or {}
    if skipped:
        parts.append("skipped rows: " + ", ".join(f"{k}: {v}" for k, v in skipped.items()))
    notes = report["data"].get("notes") or {}
    if notes:
        parts.append("data notes: " + ", ".join(f"{k}: {v}" for k, v in notes.items()))
    if markdown:
        parts.append(
            "## Definitions\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in report.get("definitions", {}).items())
        )
    return "\n\n".join(parts) + "\n"


# -- plot --------------------------------------------------------------------------------------


def plot_reliability(report: Mapping[str, Any], path: Path) -> Path:
    """Reliability diagram: mean predicted P(a better) per bin against the share of humans who chose a,
    one line per protocol, and the bin counts below. Written as PNG with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(
        2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True, constrained_layout=True
    )
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    protocols = list(report["protocols"])
    width = 0.1 / max(len(protocols), 1)
    for i, p in enumerate(protocols):
        cal = report["protocols"][p]["overall"]["calibration"]
        pts = [(b["mean_pred"], b["observed"], b["n"]) for b in cal["bins"] if b["n"]]
        label = f"{p} (ECE {_num(cal['ece'])}, Brier {_num(cal['brier'])}, n={cal['n']})"
        if pts:
            xs, ys, ns = zip(*pts, strict=True)
            sizes = [12 + 60 * math.sqrt(c / max(ns)) for c in ns]
            line = ax.plot(xs, ys, marker="o", markersize=0, label=label)[0]
            ax.scatter(xs, ys, s=sizes, color=line.get_color(), zorder=3)
            color = line.get_color()
        else:
            color = f"C{i}"
            ax.plot([], [], label=label, color=color)
        lefts = [b["lo"] + i * width for b in cal["bins"]]
        hist.bar(lefts, [b["n"] for b in cal["bins"]], width=width, align="edge", color=color, alpha=0.7, label=p)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("observed share of humans preferring a")
    data = report["data"]
    ax.set_title(f"judge calibration: {data['name']} ({data['format']}, human ties excluded)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hist.set_xlabel("judge's predicted P(a better)")
    hist.set_ylabel("pairs per bin")
    hist.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
