"""The GRPO-family policy loss: pure functions over per-token tensors, unit-tested on tiny hand-computed inputs.

One objective, two registries (verl style, a new variant is one decorated function):

- importance ratios (``rl.importance_sampling``): ``token`` (GRPO/PPO: exp(logp - old_logp) per token) or
  ``sequence`` (GSPO: exp of the length-normalised sum of token log-ratios, one ratio per sequence);
- aggregations (``rl.loss_type``): how the masked per-token loss becomes a scalar: ``grpo`` (mean over each
  sequence's tokens, then over sequences: Video-R1), ``bnpo``/``dapo`` (mean over every token of the batch),
  ``dr_grpo`` (sum / (sequences * max_completion_length)).

Per token: ``loss = -(min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) - beta * kl)`` with the k3 estimator
``x = clamp(ref_logp - logp, -10, 10); kl = exp(x) - x - 1``. With one iteration per rollout ``old_logp =
logp.detach()``, so r == 1 and the gradient is Video-R1's policy gradient + KL.

Aggregations take the normalisers of the WHOLE step (``num_sequences``, ``num_tokens``) so a step split into
several forward/backward chunks sums to exactly the loss of one big batch; on several ranks the trainer passes the
step's all-reduced counts divided by the world size, so the rank-average of the gradients (DDP) is that of one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

RATIOS: dict[str, Callable[..., torch.Tensor]] = {}
AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {}


def register_ratio(name: str):
    def deco(fn):
        RATIOS[name] = fn
        return fn

    return deco


def register_loss(*names: str):
    def deco(fn):
        for n in names:
            AGGREGATIONS[n] = fn
        return fn

    return deco


def _seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


# -- importance ratios: log-ratio per token (B, L) --------------------------------------------------------------
@register_ratio("token")
def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: ARG001
    return logp - old_logp


@register_ratio("sequence")
def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO: log s_i = mean over the sequence's tokens of (logp - old_logp), broadcast to every token."""
    return _seq_mean(logp - old_logp, mask).unsqueeze(-1).expand_as(logp)


def _positive(n: float) -> float:
    """A normaliser: the count itself (fractional on several ranks: global count / world size), 1 for none."""
    return n if n > 0 else 1.0


# -- aggregations ---------------------------------------------------------------------------------------------
@register_loss("grpo")
def grpo_aggregate(per_token: torch.Tensor, mask: torch.Tensor, *, num_sequences: float, num_tokens: float,
                   max_completion_length: int) -> torch.Tensor:  # noqa: ARG001
    """Sample-level: mean over each sequence's tokens, then mean over sequences (Video-R1)."""
    return _seq_mean(per_token, mask).sum() / _positive(num_sequences)


@register_loss("bnpo", "dapo")
def token_aggregate(per_token: torch.Tensor, mask: torch.Tensor, *, num_sequences: float, num_tokens: float,
                    max_completion_length: int) -> torch.Tensor:  # noqa: ARG001
    """Token-level: sum over every completion token of the step / number of such tokens."""
    return (per_token * mask).sum() / _positive(num_tokens)


@register_loss("dr_grpo")
def dr_grpo_aggregate(per_token: torch.Tensor, mask: torch.Tensor, *, num_sequences: float, num_tokens: float,
                      max_completion_length: int) -> torch.Tensor:  # noqa: ARG001
    """Dr. GRPO: sum over tokens / (sequences * max_completion_length): a constant normaliser, no length bias."""
    return (per_token * mask).sum() / _positive(num_sequences * max_completion_length)


# -- the objective --------------------------------------------------------------------------------------------
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): x = clamp(ref - logp, -10, 10); exp(x) - x - 1."""
    x = torch.clamp(ref_logp - logp, -10.0, 10.0)
    return torch.exp(x) - x - 1.0


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    kl: torch.Tensor  # masked mean over tokens (detached), 0 when beta == 0 / no reference
    clip_ratio: torch.Tensor  # fraction of tokens whose clipped term was the active one (detached)
    num_tokens: torch.Tensor


def policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    importance_sampling: str = "token",
    max_completion_length: int | None = None,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> LossOutput:
    """GRPO-family loss of a (chunk of a) batch.

    logp / old_logp / ref_logp: (B, L) per-token log-probs of the completion tokens; advantages: (B,);
    mask: (B, L) 1 for tokens up to and including the first EOS. old_logp None -> logp.detach() (one iteration).
    num_sequences / num_tokens: normalisers of the whole step (default: this chunk's); on several ranks the step's
    global counts divided by the world size, since the gradients are averaged over ranks.
    """
    if loss_type not in AGGREGATIONS:
        raise ValueError(f"unknown loss_type '{loss_type}' ({', '.join(sorted(AGGREGATIONS))})")
    if importance_sampling not in RATIOS:
        raise ValueError(f"unknown importance_sampling '{importance_sampling}' ({', '.join(sorted(RATIOS))})")
    mask = mask.to(logp.dtype)
    if old_logp is None:
        old_logp = logp.detach()
    log_ratio = RATIOS[importance_sampling](logp, old_logp, mask)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    obj1, obj2 = ratio * adv, clipped * adv
    per_token = -torch.min(obj1, obj2)
    if beta != 0.0 and ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(logp)
    n_tok = int(mask.sum().item())
    loss = AGGREGATIONS[loss_type](
        per_token, mask,
        num_sequences=num_sequences if num_sequences is not None else logp.shape[0],
        num_tokens=num_tokens if num_tokens is not None else n_tok,
        max_completion_length=max_completion_length if max_completion_length is not None else logp.shape[1],
    )
    with torch.no_grad():
        denom = mask.sum().clamp(min=1.0)
        is_clipped = ((ratio < 1.0 - epsilon_low) & (adv < 0)) | ((ratio > 1.0 + epsilon_high) & (adv > 0))
        clip_ratio = (is_clipped.to(mask.dtype) * mask).sum() / denom
        kl_mean = (kl.detach() * mask).sum() / denom
    return LossOutput(loss=loss, kl=kl_mean, clip_ratio=clip_ratio, num_tokens=mask.sum().detach())


__all__ = ["AGGREGATIONS", "LossOutput", "RATIOS", "kl_k3", "policy_loss", "register_loss", "register_ratio"]
