"""Per-step records: one JSON line per step in the log file and one short line on the console."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StepRecord:
    """What one PPO step did.

    Timing (seconds): ``generate_s`` generating this step's batch (sampling plus the
    log-probability, reference and value passes); ``score_s`` the remote scoring call's wall
    time, measured in the scorer thread; ``wait_s`` how long the learner actually blocked for
    the scores (scoring ran behind the generation of the next batch, so this is what was *not*
    hidden); ``train_s`` the PPO update. ``kl`` is the mean over samples of the summed per-token
    ``logp - ref_logp`` of the generating policy; ``approx_kl`` the mean ``0.5 (logp - old_logp)^2``
    during the update. ``dropped`` samples had no score (``None``) and took no part in the update;
    ``skipped`` means none had one, so there was no update.
    """

    step: int
    reward_mean: float | None
    reward_std: float | None
    kl: float | None
    entropy: float
    clip_frac: float | None
    value_loss: float | None
    policy_loss: float | None
    dropped: int
    generate_s: float
    score_s: float
    wait_s: float
    train_s: float
    response_len_mean: float
    samples: int
    skipped: bool = False
    approx_kl: float | None = None
    value_clip_frac: float | None = None
    drop_reasons: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in asdict(self).items()}


def _clean(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 6) if math.isfinite(v) else None
    return v


def console_line(r: StepRecord, total: int) -> str:
    """One concise line for the console."""

    def f(v: float | None, spec: str = ".3f") -> str:
        return "-" if v is None else format(v, spec)

    head = f"step {r.step}/{total}"
    if r.skipped:
        return f"{head} skipped: no scores for any of {r.samples} samples ({_reasons(r)})"
    drop = f" dropped {r.dropped}" if r.dropped else ""
    return (
        f"{head} reward {f(r.reward_mean)} ± {f(r.reward_std)} kl {f(r.kl, '.4f')} ent {r.entropy:.3f} "
        f"clip {f(r.clip_frac, '.3f')} vloss {f(r.value_loss, '.4f')} len {r.response_len_mean:.1f}{drop} | "
        f"gen {r.generate_s:.2f}s score {r.score_s:.2f}s wait {r.wait_s:.2f}s train {r.train_s:.2f}s"
    )


def _reasons(r: StepRecord) -> str:
    return "; ".join(f"{n}x {why}" for why, n in r.drop_reasons.items()) or "no reason given"


class StepLog:
    """The JSONL log; each record is flushed to disk as it is written."""

    def __init__(self, path: Path, *, resume_after: int | None) -> None:
        """Open ``path`` for appending. ``resume_after``: on resume from step N, records of later
        steps (written after that checkpoint by the run that stopped) are removed first, so that
        every step appears once. ``None``: a fresh run; an existing file is replaced."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after is None:
            path.write_text("", encoding="utf-8")
        elif path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line)["step"]) <= resume_after:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
            os.replace(tmp, path)
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, r: StepRecord) -> None:
        self._fh.write(json.dumps(r.to_json()) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a log file."""
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


__all__ = ["StepLog", "StepRecord", "console_line", "read_log"]
