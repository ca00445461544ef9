"""One adapter per model family: the only place that knows how Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense, MoE) and
Qwen3.5 (dense, MoE) differ. Stages ask ``adapter_for(model_or_processor_or_path)``; they never test the family.

What differs (transformers 5.20, read from site-packages; qwen-vl-utils 0.0.14):

============== ============ ========== =========================== ================ ==================================
family         patch x merge time axis  processor video kwargs      M-RoPE rule      vLLM video item
============== ============ ========== =========================== ================ ==================================
qwen2_vl       14 x 2 = 28  1 pos/grid  do_resize/do_sample False   reference (t=1)  frames + metadata(range, fps)
qwen2_5_vl     14 x 2 = 28  fps-scaled  + second_per_grid_ts        reference (tps)  frames + metadata(range, fps)
qwen3_vl(_moe) 16 x 2 = 32  timestamps  + video_metadata (fps,      HF's == reference frames + metadata(indices,
qwen3_5(_moe)               "<t s>"     frame indices) per video    (one grid per     video fps) as qwen-vl-utils
                            text                                    frame)
============== ============ ========== =========================== ================ ==================================

Weight sync to vLLM sends HF checkpoint names (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``) for every
family: vLLM's Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) / Qwen3.5(-MoE) loaders map them (``hf_to_vllm_mapper``), so
`pipelines.generation.vllm.vllm_param_name` only strips wrapper prefixes (DDP, PEFT, FSDP).

Timestamped families (Qwen3-VL, Qwen3.5): ``Qwen3VLProcessor`` writes ``<t seconds>`` before each temporal patch,
computed from the video's metadata (frame indices / video fps, averaged over the two frames of a temporal patch).
Without metadata it warns and assumes 24 fps, and its video processor resamples frames unless
``do_sample_frames=False``: both are passed explicitly here. The metadata is the one qwen-vl-utils returns for a
decoded clip (``fps`` = the file's fps, ``frames_indices`` = the sampled indices), so the timestamps are the ones the
released checkpoints were trained with. A T-GRPO shuffled copy keeps the ORDERED metadata (`pipelines.models.shuffled`)
so its timestamps are the presented order's monotone ones and cannot reveal the true order (docs/rl.md).
"""

from __future__ import annotations

import abc
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from pipelines.errors import VideoR1Error

# Video-R1 / qwen-vl-utils budgets in tokens (qwen-vl-utils 0.0.14 constants): pixels = tokens * factor^2.
VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS_VIDEO_R1 = 128  # Video-R1 trains at 128*28*28 per frame
IMAGE_MIN_TOKENS = 4
IMAGE_MAX_TOKENS_VIDEO_R1 = 256  # Video-R1's image.max_pixels = 256*28*28
MODEL_SEQ_LEN = 128000


class FamilyError(VideoR1Error):
    """A model / processor / config the family adapters cannot serve."""


class SequenceParallelError(FamilyError):
    """A model that `distributed.sequence_parallel > 1` cannot split (head counts, linear attention, attention kind)."""


# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Adapter(abc.ABC):
    """Family knowledge; subclasses override class attributes and the few methods that differ."""

    family: ClassVar[str] = ""
    label: ClassVar[str] = ""  # human name: model card, runs show
    model_class_name: ClassVar[str] = ""
    processor_class_name: ClassVar[str] = ""
    patch_size: ClassVar[int] = 14
    merge_size: ClassVar[int] = 2
    temporal_patch_size: ClassVar[int] = 2
    timestamps: ClassVar[bool] = False  # "<t seconds>" text before each temporal patch
    second_per_grid_ts: ClassVar[bool] = False  # the forward takes second_per_grid_ts (Qwen2.5-VL)
    vllm_architecture: ClassVar[str] = ""
    # M-RoPE rule bound over transformers 5's (pipelines/models/mrope.py): "time" spaces a video's temporal grid steps
    # by tokens_per_second * second_per_grid_t (Qwen2.5-VL), "grid" by one position each (Qwen2-VL); None keeps
    # transformers' rule, which equals the reference for the family (one grid per frame between timestamp texts).
    reference_rope: ClassVar[str | None] = None
    # The family's part of its tiny model's configs (pipelines.models.tiny): M-RoPE sections, hybrid layers, experts.
    tiny_text: ClassVar[dict[str, Any]] = {}
    tiny_vision: ClassVar[dict[str, Any]] = {}
    # Fields of config.json the family's code reads (checked on the file: transformers would silently fill in its
    # defaults, e.g. a 2304-entry position table that then fails to load); a checkpoint missing one is refused.
    required_config: ClassVar[tuple[str, ...]] = (
        "vision_config.patch_size", "vision_config.spatial_merge_size", "vision_config.temporal_patch_size",
        "image_token_id", "video_token_id", "vision_start_token_id",
    )
    # LoRA adapts the language model only: the vision tower's blocks reuse the names gate_proj/up_proj/down_proj
    # (and qkv/proj), so without the exclusion `target_modules` would also put adapters on the vision MLPs.
    lora_exclude: ClassVar[str] = r".*visual.*"
    lora_target_modules: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj")
    hub_example: ClassVar[str] = ""
    eval_preset: ClassVar[str] = "video-r1-eval"  # Video-R1's eval protocol in this family's pixel terms
    train_preset: ClassVar[str] = "video-r1-7b"
    # Generation engines that run this family, and the dtypes an engine runs it in on a device kind ("vllm:cpu"; a
    # key absent: every dtype). Known-broken combinations are refused before any model is loaded (`check_engine`),
    # instead of failing at the first weight sync. `engine_limits` says why, in the refusal.
    engines: ClassVar[tuple[str, ...]] = ("hf", "vllm")
    engine_dtypes: ClassVar[dict[str, tuple[str, ...]]] = {}
    engine_limits: ClassVar[dict[str, str]] = {}

    # -- sizes ---------------------------------------------------------------------------------------------------------
    @property
    def factor(self) -> int:
        """Frame sides are multiples of this (patch x spatial merge): 28 for Qwen2/2.5-VL, 32 for Qwen3-VL/3.5."""
        return self.patch_size * self.merge_size

    def visual_tokens(self, height: int, width: int, nframes: int = 1) -> int:
        """LLM tokens of an image (nframes=1) or video: ceil(T/temporal) * (H/patch) * (W/patch) / merge^2."""
        from pipelines.video import visual_tokens

        return visual_tokens(height, width, nframes, temporal_patch=self.temporal_patch_size, patch=self.patch_size,
                             merge=self.merge_size)

    def video_placeholder_tokens(self, processor, media) -> int:
        """Tokens one video placeholder (<|video_pad|>) expands into in the prompt."""
        t, h, w = media.video.shape[:3]
        return self.visual_tokens(h, w, t)

    def sampler_defaults(self) -> dict[str, float]:
        """Video-R1's frame / pixel budgets in this family's terms (qwen-vl-utils' token counts x factor^2)."""
        f2 = self.factor * self.factor
        return {
            "video.min_pixels": VIDEO_MIN_TOKENS * f2,
            "video.max_pixels": VIDEO_MAX_TOKENS_VIDEO_R1 * f2,
            "video.total_pixels": MODEL_SEQ_LEN * f2 * 0.9,
            "image.min_pixels": IMAGE_MIN_TOKENS * f2,
            "image.max_pixels": IMAGE_MAX_TOKENS_VIDEO_R1 * f2,
        }

    # -- classes -------------------------------------------------------------------------------------------------------
    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    def processor_class(self):
        import transformers

        return getattr(transformers, self.processor_class_name)

    def check_config(self, config, where: str = "") -> None:
        """A named error when the checkpoint's config lacks a field this family's code needs."""
        for dotted in self.required_config:
            obj = config
            for part in dotted.split("."):
                obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
                if obj is None:
                    break
            if obj is None:
                raise FamilyError(f"{where or 'config'}: {self.label} config lacks '{dotted}'",
                                  hint=f"a {self.label} checkpoint's config.json defines it (e.g. {self.hub_example})")

    # -- processor calls -----------------------------------------------------------------------------------------------
    def video_kwargs(self, processor, media: Sequence[Any]) -> dict[str, Any]:
        """Processor kwargs for already-sampled, already-sized frames (`media`: the batch's videos)."""
        kw: dict[str, Any] = {"do_resize": False, "do_sample_frames": False}
        if hasattr(processor.video_processor, "cap_pixels_per_frame"):
            # Frames were already sized by pipelines.video under video.total_pixels; no second cap.
            kw["cap_pixels_per_frame"] = False
        return kw

    def finish_batch(self, processor, batch, media: Sequence[Any]):
        """Family-specific fields after the processor call (per-video time scale for Qwen2.5-VL)."""
        return batch

    # -- model ---------------------------------------------------------------------------------------------------------
    def install_rope(self, model) -> bool:
        """Bind the reference M-RoPE rule where transformers 5 differs from it (see mrope.py); False where the family
        keeps transformers' rule (`reference_rope` None)."""
        if self.reference_rope is None:
            return False
        from pipelines.models.mrope import install_reference_rope

        return install_reference_rope(model, uses_time=self.reference_rope == "time")

    # -- one encoder call per distinct media item (issue 22; see "Shared vision" below) --------------------------------
    def install_shared_vision(self, model) -> bool:
        """Bind the plan-aware `get_video_features` / `get_image_features` onto the model's core (the module whose
        forward encodes pixels). Every family here can: their cores encode through those two methods, inside their
        own forward, and return per-item tuples (`pooler_output`, and per layer `deepstack_features` for Qwen3-VL).
        False when the model has no such core (nothing bound; forwards then encode per row as before)."""
        return install_shared_vision(model)

    def share_vision(self, model, plan: "VisionPlan | None", reuse: bool = False):
        """Context: forwards of `model` inside it encode the plan's distinct items once (see `share_vision`)."""
        return share_vision(model, plan, reuse=reuse)

    def patch_rows(self, media) -> int:
        """Patch rows one media item sends through the vision tower: t * h * w of its grid (frames padded to a
        multiple of temporal_patch_size; an image is one temporal patch)."""
        if media.video is not None:
            t, h, w = media.video.shape[:3]
            return -(-t // self.temporal_patch_size) * (h // self.patch_size) * (w // self.patch_size)
        if media.image is not None:
            h, w = media.image.shape[:2]
            return (h // self.patch_size) * (w // self.patch_size)
        return 0

    def vision_tower(self, model):
        tower = getattr(model_core(model), "visual", None)
        if tower is None:
            raise FamilyError(f"{type(model).__name__}: no vision tower found ({self.label})")
        return tower

    @staticmethod
    def completion_token_types(token_types, completion_ids):
        """mm_token_type_ids extended over completion tokens: completions are text (0) in every family."""
        import torch

        return torch.cat([token_types, torch.zeros_like(completion_ids, dtype=token_types.dtype)], dim=1)

    # -- sequence parallelism (pipelines/parallel.py) --------------------------------------------------------------
    # The vision tower attends within one temporal patch (per-frame cu_seqlens / windows, per-frame position
    # embeddings): a video's temporal patches can be encoded on different ranks and concatenated, exactly.
    sp_shard_frames: ClassVar[bool] = True

    def sp_check(self, config, sp: int) -> None:
        """Refuse, naming the reason, a model whose language model cannot be split over `sp` ranks by Ulysses: query
        heads must divide by `sp`, KV heads divide by it or it by them; recurrent (linear-attention) layers cannot."""
        if sp <= 1:
            return
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        kinds = set(getattr(text, "layer_types", None) or [])
        if "linear_attention" in kinds:
            raise SequenceParallelError(
                f"{self.label}: its linear-attention (Gated DeltaNet) layers run a recurrence over the whole sequence, "
                f"which Ulysses sequence parallelism cannot split (distributed.sequence_parallel={sp})",
                hint="train Qwen3.5 with distributed.sequence_parallel=1 (ZeRO-3 for memory)")
        heads, kv = int(text.num_attention_heads), int(text.num_key_value_heads)
        if heads % sp or not (kv % sp == 0 or sp % kv == 0):
            raise SequenceParallelError(
                f"{self.label}: {heads} attention heads / {kv} KV heads cannot be split over sequence_parallel={sp} "
                "(Ulysses gives each rank heads/sp heads: the heads must divide by it, and the KV heads divide by it "
                "or it by them)", hint="pick a sequence_parallel that divides the head counts")

    def sp_shard_language_kwargs(self, kwargs: dict[str, Any], start: int, end: int) -> dict[str, Any]:
        """Family-specific language-model inputs cut to the shard [start, end) (none here; Qwen3-VL: deepstack)."""
        for key in ("visual_pos_masks", "deepstack_visual_embeds"):
            if kwargs.get(key) is not None:
                raise SequenceParallelError(f"{self.label}: the language model got '{key}', which this family's "
                                            "sequence-parallel split does not cut")
        return kwargs

    # -- vLLM ----------------------------------------------------------------------------------------------------------
    def vllm_video_metadata(self, media) -> dict[str, Any]:
        """vLLM's metadata of already-sampled frames: every frame used, none resampled."""
        n = int(media.video.shape[0])
        fps = float(media.fps or 2.0)
        return {"fps": fps, "duration": n / fps, "total_num_frames": n, "frames_indices": list(range(n)),
                "video_backend": "videor1", "do_sample_frames": False}

    def vllm_mm_kwargs(self, media) -> dict[str, Any]:
        return {"fps": float(media.fps or 2.0), "do_resize": False, "do_sample_frames": False}

    # -- engines -------------------------------------------------------------------------------------------------------
    def check_engine(self, engine: str, dtype: str | None, device: str = "cpu", backend_key: str = "backend",
                     dtype_key: str = "model.dtype") -> None:
        """A one-line FamilyError, saying what works instead, when this family cannot run on `engine` (hf, vllm) in
        `dtype` (None: the engine's choice, not checked) on `device` ("cpu", "cuda"); `backend_key` / `dtype_key`
        name the settings to change."""
        device = "cpu" if str(device).startswith("cpu") else "cuda"
        others = [e for e in self.engines if e != engine]
        if engine not in self.engines:
            why = self.engine_limits.get(engine, "not supported")
            raise FamilyError(f"{self.label} cannot run on the {engine} engine ({why}); works: "
                              f"{' or '.join(f'{backend_key}={e}' for e in others)}")
        allowed = self.engine_dtypes.get(f"{engine}:{device}")
        dtype = None if dtype is None else str(dtype).removeprefix("torch.")
        if allowed is not None and dtype is not None and dtype not in allowed:
            why = self.engine_limits.get(f"{engine}:{device}", "not supported")
            instead = [f"{dtype_key}={d}" for d in allowed] + [f"{backend_key}={e}" for e in others]
            raise FamilyError(f"{self.label} on {engine} ({device}) runs in {', '.join(allowed)} only, not {dtype} "
                              f"({why}); works: {' or '.join(instead)}")

    # -- tiny models ---------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_tiny(self, out_dir: str | Path, seed: int = 0, vllm: bool = False) -> Path:
        """Write a tiny random model of this family (real classes, offline tokenizer and processor) to out_dir;
        `vllm`: a spec vLLM's CPU attention accepts (head_dim >= 32), where the default one is not."""


# ---------------------------------------------------------------------------------------------------------------------
_TINY_EXPERTS = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}  # the tiny MoE families'


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    label = "Qwen2-VL"
    model_class_name = "Qwen2VLForConditionalGeneration"
    processor_class_name = "Qwen2VLProcessor"
    vllm_architecture = "Qwen2VLForConditionalGeneration"
    hub_example = "Qwen/Qwen2-VL-7B-Instruct"
    reference_rope = "grid"

    def build_tiny(self, out_dir, seed=0, vllm=False):
        from pipelines.models import tiny

        return tiny.build_qwen2(self, out_dir, seed)  # head_dim 32 already


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    processor_class_name = "Qwen2_5_VLProcessor"
    second_per_grid_ts = True
    vllm_architecture = "Qwen2_5_VLForConditionalGeneration"
    hub_example = "Qwen/Qwen2.5-VL-7B-Instruct"
    reference_rope = "time"

    def finish_batch(self, processor, batch, media):
        # The processor takes one scalar fps; a batch mixes videos of different sampled fps, so the time scale of
        # M-RoPE (second_per_grid_ts) is recomputed per video.
        import torch

        videos = [m for m in media if m.video is not None]
        if videos:
            tp = processor.video_processor.temporal_patch_size
            batch["second_per_grid_ts"] = torch.tensor([tp / (m.fps or 2.0) for m in videos], dtype=torch.float32)
        return batch

    def build_tiny(self, out_dir, seed=0, vllm=False):
        from pipelines.models import tiny

        return tiny.build_tiny_model(out_dir, seed=seed, spec=tiny.TINY_VLLM_SPEC if vllm else None)


class Qwen3VLAdapter(Adapter):
    family = "qwen3_vl"
    label = "Qwen3-VL"
    model_class_name = "Qwen3VLForConditionalGeneration"
    processor_class_name = "Qwen3VLProcessor"
    patch_size = 16
    timestamps = True
    eval_preset = "qwen3-vl-eval"
    train_preset = "qwen3-vl-8b"
    vllm_architecture = "Qwen3VLForConditionalGeneration"
    hub_example = "Qwen/Qwen3-VL-8B-Instruct"
    required_config = Adapter.required_config + ("vision_config.num_position_embeddings",)
    # reference_rope None: each frame is its own grid (t = 1) between timestamp texts, so transformers' "resume at
    # start + max(h, w) / merge" equals the reference "resume at max(vision positions) + 1" (tested in
    # tests/test_families.py against mrope.reference_rope_index): nothing to bind.
    tiny_text = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                     "mrope_interleaved": True}}
    tiny_vision = {"deepstack_visual_indexes": [0]}

    def video_kwargs(self, processor, media):
        from transformers.video_utils import VideoMetadata

        kw = super().video_kwargs(processor, media)
        # Timestamps come from this metadata; without it the processor assumes 24 fps (and warns).
        kw["video_metadata"] = [VideoMetadata(**video_metadata(m)) for m in media]
        return kw

    def video_placeholder_tokens(self, processor, media) -> int:
        # Per temporal patch: the "<t seconds>" text, <|vision_start|>, the patch's tokens, <|vision_end|>.
        t, h, w = media.video.shape[:3]
        md = video_metadata(media)
        times = processor._calculate_timestamps(md["frames_indices"], md["fps"], self.temporal_patch_size)
        per_patch = self.visual_tokens(h, w, 1)
        tok = processor.tokenizer
        return sum(len(tok(f"<{s:.1f} seconds>", add_special_tokens=False)["input_ids"]) + 2 + per_patch
                   for s in times[: -(-t // self.temporal_patch_size)])

    def sp_shard_language_kwargs(self, kwargs, start, end):
        # DeepStack: visual features of early vision layers are added to the hidden states at the visual positions
        # after the first decoder layers; a shard keeps its positions' mask and the embeddings of its visual tokens
        # (row-major order over the batch, as the model lists them).
        from pipelines.parallel import deepstack_index

        masks, embeds = kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds")
        if masks is None:
            return kwargs
        m = masks if masks.dim() == 2 else masks[..., 0]
        out = dict(kwargs)
        out["visual_pos_masks"] = m[:, start:end]
        if embeds is not None:
            idx = deepstack_index(m, start, end).to(embeds[0].device)
            out["deepstack_visual_embeds"] = [e.index_select(0, idx) for e in embeds]
        return out

    def vllm_video_metadata(self, media) -> dict[str, Any]:
        # The same metadata the HF processor gets (video_kwargs), so both write the same timestamps.
        md = video_metadata(media)
        return {**md, "duration": md["total_num_frames"] / md["fps"], "video_backend": "videor1",
                "do_sample_frames": False}

    def vllm_mm_kwargs(self, media) -> dict[str, Any]:
        return {"do_resize": False, "do_sample_frames": False}

    def build_tiny(self, out_dir, seed=0, vllm=False):
        from pipelines.models import tiny

        return tiny.build_qwen3(self, out_dir, seed)  # head_dim 32 already


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    label = "Qwen3-VL-MoE"
    model_class_name = "Qwen3VLMoeForConditionalGeneration"
    vllm_architecture = "Qwen3VLMoeForConditionalGeneration"
    hub_example = "Qwen/Qwen3-VL-30B-A3B-Instruct"
    # transformers always renormalises the top-k router weights; vLLM reads the flag from the config.
    tiny_text = Qwen3VLAdapter.tiny_text | _TINY_EXPERTS | {"decoder_sparse_step": 1, "mlp_only_layers": [],
                                                            "norm_topk_prob": True}
    # Experts are fused 3-D parameters (not nn.Linear): LoRA adapts attention only, as EasyR1 / verl do for MoE.
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    engines = ("hf",)
    engine_limits = {"vllm": "vLLM 0.32/0.33 load its fused experts only in the released checkpoints' layout; "
                             "transformers 5 saves, and weight sync sends, another (docs/families.md)"}


class Qwen35Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    label = "Qwen3.5"
    model_class_name = "Qwen3_5ForConditionalGeneration"
    vllm_architecture = "Qwen3_5ForConditionalGeneration"
    hub_example = "Qwen/Qwen3.5-27B"
    # Hybrid: one Gated DeltaNet layer, one full-attention layer; rotary on a quarter of head_dim (8 -> 4 pairs).
    tiny_text = {"layer_types": ["linear_attention", "full_attention"], "linear_conv_kernel_dim": 4,
                 "linear_key_head_dim": 32, "linear_value_head_dim": 32, "linear_num_key_heads": 1,
                 "linear_num_value_heads": 2,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                     "mrope_interleaved": True, "partial_rotary_factor": 0.25}}
    tiny_vision = {}  # no deepstack
    # Hybrid layers: full attention (q/k/v/o_proj) and Gated DeltaNet (in_proj_qkv/z, out_proj) + MLPs.
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj",
                           "gate_proj", "up_proj", "down_proj")
    engine_dtypes = {"vllm:cpu": ("bfloat16",)}
    engine_limits = {"vllm:cpu": "vLLM's CPU Gated DeltaNet kernel requires bfloat16"}


class Qwen35MoeAdapter(Qwen35Adapter):
    family = "qwen3_5_moe"
    label = "Qwen3.5-MoE"
    model_class_name = "Qwen3_5MoeForConditionalGeneration"
    vllm_architecture = "Qwen3_5MoeForConditionalGeneration"
    hub_example = "Qwen/Qwen3.5-35B-A3B"
    tiny_text = Qwen35Adapter.tiny_text | _TINY_EXPERTS | {"shared_expert_intermediate_size": 32}
    # Routed experts are fused 3-D parameters; the shared expert's MLP is nn.Linear and keeps its adapters.
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj")


# ---------------------------------------------------------------------------------------------------------------------
# Shared vision: each distinct media item through the vision tower once per forward (issue 22)
#
# A GRPO forward holds G rows per prompt that all see the same pixels; encoding them G times is pure waste (the vision
# tower is ~20 % of a Qwen2.5-VL-7B forward at Video-R1's budget). transformers 5.20's cores (Qwen2VLModel,
# Qwen2_5_VLModel, Qwen3VLModel, Qwen3VLMoeModel, Qwen3_5Model, Qwen3_5MoeModel) encode pixels in their own forward
# through `self.get_video_features` / `self.get_image_features` (generate too: `_prepare_multimodal_encoder_kwargs_
# for_generation` calls `base_model.get_*_features`). We bind plan-aware versions of those two methods on the core
# INSTANCE (as mrope binds get_rope_index):
#
# - the forward gets the DISTINCT pixels (`pixel_values_videos` / `pixel_values`) but every per-row tensor as before
#   (input_ids, attention_mask, mm_token_type_ids, video_grid_thw / image_grid_thw, second_per_grid_ts), so the
#   reference M-RoPE rule (mrope.py) sees exactly the inputs of the repeated path and gives the same positions;
# - inside `with share_vision(model, plan)` the bound method checks that the per-row grids are the plan's distinct
#   grids indexed by `plan.index`, encodes the distinct pixels ONCE with the distinct grids, and returns the output
#   with every per-item tuple indexed into rows: `pooler_output` and, when the output has them, each layer of
#   `deepstack_features` (Qwen3-VL / Qwen3-VL-MoE; Qwen3.5 returns none). Keyed on the output's fields, not on the
#   family. Autograd sums the rows' gradients into one backward through the tower.
# - the encode stays inside the core's forward, after `zero3.VisionLockstep._agree` and before its `_inject`: under
#   ZeRO-3 every rank gathers the tower's parameters in the same order as before (precomputing features outside the
#   forward would misorder the gathers against the lockstep's all-reduce: a hang).
# - Qwen3-VL's / Qwen3.5's core encodes videos by calling its own `get_image_features`: a call made while the bound
#   method is encoding passes straight through (no second indexing).
# - `reuse=True` keeps the plan's features for the next forward of the same plan (the reference pass and the
#   `rl.num_iterations` passes of one rollout). Only valid where the tower cannot have changed between them and
#   computes in the same precision: the trainer decides (pipelines/rl/trainer.py, docs/rl.md "Encode once").
#
# Without a plan (SFT, eval, a forward outside the context) the methods are the originals, bit for bit. The same
# binding is what sequence parallelism calls when it encodes through the core's own get_*_features.
VISION_PLAN_KEY = "videor1_vision_plan"  # the plan rides in a policy_inputs dict under this key (popped before forward)
_MODALITY_ARGS = {"video": ("pixel_values_videos", "video_grid_thw"), "image": ("pixel_values", "image_grid_thw")}


@dataclass
class VisionPlan:
    """Which distinct media item each per-row item of a batch takes, per modality.

    `index[m][k]` is the distinct item (0-based, in the order of `grids[m]` and of the distinct pixels) that the k-th
    item of modality m in the batch's row order takes; `grids[m]` are the distinct items' (t, h, w) grids."""

    index: dict[str, list[int]]
    grids: dict[str, Any]
    features: dict[str, Any] | None = None  # reuse cache (detached outputs of the distinct items), per modality

    def rows(self, modality: str) -> int:
        """Patch rows of the distinct items of one modality (what one encode sends through the tower)."""
        g = self.grids.get(modality)
        return 0 if g is None else int(g.prod(-1).sum())


def vision_core(model):
    """The core module that owns `visual` and encodes pixels in its forward (through peft / DDP / DeepSpeed)."""
    return model_core(model)


def install_shared_vision(model) -> bool:
    import types

    core = vision_core(model)
    if core is None or not all(hasattr(type(core), f"get_{m}_features") for m in _MODALITY_ARGS):
        return False
    core.get_video_features = types.MethodType(_shared_video_features, core)
    core.get_image_features = types.MethodType(_shared_image_features, core)
    core._videor1_shared_vision = True
    return True


@contextlib.contextmanager
def share_vision(model, plan: VisionPlan | None, reuse: bool = False):
    """Forwards (and `generate`) of `model` inside this encode each of the plan's distinct items once and place the
    features into the rows (`plan.index`). `plan=None` is a no-op. Raises when the model's core was not bound."""
    if plan is None:
        yield
        return
    core = vision_core(model)
    if core is None or not getattr(core, "_videor1_shared_vision", False):
        raise FamilyError(f"{type(model).__name__}: shared vision not installed (load the model with "
                          "pipelines.models.load_model, or call Adapter.install_shared_vision)")
    previous = core.__dict__.get("_videor1_vision_plan")
    core._videor1_vision_plan = (plan, reuse)
    try:
        yield
    finally:
        core._videor1_vision_plan = previous


def _shared_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
    return _encode_shared(self, "video", pixel_values_videos, video_grid_thw, kwargs)


def _shared_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
    return _encode_shared(self, "image", pixel_values, image_grid_thw, kwargs)


def _encode_shared(core, modality: str, pixels, grid, kwargs):
    original = getattr(type(core), f"get_{modality}_features")
    active = core.__dict__.get("_videor1_vision_plan")
    if active is None or core.__dict__.get("_videor1_vision_busy") or modality not in active[0].index:
        return original(core, pixels, grid, **kwargs)
    plan, reuse = active
    import torch

    index = plan.index[modality]
    distinct = plan.grids[modality].to(grid.device if torch.is_tensor(grid) else pixels.device)
    if grid is None or grid.shape[0] != len(index) or not torch.equal(grid, distinct[index]):
        raise ValueError(f"shared vision: the forward's {_MODALITY_ARGS[modality][1]} "
                         f"({None if grid is None else grid.shape[0]} rows) is not the plan's distinct grids "
                         f"indexed by its rows ({len(index)})")
    if pixels.shape[0] != int(distinct.prod(-1).sum()):
        raise ValueError(f"shared vision: {pixels.shape[0]} {_MODALITY_ARGS[modality][0]} rows, the plan's distinct "
                         f"items have {int(distinct.prod(-1).sum())}")
    want_tuple = kwargs.pop("return_dict", True) is False
    cached = (plan.features or {}).get(modality) if reuse else None
    if cached is None:
        core._videor1_vision_busy = True
        try:
            out = original(core, pixels, distinct, return_dict=True, **kwargs)
        finally:
            core._videor1_vision_busy = False
        if reuse:
            plan.features = dict(plan.features or {})
            plan.features[modality] = _detached(out)
    else:
        out = cached
    rows = _index_items(out, index)
    return rows.to_tuple() if want_tuple else rows


def _index_items(out, index: list[int]):
    """A copy of an encoder output whose per-item tuples are indexed into rows (deepstack layers too, if any)."""
    new = type(out)(**{k: v for k, v in out.items()})
    new.pooler_output = tuple(out.pooler_output[i] for i in index)
    deep = getattr(out, "deepstack_features", None)
    if deep is not None:
        new.deepstack_features = [tuple(layer[i] for i in index) for layer in deep]
    return new


def _detached(out):
    new = type(out)(**{k: v for k, v in out.items()})
    new.pooler_output = tuple(t.detach() for t in out.pooler_output)
    deep = getattr(out, "deepstack_features", None)
    if deep is not None:
        new.deepstack_features = [tuple(t.detach() for t in layer) for layer in deep]
    return new


class TowerCounter:
    """Counts calls and patch rows through vision towers (a forward pre-hook on each): `vision/patches_encoded`."""

    def __init__(self):
        self.calls = 0
        self.rows = 0
        self._handles: list[Any] = []
        self._towers: set[int] = set()

    def attach(self, tower) -> "TowerCounter":
        if id(tower) not in self._towers:
            self._towers.add(id(tower))
            self._handles.append(tower.register_forward_pre_hook(self._count, with_kwargs=True))
        return self

    def _count(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("pixel_values"))
        self.calls += 1
        self.rows += int(x.shape[0]) if x is not None else 0

    def reset(self) -> tuple[int, int]:
        """(calls, rows) since the last reset."""
        out = (self.calls, self.rows)
        self.calls = self.rows = 0
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._towers = [], set()


ADAPTERS: dict[str, Adapter] = {a.family: a() for a in (Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter,
                                                         Qwen3VLMoeAdapter, Qwen35Adapter, Qwen35MoeAdapter)}
# The registry is the one list of families: the config's choices (model.family-like keys), the CLI's defaults and
# help texts, the quickstart and the M-RoPE binding all read it.
FAMILIES = tuple(ADAPTERS)
DEFAULT_FAMILY = Qwen25VLAdapter.family  # what Video-R1 trained, and what the quickstart's figures were measured on
# Processor class -> the first family whose processing it does (Qwen3.5 ships Qwen3-VL's processor).
_PROCESSOR_FAMILY: dict[str, str] = {}
for _a in ADAPTERS.values():
    _PROCESSOR_FAMILY.setdefault(_a.processor_class_name, _a.family)


def families_help(default: str | None = DEFAULT_FAMILY) -> str:
    """The family choices for a help text, from the registry: "qwen2_vl, qwen2_5_vl (default), qwen3_vl, ..."."""
    return ", ".join(f"{f} (default)" if f == default else f for f in FAMILIES)


def video_metadata(media) -> dict[str, Any]:
    """qwen-vl-utils' metadata of a decoded clip: the file's fps and the sampled frame indices (frames already
    sampled: nothing is resampled). Falls back to one index per frame at the sampled fps when the source is unknown."""
    n = int(media.video.shape[0])
    indices = list(media.indices) if getattr(media, "indices", None) is not None else None
    fps = getattr(media, "video_fps", None)
    if indices is None or fps is None or len(indices) != n:
        indices, fps = list(range(n)), float(media.fps or 2.0)
    total = max(indices) + 1 if indices else n
    return {"fps": float(fps), "frames_indices": [int(i) for i in indices], "total_num_frames": int(total)}


def unsupported(model_type: Any, where: str) -> FamilyError:
    return FamilyError(f"{where}: model family '{model_type}' is not supported; supported: {', '.join(FAMILIES)}",
                       hint=f"pass a model directory of one of: {', '.join(a.label for a in ADAPTERS.values())}")


def family_of_path(path: str | Path, revision: str | None = None) -> str:
    """model_type of a local model directory (config.json) or of a hub id (through AutoConfig)."""
    p = Path(path)
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise FamilyError(f"{cfg_file}: not found", hint="a model directory holds config.json")
        try:
            data = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise FamilyError(f"{cfg_file}: unreadable config ({e})") from None
        return str(data.get("model_type", ""))
    from transformers import AutoConfig

    try:
        return str(AutoConfig.from_pretrained(str(path), revision=revision).model_type)
    except (OSError, ValueError) as e:
        raise FamilyError(f"cannot read the config of '{path}': {str(e).splitlines()[0]}",
                          hint="pass a local model directory; offline machines need a local path") from None


def adapter_for(obj: Any, revision: str | None = None) -> Adapter:
    """The adapter of a model (or peft/DDP-wrapped model), a processor, a config, a family name or a model path."""
    if isinstance(obj, Adapter):
        return obj
    where = "model"
    if isinstance(obj, str) and obj in ADAPTERS:
        return ADAPTERS[obj]
    if isinstance(obj, (str, Path)):
        where = str(obj)
        model_type = family_of_path(obj, revision)
    elif getattr(obj, "video_processor", None) is not None or type(obj).__name__.endswith("Processor"):
        model_type = getattr(obj, "_videor1_family", None) or _PROCESSOR_FAMILY.get(type(obj).__name__)
        where = f"processor {type(obj).__name__}"
    else:
        config = getattr(obj, "config", obj)
        model_type = getattr(config, "model_type", None)
        where = type(obj).__name__
    if model_type not in ADAPTERS:
        raise unsupported(model_type, where)
    return ADAPTERS[model_type]


def family_for_settings(family: str | None, model_path: str | None) -> Adapter:
    """`--family NAME` when given, else the family of a local `model_path`, else the default (Qwen2.5-VL)."""
    if family is not None:
        if family not in ADAPTERS:
            raise unsupported(family, "--family")
        return ADAPTERS[family]
    if model_path and Path(model_path).is_dir():
        return adapter_for(model_path)
    return ADAPTERS[DEFAULT_FAMILY]


_NAME_PATTERNS = ((r"qwen3-vl-.*a\d+b", "qwen3_vl_moe"), (r"qwen3-vl", "qwen3_vl"), (r"qwen3\.5-.*a\d+b", "qwen3_5_moe"),
                  (r"qwen3\.5", "qwen3_5"), (r"qwen2\.5-vl", "qwen2_5_vl"), (r"qwen2-vl", "qwen2_vl"))


def family_from_name(name: str | None) -> str | None:
    """The family a hub id's name says (Qwen3-VL-30B-A3B*, Qwen3-VL*, Qwen3.5-*-A*B, Qwen3.5*, Qwen2.5-VL*, Qwen2-VL*),
    or None when the name names none."""
    import re

    name = str(name or "").lower()
    for pattern, family in _NAME_PATTERNS:
        if re.search(pattern, name):
            return family
    return None


def family_hint(name_or_path: str | None) -> Adapter:
    """The family of a local model, else guessed from a hub id's name (`family_from_name`), else the default; for
    choosing settings (presets) only, never for loading."""
    if name_or_path and Path(str(name_or_path)).is_dir():
        return adapter_for(str(name_or_path))
    return ADAPTERS[family_from_name(name_or_path) or DEFAULT_FAMILY]


def family_label(*paths: Any) -> str | None:
    """"Qwen3-VL (qwen3_vl)" for the first local model directory of a known family among `paths`; None if none."""
    for p in paths:
        if p and Path(str(p)).is_dir() and (Path(str(p)) / "config.json").is_file():
            try:
                a = adapter_for(str(p))
            except FamilyError:
                continue
            return f"{a.label} ({a.family})"
    return None


def check_pair(model, processor, where: str = "") -> Adapter:
    """The model's adapter, after checking the processor does the same family's processing."""
    a = adapter_for(model)
    p_family = getattr(processor, "_videor1_family", None) or _PROCESSOR_FAMILY.get(type(processor).__name__)
    if p_family is not None and ADAPTERS[p_family].processor_class_name != a.processor_class_name:
        raise FamilyError(f"{where or 'model'}: processor {type(processor).__name__} ({ADAPTERS[p_family].label}) "
                          f"does not match the {a.label} model",
                          hint=f"load the processor saved with the model ({a.processor_class_name})")
    return a


def model_core(model) -> Any | None:
    """The module that owns ``visual`` and ``language_model`` (Qwen*VLModel: the vision tower, the M-RoPE rule's
    `get_rope_index`, the language model), through DDP / DeepSpeed / PEFT wrappers; None for a model without one.
    The one way the project unwraps to it (the vision lockstep, the M-RoPE binding, `Adapter.vision_tower`)."""
    import torch

    for m in model.modules():  # registration order: the wrappers, then the ForConditionalGeneration, then its core
        if hasattr(m, "visual") and isinstance(getattr(m, "language_model", None), torch.nn.Module):
            return m
    return None
