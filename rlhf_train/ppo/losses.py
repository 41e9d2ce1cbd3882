"""The arithmetic of token-level RLHF PPO: masked statistics, rewards, GAE and the clipped losses.

Every tensor here is ``[batch, response_len]`` with a float ``mask`` (1 on response tokens, the
closing eos included; 0 on the padding after it). Nothing here knows about models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (0 when the mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked positions (0 with fewer than two of them)."""
    n = mask.sum()
    if n < 2:
        return torch.zeros((), dtype=x.dtype)
    mean = masked_mean(x, mask)
    return (((x - mean) ** 2) * mask).sum() / (n - 1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / std`` over the masked positions; masked-out positions come back as 0."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * (logp - ref_logp)`` on every response token, plus the
    sequence's scalar score on its last token. Returns ``(rewards, kl)``, ``kl`` the per-token
    estimate ``logp - ref_logp`` (masked)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; ``(advantages, returns)``.

    The value after the last real token is 0 (the episode ends there), so padding after an eos
    never leaks into the advantages.
    """
    values = values * mask
    n = rewards.shape[1]
    last_gae = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    out = torch.zeros_like(rewards)
    for t in reversed(range(n)):
        next_value = values[:, t + 1] if t + 1 < n else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        out[:, t] = last_gae
    return out, (out + values) * mask


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clip_frac: float
    approx_kl: float


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> PolicyLoss:
    """PPO's clipped surrogate: ``max(-A r, -A clip(r, 1 - eps, 1 + eps))`` averaged over tokens."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = float(masked_mean((clipped > unclipped).float(), mask))
        approx_kl = float(masked_mean(0.5 * log_ratio**2, mask))
    return PolicyLoss(loss, clip_frac, approx_kl)


@dataclass(frozen=True)
class ValueLoss:
    loss: torch.Tensor
    clip_frac: float


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> ValueLoss:
    """Clipped value loss: ``0.5 * max((v - R)^2, (v_clipped - R)^2)``, ``v_clipped`` within
    ``cliprange`` of the rollout's value."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange, cliprange)
    a = (values - returns) ** 2
    b = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(a, b), mask)
    with torch.no_grad():
        frac = float(masked_mean((b > a).float(), mask))
    return ValueLoss(loss, frac)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's categorical distribution, ``[..., vocab] -> [...]``."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def whiten_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores normalised across the batch (zero mean, unit std; a lone score becomes 0)."""
    if scores.numel() < 2:
        return torch.zeros_like(scores)
    return (scores - scores.mean()) / (scores.std() + 1e-8)


__all__ = [
    "PolicyLoss",
    "ValueLoss",
    "entropy_from_logits",
    "gae",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "token_rewards",
    "value_loss",
    "whiten_scores",
]
