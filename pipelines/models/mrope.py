"""Reference M-RoPE positions for Qwen2-VL and Qwen2.5-VL: the rule the released checkpoints were trained with.

Why this module exists: transformers 5.16-5.23 (`Qwen2VLModel.get_rope_index`, `Qwen2_5_VLModel.get_rope_index`)
resume the text after an image or video at ``start + max(h, w) // merge``. Qwen's original code, transformers 4.x
(4.49 is what Video-R1 trained with) and vLLM resume at ``max(all vision positions) + 1``, which includes the temporal
extent ``(T - 1) * tokens_per_second * second_per_grid_t`` of a video. The two disagree whenever that temporal extent
exceeds the spatial one (long or sparsely sampled videos), so an unpatched HF forward trains and evaluates at
positions the checkpoints never saw, and RL that samples with vLLM differentiates log-probs of another distribution.
No library offers the reference rule for transformers 5, so it is written here, once, as a pure function, and bound
onto the model's `get_rope_index` by `install_reference_rope` (which every model load in the project calls).

Temporal positions are ``floor(t * (second_per_grid_t * tokens_per_second))`` with the factor and the product in
float64, exactly as vLLM computes them (``Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions``, checked
against vLLM's own output in ``tests/test_vllm_engine.py``). transformers 4.x evaluated ``t * second_per_grid_t *
tokens_per_second`` left to right in float32, which truncates one position lower or higher for some fps values that
have no exact binary fraction (sampled fps 0.3: vLLM 0, 13, 26, 39; float32 0, 13, 26, 40). RL samples with vLLM and
differentiates the HF forward, so the two engines must agree to the position; the difference to 4.x is at most one
position on the time axis.
"""

from __future__ import annotations

import functools
import itertools
import types
from typing import Any

import torch

# Which families get the binding, and with which time rule, is the adapter's `reference_rope` declaration
# (pipelines.models.families): this module only knows the rule.


def vision_positions(start: int, grid_thw, spatial_merge_size: int, time_scale: float | torch.Tensor | None,
                     device=None) -> torch.Tensor:
    """(3, t*h*w) positions of one image/video's merged tokens starting at `start`.

    `time_scale` is a (second_per_grid_t, tokens_per_second) pair whose product (float64) spaces the temporal steps,
    or None for one position per temporal step (Qwen2-VL, and images).
    """
    t, h, w = (int(x) for x in grid_thw)
    h, w = h // spatial_merge_size, w // spatial_merge_size
    t_index = torch.arange(t, device=device).view(-1, 1).expand(-1, h * w)
    if time_scale is not None:
        second_per_grid_t, tokens_per_second = time_scale
        factor = float(second_per_grid_t) * float(tokens_per_second)  # vLLM: a Python float (float64)
        t_index = (t_index.to(torch.float64) * factor).long()
    t_index = t_index.flatten()
    h_index = torch.arange(h, device=device).view(1, -1, 1).expand(t, -1, w).flatten()
    w_index = torch.arange(w, device=device).view(1, 1, -1).expand(t, h, -1).flatten()
    return torch.stack([t_index, h_index, w_index]) + start


def reference_rope_index(
    input_ids: torch.Tensor,
    mm_token_type_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    spatial_merge_size: int,
    tokens_per_second: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids (3, B, L), rope_deltas (B, 1)) by the reference rule; padding positions are left at 0 (as HF).

    `mm_token_type_ids` marks text 0, image 1, video 2 (the processor's output); `tokens_per_second` None means
    Qwen2-VL's rule (one position per temporal grid step).
    """
    position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
    grids = {1: iter(image_grid_thw) if image_grid_thw is not None else iter(()),
             2: iter(video_grid_thw) if video_grid_thw is not None else iter(())}
    seconds = iter(second_per_grid_ts) if second_per_grid_ts is not None else None
    deltas = []
    for b in range(input_ids.shape[0]):
        types_b = mm_token_type_ids[b]
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(types_b, dtype=torch.bool)
        types_b = types_b[keep]
        pieces, current = [], 0
        for modality, group in itertools.groupby(types_b.tolist()):
            n = len(list(group))
            if modality == 0:
                pieces.append(torch.arange(n, device=input_ids.device).view(1, -1).expand(3, -1) + current)
                current += n
                continue
            grid = next(grids[modality], None)
            if grid is None:
                raise ValueError(f"sample {b}: more {'video' if modality == 2 else 'image'} placeholders than grids")
            scale = None
            if modality == 2 and tokens_per_second is not None:
                spg = next(seconds, None) if seconds is not None else None
                scale = (spg if spg is not None else torch.tensor(1.0), tokens_per_second)
            pos = vision_positions(current, grid, spatial_merge_size, scale, device=input_ids.device)
            if pos.shape[1] != n:
                raise ValueError(f"sample {b}: {n} placeholder tokens but grid {list(map(int, grid))} "
                                 f"gives {pos.shape[1]} merged tokens")
            pieces.append(pos)
            current = int(pos.max()) + 1
        positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        position_ids[:, b, keep] = positions.to(position_ids)
        top = int(positions.max()) + 1 if positions.numel() else 0
        deltas.append(top - int(keep.sum()))
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def _bound_get_rope_index(self, input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                          second_per_grid_ts=None, attention_mask=None, *, uses_time: bool, **kwargs):
    vision = self.config.vision_config
    return reference_rope_index(
        input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask,
        spatial_merge_size=vision.spatial_merge_size,
        tokens_per_second=getattr(vision, "tokens_per_second", None) if uses_time else None,
    )


def install_reference_rope(model: Any, *, uses_time: bool) -> bool:
    """Bind the reference rule onto the model's `get_rope_index` (through wrappers); True if bound, False when the
    model has none. `uses_time`: videos spaced by tokens_per_second * second_per_grid_t (Qwen2.5-VL), else one
    position per temporal grid step (Qwen2-VL). Called by `Adapter.install_rope` for the families that need it."""
    from pipelines.models.families import model_core

    owner = model_core(model)
    if owner is None or not hasattr(type(owner), "get_rope_index"):
        return False
    owner.get_rope_index = types.MethodType(functools.partial(_bound_get_rope_index, uses_time=uses_time), owner)
    owner._videor1_reference_rope = True
    return True
