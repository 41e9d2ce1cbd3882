"""The Bradley-Terry pieces of reward-model training: the linear head fit, the loss and pairwise accuracy.

Used by ``train rm`` (:mod:`rlhf_train.rm.trainer`), which reproduces the embedded default head
(``services/runtime/default_head``) with them; keep the fit deterministic.
"""

from __future__ import annotations

import numpy as np

DEFAULT_L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def fit_bt(diff: np.ndarray, l2: float, *, max_iter: int = 500, margin: np.ndarray | None = None) -> np.ndarray:
    """``argmin_w mean(-logsigmoid(diff @ w - margin)) + l2/2 · |w'|²`` in float32 with L-BFGS.

    ``diff`` rows are ``f_chosen - f_rejected``. The fit runs on per-dimension standardised
    differences (a few hidden dimensions of a transformer are orders of magnitude larger than
    the rest), so ``l2`` penalises the standardised weights ``w' = w · scale``; the returned
    ``w`` applies to raw features. ``margin`` (per pair, optional) is TRL RewardTrainer's: the
    chosen response must win by at least that much.
    """
    import torch

    scale = diff.std(axis=0).astype(np.float32)
    scale[scale < 1e-8] = 1.0
    x = torch.from_numpy((diff / scale).astype(np.float32))
    m = None if margin is None else torch.from_numpy(np.asarray(margin, dtype=np.float32))
    w = torch.zeros(x.shape[1], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = x @ w if m is None else x @ w - m
        loss = -torch.nn.functional.logsigmoid(z).mean() + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w.detach().numpy() / scale).astype(np.float32)


def pairwise_accuracy(margins: np.ndarray) -> float:
    """Share of pairs with chosen scored above rejected; exact ties count one half."""
    if len(margins) == 0:
        return float("nan")
    return float(((margins > 0).sum() + 0.5 * (margins == 0).sum()) / len(margins))


def bt_loss(margins: np.ndarray, offset: np.ndarray | None = None) -> float:
    """Mean ``-logsigmoid(margin - offset)`` in float64 (NaN for no pairs)."""
    z = margins.astype(np.float64) - (0.0 if offset is None else offset.astype(np.float64))
    return float(np.mean(np.logaddexp(0.0, -z))) if len(z) else float("nan")
