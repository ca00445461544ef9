"""Models and processors: load a Qwen-VL model (or a videor1 checkpoint), build the tiny offline ones, encode batches.

What differs between model families lives in `pipelines.models.families` (one adapter per family, found by
``adapter_for(model | processor | path)``); this module holds what they share. Quirks under transformers 5:
- frames are decoded and sized by `pipelines.video` and handed to the processor as arrays (``do_resize=False``),
  so the processor's own pixel bounds never silently re-size them;
- the processor takes a single scalar ``fps``; a batch mixes videos of different sampled fps, so
  ``second_per_grid_ts`` (what M-RoPE's time axis uses) is recomputed per video here;
- ``mm_token_type_ids`` must cover prompt + completion for a forward on both, or the model silently falls back to
  1-D positions (``extend_for_completion``).
The tiny models (every family's, built by `pipelines.models.tiny`; `build_tiny_model` and friends are re-exported
here) are the recipe from ``environment.md``: real classes at toy sizes with a byte-level BPE tokenizer trained
offline, so every test and the CPU quickstart exercise the same code as the 7B path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # numpy stays out of the CLI's start-up (pipelines.config reads the family registry from here)
    import numpy as np

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]

# ---------------------------------------------------------------------------------------------------------------------
def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device) -> Any:
    import torch

    if dtype == "auto":
        if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _flash_attn_available(device) -> str | None:
    """None when FlashAttention-2 can run on `device`, else why not."""
    if getattr(device, "type", str(device)) != "cuda":
        return f"it runs on CUDA GPUs only (the model is on {getattr(device, 'type', device)})"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "the flash_attn package is not installed"
    return None


def resolve_attn(attn: str, device) -> str:
    """model.attn_implementation -> what transformers gets. auto: flash_attention_2 where it can run, else sdpa.
    An explicit flash_attention_2 (the video-r1 presets) where it cannot run falls back to sdpa with one warning
    line instead of transformers' ImportError: the same attention, computed by torch's kernel."""
    if attn == "auto":
        return "flash_attention_2" if _flash_attn_available(device) is None else "sdpa"
    if attn == "flash_attention_2":
        why = _flash_attn_available(device)
        if why is not None:
            _warn_once(f"model.attn_implementation=flash_attention_2 cannot run here ({why}): using sdpa "
                       "(set model.attn_implementation=sdpa to silence this)")
            return "sdpa"
    return attn


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    import logging
    import sys

    if msg in _WARNED:
        return
    _WARNED.add(msg)
    log = logging.getLogger("videor1.models")
    if log.hasHandlers():  # unconfigured, logging's last-resort handler would print it a second time
        log.warning(msg)
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A TCP connect to the Hub endpoint: seconds, instead of transformers' minutes of retries when it is down.
    Behind a proxy the direct connect says nothing, so it counts as reachable there."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return True
    u = urlparse(endpoint)
    try:
        socket.create_connection((u.hostname or "", u.port or (443 if u.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def check_model_path(name: str | Path, revision: str | None = None) -> None:
    """Fail at once, naming it, when `name` is neither an existing local model directory nor a loadable Hub id.

    A name that looks local (starts with '.', '~' or '/', holds a backslash or more than one '/', or is no valid
    repo id) and does not exist is a missing directory. So is a bare name without an 'org/' part: every Qwen-VL
    model on the Hub has an org, and `nosuchdir` would otherwise cost minutes of Hub retries. An `org/name` id not
    in the local Hub cache needs the Hub: offline (HF_HUB_OFFLINE or no connection) it fails in one line."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from pipelines.errors import VideoR1Error

    s = str(name)
    local_hint = ("pass an existing model directory (`videor1 model tiny --out DIR` builds a tiny one) or a Hub id "
                  "such as Qwen/Qwen2.5-VL-7B-Instruct")
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise VideoR1Error(f"model path is a file, not a model directory: {s}", hint=local_hint)
        return
    try:
        validate_repo_id(s)
        repo_like = (s.count("/") == 1 and not s.startswith((".", "~", "/")) and "\\" not in s
                     and not Path(s.split("/")[0]).is_dir())  # runs/model with ./runs here: a local path
    except HFValidationError:
        repo_like = False
    if not repo_like:
        raise VideoR1Error(f"model directory not found: {s}", hint=local_hint)
    if isinstance(try_to_load_from_cache(s, "config.json", revision=revision), str):
        return  # in the local Hub cache
    if constants.is_offline_mode():
        raise VideoR1Error(f"model '{s}' is not a local directory nor in the Hub cache, and the Hub is offline "
                           "(HF_HUB_OFFLINE=1)", hint=f"download it where the Hub is reachable (`hf download {s}`), "
                           "or pass a local model directory")
    if not _hub_reachable(constants.ENDPOINT):
        raise VideoR1Error(f"model '{s}' is not a local directory nor in the Hub cache, and {constants.ENDPOINT} "
                           "cannot be reached (offline?)", hint=f"download it where the Hub is reachable (`hf "
                           f"download {s}`), or pass a local model directory")


def load_processor(path: str | Path, revision: str | None = None):
    """The processor saved with a model, tagged with the model's family (Qwen3.5 shares Qwen3-VL's class)."""
    from transformers import AutoProcessor

    check_model_path(path, revision)
    from pipelines.models.families import adapter_for

    # A LoRA checkpoint directory holds the processor but no config.json: the processor's class names the family.
    family = adapter_for(path, revision).family if (Path(str(path)) / "config.json").is_file() else None
    proc = AutoProcessor.from_pretrained(str(path), revision=revision)
    proc.tokenizer.padding_side = "left"
    if family is not None:
        from pipelines.models.families import ADAPTERS, FamilyError

        want = ADAPTERS[family].processor_class_name
        if type(proc).__name__ != want:
            raise FamilyError(f"{path}: processor {type(proc).__name__} does not match the {ADAPTERS[family].label} "
                              f"model (config.json model_type {family})",
                              hint=f"save the model's own processor ({want}) next to it")
        proc._videor1_family = family
    adapter_for(proc)  # a processor of an unsupported family: a named error now, not a wrong prompt later
    return proc


def _rng_untouched():
    """torch.random.fork_rng over the CPU stream and the current CUDA device's: the caller's RNG state is restored."""
    import torch

    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


def _full_shapes_under_zero3() -> None:
    """Under ZeRO-3 (transformers loads inside zero.Init): `pipelines.zero3.install_full_shape_conversions`."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        from pipelines.zero3 import install_full_shape_conversions

        install_full_shape_conversions()


def load_model(model_cfg, path: str | Path | None = None, device=None, for_training: bool = False):
    """Load a Qwen2.5-VL model from model_cfg.name_or_path (or `path`), on `device`, in the configured dtype."""
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging as hf_logging

    from pipelines.errors import VideoR1Error

    hf_logging.disable_progress_bar()

    device = device or resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    name = str(path or model_cfg.name_or_path)
    check_model_path(name, model_cfg.revision)
    from pipelines.models.families import adapter_for

    if (Path(name) / "config.json").is_file():  # family and required config fields checked before any weight
        adapter_for(name).check_config(json.loads((Path(name) / "config.json").read_text()),
                                       where=str(Path(name) / "config.json"))
    try:
        # Loading draws nothing from the run's random streams: under DeepSpeed ZeRO-3 transformers builds the model
        # inside `deepspeed.zero.Init` on real tensors, whose `__init__` draws random numbers (Qwen3.5's A_log is
        # `uniform_`), while other loads build on the meta device and draw none. Without the fork, a ZeRO-3 run
        # sampled other rollouts than the same DDP run from its first step.
        _full_shapes_under_zero3()  # Qwen3-VL-MoE's experts: loaded and saved as without ZeRO-3
        with _rng_untouched():
            model = AutoModelForImageTextToText.from_pretrained(
                name, revision=model_cfg.revision, dtype=dtype, attn_implementation=resolve_attn(
                    model_cfg.attn_implementation, device)
            )
    except OSError as e:
        raise VideoR1Error(
            f"cannot load model '{name}': {str(e).splitlines()[0]}",
            hint="pass --model DIR (a local Qwen2.5-VL or videor1 checkpoint); offline machines need a local path",
        ) from None
    adapter = adapter_for(model)
    adapter.install_rope(model)  # transformers 5 places text after a video elsewhere than Qwen/vLLM: see mrope.py
    adapter.install_shared_vision(model)  # one encoder call per distinct media item when a plan asks (issue 22)
    model.to(device)
    if for_training:
        model.train()
        if model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if model_cfg.freeze_vision:
            for p in adapter.vision_tower(model).parameters():
                p.requires_grad_(False)
    else:
        model.eval()
    return model


def visual_module(model):
    from pipelines.models.families import adapter_for

    return adapter_for(model).vision_tower(model)


def lora_targets(model, lora_cfg) -> list[str]:
    """`model.lora.target_modules`; left at the schema default, the family's list (`Adapter.lora_target_modules`:
    the same for Qwen2/2.5-VL; attention only for MoE experts, which are fused 3-D parameters, not nn.Linear)."""
    from pipelines.config import LoraConfig as LoraSection
    from pipelines.models.families import adapter_for

    default = LoraSection().target_modules
    if list(lora_cfg.target_modules) == list(default):
        return list(adapter_for(model).lora_target_modules)
    return list(lora_cfg.target_modules)


def apply_lora(model, lora_cfg):
    """peft LoRA on the language model's target modules (SFT and RL share this); the vision tower excluded."""
    from peft import LoraConfig, get_peft_model

    from pipelines.models.families import adapter_for

    pc = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                    target_modules=lora_targets(model, lora_cfg), exclude_modules=adapter_for(model).lora_exclude,
                    task_type="CAUSAL_LM")
    model = get_peft_model(model, pc)
    if getattr(model.config, "use_cache", None) is False or getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()
    return model


def load_lora_adapters(model, directory: str | Path) -> None:
    """Loads the adapter weights a LoRA checkpoint holds (`adapter_model.safetensors`) into a model wrapped by
    `apply_lora`; every adapter weight must be found, and only adapter weights."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a LoRA checkpoint keeps its adapters there)")
    state = load_file(str(path))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing or not state:
        raise ValueError(f"{path}: adapter weights do not match the model "
                         f"(unexpected {unexpected[:3]}, missing {missing[:3]}, {len(state)} tensors)")


# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Media:
    """Decoded media of one sample: exactly one of `video` (T,H,W,3 uint8) or `image` (H,W,3 uint8)."""

    video: np.ndarray | None = None
    image: np.ndarray | None = None
    fps: float | None = None  # sampled fps of the video (Frames.sample_fps)
    # Where the frames came from (Frames.indices, Frames.video_fps): the timestamps of timestamped families.
    indices: list[int] | None = None
    video_fps: float | None = None

    @property
    def kind(self) -> str:
        return "video" if self.video is not None else "image" if self.image is not None else "text"


def decode_media(record: dict, cfg, root: str | Path | None, factor: int | None = None) -> Media:
    """Decode a record's video (frame sampler) or image, sides multiples of `factor` (the model family's
    `Adapter.factor`; default 28, Qwen2/2.5-VL); raises MediaError naming the path."""
    from pipelines import video as V
    from pipelines.records import resolve_media

    factor = factor or V.IMAGE_FACTOR
    path = resolve_media(record, root)
    if record.get("data_type") == "video":
        fr = V.sample_video(path, cfg.video, factor=factor)
        return Media(video=fr.frames, fps=fr.sample_fps, indices=list(fr.indices), video_fps=fr.video_fps)
    if record.get("data_type") == "image":
        img = V.load_image(path, cfg.image, factor=factor)
        # torch.from_numpy in the image processor needs a writable array (cached arrays are read-only views).
        return Media(image=img if img.flags.writeable else img.copy())
    return Media()


def shuffled(media: Media, generator) -> Media:
    """The same video with its frames in one random permutation (T-GRPO's contrast).

    The source indices / fps stay those of the ORDERED clip: a timestamped family (Qwen3-VL, Qwen3.5) then writes the
    same monotone ``<t seconds>`` texts before the permuted frames as before the ordered ones, so the timestamps
    describe the presented order and never reveal the true one (docs/rl.md, "Timestamped families")."""
    import torch

    if media.video is None:
        return media
    perm = torch.randperm(media.video.shape[0], generator=generator).numpy()
    return Media(video=media.video[perm], fps=media.fps, indices=media.indices, video_fps=media.video_fps)


def encode_batch(processor, texts: Sequence[str], media: Sequence[Media], padding_side: str = "left"):
    """Processor call for a batch mixing video, image and text-only samples; per-video fps honoured.

    `texts` are chat-rendered prompts holding one <|video_pad|> / <|image_pad|> placeholder per media item.
    """
    from pipelines.models.families import adapter_for

    adapter = adapter_for(processor)
    videos = [m.video for m in media if m.video is not None]
    images = [m.image for m in media if m.image is not None]
    kwargs: dict[str, Any] = {"text": list(texts), "return_tensors": "pt", "padding": True}
    if videos:
        kwargs["videos"] = [v for v in videos]
        kwargs["videos_kwargs"] = adapter.video_kwargs(processor, [m for m in media if m.video is not None])
    if images:
        kwargs["images"] = images
        kwargs["images_kwargs"] = {"do_resize": False}
    tok = processor.tokenizer
    old_side = tok.padding_side
    tok.padding_side = padding_side
    try:
        batch = processor(**kwargs)
    finally:
        tok.padding_side = old_side
    return adapter.finish_batch(processor, batch, media)


def extend_for_completion(batch: dict, completion_ids, completion_mask=None) -> dict:
    """Inputs for a forward on prompt + completion: concatenated ids/mask, mm_token_type_ids extended with zeros."""
    import torch

    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], completion_ids], dim=1)
    cmask = completion_mask if completion_mask is not None else torch.ones_like(completion_ids)
    out["attention_mask"] = torch.cat([batch["attention_mask"], cmask.to(batch["attention_mask"].dtype)], dim=1)
    if "mm_token_type_ids" in batch:
        from pipelines.models.families import Adapter

        out["mm_token_type_ids"] = Adapter.completion_token_types(batch["mm_token_type_ids"], completion_ids)
    return out


def repeat_batch(batch: dict, n: int) -> dict:
    """Repeat every sample of a single-prompt batch n times (visual tensors included), for G completions."""
    import torch

    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            out[k] = v
        elif k in ("pixel_values_videos", "pixel_values"):
            out[k] = v.repeat(n, 1)
        elif k in ("video_grid_thw", "image_grid_thw"):
            out[k] = v.repeat(n, 1)
        elif k == "second_per_grid_ts":
            out[k] = v.repeat(n)
        else:
            out[k] = v.repeat_interleave(n, dim=0)
    return out


def select_rows(batch: dict, rows: Sequence[int], media: Sequence[Media], share_vision: bool = False):
    """Rows of a processor batch: row i is sample `rows[i]` of `batch` (whose samples hold `media`, one item or none
    each). Returns (batch, plan).

    Every per-row tensor (input_ids, attention_mask, mm_token_type_ids, the grids, second_per_grid_ts) is gathered
    per row, so positions are computed from exactly what the repeated path gives them. Pixels are gathered per row
    too (each row's item encoded on its own, as before) unless `share_vision`: then they stay the distinct items'
    once and the returned `families.VisionPlan` maps each row's item to its distinct item (forward inside
    `families.share_vision(model, plan)`). `plan` is None without shared vision or without visual items."""
    import torch

    from pipelines.models.families import VisionPlan

    rows = [int(r) for r in rows]
    n = len(media)
    # distinct item of each sample, per modality (samples without one: None)
    item_of = {"video": [None] * n, "image": [None] * n}
    counts = {"video": 0, "image": 0}
    for s, m in enumerate(media):
        kind = "video" if m.video is not None else "image" if m.image is not None else None
        if kind is not None:
            item_of[kind][s] = counts[kind]
            counts[kind] += 1
    keys = {"video": ("pixel_values_videos", "video_grid_thw"), "image": ("pixel_values", "image_grid_thw")}
    per_row_items = {k: [item_of[k][r] for r in rows if item_of[k][r] is not None] for k in keys}
    out: dict[str, Any] = {}
    index, grids = {}, {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            out[k] = v
    for kind, (pix_key, grid_key) in keys.items():
        if batch.get(pix_key) is None:
            continue
        grid = batch[grid_key]
        if grid.shape[0] != counts[kind]:
            raise ValueError(f"select_rows: {grid.shape[0]} {kind} grids for {counts[kind]} {kind} items")
        items = per_row_items[kind]
        out[grid_key] = grid[items]
        if kind == "video" and batch.get("second_per_grid_ts") is not None:
            out["second_per_grid_ts"] = batch["second_per_grid_ts"][items]
        if share_vision:
            out[pix_key] = batch[pix_key]
            index[kind], grids[kind] = items, grid
        else:
            chunks = torch.split(batch[pix_key], grid.prod(-1).tolist())
            out[pix_key] = torch.cat([chunks[i] for i in items]) if items else batch[pix_key][:0]
    done = {"pixel_values_videos", "pixel_values", "video_grid_thw", "image_grid_thw", "second_per_grid_ts"}
    take = torch.tensor(rows, dtype=torch.long)
    for k, v in batch.items():
        if torch.is_tensor(v) and k not in done:
            out[k] = v.index_select(0, take.to(v.device))
    plan = VisionPlan(index=index, grids=grids) if index else None
    return out, plan


def suppressed_token_ids(tokenizer) -> list[int]:
    """Special tokens that must never be sampled (a sampled <|video_pad|> breaks the next forward)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS if t != "<|im_end|>"
            and tokenizer.convert_tokens_to_ids(t) != eos]


# The tiny builders live in pipelines.models.tiny (one module); these names stay importable from here.
from pipelines.models.tiny import (  # noqa: E402  (tiny reads QWEN_SPECIAL_TOKENS above)
    CHAT_TEMPLATE,
    TINY_VLLM_SPEC,
    TinySpec,
    build_processor,
    build_tiny_model,
    train_tiny_tokenizer,
)
