"""Rewards -> advantages for GRPO / T-GRPO. Pure tensor math, unit-tested against hand-computed numbers.

Everything here works on a step's groups laid out as rows: ``acc`` is ``(N, G)`` (N prompts, G ordered completions
each), so the temporal and length bonuses are computed PER GROUP and any number of prompts per device is correct.
(Video-R1 takes p and p~ as means over the whole device batch, which is only right at one prompt per device, #96.)

Advantage estimators live in a registry (verl/EasyR1 style): a new one is one decorated function
``fn(rewards (N, G), eps, **step) -> (N, G)``. ``step`` is what the trainer knows of the whole step beyond this
rank's rewards (now ``batch_std``: the reward std over every rank); an estimator takes what it uses and ignores the
rest, as reward plugins do.
"""

from __future__ import annotations

from typing import Callable

import torch

ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {}

# Float slack for the p >= mu * p~ comparison, so the boundary p == mu * p~ is included despite rounding.
_BOUNDARY_EPS = 1e-6


def register_advantage(name: str):
    def deco(fn):
        ADVANTAGES[name] = fn
        return fn

    return deco


def temporal_bonus(
    acc_ordered: torch.Tensor,
    acc_shuffled: torch.Tensor,
    is_video: torch.Tensor,
    *,
    mu: float = 0.8,
    alpha: float = 0.3,
    threshold: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """T-GRPO's temporal reward, per group.

    acc_ordered (N, G), acc_shuffled (N, G~) (rows of image groups are ignored), is_video (N,) bool.
    p = mean ordered accuracy, p~ = mean shuffled accuracy of the same group. When p >= mu * p~ (boundary included),
    every ordered completion with accuracy > threshold gets +alpha. Images never get it.

    Returns (bonus (N, G), granted (N,) bool: the group's bonus was paid to at least one completion (condition held
    and something was correct; Video-R1 logs the bare condition, which also counts p = p~ = 0), p (N,), p~ (N,)).
    p~ is NaN for image groups.
    """
    acc_ordered = acc_ordered.to(torch.float64)
    is_video = is_video.to(torch.bool)
    p = acc_ordered.mean(dim=1)
    if acc_shuffled.numel():
        p_shuf = acc_shuffled.to(torch.float64).mean(dim=1)
    else:
        p_shuf = torch.full_like(p, float("nan"))
    p_shuf = torch.where(is_video, p_shuf, torch.full_like(p_shuf, float("nan")))
    condition = is_video & (p >= mu * torch.nan_to_num(p_shuf, nan=float("inf")) - _BOUNDARY_EPS)
    correct = acc_ordered > threshold
    paid = condition.unsqueeze(1) & correct
    bonus = torch.where(paid, torch.full_like(acc_ordered, alpha), torch.zeros_like(acc_ordered))
    return bonus, paid.any(dim=1), p, p_shuf


def length_bonus(
    acc: torch.Tensor,
    lengths: torch.Tensor,
    *,
    omega: float = 0.2,
    min_len: int = 320,
    max_len: int = 512,
    threshold: float = 0.1,
) -> torch.Tensor:
    """Video-R1's length reward, per group: when more than one completion of the group is correct
    (accuracy > threshold), each correct one with min_len <= tokens <= max_len gets +omega. (N, G) -> (N, G)."""
    acc = acc.to(torch.float64)
    correct = acc > threshold
    enough = correct.sum(dim=1, keepdim=True) > 1
    in_range = (lengths >= min_len) & (lengths <= max_len)
    return torch.where(enough & correct & in_range, torch.full_like(acc, omega), torch.zeros_like(acc))


@register_advantage("group")
def group_advantage(rewards: torch.Tensor, eps: float = 1e-4, **_step) -> torch.Tensor:
    """(R - mean_G) / (std_G + eps), unbiased std over the group (torch.std default, as Video-R1 / TRL)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


@register_advantage("mean_only")
def mean_only_advantage(rewards: torch.Tensor, eps: float = 1e-4, **_step) -> torch.Tensor:  # noqa: ARG001
    """R - mean_G (Dr. GRPO: no std division)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


@register_advantage("batch_std")
def batch_std_advantage(rewards: torch.Tensor, eps: float = 1e-4, batch_std: float | torch.Tensor | None = None,
                        **_step) -> torch.Tensor:
    """(R - mean_G) / (std over every reward of the batch + eps) (TRL's scale_rewards='batch').

    The batch is the whole step: on several ranks the trainer passes `batch_std` pooled over every rank's rewards
    (`pooled_std` of the all-reduced `reward_moments`), as TRL gathers rewards before normalising. Without it, this
    rank's rewards; with one reward in total the std is taken as 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = batch_std
    if std is None:
        flat = rewards.reshape(-1)
        std = flat.std() if flat.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
    return (rewards - mean) / (std + eps)


def reward_moments(rewards: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of a rank's rewards, float64: summed over ranks, they give `pooled_std`."""
    flat = rewards.reshape(-1).to(torch.float64)
    return torch.stack([torch.tensor(float(flat.numel()), dtype=torch.float64), flat.sum(), (flat * flat).sum()])


def pooled_std(moments: torch.Tensor) -> torch.Tensor:
    """Unbiased std of every reward behind `moments` (the rank-sum of `reward_moments`); 0 for fewer than two."""
    n, s, ss = (float(v) for v in moments)
    if n < 2:
        return torch.zeros((), dtype=torch.float64)
    var = max(0.0, (ss - s * s / n) / (n - 1))
    return torch.tensor(var, dtype=torch.float64).sqrt()


def compute_advantages(rewards: torch.Tensor, mode: str = "group", eps: float = 1e-4,
                       batch_std: float | torch.Tensor | None = None) -> torch.Tensor:
    """`batch_std`: the step's reward std over every rank, for the `batch_std` estimator (ignored by the others)."""
    if mode not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator '{mode}' ({', '.join(sorted(ADVANTAGES))})")
    return ADVANTAGES[mode](rewards, eps, batch_std=batch_std)


def group_stats(rewards: torch.Tensor, acc: torch.Tensor, threshold: float = 0.1) -> dict[str, torch.Tensor]:
    """Per-group flags for metrics: all completions correct / all wrong (by accuracy > threshold)."""
    correct = acc > threshold
    return {"all_correct": correct.all(dim=1), "all_wrong": (~correct).all(dim=1)}


__all__ = ["ADVANTAGES", "compute_advantages", "group_stats", "length_bonus", "register_advantage", "temporal_bonus"]
