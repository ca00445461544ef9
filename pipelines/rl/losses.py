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

Rollout correction (``rl.rollout_correction``): when the rollouts come from another engine than the policy itself
(vLLM), each sequence's (or token's) loss is weighted by the importance ratio pi_trainer / pi_engine of the sampled
tokens, truncated or masked outside [C_min, C_max], exactly as TRL's GRPOTrainer does it (``rollout_correction``;
both log-probs are those of the distribution the engine samples from: ``sampler_logprobs``).

Aggregations take the normalisers of the WHOLE step (``num_sequences``, ``num_tokens``) so a step split into
several forward/backward chunks sums to exactly the loss of one big batch; on several ranks the trainer passes the
step's all-reduced counts divided by the world size, so the rank-average of the gradients (DDP) is that of one batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

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
    rollout_weights: torch.Tensor | None = None,
) -> LossOutput:
    """GRPO-family loss of a (chunk of a) batch.

    logp / old_logp / ref_logp: (B, L) per-token log-probs of the completion tokens; advantages: (B,);
    mask: (B, L) 1 for tokens up to and including the first EOS. old_logp None -> logp.detach() (one iteration).
    num_sequences / num_tokens: normalisers of the whole step (default: this chunk's); on several ranks the step's
    global counts divided by the world size, since the gradients are averaged over ranks.
    rollout_weights: (B, L) or (B, 1) rollout-correction weights (`rollout_correction(...).weights`), multiplying the
    policy term before the KL term is added (TRL's order); None for rollouts sampled from the policy itself.
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
    if rollout_weights is not None:
        per_token = per_token * rollout_weights.to(per_token.dtype).detach()
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


# -- rollout correction ---------------------------------------------------------------------------------------
# The engine's sampling distribution, seen from the trainer. vLLM's sampler (vllm/v1/sample/sampler.py and
# ops/topk_topp_sampler.py, vLLM 0.32) turns the model's logits into the distribution it samples from in this order:
# float32, logit bias (the special tokens the project suppresses), temperature (skipped below 1e-5: greedy), top-p
# (sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p, always keep the most likely one),
# softmax. Its ``logprobs_mode="processed_logprobs"`` reports the sampled token's log-prob under exactly that
# distribution. The trainer's own log-prob forward (`rollout.completion_logprobs`) stops after the temperature: over a
# nucleus of mass Z < 1 the two differ by -log Z per token (~0.07 at T 0.7 / top_p 0.95 on the random tiny model), so a
# mismatch metric or an importance ratio between them reads that, not the engines' disagreement.
# `sampler_logprobs` applies vLLM's processing to the trainer's logits, so both sides are the same function of the
# weights: identical weights give ratio 1 and a mismatch near float rounding at any temperature and top_p.
_SAMPLING_EPS = 1e-5


def sampler_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0,
                     logit_bias: Mapping[int, float] | None = None) -> torch.Tensor:
    """(B, L) log-probs of `token_ids` under the distribution vLLM samples from, computed from (B, L, V) `logits`.

    The sampled token always counts as inside the nucleus (it was inside the engine's, by construction): a token on
    the nucleus edge that the trainer's float rounding would drop gets its renormalised log-prob instead of -inf.
    Row by row (one sequence's (L, V) sort at a time), without gradient: this feeds metrics and importance weights.
    """
    out = torch.empty(token_ids.shape, dtype=torch.float32, device=logits.device)
    bias_ids = bias_vals = None
    if logit_bias:
        bias_ids = torch.tensor(list(logit_bias), dtype=torch.long, device=logits.device)
        bias_vals = torch.tensor(list(logit_bias.values()), dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for b in range(logits.shape[0]):
            x = logits[b].detach().to(torch.float32).clone()  # (L, V)
            ids = token_ids[b].long().unsqueeze(-1)
            if bias_ids is not None:
                x[:, bias_ids] += bias_vals
            if temperature >= _SAMPLING_EPS:
                x = x / float(temperature)
            if top_p < 1.0:
                x_sort, idx = x.sort(dim=-1, descending=False)
                cum = x_sort.softmax(dim=-1).cumsum(dim=-1)
                drop_sorted = cum <= 1.0 - float(top_p)
                drop_sorted[:, -1] = False
                drop = torch.zeros_like(drop_sorted).scatter_(-1, idx, drop_sorted)
                drop.scatter_(-1, ids, False)  # the sampled token was in the engine's nucleus
                x = x.masked_fill(drop, -math.inf)
            out[b] = torch.log_softmax(x, dim=-1).gather(-1, ids).squeeze(-1)
    return out


CORRECTION_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class RolloutCorrection:
    """Importance weights of one chunk and the sums its metrics are made of (summed over chunks and ranks)."""

    weights: torch.Tensor  # (B, L) token modes, (B, 1) sequence modes; detached
    ratio_sum: float  # over the units below, after truncation / masking (what TRL logs)
    ratio_min: float
    ratio_max: float
    units: int  # completion tokens (token modes) or sequences (sequence modes)
    outside: int  # units whose ratio fell outside [C_min, C_max]: masked (set to 0) or truncated


def rollout_correction(policy_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                       mode: str = "sequence_mask", c_max: float | None = 3.0, c_min: float | None = None
                       ) -> RolloutCorrection:
    """TRL's vLLM importance-sampling correction (trl 1.16, ``trl/trainer/grpo_trainer.py``,
    ``GRPOTrainer._generate_and_score_completions``: ``vllm_importance_sampling_mode`` / ``_clip_max`` / ``_clip_min``).

    policy_logp: (B, L) the trainer's log-probs of the sampled tokens before the update (detached); rollout_logp: the
    engine's for the same tokens, NaN where it reported none; mask: (B, L) completion tokens. As TRL:
    ``d = nan_to_num((policy - rollout) * mask, 0)``; token modes: ratio = exp(d) per token; sequence modes:
    ratio = exp(sum of d over the sequence's tokens) -- the SUM of log-ratios (the probability ratio of the whole
    sequence), not GSPO's length-normalised mean. ``*_truncate``: clamp(ratio, C_min, C_max); ``*_mask``: ratio set to
    0 where ratio < C_min or ratio > C_max (a missing bound: none). The weights multiply the per-token policy term.
    Metrics as TRL's ``sampling/importance_sampling_ratio/*``: over the sequences (sequence modes) or the completion
    tokens (token modes), after truncation / masking.
    """
    if mode not in CORRECTION_MODES or mode == "none":
        raise ValueError(f"rollout correction mode must be one of {', '.join(CORRECTION_MODES[1:])}, not {mode!r}")
    mask_f = mask.to(torch.float32)
    diff = torch.nan_to_num((policy_logp.detach().float() - rollout_logp.float()) * mask_f, nan=0.0)
    sequence = mode.startswith("sequence")
    log_ratio = diff.sum(dim=-1, keepdim=True) if sequence else diff
    ratio = torch.exp(log_ratio)
    lo = -math.inf if c_min is None else float(c_min)
    hi = math.inf if c_max is None else float(c_max)
    outside = (ratio < lo) | (ratio > hi)
    if mode.endswith("truncate"):
        weights = torch.clamp(ratio, min=c_min, max=c_max) if (c_min is not None or c_max is not None) else ratio
    else:
        weights = ratio.masked_fill(outside, 0.0)
    units = torch.ones_like(weights, dtype=torch.bool) if sequence else mask.bool()
    flat, out_flat = weights[units], outside[units]
    if not flat.numel():
        return RolloutCorrection(weights=weights, ratio_sum=0.0, ratio_min=math.inf, ratio_max=-math.inf, units=0,
                                 outside=0)
    return RolloutCorrection(weights=weights, ratio_sum=float(flat.sum()), ratio_min=float(flat.min()),
                             ratio_max=float(flat.max()), units=int(flat.numel()), outside=int(out_flat.sum()))


__all__ = ["AGGREGATIONS", "CORRECTION_MODES", "LossOutput", "RATIOS", "RolloutCorrection", "kl_k3", "policy_loss",
           "register_loss", "register_ratio", "rollout_correction", "sampler_logprobs"]
