"""vLLM backend (GPU, the `[vllm]` extra): the same `generate(prompts, media, sampling)` as `HFBackend`.

Written against vLLM's public offline API (``vllm.LLM``, ``vllm.SamplingParams``, ``LLM.sleep / wake_up``,
``LLM.reset_prefix_cache``, ``LLM.collective_rpc``) as of vLLM 0.33. vLLM cannot run a Qwen2.5-VL model on the
project's CPU machines, so this module is exercised for real only on a GPU; the tests drive it with a stand-in engine
that records requests (``tests/test_vllm_backend.py``).

Requests. One request per prompt, each carrying ITS OWN media (Video-R1 bug #72: its vLLM trainer sent the
unshuffled video with the "shuffled" prompt, silently turning T-GRPO into GRPO)::

    {"prompt": "<|im_start|>user\\n<|vision_start|><|video_pad|><|vision_end|>...",   # one placeholder, unexpanded
     "multi_modal_data": {"video": (frames_uint8_THWC, metadata)},                     # or {"image": PIL.Image}
     "mm_processor_kwargs": {"fps": sample_fps, "do_resize": False, "do_sample_frames": False}}

Frames were already sampled and sized by ``pipelines.video`` (sides multiples of 28), so vLLM's HF processor must
neither resample (``do_sample_frames=False``; metadata lists every given frame) nor resize (``do_resize=False``).
``fps`` is the sampled fps: the processor derives ``second_per_grid_ts = temporal_patch_size / fps`` from it, which
sets M-RoPE's time axis (Video-R1's eval passes it the same way). The (frames, metadata) tuple is what vLLM's own
video loader returns; models that do not need metadata (Qwen2.5-VL) drop it, models that do (Qwen3-VL) use it.

Weight sync (colocated RL). ``sync_weights(model)`` streams the policy's parameters, one tensor at a time, into the
engine's model through ``model.load_weights([(name, tensor)])`` -- the path TRL's colocate mode uses
(``llm.llm_engine.model_executor.driver_worker.model_runner.model``), reachable when the engine lives in this
process (``distributed_executor_backend="external_launcher"`` under torchrun, or ``VLLM_ENABLE_V1_MULTIPROCESSING=0``);
otherwise it falls back to ``llm.collective_rpc``. Names are the HF checkpoint names (vLLM's Qwen2.5-VL maps
``model.language_model.* / model.visual.* / lm_head.*`` itself); wrapper prefixes are stripped (DDP ``module.``,
``_orig_mod.``, ``_checkpoint_wrapped_module.``, PEFT ``base_model.model.`` / ``.base_layer``). ZeRO-3 partitioned
parameters are gathered one at a time (``deepspeed.zero.GatheredParameters``), so EVERY rank must call
``iter_vllm_weights(model)`` (``sync_weights`` does) even when only rank 0 owns an engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from pipelines.errors import VideoR1Error
from pipelines.generation import Completion, Sampling
from pipelines.models import QWEN_SPECIAL_TOKENS, Media

log = logging.getLogger(__name__)

VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
EOS_TOKEN = "<|im_end|>"
INSTALL_HINT = "pip install 'videor1[vllm]' (GPU only; vLLM 0.33 pins torch==2.14.0), or use the hf backend"


def import_vllm():
    """`vllm` or a VideoR1Error with the install hint (imported lazily: the base install has no vLLM)."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise VideoR1Error(f"the vllm backend needs vLLM, which is not importable here ({e})", hint=INSTALL_HINT) \
            from None
    return vllm


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
    if logit_bias:
        kw["logit_bias"] = dict(logit_bias)
    return kw


def to_completion(output: Any, eos_id: int) -> Completion:
    """A vLLM CompletionOutput (.text, .token_ids, .finish_reason) -> Completion (ids up to and incl. first EOS)."""
    ids = [int(t) for t in output.token_ids]
    finished = getattr(output, "finish_reason", None) == "stop" or eos_id in ids
    if eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    elif finished:
        # Stopped on a stop token vLLM did not report in token_ids: keep the HF convention (finished => ends in EOS).
        ids.append(eos_id)
    return Completion(text=output.text, token_ids=ids, finished=finished)


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
                for name, p in model.named_parameters():
                    if prefix in name or "original_module" in name:
                        continue
                    yield vllm_param_name(name), p.data
            finally:
                model.unmerge_adapter()
        return
    for name, p in model.named_parameters():
        with gathered([p]):
            yield vllm_param_name(name), p.data


def _engine_model(llm):
    """The engine's nn.Module when it lives in this process (external_launcher / no V1 multiprocessing), else None."""
    try:
        worker = llm.llm_engine.model_executor.driver_worker
    except AttributeError:
        return None
    worker = getattr(worker, "worker", worker)  # WorkerWrapperBase -> Worker
    runner = getattr(worker, "model_runner", None)
    return getattr(runner, "model", None)


def _rpc_load_weights(worker, weights):  # runs inside each vLLM worker (collective_rpc)
    worker.model_runner.model.load_weights(weights=weights)


# ---------------------------------------------------------------------------------------------------------------------
class VLLMBackend:
    """`generate(prompts, media, sampling)` on a vLLM engine; colocated weight sync and sleep mode for RL."""

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
        limit_mm_per_prompt: dict[str, int] | None = None,
        max_num_seqs: int | None = None,
        suppress_special_tokens: bool = True,
        mm_processor_kwargs: dict[str, Any] | None = None,
        llm_kwargs: dict[str, Any] | None = None,
        sampling_params_cls: Callable[..., Any] | None = None,
    ):
        self.model_path = str(model_path)
        self.tensor_parallel_size = int(tensor_parallel_size)
        self.enable_sleep_mode = bool(enable_sleep_mode)
        self.sleep_level = int(sleep_level)
        self.colocate = bool(colocate)
        self.mm_processor_kwargs = dict(mm_processor_kwargs or {})
        from pipelines.models.families import ADAPTERS, DEFAULT_FAMILY, adapter_for

        if os.path.isdir(self.model_path):
            self.adapter = adapter_for(self.model_path)  # an unsupported family: a named error before the engine
        else:
            try:
                self.adapter = adapter_for(self.model_path)
            except VideoR1Error:  # a hub id whose config cannot be read offline: the default family's form
                self.adapter = ADAPTERS[DEFAULT_FAMILY]
        self._sampling_params_cls = sampling_params_cls  # tests inject a stand-in; default vllm.SamplingParams
        self._sleeping: set[str] = set()  # {"weights", "kv_cache"} while asleep
        self._weights_lost = False  # sleep(level=2) discarded the weights: sync_weights must run before generate
        self._tp_group = None
        self._all_gather_object: Callable | None = None
        if llm is None:
            vllm = import_vllm()
            kwargs: dict[str, Any] = dict(
                model=self.model_path,
                tensor_parallel_size=self.tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                enable_sleep_mode=self.enable_sleep_mode,
                enable_prefix_caching=enable_prefix_caching,
                enforce_eager=enforce_eager,
                dtype=dtype,
                seed=int(seed),
                limit_mm_per_prompt=limit_mm_per_prompt or {"image": 1, "video": 1},
            )
            if max_num_seqs is not None:
                kwargs["max_num_seqs"] = max_num_seqs
            if self.colocate:
                # One engine per trainer rank, inside the torchrun process (TRL's colocate mode). Ranks of one
                # tensor-parallel group must sample identically, so they share a seed.
                from pipelines.launch import rank, world_size

                if world_size() % self.tensor_parallel_size:
                    raise VideoR1Error(
                        f"tensor_parallel_size {self.tensor_parallel_size} must divide the world size {world_size()}"
                    )
                kwargs["distributed_executor_backend"] = "external_launcher"
                kwargs["seed"] = int(seed) + rank() // self.tensor_parallel_size
                kwargs.setdefault("max_num_batched_tokens", 4096)
                os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                self._setup_tp_group()
            kwargs.update(llm_kwargs or {})
            llm = vllm.LLM(**kwargs)
            self.llm = llm
            if self.enable_sleep_mode and self.colocate:
                # The trainer needs the memory first; the first sync_weights + generate wake the engine up.
                self.sleep()
        self.llm = llm
        tok = llm.get_tokenizer()
        self.eos_id = int(tok.convert_tokens_to_ids(EOS_TOKEN))
        self.stop_token_ids = [self.eos_id]
        self.logit_bias: dict[int, float] = {}
        if suppress_special_tokens:
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
        outputs = self.llm.generate(requests, sampling_params=self.sampling_params(sampling), use_tqdm=False)
        outputs = list(outputs)[offset: offset + own]
        return [[to_completion(o, self.eos_id) for o in out.outputs] for out in outputs]

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
    def sync_weights(self, model) -> int:
        """Push the (unwrapped) policy's current weights into the engine; returns the number of tensors pushed.

        Call on every rank after each optimizer step (ZeRO-3 gathers are collective). Resets the prefix cache, whose
        KV entries were computed with the old weights.
        """
        if "weights" in self._sleeping:
            self._empty_cache()
            self.wake_up(tags=["weights"])
        target = _engine_model(self.llm)
        count = 0
        for name, tensor in iter_vllm_weights(model):
            if target is not None:
                target.load_weights([(name, tensor)])
            else:
                # Engine in other processes (V1 multiprocessing): ship tensors by RPC (slow; needs
                # VLLM_ALLOW_INSECURE_SERIALIZATION=1 for a callable). Colocated RL uses the in-process path above.
                self.llm.collective_rpc(_rpc_load_weights, args=([(name, tensor.detach().cpu())],))
            count += 1
        self._weights_lost = False
        self.llm.reset_prefix_cache()
        return count

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

    @classmethod
    def from_config(cls, model_path, vllm_cfg, *, seed: int = 0, colocate: bool = False, **kw) -> "VLLMBackend":
        """Build from `pipelines.config.VllmConfig` (rl.vllm)."""
        return cls(
            model_path,
            tensor_parallel_size=vllm_cfg.tensor_parallel_size,
            gpu_memory_utilization=vllm_cfg.gpu_memory_utilization,
            max_model_len=vllm_cfg.max_model_len,
            enable_sleep_mode=vllm_cfg.enable_sleep_mode,
            enable_prefix_caching=vllm_cfg.enable_prefix_caching,
            enforce_eager=vllm_cfg.enforce_eager,
            seed=seed,
            colocate=colocate,
            **kw,
        )
