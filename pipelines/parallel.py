"""Sequence parallelism for Qwen-VL on DeepSpeed's Ulysses engine (`distributed.sequence_parallel`).

A group of ``sp`` ranks shares one micro-batch. Every rank of the group runs the model's own forward on the whole
batch up to the language model: embeddings, the vision features (`get_video_features` / `get_image_features` of the
model core, so their per-item sharing and the ZeRO-3 lockstep of `pipelines.zero3` apply unchanged) and their merge
into the text (`masked_scatter`, Qwen3-VL's deepstack), and the 3-D M-RoPE positions by the project's reference rule
(`get_rope_index` on the unsliced batch). Then a forward pre-hook on the language model cuts the merged sequence into
``sp`` contiguous shards (embeddings, 4 x B x L positions, deepstack slots) and each rank runs the decoder layers on its
shard; inside every attention layer DeepSpeed's `UlyssesSPAttentionHF` swaps sequence for heads (all-to-all), runs
the model's own attention (sdpa / FlashAttention) on full sequences for ``heads / sp`` heads, and swaps back. The
logits of the needed positions are computed on each shard, their per-token log-probs (RL) or losses (SFT) gathered
over the group (autograd), and the loss code runs unchanged on the full per-token tensors, identical on every rank.

Why this is written here and not taken whole from a library (read in site-packages, see
/work/shared/reference/sequence-parallel.md): DeepSpeed's `register_with_transformers` overwrites the core attention
key (``sdpa``) that the vision tower also uses, and its `UlyssesSPDataLoaderAdapter`, like accelerate's SP path,
takes 2-D tensors only (no pixel values, grids or 3/4 x B x L positions; accelerate also refuses Qwen3.5's linear
attention); TRL's GRPOTrainer refuses SP. So the attention layer is DeepSpeed's (`UlyssesSPAttentionHF` under a key of
our own, set on the text config only, and only while a sequence-parallel forward runs), the groups are DeepSpeed's
(`parallel_state_sp`), and this module adds only the vision-language glue: pure tensor functions (right padding,
shards, positions, targets, deepstack indices, vision partitions) and two autograd collectives.

Exactness. The Ulysses wrapper drops attention masks (causal only), so the batch is first moved to right padding
(real tokens first, in order; a left pad in front of real tokens would be attended), then padded at the end to a
multiple of ``sp``. Targets are shifted on the full sequence before it is cut (a shard's last token predicts the next
shard's first). The gathers' backward sums the group's gradients (all-reduce), so every rank's parameter gradient
holds the contribution of its shard times ``sp`` (each rank computes the same loss); DDP and DeepSpeed average
gradients over all ``sp x dp`` ranks, which makes the update exactly that of one rank holding the whole batch. Tested
on 2 gloo ranks to 1e-5 against one rank (tests/test_parallel.py, tests/test_sequence_parallel.py).

Vision encoder frames are sharded too (as Long-RL does) where the family's tower attends within one temporal patch
(`Adapter.sp_shard_frames`): each rank encodes a contiguous share of the batch's temporal patches (images whole) and
the merged features are all-gathered (autograd) before the merge. A call with fewer temporal patches than ranks (one
image, the lockstep's dummy) runs whole on every rank.

Generation is not split: each rank of a group generates the group's rollouts (the trainer broadcasts the first rank's
completions so the group trains on identical tokens).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

SP_ATTENTION = "videor1_ulysses"
IGNORE_INDEX = -100
# Per-row (B, L) inputs of a Qwen-VL forward: moved to right padding with the sequence. Anything else of shape (B, L)
# would be silently misaligned, so it is refused (`to_right_padding`).
ROW_KEYS_PAD = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "labels": IGNORE_INDEX}
VISUAL_KEYS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")


# ---------------------------------------------------------------------------------------------------------------------
# Topology
@dataclass(frozen=True)
class Topology:
    """Where this rank sits: ``size`` ranks share a sequence (contiguous global ranks, DeepSpeed's layout)."""

    size: int = 1
    rank: int = 0  # within the sequence-parallel group
    world: int = 1
    global_rank: int = 0
    group: Any = None  # the torch process group of this rank's SP group (None when size == 1)

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: groups that read different records."""
        return self.world // self.size

    @property
    def dp_rank(self) -> int:
        return self.global_rank // self.size

    @property
    def leader(self) -> bool:
        """First rank of its group: the one whose rollouts and metrics count."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def setup(sequence_parallel: int) -> Topology:
    """The topology of this process; for ``sequence_parallel > 1`` also DeepSpeed's SP groups (created once, a
    collective over every rank) and DeepSpeed's communication layer on top of torch's initialised process group."""
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    world, grank = (dist.get_world_size(), dist.get_rank()) if on else (1, 0)
    sp = int(sequence_parallel)
    if sp <= 1:
        return Topology(1, 0, world, grank, None)
    if not on:
        raise SequenceParallelSetupError(f"distributed.sequence_parallel={sp} needs {sp} or more ranks",
                                         hint=f"run with --nproc {sp} (a multiple of sequence_parallel)")
    if world % sp:
        raise SequenceParallelSetupError(f"distributed.sequence_parallel={sp} does not divide the {world} ranks",
                                         hint="use a number of processes that is a multiple of sequence_parallel")
    import deepspeed
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

    if not ds_comm.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sequence_parallel_size=sp)
    group = mpu.get_sequence_parallel_group()
    if dist.get_world_size(group) != sp:
        raise SequenceParallelSetupError(f"DeepSpeed's sequence-parallel groups were made for "
                                         f"{dist.get_world_size(group)} ranks, not {sp}")
    return Topology(sp, dist.get_rank(group), world, grank, group)


from pipelines.errors import VideoR1Error  # noqa: E402


class SequenceParallelSetupError(VideoR1Error):
    """A run whose ranks cannot be arranged into sequence-parallel groups."""


# ---------------------------------------------------------------------------------------------------------------------
# Pure layout functions (B = rows, L = sequence length)
def padded_length(length: int, sp: int) -> int:
    """`length` rounded up to a multiple of `sp` (every shard has the same length: Ulysses' all-to-all needs it)."""
    return -(-int(length) // int(sp)) * int(sp)


def shard_bounds(length: int, sp: int, rank: int) -> tuple[int, int]:
    """[start, end) of `rank`'s contiguous shard of a sequence of `length` (a multiple of `sp`)."""
    if length % sp:
        raise ValueError(f"sequence length {length} is not a multiple of sequence_parallel {sp}")
    chunk = length // sp
    return rank * chunk, (rank + 1) * chunk


def right_padding_order(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) permutation per row: new position k holds old position order[b, k]; real tokens (mask 1) first in their
    order, then the padding. Causal attention without a mask is exact for every real token only in this layout."""
    keys = (attention_mask == 0).to(torch.int64)
    return torch.sort(keys, dim=1, stable=True).indices


def apply_order(t: torch.Tensor, order: torch.Tensor, length: int, pad_value) -> torch.Tensor:
    """`t` (B, L, ...) reordered per row by `order`, then padded at the end to `length` with `pad_value`."""
    idx = order.view(*order.shape, *([1] * (t.dim() - 2))).expand(*order.shape, *t.shape[2:])
    out = torch.gather(t, 1, idx.to(t.device))
    extra = length - out.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a sequence of {out.shape[1]} to {length}")
    if extra:
        pad = torch.full((out.shape[0], extra, *out.shape[2:]), pad_value, dtype=out.dtype, device=out.device)
        out = torch.cat([out, pad], dim=1)
    return out


def to_right_padding(inputs: dict, sp: int, pad_token_id: int) -> tuple[dict, torch.Tensor, int]:
    """Model inputs moved to right padding and padded to a multiple of `sp`: (inputs, order (B, L), padded length).

    Every (B, L) tensor of the batch moves (ids, attention mask, mm_token_type_ids, labels); visual tensors and grids
    are per item and stay. An unknown (B, L) tensor is refused rather than left misaligned."""
    mask = inputs["attention_mask"]
    B, L = mask.shape
    order = right_padding_order(mask)
    length = padded_length(L, sp)
    out = {}
    for k, v in inputs.items():
        if k in ROW_KEYS_PAD:
            pad = pad_token_id if k == "input_ids" else ROW_KEYS_PAD[k]
            out[k] = apply_order(v, order, length, pad)
        elif torch.is_tensor(v) and k not in VISUAL_KEYS and v.dim() >= 2 and tuple(v.shape[:2]) == (B, L):
            raise ValueError(f"sequence parallelism: input '{k}' {tuple(v.shape)} is per token but has no padding rule")
        else:
            out[k] = v
    return out, order, length


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 1-D positions of the text row: 0, 1, ... over real tokens, 0 on padding (a position reset per pad, so
    FlashAttention's varlen path sees each pad as its own sequence and the real tokens as one)."""
    m = attention_mask.to(torch.int64)
    return ((m.cumsum(-1) - 1).clamp(min=0) * m).to(torch.int64)


def with_text_row(position_ids: torch.Tensor | None, attention_mask: torch.Tensor, rows: int = 3) -> torch.Tensor:
    """4 x B x L positions (text row + the 3 M-RoPE rows) from the model's 3 x B x L (None: text positions on every
    row, as the text model does without rope information). Qwen-VL text layers hand positions to the attention
    function only in this 4-row form, and Ulysses needs them there (it gathers them over the group)."""
    text = text_positions(attention_mask)
    if position_ids is None:
        return text.unsqueeze(0).expand(rows + 1, -1, -1).to(attention_mask.device)
    if position_ids.dim() == 2:
        position_ids = position_ids.unsqueeze(0).expand(rows, -1, -1)
    if position_ids.dim() == 3 and position_ids.shape[0] == rows + 1:
        return position_ids
    if position_ids.dim() != 3 or position_ids.shape[0] != rows:
        raise ValueError(f"position_ids of shape {tuple(position_ids.shape)}: expected {rows} x B x L")
    return torch.cat([text.unsqueeze(0).to(position_ids), position_ids], dim=0)


def split_positions(position_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The shard [start, end) of 4 x B x L positions. 3 x B x L positions are refused: the text layers would pass
    no positions to the attention, and Ulysses cannot gather them (`with_text_row` makes the 4-row form)."""
    if position_ids.dim() != 3 or position_ids.shape[0] != 4:
        raise ValueError(f"sequence parallelism needs 4 x B x L position ids (text row + M-RoPE rows), got "
                         f"{tuple(position_ids.shape)}; build them with with_text_row()")
    return position_ids[..., start:end]


def shifted(t: torch.Tensor, fill) -> torch.Tensor:
    """Next-token targets: out[:, k] = t[:, k + 1], the last column `fill` (shift BEFORE splitting: a shard's last
    position predicts the first token of the next shard)."""
    return torch.cat([t[:, 1:], torch.full_like(t[:, :1], fill)], dim=1)


def deepstack_index(visual_pos_masks: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Indices into the row-major list of visual tokens (the order of deepstack embeddings) of those inside the shard
    [start, end) of every row (any batch size)."""
    m = visual_pos_masks.bool()
    rank_of = (m.reshape(-1).to(torch.int64).cumsum(0) - 1).view_as(m)
    return rank_of[:, start:end][m[:, start:end]]


def partition_units(costs: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of `costs` for `parts` workers, each non-empty (needs len(costs) >= parts),
    boundaries where the running cost crosses k/parts of the total."""
    n = len(costs)
    if n < parts:
        raise ValueError(f"{n} units cannot feed {parts} ranks")
    total = float(sum(costs))
    bounds, acc, i = [0], 0.0, 0
    cum = []
    for c in costs:
        acc += c
        cum.append(acc)
    for k in range(1, parts):
        target = total * k / parts
        i = bounds[-1] + 1
        while i < n and cum[i - 1] < target:
            i += 1
        i = min(max(i, bounds[-1] + 1), n - (parts - k))
        bounds.append(i)
    bounds.append(n)
    return [(bounds[k], bounds[k + 1]) for k in range(parts)]


@dataclass
class VisionShard:
    """This rank's share of one vision-tower call: its pixel rows (one contiguous range: a view, no copy), grids,
    and every rank's merged-token counts."""

    start: int  # first pixel row of this rank
    end: int
    grid: torch.Tensor  # (n, 3) grids of this rank's sub-items
    merged_counts: list[int]  # merged tokens per rank (gather sizes)

    @property
    def rows(self) -> torch.Tensor:
        return torch.arange(self.start, self.end)


def vision_shard(grid_thw: torch.Tensor, sp: int, rank: int, merge: int) -> VisionShard | None:
    """Split one tower call's items into temporal patches and give each rank a contiguous share (images whole).

    None when there are fewer temporal patches than ranks (the call runs whole on every rank)."""
    grid = [tuple(int(x) for x in g) for g in grid_thw.tolist()]
    units: list[tuple[int, int]] = []  # (item, temporal index)
    costs: list[int] = []
    for i, (t, h, w) in enumerate(grid):
        for k in range(t):
            units.append((i, k))
            costs.append(h * w)
    if len(units) < sp:
        return None
    parts = partition_units(costs, sp)
    offsets, off = [], 0
    for t, h, w in grid:
        offsets.append(off)
        off += t * h * w
    merged = [sum(costs[a:b]) // (merge * merge) for a, b in parts]
    a, b = parts[rank]
    sub = []
    k = a
    while k < b:  # consecutive temporal patches of one item form one sub-grid
        item, t0 = units[k]
        t1 = t0
        while k < b and units[k][0] == item:
            t1 = units[k][1] + 1
            k += 1
        _, h, w = grid[item]
        sub.append([t1 - t0, h, w])
    # Units are in pixel-row order (item, then temporal patch): a contiguous run of units is a contiguous run of rows.
    first_item, first_t = units[a]
    last_item, last_t = units[b - 1]
    start = offsets[first_item] + first_t * grid[first_item][1] * grid[first_item][2]
    end = offsets[last_item] + (last_t + 1) * grid[last_item][1] * grid[last_item][2]
    return VisionShard(start, end, torch.tensor(sub, dtype=grid_thw.dtype), merged)


# ---------------------------------------------------------------------------------------------------------------------
# Autograd collectives
class _GatherSeq(torch.autograd.Function):
    """All-gather along `dim` of per-rank pieces of (possibly) different sizes; backward: the group's gradients summed
    (all-reduce), then this rank's piece."""

    @staticmethod
    def forward(ctx, x, dim, group, sizes):
        import torch.distributed as dist

        n = dist.get_world_size(group)
        rank = dist.get_rank(group)
        sizes = list(sizes) if sizes is not None else [x.shape[dim]] * n
        top = max(sizes)
        xp = x
        if x.shape[dim] < top:
            pad_shape = list(x.shape)
            pad_shape[dim] = top - x.shape[dim]
            xp = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
        parts = [torch.empty_like(xp) for _ in range(n)]
        dist.all_gather(parts, xp.contiguous(), group=group)
        out = torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)
        ctx.dim, ctx.group, ctx.start, ctx.size = dim, group, sum(sizes[:rank]), sizes[rank]
        return out

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.start, ctx.size), None, None, None


def gather(x: torch.Tensor, dim: int, group, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenation over the group (rank order) of every rank's `x` along `dim`; differentiable (see `_GatherSeq`)."""
    return _GatherSeq.apply(x, dim, group, None if sizes is None else tuple(int(s) for s in sizes))


def _check_same_shape(t: torch.Tensor, group, what: str) -> None:
    """Every rank of the group holds the same batch shape (a mismatch would hang an all-to-all: fail instead)."""
    import torch.distributed as dist

    mine = torch.tensor(list(t.shape), dtype=torch.int64, device=t.device)  # NCCL: a tensor on the device
    n = dist.get_world_size(group)
    allv = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(allv, mine, group=group)
    shapes = [tuple(v.tolist()) for v in allv]
    if len(set(shapes)) != 1:
        raise RuntimeError(f"sequence parallelism: the ranks of a group hold different {what} {shapes}; they must "
                           "read the same records (data sharding by data-parallel rank)")


# ---------------------------------------------------------------------------------------------------------------------
# The model side
_BY_CONFIG: dict[int, "SequenceParallel"] = {}


@dataclass
class _Plan:
    start: int
    end: int
    length: int
    attention_mask: torch.Tensor  # (B, length), right-padded: the text row of the positions
    vision_stack: list = field(default_factory=list)


def _ulysses_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """The attention function under `SP_ATTENTION` (text config only): DeepSpeed's Ulysses around the core one."""
    sp = _BY_CONFIG.get(id(module.config))
    if sp is None:
        raise RuntimeError(f"{SP_ATTENTION} attention called on a model without sequence parallelism installed")
    return sp.attention(module, query, key, value, attention_mask, *args, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(SP_ATTENTION, _ulysses_attention)


class SequenceParallel:
    """Sequence parallelism installed on one model (policy or reference): hooks on its language model and vision tower,
    active only inside `SequenceParallel.forward_plan` (every other forward, generation included, is untouched)."""

    def __init__(self, model, topo: Topology, adapter):
        from pipelines.models.families import model_core

        self.topo = topo
        self.adapter = adapter
        self.core = model_core(model)
        if self.core is None:
            raise SequenceParallelSetupError(f"{type(model).__name__}: no vision-language core to split")
        self.text_config = self.core.language_model.config
        adapter.sp_check(self.core.config, topo.size)
        core_attn = self.text_config._attn_implementation
        if core_attn in (None, "eager", "paged|eager", SP_ATTENTION):
            from pipelines.models.families import SequenceParallelError

            raise SequenceParallelError(
                f"sequence parallelism needs sdpa or FlashAttention in the language model, not '{core_attn}'",
                hint="set model.attn_implementation=sdpa (or flash_attention_2 on GPUs)")
        self.core_attn = core_attn
        self.plan: _Plan | None = None
        self._uattn: dict[int, Any] = {}
        self.counts = {"forwards": 0, "attention": 0, "vision_sharded": 0, "vision_whole": 0}  # tests, bench
        _register_attention()
        _BY_CONFIG[id(self.text_config)] = self
        self.merge = int(getattr(self.core.visual, "spatial_merge_size", 2))
        self._handles = [self.core.language_model.register_forward_pre_hook(self._shard_language_inputs,
                                                                            with_kwargs=True)]
        if adapter.sp_shard_frames:
            self._handles.append(self.core.visual.register_forward_pre_hook(self._shard_vision_inputs,
                                                                            with_kwargs=True))
            self._handles.append(self.core.visual.register_forward_hook(self._gather_vision_outputs))
        self.core._videor1_sequence_parallel = self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.text_config._attn_implementation = self.core_attn
        _BY_CONFIG.pop(id(self.text_config), None)
        self.core.__dict__.pop("_videor1_sequence_parallel", None)

    # -- the attention layer -------------------------------------------------------------------------------------------
    def _ulysses_for(self, batch: int):
        """DeepSpeed's `UlyssesSPAttentionHF` for this batch size (it checks the batch dimension it was built for)."""
        if batch not in self._uattn:
            from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
            from transformers import AttentionInterface

            c = self.text_config
            u = UlyssesSPAttentionHF(
                attn=AttentionInterface._global_mapping[self.core_attn], batch_size=batch,
                attn_head_count=c.num_attention_heads,
                attn_head_size=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                kv_head_count=c.num_key_value_heads, num_hidden_layers=c.num_hidden_layers,
                process_group=self.topo.group, seq_length_is_variable=True)
            u.core_attn_implementation = self.core_attn
            self._uattn[batch] = u
        return self._uattn[batch]

    def attention(self, module, query, key, value, attention_mask, *args, **kwargs):
        uattn = self._ulysses_for(query.shape[0])
        self.counts["attention"] += 1
        groups = getattr(module, "num_key_value_groups", None)
        # FlashAttention reads its implementation name from the config (`module.config._attn_implementation`): the
        # core's name while the core runs, ours again after (the wrapper runs the core once, inside this call).
        self.text_config._attn_implementation = self.core_attn
        try:
            # Masks dropped (causal on right-padded rows, positions carry the rest), as DeepSpeed's own wrapper does.
            return uattn(module, query, key, value, None, *args, **kwargs)
        finally:
            self.text_config._attn_implementation = SP_ATTENTION
            if groups is not None:  # Ulysses rewrites it when it replicates KV heads; generation needs the original
                module.num_key_value_groups = groups

    # -- hooks ---------------------------------------------------------------------------------------------------------
    def _shard_language_inputs(self, module, args, kwargs):
        plan = self.plan
        if plan is None:
            if self.text_config._attn_implementation == SP_ATTENTION:
                self.text_config._attn_implementation = self.core_attn
            return None
        # Stays set after this forward: a gradient-checkpointed layer recomputed in backward must take this path too.
        self.text_config._attn_implementation = SP_ATTENTION
        self.counts["forwards"] += 1
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or args:
            raise RuntimeError("sequence parallelism: the language model was not called with inputs_embeds")
        if embeds.shape[1] != plan.length:
            raise RuntimeError(f"sequence parallelism: {embeds.shape[1]} embeddings, the plan has {plan.length}")
        positions = with_text_row(kwargs.get("position_ids"), plan.attention_mask.to(embeds.device))
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = embeds[:, plan.start:plan.end]
        kwargs["position_ids"] = split_positions(positions, plan.start, plan.end)
        kwargs["attention_mask"] = None
        kwargs = self.adapter.sp_shard_language_kwargs(kwargs, plan.start, plan.end)
        return args, kwargs

    def _shard_vision_inputs(self, module, args, kwargs):
        plan = self.plan
        if plan is None:
            return None
        pixels = args[0] if args else kwargs.get("hidden_states")
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        extra = [k for k, v in kwargs.items() if k not in ("grid_thw", "hidden_states") and torch.is_tensor(v)]
        shard = None
        if grid is not None and pixels is not None and not extra:
            shard = vision_shard(grid, self.topo.size, self.topo.rank, self.merge)
        plan.vision_stack.append(shard)
        self.counts["vision_whole" if shard is None else "vision_sharded"] += 1
        if shard is None:
            return None
        local = pixels[shard.start:shard.end]  # a view: the rank's frames are one contiguous block of rows
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kwargs["grid_thw"] = shard.grid.to(grid.device)
        return (local, *args[2:]) if len(args) > 2 else (local,), kwargs

    def _gather_vision_outputs(self, module, args, output):
        plan = self.plan
        if plan is None or not plan.vision_stack:
            return None
        shard = plan.vision_stack.pop()
        if shard is None:
            return None
        group = self.topo.group
        output.pooler_output = gather(output.pooler_output, 0, group, shard.merged_counts)
        deep = getattr(output, "deepstack_features", None)
        if deep:
            output.deepstack_features = [gather(d, 0, group, shard.merged_counts) for d in deep]
        output.last_hidden_state = None  # this rank's patches only: nothing downstream may read it
        return output

    @contextlib.contextmanager
    def forward_plan(self, attention_mask: torch.Tensor) -> Iterator[_Plan]:
        """Inside: forwards of this model run sequence-parallel on the right-padded batch `attention_mask` describes."""
        length = attention_mask.shape[1]
        start, end = shard_bounds(length, self.topo.size, self.topo.rank)
        _check_same_shape(attention_mask, self.topo.group, "batch shapes")
        self.plan = _Plan(start, end, length, attention_mask)
        try:
            yield self.plan
        finally:
            self.plan = None


def install(model, topo: Topology, adapter=None) -> SequenceParallel | None:
    """Sequence parallelism on `model` (before DDP / DeepSpeed / PEFT wrap it, or after: the hooks live on its core);
    None when `topo` has one rank per sequence."""
    if not topo.enabled:
        return None
    if adapter is None:
        from pipelines.models.families import adapter_for

        adapter = adapter_for(model)
    return SequenceParallel(model, topo, adapter)


def of(model) -> SequenceParallel | None:
    """The `SequenceParallel` installed on `model` (through DDP / DeepSpeed / PEFT wrappers), or None."""
    if not _BY_CONFIG:  # nothing installed in this process: the common case costs nothing
        return None
    cached = getattr(model, "__dict__", {}).get("_videor1_sp_lookup")
    if cached is not None:
        return cached if cached._handles else None
    for m in model.modules():
        sp = m.__dict__.get("_videor1_sequence_parallel")
        if sp is not None:
            model.__dict__["_videor1_sp_lookup"] = sp
            return sp
    return None


def enabled(model) -> bool:
    return of(model) is not None


# ---------------------------------------------------------------------------------------------------------------------
# Forwards
def _local_keep(needed: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Sorted local indices in [0, end - start) where any row needs the logits (union over rows)."""
    cols = needed[:, start:end].any(dim=0)
    return cols.nonzero(as_tuple=True)[0]


def _run(sp: SequenceParallel, model, inputs: dict, keep: torch.Tensor):
    with sp.forward_plan(inputs["attention_mask"]):
        return model(**inputs, logits_to_keep=keep, use_cache=False)


def completion_logprobs(model, inputs: dict, completion_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs (B, C) of the completion tokens, sequence-parallel; the same values on every rank of the
    group (gathered), equal to `rollout.completion_logprobs` on one rank. Completion padding (attention mask 0) gets 0.

    `inputs`: the rollout's model inputs (prompts left-padded, completions right-padded after them)."""
    sp = of(model)
    if sp is None:
        raise RuntimeError("completion_logprobs: sequence parallelism is not installed on this model")
    B, C = completion_ids.shape
    mask = inputs["attention_mask"]
    L = mask.shape[1]
    P = L - C
    pad_id = _pad_id(inputs)
    rolled, order, length = to_right_padding(inputs, sp.topo.size, pad_id)
    new_pos = torch.argsort(order, dim=1)  # old position -> new position
    needed_tok = mask[:, P:].bool()  # real completion tokens
    src = (new_pos[:, P:] - 1).clamp(min=0)  # the logits that predict completion token j
    needed = torch.zeros(B, length, dtype=torch.bool, device=mask.device)
    needed.scatter_(1, src.to(mask.device), needed_tok)
    start, end = shard_bounds(length, sp.topo.size, sp.topo.rank)
    keep = _local_keep(needed, start, end).to(mask.device)
    targets = shifted(rolled["input_ids"], pad_id)[:, start:end].index_select(1, keep)
    out = _run(sp, model, rolled, keep)
    logits = out.logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lp = torch.gather(torch.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1).to(logits.device)).squeeze(-1)
    local = lp.new_zeros(B, end - start).index_copy(1, keep.to(lp.device), lp)
    full = gather(local, 1, sp.topo.group)
    logp = torch.gather(full, 1, src.to(full.device))
    return logp * needed_tok.to(logp.dtype)


def _pad_id(inputs: dict) -> int:
    """Token written into padding (its value never matters: padding is after every real token and masked out)."""
    ids = inputs["input_ids"]
    pads = ids[inputs["attention_mask"] == 0]
    return int(pads[0]) if pads.numel() else 0


def lm_loss(model, inputs: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the label tokens of the batch (transformers' causal-LM loss: labels -100
    ignored), sequence-parallel; the same value on every rank of the group."""
    sp = of(model)
    if sp is None:
        raise RuntimeError("lm_loss: sequence parallelism is not installed on this model")
    rolled, _order, length = to_right_padding(inputs, sp.topo.size, _pad_id(inputs))
    targets_full = shifted(rolled.pop("labels"), IGNORE_INDEX)  # labels move with the sequence, then leave the forward
    valid = targets_full != IGNORE_INDEX
    start, end = shard_bounds(length, sp.topo.size, sp.topo.rank)
    keep = _local_keep(valid, start, end).to(valid.device)
    targets = targets_full[:, start:end].index_select(1, keep)
    out = _run(sp, model, rolled, keep)
    logits = out.logits.float()
    lp = torch.log_softmax(logits, dim=-1)
    ok = targets != IGNORE_INDEX
    nll = -torch.gather(lp, 2, targets.clamp(min=0).unsqueeze(-1).to(lp.device)).squeeze(-1) * ok.to(lp.dtype)
    local = nll.new_zeros(nll.shape[0], end - start).index_copy(1, keep.to(nll.device), nll)
    full = gather(local, 1, sp.topo.group)
    return full.sum() / valid.sum().to(full.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Data
def shard_dataloader(dataloader, topo: Topology):
    """An accelerate-prepared DataLoader dealing batches over the data-parallel groups instead of over every rank: the
    ranks of one sequence-parallel group get the same batches (as transformers' Trainer does for its rank-aware
    BatchRebalanceSampler)."""
    if not topo.enabled:
        return dataloader
    from accelerate.data_loader import BatchSamplerShard

    bs = getattr(dataloader, "batch_sampler", None)
    if not isinstance(bs, BatchSamplerShard):
        raise SequenceParallelSetupError(f"cannot shard {type(dataloader).__name__} by data-parallel rank "
                                         f"(batch sampler {type(bs).__name__})")
    bs.num_processes = topo.dp_size
    bs.process_index = topo.dp_rank
    if topo.dp_size == 1:  # as accelerate does for one process: the last batch stays short (no wrap-around fill)
        bs.even_batches = False
    return dataloader


def gather_leaders(accelerator, topo: Topology, tensor: torch.Tensor) -> torch.Tensor:
    """accelerate's `gather_for_metrics` for sequence-parallel groups: the first rank of each group only (its other
    ranks hold the same batch, which `gather_for_metrics` would count `size` times), and at the end of the data the
    last batch cut to the samples it really holds (accelerate's remainder, which `shard_dataloader` makes relative to
    the data-parallel groups). transformers' evaluation loop gathers its per-sample losses with this under SP."""
    full = accelerator.gather(tensor)
    if topo.enabled:
        full = full.reshape(topo.world, -1, *tensor.shape[1:])[:: topo.size].reshape(-1, *tensor.shape[1:])
    state = accelerator.gradient_state
    if state.end_of_dataloader and state.remainder > 0:
        full = full[: state.remainder]
    return full


def broadcast_object(obj: Any, topo: Topology) -> Any:
    """`obj` of the group's first rank, on every rank of the group."""
    if not topo.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(topo.group, 0), group=topo.group)
    return box[0]


__all__ = ["SP_ATTENTION", "SequenceParallel", "SequenceParallelSetupError", "Topology", "apply_order",
           "broadcast_object", "completion_logprobs", "deepstack_index", "enabled", "gather", "gather_leaders", "install",
           "lm_loss",
           "of", "padded_length", "partition_units", "right_padding_order", "setup", "shard_bounds",
           "shard_dataloader", "shifted", "split_positions", "text_positions", "to_right_padding", "vision_shard",
           "with_text_row"]
