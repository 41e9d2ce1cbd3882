"""Checkpoints under ``<out>/checkpoints/step-NNNNNN/``, written atomically.

A checkpoint holds the policy (``save_pretrained`` plus its tokenizer, so ``policy/`` loads as
an ordinary Hugging Face model), the value head, the optimizer state, the RNG state, the prompt
cursor, the step and the batch that was generated but not yet trained on (it is scored again on
resume, so a resumed run takes the same path as one that never stopped).

Each checkpoint is written into a hidden temporary folder beside its final place and renamed
into place once complete (with a marker file written last), so a kill at any moment leaves
either the whole checkpoint or none of it; :func:`latest` ignores anything without the marker.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DONE = ".complete"
PREFIX = "step-"


def checkpoints_dir(out: Path) -> Path:
    return out / "checkpoints"


def _steps(out: Path) -> list[tuple[int, Path]]:
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.name.startswith(PREFIX) and (d / DONE).is_file():
            try:
                found.append((int(d.name[len(PREFIX) :]), d))
            except ValueError:
                continue
    return sorted(found)


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out``, or ``None``."""
    steps = _steps(out)
    return steps[-1][1] if steps else None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


@dataclass
class Saved:
    """What :func:`load` reads back (the policy itself is loaded from ``policy_dir``)."""

    path: Path
    step: int
    state: dict[str, Any]  # trainer_state.json
    value_head: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    pending: list[dict[str, Any]]

    @property
    def policy_dir(self) -> Path:
        return self.path / "policy"


def save(
    out: Path,
    *,
    step: int,
    policy: Any,
    tokenizer: Any,
    value_head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    pending: list[dict[str, Any]],
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically and prune all but the newest ``keep``; its path."""
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    policy.save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    torch.save(value_head.state_dict(), tmp / "value_head.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    torch.save(pending, tmp / "pending.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n", encoding="utf-8")
    _fsync_tree(tmp)
    (tmp / DONE).write_text("ok\n", encoding="utf-8")
    if final.exists():  # an older write of the same step (a rerun): replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    for _, d in _steps(out)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    return final


def _fsync_tree(root: Path) -> None:
    # Data on disk before the rename makes the checkpoint visible, or a power cut could expose a
    # renamed but empty file.
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def load(path: Path) -> Saved:
    """Read a checkpoint written by :func:`save`."""
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    return Saved(
        path=path,
        step=int(state["step"]),
        state=state,
        value_head=torch.load(path / "value_head.pt", weights_only=True),
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        rng=torch.load(path / "rng.pt", weights_only=True),
        pending=torch.load(path / "pending.pt", weights_only=True),
    )


def clean_temporaries(out: Path) -> None:
    """Remove leftovers of writes that a kill interrupted."""
    root = checkpoints_dir(out)
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(d, ignore_errors=True)


__all__ = ["Saved", "checkpoints_dir", "clean_temporaries", "latest", "load", "save"]
