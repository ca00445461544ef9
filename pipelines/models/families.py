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
        """Bind the reference M-RoPE rule where transformers 5 differs from it (see mrope.py)."""
        from pipelines.models.mrope import install_reference_rope

        return install_reference_rope(model)

    def vision_tower(self, model):
        base = model
        for attr in ("module", "base_model", "model"):  # DDP / peft wrappers
            while hasattr(base, attr) and not hasattr(base, "visual") and getattr(base, attr) is not base:
                base = getattr(base, attr)
        base = getattr(base, "model", base)
        tower = getattr(base, "visual", None) or getattr(model, "visual", None)
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

    # -- tiny models ---------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_tiny(self, out_dir: str | Path, seed: int = 0) -> Path:
        """Write a tiny random model of this family (real classes, offline tokenizer and processor) to out_dir."""


# ---------------------------------------------------------------------------------------------------------------------
class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    label = "Qwen2-VL"
    model_class_name = "Qwen2VLForConditionalGeneration"
    processor_class_name = "Qwen2VLProcessor"
    vllm_architecture = "Qwen2VLForConditionalGeneration"
    hub_example = "Qwen/Qwen2-VL-7B-Instruct"

    def build_tiny(self, out_dir, seed=0):
        from pipelines.models import tiny

        return tiny.build_qwen2(self, out_dir, seed)


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    label = "Qwen2.5-VL"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    processor_class_name = "Qwen2_5_VLProcessor"
    second_per_grid_ts = True
    vllm_architecture = "Qwen2_5_VLForConditionalGeneration"
    hub_example = "Qwen/Qwen2.5-VL-7B-Instruct"

    def finish_batch(self, processor, batch, media):
        # The processor takes one scalar fps; a batch mixes videos of different sampled fps, so the time scale of
        # M-RoPE (second_per_grid_ts) is recomputed per video.
        import torch

        videos = [m for m in media if m.video is not None]
        if videos:
            tp = processor.video_processor.temporal_patch_size
            batch["second_per_grid_ts"] = torch.tensor([tp / (m.fps or 2.0) for m in videos], dtype=torch.float32)
        return batch

    def build_tiny(self, out_dir, seed=0):
        from pipelines.models import build_tiny_model

        return build_tiny_model(out_dir, seed=seed)


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

    def install_rope(self, model) -> bool:
        # Each frame is its own grid (t = 1) between timestamp texts, so transformers' "resume at start +
        # max(h, w) / merge" equals the reference "resume at max(vision positions) + 1" (tested in
        # tests/test_families.py against mrope.reference_rope_index): nothing to patch.
        return False

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

    def build_tiny(self, out_dir, seed=0):
        from pipelines.models import tiny

        return tiny.build_qwen3(self, out_dir, seed)


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    family = "qwen3_vl_moe"
    label = "Qwen3-VL-MoE"
    model_class_name = "Qwen3VLMoeForConditionalGeneration"
    vllm_architecture = "Qwen3VLMoeForConditionalGeneration"
    hub_example = "Qwen/Qwen3-VL-30B-A3B-Instruct"
    # Experts are fused 3-D parameters (not nn.Linear): LoRA adapts attention only, as EasyR1 / verl do for MoE.
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj")


class Qwen35Adapter(Qwen3VLAdapter):
    family = "qwen3_5"
    label = "Qwen3.5"
    model_class_name = "Qwen3_5ForConditionalGeneration"
    vllm_architecture = "Qwen3_5ForConditionalGeneration"
    hub_example = "Qwen/Qwen3.5-27B"
    # Hybrid layers: full attention (q/k/v/o_proj) and Gated DeltaNet (in_proj_qkv/z, out_proj) + MLPs.
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj",
                           "gate_proj", "up_proj", "down_proj")


class Qwen35MoeAdapter(Qwen35Adapter):
    family = "qwen3_5_moe"
    label = "Qwen3.5-MoE"
    model_class_name = "Qwen3_5MoeForConditionalGeneration"
    vllm_architecture = "Qwen3_5MoeForConditionalGeneration"
    hub_example = "Qwen/Qwen3.5-35B-A3B"
    # Routed experts are fused 3-D parameters; the shared expert's MLP is nn.Linear and keeps its adapters.
    lora_target_modules = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj")


ADAPTERS: dict[str, Adapter] = {a.family: a() for a in (Qwen2VLAdapter, Qwen25VLAdapter, Qwen3VLAdapter,
                                                         Qwen3VLMoeAdapter, Qwen35Adapter, Qwen35MoeAdapter)}
FAMILIES = tuple(ADAPTERS)
DEFAULT_FAMILY = "qwen2_5_vl"
# Processor class -> the family whose processing it does (Qwen3.5 ships Qwen3-VL's processor).
_PROCESSOR_FAMILY = {"Qwen2VLProcessor": "qwen2_vl", "Qwen2_5_VLProcessor": "qwen2_5_vl",
                     "Qwen3VLProcessor": "qwen3_vl"}


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
                       hint="pass a Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE) or Qwen3.5(-MoE) model directory")


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


def family_hint(name_or_path: str | None) -> Adapter:
    """The family of a local model, else guessed from a hub id's name (Qwen3-VL*, Qwen3.5*, Qwen2-VL*), else the
    default; for choosing settings (presets) only, never for loading."""
    import re

    if name_or_path and Path(str(name_or_path)).is_dir():
        return adapter_for(str(name_or_path))
    name = str(name_or_path or "").lower()
    for pattern, family in ((r"qwen3-vl-.*a\d+b", "qwen3_vl_moe"), (r"qwen3-vl", "qwen3_vl"),
                            (r"qwen3\.5-.*a\d+b", "qwen3_5_moe"), (r"qwen3\.5", "qwen3_5"), (r"qwen2-vl", "qwen2_vl")):
        if re.search(pattern, name):
            return ADAPTERS[family]
    return ADAPTERS[DEFAULT_FAMILY]


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
