"""The one configuration schema shared by every videor1 command.

Every command resolves its settings the same way: the schema defaults, then a preset (YAML data shipped in
``pipelines/presets/``), then a ``--config`` file, then repeatable ``--set dotted.key=value`` overrides. Field
descriptions are the documentation: ``videor1 config show`` and ``videor1 config schema`` print them.

pydantic does the validation; this module only adds the merge order and errors that name the offending key and
the file it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipelines.models.families import DEFAULT_FAMILY, FAMILIES, families_help

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "cpu-tiny"


class ConfigError(ValueError):
    """A configuration problem a user can fix: names the key and, where known, the file."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------------------------------
class RunConfig(Section):
    name: str | None = Field(None, description="Human-readable run name; defaults to '<kind>-<timestamp>'.")
    seed: int = Field(42, description="Seed for python, numpy and torch (and data order).")
    output_dir: str = Field("videor1-runs", description="Directory under which each run writes its outputs.")
    registry: str | None = Field(
        None,
        description="Path of the SQLite run registry. Default: $VIDEOR1_HOME/registry.db if VIDEOR1_HOME is set, "
        "else <run.output_dir>/registry.db.",
    )
    tags: list[str] = Field(default_factory=list, description="Free-form tags stored with the run.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads per process of train sft / train rl / eval (null: auto = the cores this "
        "process may use / the job's processes on this node, at least 1; `videor1 doctor` prints what each stage gets).",
    )
    report_to: list[Literal["wandb", "tensorboard", "mlflow", "trackio"]] = Field(
        default_factory=list, description="Extra trackers metrics are also sent to (the registry and <run dir>/"
        "metrics.jsonl always get them); trackio is TRL's local-first tracker (pip install trackio).",
    )
    progress_every: float = Field(
        30.0, gt=0, description="Seconds between plain progress lines of long stages when output is not a terminal "
        "(a log file, CI, nohup); on a terminal a live rich bar is drawn instead.",
    )


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights.")
    r: int = Field(64, ge=1, description="LoRA rank.")
    alpha: int = Field(128, ge=1, description="LoRA alpha.")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names of the language model that get adapters (the vision tower is left alone).",
    )


class ModelConfig(Section):
    name_or_path: str = Field(
        "videor1-runs/tiny-model",
        description="Hub id or local directory of a Qwen2.5-VL model (or a videor1 checkpoint). Shortcut: --model.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype. auto = bfloat16 on a GPU that supports it, float32 on the CPU."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel. auto = flash_attention_2 when installed on a GPU, else sdpa."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    freeze_vision: bool = Field(False, description="Keep the vision tower frozen during training.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Optional LoRA fine-tuning.")
    device: str = Field("auto", description="Device for single-process commands: auto, cpu, cuda, cuda:N.")


class DataConfig(Section):
    file: str | None = Field(
        None, description="Input records (Video-R1 JSON list or JSONL) of the command. Shortcut: --data."
    )
    root: str | None = Field(
        None,
        description="Directory that record `path`s resolve against (never the cwd). Shortcut: --root. "
        "Default: the directory holding data.file.",
    )
    max_samples: int | None = Field(None, ge=1, description="Use only the first N records (after shuffling).")
    shuffle: bool = Field(True, description="Shuffle training records (seeded by run.seed).")
    repo_id: str = Field("Video-R1/Video-R1-data", description="Dataset repo `data fetch` downloads.")
    revision: str | None = Field(None, description="Dataset revision for `data fetch` (default: main).")
    include: list[str] = Field(
        default_factory=lambda: ["*.json"],
        description="Glob patterns `data fetch` downloads (e.g. ['*.json', 'CLEVRER/*']). ['*'] = everything.",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader workers that decode media in the background.")
    max_skip_fraction: float = Field(
        0.1, ge=0, le=1,
        description="sft and rl stop with an error when more than this fraction of the samples seen so far were "
        "skipped (unreadable media, bad fields, too long), judged after 64 samples; at the end sft, rl, eval "
        "(error rows per benchmark) and annotate (error records) fail (exit 1, no model/result registered, files "
        "kept) above it, or when they read nothing or skipped everything. 1 = only the last two fail.",
    )


class VideoConfig(Section):
    fps: float = Field(2.0, gt=0, description="Frames per second to sample before min/max frame clamping.")
    min_frames: int = Field(4, ge=1, description="Fewest frames sampled from a video (rounded up to even).")
    max_frames: int = Field(16, ge=2, description="Most frames sampled from a video (rounded down to even).")
    min_pixels: int = Field(128 * 28 * 28, ge=28 * 28, description="Lower bound of pixels per resized frame.")
    max_pixels: int = Field(128 * 28 * 28, ge=28 * 28, description="Upper bound of pixels per resized frame.")
    total_pixels: float = Field(
        128000 * 28 * 28 * 0.9,
        gt=0,
        description="Pixel budget over all frames of one video; lowers the per-frame cap for long samples.",
    )
    backend: Literal["auto", "decord", "pyav"] = Field(
        "auto", description="Video reader. auto = pyav (FFmpeg inside the PyAV wheel; faster than decord here, same "
        "pixels). decord = opt-in, needs the [decord] extra (unmaintained since 2021; can deadlock, decord#373)."
    )
    decode_timeout_s: float | None = Field(
        120.0, ge=0, description="A video whose decode takes longer is given up as a hung decoder (MediaError "
        "naming it; skipped and counted like any unreadable video). 0 or null = no watchdog."
    )
    cache_dir: str | None = Field(
        None, description="Directory of the decoded-frame cache (off when unset). Keyed by file identity + settings."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> "VideoConfig":
        if self.min_frames > self.max_frames:
            raise ValueError(f"video.min_frames ({self.min_frames}) > video.max_frames ({self.max_frames})")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"video.min_pixels ({self.min_pixels}) > video.max_pixels ({self.max_pixels})")
        return self


class ImageConfig(Section):
    min_pixels: int = Field(4 * 28 * 28, ge=28 * 28, description="Lower bound of pixels of a resized image.")
    max_pixels: int = Field(256 * 28 * 28, ge=28 * 28, description="Upper bound of pixels of a resized image.")

    @model_validator(mode="after")
    def _check_bounds(self) -> "ImageConfig":
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"image.min_pixels ({self.min_pixels}) > image.max_pixels ({self.max_pixels})")
        return self


class PromptConfig(Section):
    template: str = Field(
        "video-r1",
        description="Prompt template: a shipped name (video-r1, answer-only) or a path to a template YAML file.",
    )
    max_prompt_length: int | None = Field(
        None,
        ge=1,
        description="Refuse (skip and count) prompts longer than this many tokens; visual tokens are never cut.",
    )


class VllmConfig(Section):
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="Fraction of GPU memory vLLM may take.")
    tensor_parallel_size: int = Field(1, ge=1, description="Tensor-parallel degree of the vLLM engine.")
    enable_sleep_mode: bool = Field(True, description="Free vLLM's memory while the trainer runs (colocated); "
                                    "switched off with a warning where the platform has no sleep mode (CPU).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV cache of shared prompt prefixes.")
    max_model_len: int | None = Field(None, ge=1, description="Context length of the engine (default: model's).")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (slower, less memory).")


class SftConfig(Section):
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (AdamW).")
    num_train_epochs: float = Field(1.0, gt=0, description="Epochs over the SFT records.")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use num_train_epochs).")
    per_device_batch_size: int = Field(1, ge=1, description="Samples per device per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of steps used for linear warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    max_grad_norm: float = Field(5.0, gt=0, description="Gradient clipping norm.")
    max_length: int | None = Field(None, ge=1, description="Skip (and count) samples longer than this many tokens.")
    bf16: bool = Field(False, description="bfloat16 mixed precision (GPU).")
    save_steps: int = Field(1000, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many checkpoints.")
    logging_steps: int = Field(10, ge=1, description="Log metrics every N optimizer steps.")
    eval_file: str | None = Field(None, description="Held-out COT records; loss on them is logged when set.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate held-out loss every N steps (default: at end).")
    output_dir: str | None = Field(None, description="Where the model is written (default: the run's directory).")


class RlConfig(Section):
    algo: Literal["tgrpo", "grpo"] = Field(
        "tgrpo", description="tgrpo = GRPO + Video-R1's temporal reward (ordered vs shuffled frames); grpo = plain."
    )
    num_generations: int = Field(8, ge=2, description="G: completions sampled per prompt on ordered frames.")
    num_shuffled: int | None = Field(
        None, ge=1, description="G~: completions per video prompt on shuffled frames (default G/2). T-GRPO only."
    )
    temporal_mu: float = Field(
        0.8,
        ge=0,
        description="The bonus is given when p >= mu * p~. Video-R1's code uses 0.8; the paper states p >= p~ (1.0).",
    )
    temporal_alpha: float = Field(0.3, ge=0, description="alpha: temporal bonus added to correct ordered answers.")
    temporal_rule: Literal["video_r1", "contrast"] = Field(
        "video_r1",
        description="T-GRPO's temporal reward (pipelines/rl/advantages.py, a registry). video_r1: +alpha to every "
        "correct ordered completion of a video group whose p >= mu * p~ (Video-R1). contrast: each ordered "
        "completion gets alpha * (accuracy - s), s = the share of the group's shuffled completions giving the same "
        "answer: an answer pays only as far as the policy cannot give it without the frame order, and the answer it "
        "also gives on shuffled frames (a shortcut's) is pushed down hardest; mu is not used. docs/rl.md and "
        "BENCHMARKS.md (issue 25) for what each does on the shortcut world.",
    )
    temporal_term: Literal["reward", "advantage"] = Field(
        "reward",
        description="Where the temporal reward enters. reward: added to R before the advantage (Video-R1; with "
        "rl.advantage=group a bonus paid to every correct completion of a binary-reward group is divided away by the "
        "group's std, Video-R1 #51). advantage: a separate term, bonus - its group mean, added to the advantage of R "
        "without it, so no std divides it away. Identical under rl.advantage=mean_only.",
    )
    shuffled_probe: bool = Field(
        False,
        description="GRPO only: also sample G~ completions on the shuffled frames of each video prompt to log "
        "p_shuffled and p_gap as T-GRPO does (no reward, no gradient). The probe is a separate generate call whose "
        "random numbers are given back, so training is bit-identical with and without it on the hf backend; its "
        "time is logged as time/shuffled_probe and left out of step_time. Not under ZeRO-3 on several ranks.",
    )
    correct_threshold: float = Field(
        0.1, ge=0, le=1, description="An answer is 'correct' for the temporal/length bonus when accuracy > this."
    )
    rewards: list[str] = Field(
        default_factory=lambda: ["accuracy", "format"],
        description="Reward functions summed into R: built-in names or 'package.module:function' plugins.",
    )
    reward_weights: list[float] | None = Field(None, description="One weight per entry of rl.rewards (default 1).")
    length_bonus: bool = Field(True, description="Video-R1's length reward (len_control).")
    length_omega: float = Field(0.2, ge=0, description="omega: bonus for correct completions of a good length.")
    length_min: int = Field(320, ge=0, description="l_min: shortest completion (tokens) that earns the bonus.")
    length_max: int = Field(512, ge=0, description="l_max: longest completion (tokens) that earns the bonus.")
    mc_lenient: bool = Field(
        False, description="Accept 'b', 'B.', '(B)' and 'B) text' as B in multiple choice (Video-R1: exact only)."
    )
    numerical_math_verify: bool = Field(
        False, description="Score numerical answers with math-verify instead of Video-R1's round-to-2 rule."
    )
    advantage: Literal["group", "mean_only", "batch_std"] = Field(
        "group",
        description="group = (R-mean)/(std+1e-4) per group (Video-R1); mean_only = R-mean (Dr. GRPO); "
        "batch_std = (R-group mean)/(std of the step's rewards over all ranks).",
    )
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = Field(
        "grpo",
        description="grpo = mean over tokens per sequence, then sequences (Video-R1); bnpo/dapo = token-level mean; "
        "dr_grpo = sum over tokens / (batch * max_completion_length). Counts are the step's over all ranks.",
    )
    importance_sampling: Literal["token", "sequence"] = Field(
        "token", description="token = per-token ratio (GRPO); sequence = length-normalised sequence ratio (GSPO)."
    )
    epsilon_low: float = Field(0.2, ge=0, description="PPO clip: ratio >= 1 - epsilon_low.")
    epsilon_high: float = Field(0.2, ge=0, description="PPO clip: ratio <= 1 + epsilon_high (DAPO uses 0.28).")
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each rollout (>1 uses old log-probs).")
    beta: float = Field(0.04, ge=0, description="KL coefficient (k3 estimator). 0 loads no reference model.")
    encode_once: bool = Field(
        True,
        description="Vision tower once per distinct media item per forward: the G rows of a prompt (and in HF "
        "generation its G ordered and, as a separate item, G~ shuffled rollouts) share one encoder call, placed into "
        "every row (exact: same log-probs, loss and gradients; the rows' gradients meet in one tower backward). With a "
        "frozen tower (model.freeze_vision, LoRA) and no DeepSpeed the features are also reused across the reference "
        "and the num_iterations passes. false: every row encodes its own copy (the repeated path). Logged per step: "
        "vision/patches_encoded, vision/patches_distinct (docs/rl.md).",
    )
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling: drop groups whose rewards are all equal (zero advantage: they only add "
        "KL and optimizer noise) and draw more prompts until the step has per_device_prompts informative groups or "
        "max_sampling_rounds were drawn. Costs extra generation when most groups are all-correct.",
    )
    max_sampling_rounds: int = Field(
        4, ge=1, description="Most prompt batches generated per step with dynamic_sampling (the step trains on what "
        "it has after the last round)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling of rollouts.")
    max_completion_length: int = Field(768, ge=1, description="Most new tokens per completion.")
    per_device_prompts: int = Field(1, ge=1, description="Prompts per device per step (each yields G(+G~) samples).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps whose gradients are summed per update.")
    learning_rate: float = Field(1e-6, gt=0, description="AdamW learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    max_grad_norm: float = Field(5.0, gt=0, description="Gradient clipping norm.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to run, within rl.num_epochs passes over the "
                           "records (unlike HF's max_steps, it does not override the epochs; a warning says when they "
                           "cut it short).")
    num_epochs: float = Field(1.0, gt=0, description="Upper bound on passes over the RL records.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every N steps (resumable with --resume).")
    save_total_limit: int | None = Field(2, ge=1, description="Keep at most this many checkpoints.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every N steps.")
    bf16: bool = Field(False, description="bfloat16 autocast for the policy (GPU).")
    backend: Literal["hf", "vllm"] = Field("hf", description="Rollout engine: hf (transformers generate) or vllm.")
    vllm: VllmConfig = Field(default_factory=VllmConfig, description="Settings of the colocated vLLM engine.")
    rollout_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = Field(
        "sequence_mask",
        description="Importance-sampling correction for rollouts that do not come from the policy itself (TRL's "
        "vllm_importance_sampling_mode): each completion's loss is weighted by pi_policy / pi_engine of its sampled "
        "tokens, both log-probs taken under the engine's sampling distribution (temperature, top-p, logit bias). "
        "token_* = one ratio per token; sequence_* = one per sequence (exp of the summed token log-ratios); "
        "*_truncate = clip the ratio to [C_min, C_max]; *_mask = weight 0 outside it; none = no correction. Applies "
        "with rl.backend=vllm; the hf backend samples from the policy itself, so there it is always none. Logged per "
        "step: rollout/is_ratio_mean|min|max and rollout/is_masked_fraction (share of sequences or tokens outside "
        "[C_min, C_max]).",
    )
    rollout_correction_c_max: float | None = Field(
        3.0, gt=0, description="C_max of rl.rollout_correction (TRL's vllm_importance_sampling_clip_max); null: none."
    )
    rollout_correction_c_min: float | None = Field(
        None, ge=0, description="C_min of rl.rollout_correction (TRL's vllm_importance_sampling_clip_min); null: none."
    )
    output_dir: str | None = Field(None, description="Where the model is written (default: the run's directory).")

    @model_validator(mode="after")
    def _check(self) -> "RlConfig":
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(
                f"rl.reward_weights has {len(self.reward_weights)} entries but rl.rewards has {len(self.rewards)}"
            )
        if self.length_min > self.length_max:
            raise ValueError(f"rl.length_min ({self.length_min}) > rl.length_max ({self.length_max})")
        lo, hi = self.rollout_correction_c_min, self.rollout_correction_c_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"rl.rollout_correction_c_min ({lo}) > rl.rollout_correction_c_max ({hi})")
        return self

    @property
    def shuffled_count(self) -> int:
        return self.num_shuffled if self.num_shuffled is not None else max(1, self.num_generations // 2)


class AnnotateConfig(Section):
    model: str = Field("Qwen/Qwen2.5-VL-72B-Instruct", description="Teacher model (hub id or directory).")
    backend: Literal["vllm", "hf"] = Field("vllm", description="vllm (GPU, tensor parallel) or hf (any device).")
    tensor_parallel_size: int = Field(1, ge=1, description="Tensor-parallel GPUs of the vLLM teacher.")
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1, description="vLLM memory fraction.")
    max_model_len: int = Field(8192, ge=1, description="vLLM context length (clamped to the model's own).")
    enforce_eager: bool = Field(False, description="vLLM without CUDA graphs / compilation (on the CPU: skips ~60 s of "
                                "compile warm-up per engine).")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (paper: 1.0).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling (paper: 0.95).")
    max_new_tokens: int = Field(512, ge=1, description="Most tokens per answer (paper: 512).")
    batch_size: int = Field(32, ge=1, description="Records per generation call.")
    min_reward: float = Field(0.6, ge=0, le=1, description="Keep a trace when its answer scores > this.")
    nproc: int = Field(
        1, ge=1,
        description="Shard processes on this node (`annotate --nproc`): each annotates --shard i/nproc on its own "
        "tensor_parallel_size GPUs, then the shards are merged. Separate from distributed.nproc, which sizes training.",
    )
    output: str | None = Field(
        None,
        description="Output prefix: PREFIX.jsonl (every record, append-only, resumable) and PREFIX.cot.json (kept "
        "records, Video-R1-COT format); shards add .shard-I-of-N. Default: <run.output_dir>/annotate/<data stem>, "
        "stable across runs so a restart resumes.",
    )


class EvalConfig(Section):
    bench: list[str] = Field(default_factory=lambda: ["synthetic"], description="Benchmarks to evaluate.")
    frames: int | None = Field(
        None, ge=2, description="Frame count of the protocol (16, 32 or 64); sets video.max_frames when given."
    )
    scoring: Literal["video-r1", "official"] = Field(
        "video-r1", description="Headline scoring mode; both are always computed and stored."
    )
    temperature: float = Field(
        0.1, ge=0, description="Sampling temperature. Video-R1's code uses 0.1, its README says 0.01; 0 = greedy."
    )
    top_p: float = Field(0.001, gt=0, le=1, description="Nucleus sampling (Video-R1: 0.001, effectively greedy).")
    max_new_tokens: int = Field(1024, ge=1, description="Most new tokens per answer.")
    batch_size: int = Field(16, ge=1, description="Samples per generation call.")
    backend: Literal["hf", "vllm"] = Field("hf", description="hf (batched generate) or vllm (GPU).")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel degree.")
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1, description="vLLM memory fraction.")
    max_model_len: int = Field(16384, ge=1, description="vLLM context length (clamped to the model's own).")
    enforce_eager: bool = Field(False, description="vLLM without CUDA graphs / compilation (on the CPU: skips ~60 s of "
                                "compile warm-up per engine).")
    output_dir: str | None = Field(None, description="Where per-sample JSONL and results.json go (default: run dir).")
    compare: Literal["none", "paper"] = Field("none", description="paper = add the paper's row and the delta.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N samples of each benchmark.")
    paper_model: str | None = Field(
        None, description="Paper row compared with under compare=paper (e.g. 'Video-R1-7B', 'Qwen2.5-VL-7B-SFT'); "
        "default: guessed from the model path."
    )

    @field_validator("bench", mode="before")
    @classmethod
    def _split_bench(cls, v: Any) -> Any:
        # --bench vsi,videomme (a comma list) as well as a YAML list.
        if isinstance(v, str):
            return [b.strip() for b in v.split(",") if b.strip()]
        return v


class QuickstartConfig(Section):
    out_dir: str = Field(
        "videor1-runs/quickstart",
        description="Directory the quickstart writes everything to (world, models, run dirs, evals, table). "
        "Shortcut: --out.",
    )
    train: int = Field(4000, ge=1, description="RL pool: synthetic records without CoT (rl.json). Shortcut: --train.")
    sft: int = Field(
        300,
        ge=1,
        description="Cold-start SFT records with gold CoT (sft.json). Shortcut: --sft. Small, as in the paper (gold "
        "CoT is the scarce data, the RL pool the plentiful one). Measured over 3 seeds (BENCHMARKS.md): 300 records "
        "leave RL something to add (see sft_steps); 2,000 x 2,000 steps give SFT 87.0 and RL -0.1 (what SFT still "
        "misses there is not what the reward teaches).",
    )
    test: int = Field(1000, ge=1, description="Held-out records every model is evaluated on. Shortcut: --test.")
    shuffle_options: bool = Field(
        False,
        description="Shuffle multiple-choice options per record (false: one fixed order per question kind, so the "
        "letter of an answer is constant; chance stays 1/#options since answers are uniform). The 0.2 M-param model does not "
        "learn to look a colour up in a shuffled option list within the budget (MC stayed at chance), so the default is "
        "the fixed order.",
    )
    seeds: list[int] | None = Field(
        None,
        description="Run the whole chain once per seed (world, model init, training) and report each and the mean. "
        "Default: [run.seed]. Shortcut: --seeds 0,1,2.",
    )
    sft_steps: int = Field(
        675,
        ge=1,
        description="Optimizer steps of the SFT cold start. Shortcut: --sft-steps. On 300 records, 3 seeds "
        "(BENCHMARKS.md): 600 steps leave SFT at 52.5 (RL +4.3), 750 steps give 65.4 but RL only +1.3; 675 meets "
        "both goals (59.8, RL +3.4).",
    )
    sft_learning_rate: float | None = Field(
        1e-3,
        gt=0,
        description="Peak SFT learning rate of the quickstart (sets sft.learning_rate; null keeps it). 1e-3 learns the "
        "CoT targets about twice as fast as 5e-4 on the tiny model; 2e-3 collapses its vision tower.",
    )
    algo: Literal["tgrpo", "grpo"] = Field(
        "grpo",
        description="RL algorithm of the quickstart's RL stage (sets `train rl --algo`; `train rl` itself defaults to "
        "T-GRPO). Shortcut: --algo. GRPO because the T-GRPO study (BENCHMARKS.md, `videor1 bench tgrpo`, 5 seeds) "
        "found no temporal variant above GRPO on this world (T-GRPO +0.6 [-0.6, +1.9] on order-dependent "
        "questions), and a GRPO step samples no shuffled-frame rollouts (~0.7x the time of a T-GRPO step here), so "
        "the same time buys about twice the steps. --algo tgrpo runs Video-R1's rule; --compare-algos runs both.",
    )
    rl_steps: int = Field(
        250,
        ge=1,
        description="Steps (rollouts) of the RL phase. Shortcut: --rl-steps. 250 is two passes over the 4,000-prompt "
        "pool at 32 prompts per step (the quickstart raises rl.num_epochs to cover the steps). Measured over seeds "
        "0-2 (BENCHMARKS.md, the quickstart's RL stage): RL - SFT +5.2 with GRPO 250 steps at lr 6e-4, +4.1 at 4e-4, "
        "+3.3 / +2.6 on seeds 0 / 1 at 2e-4; the previous default (T-GRPO 125 steps at 2e-4) +2.7.",
    )
    rl_learning_rate: float | None = Field(
        6e-4,
        gt=0,
        description="Peak RL learning rate of the quickstart (sets rl.learning_rate; null keeps the preset's 2e-4). "
        "6e-4 beat 4e-4 on each of seeds 0-2 (+4.6 / +5.7 / +5.3 against +4.1 / +3.3 / +5.0) at 32 prompts per step "
        "and 250 GRPO steps; seeds 3 and 42 were not used for the choice.",
    )
    family: Literal[FAMILIES] = Field(  # the adapter registry's families (pipelines.models.families)
        DEFAULT_FAMILY,
        description=f"Model family of the tiny model (`videor1 model tiny --family`): {families_help()}. "
        "Shortcut: --family. Pixel "
        "budgets are converted to the family's patches (x (32/28)^2 for Qwen3-VL / Qwen3.5: the same tokens per "
        "frame). The measured learning figures are Qwen2.5-VL's.",
    )
    rl_freeze_vision: bool = Field(
        True,
        description="Freeze the vision tower in the RL stages only (sets model.freeze_vision there; SFT trains it). "
        "Measured: with it trainable, reward-only gradients at RL's noise level moved the tiny model's visual "
        "features and cost up to 5 points of held-out accuracy; frozen, RL stays within about 1 point of SFT.",
    )
    template: str = Field(
        "answer-only",
        description="Prompt template of every stage of the quickstart (sets prompt.template): the short "
        "answer-only prompt suits the tiny CPU model.",
    )
    compare_algos: bool = Field(
        False,
        description="Also train the other algorithm (T-GRPO when quickstart.algo is grpo, and the reverse) from the "
        "same SFT model and report it beside the main one. Shortcut: --compare-algos.",
    )
    torch_threads: int | None = Field(
        1,
        ge=1,
        description="torch intra-op threads per process of every stage (sets run.torch_threads; null: auto). 1 is "
        "fastest for the 0.2 M-parameter model: its ops are too small to split (2 threads cost ~4x the CPU seconds "
        "for the same steps, BENCHMARKS.md); the other cores go to data-parallel ranks (nproc) instead.",
    )
    nproc: int = Field(
        2,
        ge=1,
        description="Data-parallel ranks (torchrun, gloo) of train sft and train rl: the global batch stays "
        "sft.per_device_batch_size and rl.per_device_prompts (each rank gets 1/nproc of it, which must divide). "
        "2 uses both cores of a 2-core machine; the table's numerics depend on it (RL samples with seed + rank), so it "
        "is fixed rather than taken from the machine.",
    )
    overlap_evals: bool = Field(
        True,
        description="Evaluate the untrained and SFT models in a background process while the next training stage "
        "runs (false: every stage one after the other).",
    )
    data_workers: int = Field(
        1, ge=0, description="DataLoader workers of the stages (sets data.num_workers): decode + encode overlap training."
    )

    @field_validator("seeds", mode="before")
    @classmethod
    def _split_seeds(cls, v: Any) -> Any:
        # --seeds 0,1,2 (a comma list) as well as a YAML list or one integer.
        if isinstance(v, int):
            return [v]
        if isinstance(v, str):
            return [int(x) for x in v.replace(" ", "").split(",") if x]
        return v


class PushConfig(Section):
    repo_id: str | None = Field(None, description="Target model repo, ORG/NAME.")
    private: bool = Field(False, description="Create the repo as private.")
    revision: str | None = Field(None, description="Branch to push to (created if missing).")
    license: str = Field("apache-2.0", description="License written into the model card.")
    commit_message: str = Field("Upload videor1 model", description="Commit message of the upload.")


class DistributedConfig(Section):
    nproc: int = Field(1, ge=1, description="Processes per node (one per GPU; on CPU, gloo ranks).")
    nnodes: int = Field(1, ge=1, description="Number of nodes.")
    node_rank: int = Field(0, ge=0, description="Rank of this node.")
    master_addr: str = Field("127.0.0.1", description="Address of the rank-0 node.")
    master_port: int | None = Field(
        None, ge=1, le=65535,
        description="Port of the rank-0 node. Default: a free port chosen at launch, so jobs sharing a machine never "
        "collide; a multi-node run must set it (the same on every node).")
    launcher: Literal["torchrun", "accelerate"] = Field("torchrun", description="How --nproc > 1 is launched.")
    deepspeed: str | None = Field(
        None, description="DeepSpeed: zero2, zero3, zero3_offload (shipped configs) or a path to a JSON config."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="Process-group backend (auto: nccl on GPU).")
    timeout_minutes: int = Field(30, ge=1, description="Collective timeout.")
    sequence_parallel: int = Field(
        1, ge=1, description="Ranks that share one sequence (DeepSpeed Ulysses sequence parallelism, `train sft` and "
        "`train rl`): the vision features are merged into the text, then the sequence is split over this many ranks "
        "and every attention layer exchanges heads for sequence (all-to-all). Data parallelism is then "
        "(nproc * nnodes) / sequence_parallel: the ranks of one group read the same records. Needs the attention "
        "heads (and KV heads, or sequence_parallel a multiple of them) to divide; Qwen3.5's linear-attention layers "
        "are refused. Generation is not split (each rank generates its group's rollouts). docs/distributed.md.")

    @model_validator(mode="after")
    def _check_sequence_parallel(self) -> "DistributedConfig":
        world = self.nproc * self.nnodes
        if self.sequence_parallel > 1 and world % self.sequence_parallel:
            raise ValueError(f"distributed.sequence_parallel ({self.sequence_parallel}) must divide the number of "
                             f"processes (nproc {self.nproc} x nnodes {self.nnodes} = {world}); e.g. --nproc "
                             f"{self.sequence_parallel}")
        return self


class Config(Section):
    """Root of the videor1 configuration."""

    # dotted key -> where its value came from ("preset cpu-tiny", "config file F", "--set k=v", ...); keys absent
    # here hold the schema default. Filled by load_config; not part of the config's content or hash.
    _origin: dict[str, str] = PrivateAttr(default_factory=dict)

    def origin(self, key: str) -> str:
        return self._origin.get(key, "default")

    run: RunConfig = Field(default_factory=RunConfig, description="Run identity, seed, outputs and registry.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model trained or evaluated.")
    data: DataConfig = Field(default_factory=DataConfig, description="Input records and where their media live.")
    video: VideoConfig = Field(default_factory=VideoConfig, description="How frames are sampled and sized.")
    image: ImageConfig = Field(default_factory=ImageConfig, description="How images are sized.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Prompt template.")
    sft: SftConfig = Field(default_factory=SftConfig, description="Supervised cold start (train sft).")
    rl: RlConfig = Field(default_factory=RlConfig, description="GRPO / T-GRPO (train rl).")
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig, description="CoT annotation with a teacher.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Benchmark evaluation.")
    push: PushConfig = Field(default_factory=PushConfig, description="Publishing to the Hugging Face Hub.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Multi-process launch.")
    quickstart: QuickstartConfig = Field(
        default_factory=QuickstartConfig, description="`videor1 quickstart`: sizes, steps and seeds of the CPU demo."
    )

    def hash(self) -> str:
        """Stable hash of the resolved config (what the registry stores)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def registry_path(self) -> Path:
        if self.run.registry:
            return Path(self.run.registry)
        home = os.environ.get("VIDEOR1_HOME")
        if home:
            return Path(home) / "registry.db"
        return Path(self.run.output_dir) / "registry.db"

    def data_root(self) -> Path | None:
        if self.data.root:
            return Path(self.data.root)
        if self.data.file:
            return Path(self.data.file).resolve().parent
        return None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------------------------------
# Loading: preset < file < --set
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def preset_data(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset '{name}'", hint=f"presets: {', '.join(list_presets())}")
    data = _read_yaml(path, "preset")
    base = data.pop("inherits", None)
    if base:
        return deep_merge(preset_data(base), data)
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(item: str) -> tuple[list[str], Any]:
    """Parse one ``dotted.key=value``; the value is read as YAML (so 3, 1e-6, true, [a, b] have their types)."""
    if "=" not in item:
        raise ConfigError(f"--set expects dotted.key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-6" as a string; a user typing it means a number
            value = float(value) if any(c.isdigit() for c in value) and "e" in value.lower() else value
        except ValueError:
            pass
    return key.split("."), value


def set_dotted(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def _format_errors(err: ValidationError, origin: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        src = origin.get(key) or origin.get(key.split(".")[0], "")
        where = f" (from {src})" if src else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'{where}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"bad value for '{key}'{where}: {msg} (got {e.get('input')!r})")
    return "; ".join(lines)


def _origins(data: dict[str, Any], label: str, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out[key] = label
        if isinstance(v, dict):
            out.update(_origins(v, label, key + "."))
    return out


def load_config(
    preset: str | None = None,
    file: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    shortcuts: dict[str, Any] | None = None,
) -> Config:
    """Resolve a Config: defaults < preset (default cpu-tiny) < file < --set overrides < shortcut flags.

    Shortcut flags (``--model``, ``--data``, ``--root``, ``--frames`` ...) are given as {dotted.key: value}; they are
    spelled-out --set entries, applied last.
    """
    origin: dict[str, str] = {}
    file_data = _read_yaml(Path(file), "config file") if file else {}
    # A config file may name the preset it builds on (`inherits: video-r1-7b`); --preset wins over it.
    preset = preset or file_data.pop("inherits", None) or DEFAULT_PRESET
    file_data.pop("inherits", None)
    data = preset_data(preset)
    origin.update(_origins(data, f"preset {preset}"))
    if file_data:
        data = deep_merge(data, file_data)
        origin.update(_origins(file_data, f"config file {file}"))
    for item in overrides or []:
        parts, value = parse_set(item)
        set_dotted(data, parts, value)
        origin[".".join(parts)] = f"--set {item}"
    for key, value in (shortcuts or {}).items():
        if value is None:
            continue
        set_dotted(data, key.split("."), value)
        origin[key] = "command-line flag"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin), hint="`videor1 config keys` lists every key with its help") from None
    if cfg.eval.frames is not None and not (shortcuts or {}).get("video.max_frames"):
        # The eval frame protocol sets the sampler's ceiling: one place to say "32 frames".
        cfg.video.max_frames = cfg.eval.frames
        cfg.video.min_frames = min(cfg.video.min_frames, cfg.eval.frames)
        origin["video.max_frames"] = f"eval.frames ({origin.get('eval.frames', 'default')})"
    cfg._origin = origin
    return cfg


def validate_file(path: str | os.PathLike) -> Config:
    """Validate a config file on its own (against schema defaults, without a preset)."""
    data = _read_yaml(Path(path), "config file")
    if "inherits" in data:
        data = deep_merge(preset_data(data.pop("inherits")), data)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, _origins(data, f"config file {path}"))) from None


def json_schema() -> dict[str, Any]:
    return Config.model_json_schema()


def describe(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, description, default) for every leaf field: the help text of `config show --help-keys`."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        key = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, key + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((key, field.description or "", default))
    return rows
