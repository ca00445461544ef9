"""ZeRO-3 lockstep for vision-language forwards: every rank calls the vision tower the same number of times.

Under DeepSpeed ZeRO-3 each sub-module's parameters are all-gathered (a collective) when the module runs, in forward
and in backward. Qwen-VL models call their vision tower once per modality present in the batch (images, then videos),
so a rank whose micro-batch holds an image AND a video calls it twice while a rank holding one video calls it once:
the all-gathers fall out of step. gloo aborts ("collective mismatch"); NCCL on GPUs hangs. The same happens when a
rank has nothing to train (all samples skipped, an empty RL step) and runs a text-only dummy forward.

`VisionLockstep(model)` hooks the model so that, inside `with lockstep.active():`, each forward

1. all-reduces (MAX) which modalities are present over the ranks -- one tiny collective per forward, and
2. where this rank lacks a modality another rank has, runs the vision tower on a minimal dummy input (one merged
   token of zeros) right before the language model, and adds ``0 * sum(...)`` of exactly the outputs a real call
   feeds the language model (`vision_outputs`: the merged features AND Qwen3-VL's deepstack features) to the
   language model's input embeddings, so the tower's modules take part in backward exactly as on a rank with real
   media.

So every rank runs: embeddings, vision tower x (number of modalities present anywhere), language model -- the same
module sequence in forward and (the dummy joins the graph) in backward. The dummy's contribution is an exact zero:
the input embeddings keep their values bit for bit (x + 0.0 == x) and its gradient is 0 * (upstream), added to the
real samples' gradients; the loss and gradient are those of the real samples.

ZeRO-1/2 gather nothing in forward, but reduce gradients in buckets that must hold the same parameters on every
rank: a rank with nothing to train whose text-only dummy forward skipped the vision tower made gloo abort too, so
the trainers use the lockstep under every DeepSpeed stage (`deepspeed_lockstep`).

Only forwards inside `active()` take part (training / reference log-prob forwards). Generation is left alone: ranks
generate different numbers of tokens, and under ZeRO-3 generation runs with all parameters gathered anyway.
The hooks expect a model with a ``visual`` tower and a ``language_model`` called with ``inputs_embeds`` (Qwen2-VL,
Qwen2.5-VL, Qwen3-VL in transformers 5); a model without them is left as is.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Callable, Iterator

import torch

from pipelines.models.families import model_core

MODALITIES = (("image", "pixel_values"), ("video", "pixel_values_videos"))


def dummy_vision_input(visual) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel patches, grid_thw) of the smallest input the vision tower accepts: 1 x m x m patches -> 1 merged token.

    Patch width = channels * temporal_patch_size * patch_size**2, as the Qwen-VL image processors flatten them."""
    c = visual.config
    m = int(getattr(c, "spatial_merge_size", 2))
    channels = int(getattr(c, "in_channels", getattr(c, "in_chans", 3)))
    width = channels * int(getattr(c, "temporal_patch_size", 2)) * int(c.patch_size) ** 2
    try:
        dtype = next(visual.parameters()).dtype
    except StopIteration:
        dtype = torch.float32
    return torch.zeros(m * m, width, dtype=dtype), torch.tensor([[1, m, m]], dtype=torch.long)


def _all_reduce_max(flags: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


# Fields of a vision tower's output that the language model never reads: the un-merged last hidden state (and the
# per-layer captures, when asked for).
_UNUSED_VISION_FIELDS = ("last_hidden_state", "hidden_states", "attentions")


def vision_outputs(out) -> list[torch.Tensor]:
    """The tensors of a vision-tower output that a real call feeds the language model: the merged features AND the
    side outputs (Qwen3-VL's deepstack features, one per deepstack merger), whatever container holds them; not the
    un-merged last hidden state.

    A dummy call must join exactly these into the graph, no fewer and no more. Fewer: a module whose output is
    dropped gets no backward, so under ZeRO-3 its parameters are not gathered again in backward and its gradient is
    missing from the reduction on the dummy rank (Qwen3-VL's deepstack mergers made gloo abort with "collective
    mismatch"). More: ZeRO-3 hooks every tensor a module returns and fetches the module's parameters once per output
    that receives a gradient, so an extra joined output is an extra fetch on this rank only (DeepSpeed's trace check:
    "disagreement on list length"). tests/test_deepspeed_units.py counts both, per family."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):  # ModelOutput is a dict of its non-None fields
        values = [v for k, v in out.items() if k not in _UNUSED_VISION_FIELDS]
    elif isinstance(out, (tuple, list)):
        values = list(out)
    else:
        return []
    return [t for v in values for t in vision_outputs(v)]


class VisionLockstep:
    """Hooks that keep the vision tower's call count identical on every rank (see the module docstring)."""

    def __init__(self, model, reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.core = model_core(model)
        self.reduce_max = reduce_max or _all_reduce_max
        self._active = 0
        self._pending: list[str] = []
        self.dummy_calls = 0  # how many dummy vision-tower calls ran (tests, logs)
        self._handles = []
        if self.core is not None:
            self._handles.append(self.core.register_forward_pre_hook(self._agree, with_kwargs=True))
            # prepend: run before DeepSpeed's own pre-hook on the language model, so the dummy tower call comes before
            # the language model's parameter fetch on every rank, exactly where the real second call would be.
            self._handles.append(self.core.language_model.register_forward_pre_hook(
                self._inject, with_kwargs=True, prepend=True))

    @property
    def installed(self) -> bool:
        return self.core is not None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def active(self) -> Iterator["VisionLockstep"]:
        self._active += 1
        try:
            yield self
        finally:
            self._active -= 1
            self._pending = []

    # ----------------------------------------------------------------------------------------------------- hooks
    def _agree(self, module, args, kwargs):
        if not self._active:
            return None
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        if ref is None and args:
            ref = args[0]
        local = [kwargs.get(key) is not None or (kwargs.get("mm_encoder_outputs") or {}).get(name) is not None
                 for name, key in MODALITIES]
        flags = torch.tensor([1.0 if x else 0.0 for x in local], dtype=torch.float32,
                             device=ref.device if torch.is_tensor(ref) else None)
        present = self.reduce_max(flags).tolist()
        self._pending = [name for (name, _), here, anywhere in zip(MODALITIES, local, present)
                         if anywhere > 0 and not here]
        return None

    def _inject(self, module, args, kwargs):
        if not (self._active and self._pending):
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise RuntimeError("VisionLockstep: the language model was not called with inputs_embeds")
        visual = self.core.visual
        pixels, grid = dummy_vision_input(visual)
        zero = None
        for _ in self._pending:
            outs = vision_outputs(visual(pixels.to(embeds.device), grid_thw=grid.to(embeds.device)))
            term = sum(t.float().sum() for t in outs) * 0.0
            zero = term if zero is None else zero + term
            self.dummy_calls += 1
        self._pending = []
        kwargs = dict(kwargs)
        kwargs["inputs_embeds"] = embeds + zero.to(embeds.dtype)
        return args, kwargs


def text_dummy_forward(model, pad_token_id: int, device) -> Any:
    """A one-token text forward: how a rank with nothing to train joins the others' collective forward/backward.

    Run it inside `VisionLockstep.active()` under ZeRO-3, so it also makes the vision-tower calls the other ranks
    make."""
    ids = torch.tensor([[int(pad_token_id)]], device=device)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def deepspeed_lockstep(model, deepspeed: bool) -> VisionLockstep | None:
    """A `VisionLockstep` on `model` (any wrapper: the hooks go on its core) when the run uses DeepSpeed (`deepspeed`,
    any ZeRO stage), else None; None too for a model without a vision core. ZeRO-1/2 need it as well, for the
    text-only dummy forward: their gradient reduction expects the same parameters to hold gradients on every rank,
    and a rank whose step left the vision tower out made gloo abort. The SFT and RL trainers both build theirs here."""
    if not deepspeed:
        return None
    lock = VisionLockstep(model)
    return lock if lock.installed else None


class _FullShapes:
    """A model whose `get_parameter(name).shape` is the full shape of a ZeRO-3-partitioned parameter (`ds_shape`)."""

    def __init__(self, model):
        self._model = model

    def get_parameter(self, name: str):
        p = self._model.get_parameter(name)
        shape = getattr(p, "ds_shape", None)
        return p if shape is None else types.SimpleNamespace(shape=torch.Size(shape))

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def full_shape_transpose(convert):
    """`convert` (transformers' `Transpose.convert`) comparing with a ZeRO-3 parameter's full shape (`ds_shape`)."""

    def full_shape_convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        if kwargs.get("model") is not None:
            kwargs["model"] = _FullShapes(kwargs["model"])
        return convert(self, input_dict, source_patterns, target_patterns, **kwargs)

    full_shape_convert._videor1_full_shape = True
    return full_shape_convert


def install_full_shape_conversions() -> None:
    """Make transformers' weight conversions compare a checkpoint tensor with a ZeRO-3 parameter's full shape, for the
    rest of the process; `load_model` calls it before the first load under ZeRO-3. Idempotent. Without ZeRO-3 nothing
    changes: a parameter without `ds_shape` is compared as before.

    Why: transformers 5.20's `Transpose(check_dims=True)`, Qwen3-VL-MoE's conversion of its fused experts
    (gate_up_proj, down_proj), keeps a tensor already in the model's layout and transposes one in the released
    checkpoints' layout, by comparing shapes; saving runs the reverse with the same comparison. Under ZeRO-3 the
    parameter it compares with is partitioned (empty), so it transposed every tensor: a checkpoint that transformers
    5 wrote (the tiny model, every SFT / RL output) failed to load with a size mismatch, or, with square experts (the
    tiny model's gate_up_proj), loaded transposed without a word; and a ZeRO-3 run saved its experts transposed
    (square ones then reloaded wrong). With the full shape, ZeRO-3 loads and saves exactly what DDP does."""
    from transformers.core_model_loading import Transpose

    if not getattr(Transpose.convert, "_videor1_full_shape", False):
        Transpose.convert = full_shape_transpose(Transpose.convert)


def drop_tied_duplicates(model, state: dict[str, Any]) -> dict[str, Any]:
    """`state` without the second name of tied parameters (lm_head.weight when it IS embed_tokens.weight).

    DeepSpeed's consolidated state dicts hold a separate tensor per name, so `save_pretrained` cannot see the tie by
    storage and would write lm_head.weight a second time; the model (tie_word_embeddings) re-ties it on load."""
    seen: set[int] = set()
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return {k: v for k, v in state.items() if k not in tied}
