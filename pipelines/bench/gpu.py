"""The GPU check's Python half (driven by ``scripts/device-check.sh``; docs/gpu-check.md says what it proves).

Two parts, each a subcommand of ``python -m pipelines.bench.gpu``:

``tiny``  -- the tiny Qwen2.5-VL end to end through the real CLI commands (``data synth`` -> ``model tiny`` ->
    ``train sft`` -> ``train rl --algo tgrpo`` -> ``eval --bench synthetic``), each in its own process, on one device
    and precision, and the SFT loss, RL loss / KL / rewards and eval accuracy read back from each run's
    ``metrics.jsonl`` and ``results.json``. ``--record`` writes them as the expected values (CPU float32, the
    reference), otherwise they are compared with the stored ones under the tolerance of the precision:

    - deterministic metrics (SFT losses: the same data order, no dropout) get a relative tolerance, float32 on CUDA
      (TF32 off) a tight one, bfloat16 one of a few percent (bf16 keeps 8 mantissa bits: 0.4% per rounding);
    - sampled metrics (RL rewards, losses, KL; CUDA and the CPU draw from different random streams, so the
      completions differ) can only agree in distribution: an absolute tolerance of several standard errors of the
      mean over the step's samples;
    - greedy eval accuracy gets an absolute tolerance for answers flipped by near-ties of the top two logits.
    A metric outside its tolerance is a failure (exit 1); the table prints CPU and device values side by side.

``probe`` -- seconds per T-GRPO step, tokens per second and peak GPU memory of a random-weight model of
    Qwen2.5-VL-7B's configuration (``QWEN2_5_VL_7B``: the released ``config.json``'s values, written here; built on
    the device from the config, nothing downloaded), on the synthetic world's 16-frame videos at the
    ``video-r1-7b`` preset's 128*28*28 pixels per frame, G = 8 (+ G~ = 4 shuffled), HF generation. Full AdamW on all
    8.3 B parameters does not fit one 80 GB GPU (bf16 weights 16.6 GB + fp32 Adam moments 66 GB + gradients), so the
    probe trains LoRA adapters (r 64 on the language model's linear layers; the vision tower and base weights
    frozen; gradient checkpointing; the KL reference is the base model with the adapters off, so no second copy).
    With ``rl.encode_once`` in the schema it measures on and off, alternating; without it, one setting and a note.

Why by hand: no library runs a project's own CLI chain on two devices and compares its logged metrics; building a
model with random weights from a config is transformers' ``from_config``, bound under ``from_pretrained`` of one
directory only while the probe runs (``random_weights``), so ``pipelines.models.load_model`` -- dtype, attention,
the reference M-RoPE binding and anything else it installs -- runs unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

# Qwen/Qwen2.5-VL-7B-Instruct's config.json (the values that size the compute; token ids are remapped to the offline
# tokenizer's, which does not change any shape: the vocabulary stays 152064 rows).
QWEN2_5_VL_7B: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "mrope_section": [16, 24, 24],
    "sliding_window": 32768,
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}

# A shrunken copy with the same structure, for exercising the probe on a CPU (tests); not a measurement.
SMALL_PROBE_CONFIG: dict[str, Any] = dict(
    QWEN2_5_VL_7B, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    num_hidden_layers=2, max_window_layers=2, mrope_section=[2, 3, 3], vocab_size=2048,
    vision_config=dict(QWEN2_5_VL_7B["vision_config"], depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                       out_hidden_size=64, fullatt_block_indexes=[1]),
)

EXPECTED_FORMAT = 2


# ---------------------------------------------------------------------------------------------------------------------
# Part 1: the tiny model end to end through the CLI
TINY_WORLD = dict(train=64, sft=128, test=96, seed=0)
TINY_SFT = dict(steps=150, batch=16, lr=1e-3)
TINY_RL = dict(steps=3, prompts=8)
TINY_EVAL_TOKENS = 24

# precision -> the --set entries that select it (model.device is added per device)
PRECISIONS = {
    "fp32": ["model.dtype=float32", "sft.bf16=false", "rl.bf16=false"],
    # The video-r1-7b preset's precision: bf16 weights and bf16 autocast in both trainers.
    "bf16": ["model.dtype=bfloat16", "sft.bf16=true", "rl.bf16=true"],
}

# Tolerances by (metric kind, precision): |device - cpu| <= rel * |cpu| + abs. The bf16 ones were calibrated by the
# same chain on the CPU in bfloat16 (docs/gpu-check.md); the sampled ones are ~3 standard errors of their means.
TOLERANCES: dict[str, dict[str, dict[str, float]]] = {
    # SFT loss at step 1: identical weights and batch, only the arithmetic differs
    "first": {"fp32": {"rel": 1e-3, "abs": 1e-4}, "bf16": {"rel": 2e-2, "abs": 1e-3}},
    # SFT loss over steps 1-10: the trajectories have barely separated
    "trajectory": {"fp32": {"rel": 1e-2, "abs": 1e-3}, "bf16": {"rel": 6e-2, "abs": 1e-2}},
    # SFT loss over the last 20 of 150 steps: rounding differences grow through Adam's normalised updates (CPU bf16
    # ended 21% above CPU fp32: 0.338 vs 0.279); a broken path stays near the untrained 6.6
    "late": {"fp32": {"rel": 0.2, "abs": 0.03}, "bf16": {"rel": 0.3, "abs": 0.05}},
    # RL reward components (accuracy, format: means of 0/1 over 3 steps x 8 prompts x 8 completions, on other samples)
    "sampled": {"fp32": {"rel": 0.0, "abs": 0.25}, "bf16": {"rel": 0.0, "abs": 0.25}},
    # the total reward (accuracy + format + temporal bonus, up to 2.3)
    "reward": {"fp32": {"rel": 0.0, "abs": 0.4}, "bf16": {"rel": 0.0, "abs": 0.4}},
    # the RL loss: with one update per rollout the ratio is 1 and group advantages sum to 0: loss = beta * KL, ~1e-5
    "loss": {"fp32": {"rel": 0.0, "abs": 1e-3}, "bf16": {"rel": 0.0, "abs": 1e-3}},
    # mean KL over the 3 steps (the policy's drift after 1-2 updates, on other samples): within a factor of 2
    "kl": {"fp32": {"rel": 1.0, "abs": 2e-4}, "bf16": {"rel": 1.0, "abs": 2e-4}},
    # KL at RL step 1: the policy IS the reference then, so it is 0 up to the precision's noise
    "kl_step1": {"fp32": {"rel": 0.0, "abs": 1e-5}, "bf16": {"rel": 0.0, "abs": 1e-3}},
    # greedy eval accuracy of the SFT model (fraction of 96): answers flipped by near-ties (CPU bf16: 5 of 96)
    "accuracy": {"fp32": {"rel": 0.0, "abs": 0.05}, "bf16": {"rel": 0.0, "abs": 0.12}},
    # greedy eval accuracy of the RL model, which trained on the device's own samples
    "rl_accuracy": {"fp32": {"rel": 0.0, "abs": 0.15}, "bf16": {"rel": 0.0, "abs": 0.15}},
}


def _cli(python: str) -> list[str]:
    return [python, "-m", "videor1_cli.app"]


def tiny_plan(work: Path, device: str, precision: str, world: Path, model: Path) -> list[tuple[str, list[str]]]:
    """(stage, argv) of the chain on one device/precision; every path absolute, outputs under `work`."""
    common = ["--set", "prompt.template=answer-only", "--set", f"video.cache_dir={world.parent / 'frame-cache'}",
              "--set", f"model.device={device}", "--set", "run.torch_threads=1"]
    for s in PRECISIONS[precision]:
        common += ["--set", s]
    sft, rl = work / "sft-model", work / "rl-model"
    return [
        ("sft", ["train", "sft", *common, "--model", str(model), "--data", str(world / "sft-short.json"),
                 "--max-steps", str(TINY_SFT["steps"]), "--out", str(sft), "--set", f"run.output_dir={work / 'sft'}",
                 "--set", "sft.logging_steps=1", "--set", f"sft.per_device_batch_size={TINY_SFT['batch']}",
                 "--set", f"sft.learning_rate={TINY_SFT['lr']}", "--set", "sft.lr_scheduler=constant",
                 "--set", "sft.warmup_ratio=0", "--set", "sft.save_steps=100000"]),
        ("rl", ["train", "rl", *common, "--algo", "tgrpo", "--model", str(sft), "--data", str(world / "rl.json"),
                "--max-steps", str(TINY_RL["steps"]), "--set", f"rl.output_dir={rl}",
                "--set", f"run.output_dir={work / 'rl'}", "--set", f"rl.per_device_prompts={TINY_RL['prompts']}",
                "--set", "rl.logging_steps=1", "--set", "model.freeze_vision=true", "--set", "rl.save_steps=100000"]),
    ] + [(f"eval-{name}", ["eval", *common, "--model", str(m), "--data", str(world / "test.json"), "--bench",
                           "synthetic", "--out", str(work / f"eval-{name}"),
                           "--set", f"run.output_dir={work / f'eval-{name}-runs'}",
                           "--set", f"eval.max_new_tokens={TINY_EVAL_TOKENS}"])
          for name, m in (("sft", sft), ("rl", rl))]


def prepare_world(root: Path, python: str, env: dict[str, str], log: Callable[[str], None]) -> tuple[Path, Path]:
    """The synthetic world and the tiny model (device-independent, made once on the CPU) under `root`.

    SFT trains on the world's CoT records with the reasoning emptied (``<think></think>`` + the gold answer): a few
    hundred steps then teach the 0.2 M-parameter model the answer format, so RL's rewards and the eval's accuracy are
    not all zero (with the full CoT targets they stay 0 for the first ~600 steps, and 0 == 0 proves nothing)."""
    world, model = root / "world", root / "tiny-model"
    if not (world / "sft-short.json").is_file():
        _run(_cli(python) + ["data", "synth", "--out", str(world), "--train", str(TINY_WORLD["train"]), "--sft",
                             str(TINY_WORLD["sft"]), "--test", str(TINY_WORLD["test"]), "--seed",
                             str(TINY_WORLD["seed"]), "--fixed-options"], env, root / "logs" / "synth.log", log)
        recs = json.loads((world / "sft.json").read_text())
        for r in recs:
            r["process"] = "<think></think>"
        (world / "sft-short.json").write_text(json.dumps(recs))
    if not (model / "config.json").is_file():
        _run(_cli(python) + ["model", "tiny", "--out", str(model), "--seed", "0"], env, root / "logs" / "tiny.log",
             log)
    return world, model


def _run(argv: list[str], env: dict[str, str], log_file: Path, log: Callable[[str], None],
         timeout: float | None = None) -> float:
    """One `videor1` command line (argv starts with python -m videor1_cli.app), output to `log_file`."""
    words = [a for a in argv[3:5] if not a.startswith("-")]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_file, "w") as f:
        proc = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"`videor1 {' '.join(words)}` exited {proc.returncode} after {dt:.0f}s "
                           f"(log {log_file}):\n" + "\n".join(tail))
    log(f"  videor1 {' '.join(words)}: {dt:.1f}s")
    return dt


def _metrics_rows(run_parent: Path) -> list[dict[str, Any]]:
    files = sorted(run_parent.glob("*/metrics.jsonl"))
    if len(files) != 1:
        raise RuntimeError(f"expected one run with metrics.jsonl under {run_parent}, found {len(files)}")
    return [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def collect_tiny(work: Path) -> dict[str, float]:
    """The compared metrics of one chain, read from its runs' metrics.jsonl and the eval's results.json."""
    sft = [r for r in _metrics_rows(work / "sft") if "loss" in r]
    losses = [float(r["loss"]) for r in sorted(sft, key=lambda r: r["step"])]
    rl = sorted((r for r in _metrics_rows(work / "rl") if "reward" in r), key=lambda r: r["step"])
    out: dict[str, float] = {
        "sft/loss_step1": losses[0],
        "sft/loss_steps_1_10": _mean(losses[:10]),
        "sft/loss_last_20": _mean(losses[-20:]),
        "rl/kl_step1": float(rl[0]["kl"]),
        "rl/kl_mean": _mean([float(r["kl"]) for r in rl]),
        "rl/loss_mean": _mean([float(r["loss"]) for r in rl]),
        "rl/reward_mean": _mean([float(r["reward"]) for r in rl]),
        "rl/accuracy_reward_mean": _mean([float(r["rewards/accuracy"]) for r in rl]),
        "rl/format_reward_mean": _mean([float(r["rewards/format"]) for r in rl]),
    }
    for name in ("sft", "rl"):
        res = json.loads((work / f"eval-{name}" / "results.json").read_text())["benchmarks"]["synthetic"]
        for mode in ("video-r1", "official"):
            out[f"eval/{name}_accuracy_{mode}"] = float(res[mode]["overall"]) / 100.0
    return out


METRIC_KIND = {
    "sft/loss_step1": "first", "sft/loss_steps_1_10": "trajectory", "sft/loss_last_20": "late",
    "rl/kl_step1": "kl_step1", "rl/kl_mean": "kl", "rl/loss_mean": "loss", "rl/reward_mean": "reward",
    "rl/accuracy_reward_mean": "sampled", "rl/format_reward_mean": "sampled",
    "eval/sft_accuracy_video-r1": "accuracy", "eval/sft_accuracy_official": "accuracy",
    "eval/rl_accuracy_video-r1": "rl_accuracy", "eval/rl_accuracy_official": "rl_accuracy",
}


def compare(observed: dict[str, float], expected: dict[str, float], precision: str) -> list[dict[str, Any]]:
    rows = []
    for key, cpu in expected.items():
        kind = METRIC_KIND.get(key, "sampled")
        tol = TOLERANCES[kind][precision]
        dev = observed.get(key)
        if dev is None:
            rows.append({"metric": key, "cpu_fp32": cpu, "device": None, "diff": None, "tolerance": None,
                         "kind": kind, "ok": False})
            continue
        allowed = tol["rel"] * abs(cpu) + tol["abs"]
        diff = abs(dev - cpu)
        ok = math.isfinite(dev) and diff <= allowed
        rows.append({"metric": key, "cpu_fp32": cpu, "device": dev, "diff": diff, "tolerance": allowed,
                     "kind": kind, "ok": ok})
    return rows


def format_rows(rows: list[dict[str, Any]], label: str) -> str:
    def f(x):
        return "-" if x is None else f"{x:.5g}"

    lines = [f"{'metric':28s} {'cpu fp32':>11s} {label:>11s} {'|diff|':>10s} {'allowed':>10s}  kind        ok"]
    for r in rows:
        lines.append(f"{r['metric']:28s} {f(r['cpu_fp32']):>11s} {f(r['device']):>11s} {f(r['diff']):>10s} "
                     f"{f(r['tolerance']):>10s}  {r['kind']:10s}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def _env(extra_pythonpath: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["VIDEOR1_QUIET"] = "1"
    repo = str(Path(__file__).resolve().parents[2])
    parts = [repo] + ([extra_pythonpath] if extra_pythonpath else []) + \
        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in parts if p))
    return env


def run_tiny(work: Path, device: str, precision: str, python: str = sys.executable,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """The chain on one device/precision under `work` (world and tiny model shared under work/common)."""
    work = Path(work).resolve()
    env = _env()
    env["VIDEOR1_HOME"] = str(work / "home")
    world, model = prepare_world(work / "common", python, env, log)
    out = work / f"{device.replace(':', '')}-{precision}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.perf_counter()
    for stage, argv in tiny_plan(out, device, precision, world, model):
        _run(_cli(python) + argv, env, out / "logs" / f"{stage}.log", log)
    return {"device": device, "precision": precision, "seconds": round(time.perf_counter() - t0, 1),
            "metrics": collect_tiny(out)}


def expected_meta() -> dict[str, Any]:
    import torch

    meta = {"python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        meta["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).resolve().parents[2]).stdout.strip() or None
    except OSError:
        pass
    return meta


def write_expected(path: Path, result: dict[str, Any]) -> None:
    data = {
        "format": EXPECTED_FORMAT,
        "what": "CPU float32 values of the GPU check's tiny chain (python -m pipelines.bench.gpu tiny); regenerate "
                "with scripts/device-check.sh --record-expected after any change to the numerics (summation order, "
                "data order, schedules).",
        "recorded_with": expected_meta() | {"seconds": result["seconds"]},
        "plan": {"world": TINY_WORLD, "sft": TINY_SFT, "rl": TINY_RL, "eval_max_new_tokens": TINY_EVAL_TOKENS},
        "tolerances": TOLERANCES,
        "metric_kind": METRIC_KIND,
        "metrics": result["metrics"],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def check_tiny(result: dict[str, Any], expected_file: Path, precision: str) -> tuple[bool, str]:
    exp = json.loads(Path(expected_file).read_text())
    plan = {"world": TINY_WORLD, "sft": TINY_SFT, "rl": TINY_RL, "eval_max_new_tokens": TINY_EVAL_TOKENS}
    if exp.get("format") != EXPECTED_FORMAT or exp.get("plan") != json.loads(json.dumps(plan)):
        return False, (f"{expected_file} was recorded for another plan; re-record it "
                       "(scripts/device-check.sh --record-expected)")
    rows = compare(result["metrics"], exp["metrics"], precision)
    label = f"{result['device']} {precision}"
    text = format_rows(rows, label)
    return all(r["ok"] for r in rows), text


# ---------------------------------------------------------------------------------------------------------------------
# Part 2: the throughput probe
def write_probe_model(out: Path, config: dict[str, Any]) -> Path:
    """A model directory of `config` without weights: config.json, the offline tokenizer and Qwen2.5-VL's processor,
    and ``videor1_random_weights.json`` (what `random_weights` looks for)."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig

    from pipelines.models import QWEN_SPECIAL_TOKENS, build_processor, train_tiny_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_tokenizer(1024)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    c = dict(config)
    vision = dict(c.pop("vision_config"))
    mrope = c.pop("mrope_section")
    c.pop("architectures", None)
    c.pop("model_type", None)
    text = {k: c.pop(k) for k in list(c) if k not in ("tie_word_embeddings",)}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"), "mrope_section": mrope}
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=c["tie_word_embeddings"])
    vision.pop("spatial_patch_size", None)
    vision["in_channels"] = vision.pop("in_chans", 3)
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=c["tie_word_embeddings"])
    cfg.save_pretrained(out)
    GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                     bos_token_id=ids["<|endoftext|>"]).save_pretrained(out)
    build_processor(tok).save_pretrained(out)
    (out / "videor1_random_weights.json").write_text(json.dumps({"note": "no weights: the GPU probe builds them "
                                                                         "randomly on the device"}))
    return out


@contextlib.contextmanager
def random_weights(model_dir: Path, device) -> Iterator[None]:
    """While active, ``AutoModelForImageTextToText.from_pretrained(model_dir, ...)`` builds the model from its
    config.json with random weights, allocated and initialised directly on `device` (seconds for 8 B parameters on a
    GPU, instead of writing and reading 16 GB). Any other path loads as usual."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    target = str(Path(model_dir).resolve())
    original = AutoModelForImageTextToText.__dict__["from_pretrained"]

    def patched(cls, name, *args, **kwargs):
        if str(Path(str(name)).resolve()) != target:
            return original.__get__(None, cls)(name, *args, **kwargs)
        config = AutoConfig.from_pretrained(target)
        dtype = kwargs.get("dtype") or torch.float32
        attn = kwargs.get("attn_implementation")
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
        model.generation_config = GenerationConfig.from_pretrained(target)
        return model

    AutoModelForImageTextToText.from_pretrained = classmethod(patched)
    try:
        yield
    finally:
        AutoModelForImageTextToText.from_pretrained = original


def encode_once_available() -> bool:
    from pipelines.config import RlConfig

    return "encode_once" in RlConfig.model_fields


def probe_config(model_dir: Path, data: Path, root: Path, work: Path, device: str, *, completion: int,
                 encode_once: bool | None, lora: bool, frames: int, small: bool):
    from pipelines.config import load_config

    sets = [
        f"model.name_or_path={model_dir}", f"data.file={data}", f"data.root={root}", "data.shuffle=false",
        f"run.output_dir={work / 'runs'}", f"model.device={device}", "model.attn_implementation=sdpa",
        "distributed.deepspeed=null", "distributed.nproc=1", "rl.backend=hf", "rl.algo=tgrpo",
        "rl.num_generations=8", "rl.num_shuffled=4", "rl.per_device_prompts=1",
        f"rl.max_completion_length={completion}",
        "rl.save_steps=100000", "rl.max_steps=100000", "rl.num_epochs=100000", f"video.max_frames={frames}",
        f"video.cache_dir={work / 'frame-cache'}", "run.torch_threads=null",
        f"model.lora.enabled={'true' if lora else 'false'}",
    ]
    if small:  # the CPU exercise: fp32, tiny frames, G = 2
        sets += ["model.dtype=float32", "rl.bf16=false", "model.gradient_checkpointing=false",
                 "video.min_pixels=3136", "video.max_pixels=3136", "rl.num_generations=2", "rl.num_shuffled=1",
                 "video.min_frames=2", "run.torch_threads=1"]
    if encode_once is not None:
        sets.append(f"rl.encode_once={'true' if encode_once else 'false'}")
    return load_config(preset="video-r1-7b", overrides=sets)


class _NullRun:
    id = "gpu-probe"

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


def _prompt_tokens(trainer, rows) -> list[int]:
    """Prompt length (tokens, visual ones included) of each ordered and shuffled sequence of a step's prompts."""
    from pipelines.rl import rollout as R

    samples, _ = R.prepare_samples(rows, trainer.cfg, trainer.processor, trainer.template, trainer.root,
                                   torch_generator(), trainer.temporal)
    out = []
    for s in samples:
        n = R.prompt_tokens(trainer.processor, s.prompt, s.media)
        out += [n] * (trainer.G + (trainer.G_shuf if s.shuffled_media is not None else 0))
    return out


def torch_generator():
    """A generator of its own for the peek at a step's prompts (the trainer's shuffle stream stays untouched)."""
    import torch

    return torch.Generator().manual_seed(0)


def time_setting(cfg, work: Path, model_dir: Path, steps: int, warmup: int, label: str,
                 log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from pipelines.rl.trainer import RLTrainer

    cuda = torch.device(cfg.model.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_setup = time.perf_counter()
    with random_weights(model_dir, cfg.model.device):
        tr = RLTrainer(cfg, _NullRun(), work / f"run-{label}")
        tr.setup()
    setup_s = time.perf_counter() - t_setup
    n_params = sum(p.numel() for p in tr.unwrapped.parameters())
    n_train = sum(p.numel() for p in tr.unwrapped.parameters() if p.requires_grad)
    times, gen, fb, comp_tokens, total_tokens = [], [], [], [], []
    try:
        for i in range(warmup + steps):
            pos, epoch = tr.position, tr.epoch
            rows = tr._next_rows()
            tr.position, tr.epoch = pos, epoch  # only peeked: train_step draws the same rows
            prompt = _prompt_tokens(tr, rows)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = tr.train_step()
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tr.step += 1
            seqs = len(prompt)
            completion = float(m["completion_length"]) * seqs
            log(f"  {label} step {i + 1}/{warmup + steps}{' (warm-up)' if i < warmup else ''}: {dt:.2f}s "
                f"(generation {m['gen_time']:.2f}s, policy fwd+bwd {m.get('time/policy_fwd_bwd', float('nan')):.2f}s)"
                f", {seqs} sequences, {sum(prompt) / max(1, seqs):.0f} prompt + {m['completion_length']:.0f} "
                "completion tokens each")
            if i >= warmup:
                times.append(dt)
                gen.append(float(m["gen_time"]))
                fb.append(float(m.get("time/policy_fwd_bwd", float("nan"))))
                comp_tokens.append(completion)
                total_tokens.append(sum(prompt) + completion)
    finally:
        peak = torch.cuda.max_memory_allocated() if cuda else None
        reserved = torch.cuda.max_memory_reserved() if cuda else None
        tr.cleanup()
        del tr
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    med = statistics.median(times)
    tokens = statistics.median(total_tokens)
    return {
        "label": label, "setup_s": round(setup_s, 1), "steps": steps, "warmup": warmup,
        "s_per_step_median": med, "s_per_step_min": min(times), "s_per_step": times,
        "generation_s_median": statistics.median(gen), "policy_fwd_bwd_s_median": statistics.median(fb),
        "tokens_per_step": tokens, "tokens_per_s_per_gpu": tokens / med,
        "generated_tokens_per_s": statistics.median(comp_tokens) / statistics.median(gen),
        "peak_gpu_memory_gib": None if peak is None else peak / 2**30,
        "peak_gpu_reserved_gib": None if reserved is None else reserved / 2**30,
        "parameters": n_params, "trainable_parameters": n_train,
    }


def probe_world(work: Path, frames: int, small: bool) -> tuple[Path, Path]:
    """Video records of the synthetic world: 2 fps x `frames` frames (the video-r1-7b preset samples 2 fps)."""
    from pipelines.synth import synthesize

    wdir = work / "world"
    if not (wdir / "rl.json").exists():
        # 336 px squares: the preset's 128*28*28 budget resizes them to 308x308, 121 visual tokens per frame (a
        # square at most 128*28*28 pixels; 320 px would be sized up to 336x336, 144 tokens, by min_pixels).
        synthesize(wdir, train=16, test=1, seed=0, frames=frames * 2, fps=4.0, size=56 if small else 336,
                   image_fraction=0.0)
    recs = [r for r in json.loads((wdir / "rl.json").read_text()) if r["data_type"] == "video"]
    f = work / "videos.json"
    f.write_text(json.dumps(recs))
    return f, wdir


def run_probe(work: Path, device: str = "cuda", steps: int = 3, warmup: int = 1, completion: int = 256,
              frames: int = 16, small: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = SMALL_PROBE_CONFIG if small else QWEN2_5_VL_7B
    model_dir = write_probe_model(work / ("small-model" if small else "qwen2_5_vl_7b-random"), config)
    data, root = probe_world(work, frames, small)
    settings: list[bool | None] = [None]
    note = None
    if encode_once_available():
        settings = [True, False]
    else:
        note = ("rl.encode_once is not in this schema (the encode-once change is not merged here): measured the "
                "current path only, no on/off comparison")
        log(f"note: {note}")
    res: dict[str, Any] = {
        "what": None,  # filled from the first setting's config
        "tokens_per_s_per_gpu_means": "(prompt + completion tokens of every ordered and shuffled sequence of the "
                                      "step) / step seconds; one GPU",
        "completion_tokens": completion, "frames": frames, "note": note, "settings": [],
        "device": (torch.cuda.get_device_name(0) if torch.device(device).type == "cuda"
                   else platform.processor() or platform.machine()),
        "torch": torch.__version__,
    }
    for enc in settings:
        label = {None: "current", True: "encode_once-on", False: "encode_once-off"}[enc]
        cfg = probe_config(model_dir, data, root, work, device, completion=completion, encode_once=enc,
                           lora=True, frames=frames, small=small)
        if res["what"] is None:
            res["what"] = describe_probe(cfg, small)
        log(f"probe {label}: building the model and trainer")
        try:
            r = time_setting(cfg, work, model_dir, steps, warmup, label, log)
        except Exception as e:  # noqa: BLE001 - one setting failing (OOM, say) must not lose the other's figures
            import traceback

            log(traceback.format_exc())
            r = {"label": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            if torch.cuda.is_available():
                r["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                gc.collect()
                torch.cuda.empty_cache()
        r["encode_once"] = enc
        res["settings"].append(r)
    try:
        from importlib import metadata

        res["transformers"] = metadata.version("transformers")
    except Exception:  # noqa: BLE001
        pass
    return res


def describe_probe(cfg, small: bool) -> str:
    rl, m = cfg.rl, cfg.model
    lora = m.lora
    what = ("a SHRUNKEN Qwen2.5-VL config (CPU exercise, not a measurement)" if small
            else "Qwen2.5-VL-7B's configuration")
    return (f"T-GRPO steps (HF generation; G={rl.num_generations} + {rl.shuffled_count} shuffled; "
            f"{rl.per_device_prompts} prompt per step; completions of {rl.max_completion_length} tokens) of a "
            f"random-weight model of {what}; "
            f"up to {cfg.video.max_frames} frames per video at {cfg.video.max_pixels} pixels per frame at most; "
            + (f"LoRA r{lora.r} on the language model's linear layers (vision tower and base weights frozen)"
               if lora.enabled else "all weights trained")
            + f"; gradient checkpointing {'on' if m.gradient_checkpointing else 'off'}; {m.dtype} weights"
            + (" + bf16 autocast" if rl.bf16 else "") + f"; {m.attn_implementation} attention; KL reference = "
            + ("the adapters off" if lora.enabled else "a frozen copy"))


def format_probe(res: dict[str, Any]) -> str:
    lines = [res["what"], f"device: {res['device']}, torch {res['torch']}, transformers {res.get('transformers')}",
             f"{'setting':18s} {'s/step med':>10s} {'min':>7s} {'gen s':>7s} {'fwd+bwd s':>9s} {'tok/step':>9s} "
             f"{'tok/s/GPU':>10s} {'gen tok/s':>10s} {'peak GiB':>9s}"]
    for s in res["settings"]:
        if "error" in s:
            lines.append(f"{s['label']:18s} FAILED: {s['error']}")
            continue
        pk = "-" if s["peak_gpu_memory_gib"] is None else f"{s['peak_gpu_memory_gib']:.1f}"
        lines.append(f"{s['label']:18s} {s['s_per_step_median']:10.2f} {s['s_per_step_min']:7.2f} "
                     f"{s['generation_s_median']:7.2f} {s['policy_fwd_bwd_s_median']:9.2f} {s['tokens_per_step']:9.0f} "
                     f"{s['tokens_per_s_per_gpu']:10.0f} {s['generated_tokens_per_s']:10.0f} {pk:>9s}")
    if len(res["settings"]) == 2 and not any("error" in s for s in res["settings"]):
        on, off = res["settings"]
        lines.append(f"encode_once on/off step time ratio: {on['s_per_step_median'] / off['s_per_step_median']:.3f}")
    if res.get("note"):
        lines.append(f"note: {res['note']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.bench.gpu", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="the tiny chain on one device/precision; compare with (or --record) the expected "
                                    "CPU float32 values")
    t.add_argument("--work", type=Path, required=True)
    t.add_argument("--device", default="cuda")
    t.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    t.add_argument("--expected", type=Path, required=True)
    t.add_argument("--record", action="store_true", help="write the expected values (CPU float32 only)")
    t.add_argument("--json", type=Path, help="also write the result and comparison here")
    p = sub.add_parser("probe", help="throughput of a random-weight Qwen2.5-VL-7B (T-GRPO, HF backend)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--completion", type=int, default=256, help="max completion tokens (random weights never stop "
                                                               "early, so every completion has this length)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--small", action="store_true", help="a shrunken config (exercise the code on a CPU)")
    p.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if a.cmd == "tiny":
        if a.record and (a.device != "cpu" or a.precision != "fp32"):
            ap.error("--record writes the reference: CPU float32 only")
        res = run_tiny(a.work, a.device, a.precision, log=log)
        if a.record:
            write_expected(a.expected, res)
            log(f"expected values written to {a.expected}:")
            log(json.dumps(res["metrics"], indent=1))
            return 0
        ok, table = check_tiny(res, a.expected, a.precision)
        log(table)
        if a.json:
            a.json.write_text(json.dumps(res | {"ok": ok, "table": table}, indent=1))
        log(f"tiny chain on {a.device} {a.precision}: {'PASS' if ok else 'FAIL'} ({res['seconds']}s)")
        return 0 if ok else 1
    res = run_probe(a.work, a.device, steps=a.steps, warmup=a.warmup, completion=a.completion, frames=a.frames,
                    small=a.small, log=log)
    log(format_probe(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 1 if any("error" in s for s in res["settings"]) else 0


if __name__ == "__main__":
    sys.exit(main())
