"""Rank aggregation: which pairs to judge, and a Bradley-Terry maximum-likelihood fit."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np


def pairs_to_judge(n: int, max_pairs: int, seed: int) -> list[tuple[int, int]]:
    """All pairs when N(N-1)/2 <= ``max_pairs``; else a balanced sample.

    The sample is a circulant graph over a random permutation: offsets 1..D with
    D = max(1, max_pairs // n), so every response is in exactly 2D pairs, the graph is
    connected (offset 1 is a Hamiltonian cycle), and N*D pairs are judged (at least N).
    """
    if n * (n - 1) // 2 <= max_pairs:
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    rng = random.Random(seed)
    perm = list(range(n))
    rng.shuffle(perm)
    d_max = max(1, min(max_pairs // n, (n - 1) // 2))
    pairs: set[tuple[int, int]] = set()
    for d in range(1, d_max + 1):
        for k in range(n):
            i, j = perm[k], perm[(k + d) % n]
            pairs.add((min(i, j), max(i, j)))
    return sorted(pairs)


def bradley_terry(
    n: int, outcomes: Sequence[tuple[int, int, float]], *, prior: float = 1e-4, max_iter: int = 100
) -> list[float]:
    """Log-strengths θ maximising Σ y·log σ(θi-θj) + (1-y)·log σ(θj-θi) - prior/2·Σθ².

    ``outcomes`` are ``(i, j, y)`` with y = P(i beats j) in [0, 1] (soft outcomes allowed). The
    tiny Gaussian prior keeps θ finite when one response wins everything and centres θ at 0.
    Damped Newton steps on a strictly concave objective: converges in a handful of iterations.
    """
    theta = np.zeros(n)
    if n == 0:
        return []
    ii = np.array([o[0] for o in outcomes], dtype=np.int64)
    jj = np.array([o[1] for o in outcomes], dtype=np.int64)
    yy = np.array([o[2] for o in outcomes], dtype=np.float64)

    def objective(t: np.ndarray) -> float:
        d = t[ii] - t[jj]
        # log σ(d) = -log1p(exp(-d)), computed stably
        ll = -(yy * np.logaddexp(0.0, -d) + (1 - yy) * np.logaddexp(0.0, d)).sum()
        return float(ll - prior / 2 * (t @ t))

    current = objective(theta)
    for _ in range(max_iter):
        d = theta[ii] - theta[jj]
        s = 1.0 / (1.0 + np.exp(-d))
        r = yy - s
        grad = -prior * theta
        np.add.at(grad, ii, r)
        np.add.at(grad, jj, -r)
        w = s * (1 - s)
        hess = -prior * np.eye(n)
        np.add.at(hess, (ii, ii), -w)
        np.add.at(hess, (jj, jj), -w)
        np.add.at(hess, (ii, jj), w)
        np.add.at(hess, (jj, ii), w)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while True:
            candidate = theta - scale * step
            value = objective(candidate)
            if value >= current - 1e-12 or scale < 1e-6:
                break
            scale /= 2
        theta, current = candidate, value
        if float(np.max(np.abs(scale * step))) < 1e-10:
            break
    return [float(x) if math.isfinite(x) else 0.0 for x in theta]


def ranking_from_scores(scores: Sequence[float]) -> list[int]:
    """Indices best first; ties keep input order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))
