"""Rewards -> advantages for GRPO / T-GRPO. Pure tensor math, unit-tested against hand-computed numbers.

Everything here works on a step's groups laid out as rows: ``acc`` is ``(N, G)`` (N prompts, G ordered completions
each), so the temporal and length bonuses are computed PER GROUP and any number of prompts per device is correct.
(Video-R1 takes p and p~ as means over the whole device batch, which is only right at one prompt per device, #96.)

Advantage estimators live in a registry (verl/EasyR1 style): a new one is one decorated function
``fn(rewards (N, G), eps, **step) -> (N, G)``. ``step`` is what the trainer knows of the whole step beyond this
rank's rewards (now ``batch_std``: the reward std over every rank); an estimator takes what it uses and ignores the
rest, as reward plugins do.

T-GRPO's temporal reward has a registry of its own (``rl.temporal_rule``, issue 25): a rule is one decorated function
``fn(acc_ordered (N, G), acc_shuffled (N, G~), is_video (N,), *, agreement (N, G) or None, mu, alpha, threshold)
-> TemporalReward``. ``video_r1`` is Video-R1's rule; ``contrast`` pays each ordered completion by how much its answer
differs from what the same policy answers on the shuffled frames. Where the temporal reward enters is
``rl.temporal_term`` (`temporal_advantages`): added to the reward before the advantage (Video-R1), or as a separate,
group-centred advantage term that the group's std does not divide away (Video-R1 #51).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {}
TEMPORAL_RULES: dict[str, Callable[..., "TemporalReward"]] = {}

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


@dataclass
class TemporalReward:
    """What a temporal rule pays one step's groups. bonus (N, G): added to each ordered completion (0 for image
    groups); fired (N,) bool: the rule paid a positive bonus to at least one completion of the group; p (N,) mean
    ordered accuracy; p_shuffled (N,) mean shuffled accuracy (NaN for groups without shuffled completions)."""

    bonus: torch.Tensor
    fired: torch.Tensor
    p: torch.Tensor
    p_shuffled: torch.Tensor


def register_temporal(name: str):
    def deco(fn):
        TEMPORAL_RULES[name] = fn
        return fn

    return deco


@register_temporal("video_r1")
def video_r1_rule(acc_ordered: torch.Tensor, acc_shuffled: torch.Tensor, is_video: torch.Tensor, *, mu: float = 0.8,
                  alpha: float = 0.3, threshold: float = 0.1, **_step) -> TemporalReward:
    """Video-R1's rule (`temporal_bonus`): +alpha to every correct ordered completion of a group whose p >= mu * p~."""
    bonus, granted, p, p_shuf = temporal_bonus(acc_ordered, acc_shuffled, is_video, mu=mu, alpha=alpha,
                                               threshold=threshold)
    return TemporalReward(bonus, granted, p, p_shuf)


@register_temporal("contrast")
def contrast_rule(acc_ordered: torch.Tensor, acc_shuffled: torch.Tensor, is_video: torch.Tensor, *,
                  agreement: torch.Tensor | None = None, alpha: float = 0.3, **_step) -> TemporalReward:
    """Per-sample contrast with the shuffled frames: bonus_i = alpha * (acc_i - s_i), where s_i is the share of the
    group's shuffled completions whose answer equals completion i's (`answer_agreement`).

    A correct answer earns alpha * (1 - p~): a lot when the policy cannot give it without the frame order, nothing
    when it gives it anyway (an order-free question, or an order question answered from a shortcut). A wrong answer
    loses alpha * s_i: most when it is what the policy also says on shuffled frames (a shortcut's mistake), so among
    several wrong answers the shortcut's is pushed down hardest. Where only one wrong answer exists (two options)
    the rule scales the group's reward gap by 1 + 2 alpha (1 - p~), which a per-group std divides away: use it with
    `mean_only` or with rl.temporal_term = advantage. Without `agreement` (no answers known) s_i is p~ for correct
    completions and 0 for wrong ones. mu is not used."""
    acc = acc_ordered.to(torch.float64)
    is_video = is_video.to(torch.bool)
    p = acc.mean(dim=1)
    has_shuf = is_video & torch.isfinite(acc_shuffled.to(torch.float64)).all(dim=1) if acc_shuffled.numel() else \
        torch.zeros_like(is_video)
    p_shuf = acc_shuffled.to(torch.float64).mean(dim=1) if acc_shuffled.numel() else torch.full_like(p, float("nan"))
    p_shuf = torch.where(has_shuf, p_shuf, torch.full_like(p_shuf, float("nan")))
    if agreement is None:
        agreement = torch.where(acc > 0, torch.nan_to_num(p_shuf, nan=0.0).unsqueeze(1).expand_as(acc),
                                torch.zeros_like(acc))
    bonus = alpha * (acc - agreement.to(torch.float64))
    bonus = torch.where(has_shuf.unsqueeze(1), bonus, torch.zeros_like(bonus))
    return TemporalReward(bonus, (bonus > 0).any(dim=1), p, p_shuf)


def answer_agreement(ordered: Sequence[Sequence[str]], shuffled: Sequence[Sequence[str]]) -> torch.Tensor:
    """(N, G): for each ordered answer, the share of its group's shuffled answers equal to it (compared stripped and
    case-folded, runs of spaces as one; an empty answer agrees with nothing). Groups without shuffled answers: 0."""
    def norm(a: str) -> str:
        return " ".join(a.lower().split()).rstrip(".")

    G = max((len(o) for o in ordered), default=0)
    out = torch.zeros((len(ordered), G), dtype=torch.float64)
    for n, (o, sh) in enumerate(zip(ordered, shuffled)):
        shn = [norm(a) for a in sh]
        for i, a in enumerate(o):
            a = norm(a)
            if a and shn:
                out[n, i] = sum(x == a for x in shn) / len(shn)
    return out


def temporal_rule(name: str, acc_ordered: torch.Tensor, acc_shuffled: torch.Tensor, is_video: torch.Tensor,
                  **kwargs) -> TemporalReward:
    if name not in TEMPORAL_RULES:
        raise ValueError(f"unknown temporal rule '{name}' ({', '.join(sorted(TEMPORAL_RULES))})")
    return TEMPORAL_RULES[name](acc_ordered, acc_shuffled, is_video, **kwargs)


def temporal_advantages(rewards: torch.Tensor, bonus: torch.Tensor, term: str = "reward", mode: str = "group",
                        eps: float = 1e-4, batch_std: float | torch.Tensor | None = None) -> torch.Tensor:
    """Advantages of rewards (N, G) (without the temporal bonus) and the temporal bonus (N, G).

    term = "reward": estimator(rewards + bonus) (Video-R1: under `group` a bonus paid to every correct completion of
    a binary-reward group is divided away by the std, #51). term = "advantage": estimator(rewards) + (bonus - its
    group mean): the temporal term is centred per group but never divided by the reward std, so it survives any
    estimator. Under `mean_only` the two are the same."""
    if term == "reward":
        return compute_advantages(rewards + bonus, mode, eps, batch_std=batch_std)
    if term == "advantage":
        return compute_advantages(rewards, mode, eps, batch_std=batch_std) + (bonus - bonus.mean(dim=1, keepdim=True))
    raise ValueError(f"unknown temporal term '{term}' (reward, advantage)")


def advantage_change(with_bonus: torch.Tensor, without: torch.Tensor) -> tuple[float, float]:
    """(sum |A_with - A_without|, sum |A_without|) over the given rows: their ratio is the share of the advantages
    the temporal reward moved after normalisation (0: normalised away)."""
    return float((with_bonus - without).abs().sum()), float(without.abs().sum())


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


__all__ = ["ADVANTAGES", "TEMPORAL_RULES", "TemporalReward", "advantage_change", "answer_agreement",
           "compute_advantages", "group_stats", "length_bonus", "register_advantage", "register_temporal",
           "temporal_advantages", "temporal_bonus", "temporal_rule"]
