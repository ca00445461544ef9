"""`videor1 bench rl`: RL step time of `pipelines.rl` against TRL's GRPOTrainer, T-GRPO's overhead, frame scaling.

Three scenarios on the same tiny Qwen2.5-VL and one synthetic world (64-frame 56x56 videos and 56x56 images):

1. ``grpo_image``: GRPO on image prompts, ours vs ``trl.GRPOTrainer`` (trl 1.16) doing the same work per step: one
   prompt, G = 4 completions of up to 32 new tokens (T = 1.0, top_p 0.95, special tokens other than <|im_end|>
   suppressed on both sides), beta = 0.04 (so both load a frozen reference and run its forward), loss_type grpo,
   one optimizer step per rollout, AdamW, constant LR, clip 1.0. TRL gets ``per_device_train_batch_size = G`` (= one
   prompt x G) and the same 56x56 images as PIL (its processor keeps the size: 4 visual tokens, as ours), and the
   same accuracy + format rewards through thin wrappers.
2. ``video``: T-GRPO vs GRPO on video prompts at 16 frames (T-GRPO adds G~ = G/2 shuffled rollouts and the p / p~
   bookkeeping; the shuffled rollouts ride in the same generate call).
3. ``frames``: T-GRPO step time at 4 / 16 / 64 frames.

A step is timed from the end of one optimizer step to the end of the next (everything: data, decode, rollout,
rewards, reference and policy forward, backward, optimizer). Timing: `pipelines.bench.alternate` -- the two sides of
a scenario in alternating rounds (``repeats``; each round a fresh trainer per side whose first ``warmup`` steps are
untimed), the timed steps pooled; min and median and the machine's load are reported. TRL has no video path for the loss forward (see docs/rl.md), so it appears only in scenario 1.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

IMAGE_RATIO_TARGET = 0.8  # ours / TRL
TGRPO_RATIO_TARGET = 1.3  # T-GRPO / GRPO
COMMON = dict(G=4, max_completion_length=32, beta=0.04, lr=1e-5, max_grad_norm=1.0, top_p=0.95, temperature=1.0)


class _NullRun:
    """Stands in for a registry run inside the benchmark's inner trainers (the bench run records the results)."""

    id = "bench"

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


def _world(work: Path, model_dir: str | None) -> tuple[str, dict[str, Path], Path]:
    from pipelines.bench import cached_tiny_model
    from pipelines.synth import synthesize

    if model_dir is None:
        model_dir = cached_tiny_model(work / "tiny-model")
    wdir = work / "world"
    if not (wdir / "rl.json").exists():
        synthesize(wdir, train=32, test=1, seed=0, frames=64, fps=8.0, image_fraction=0.5)
    recs = json.loads((wdir / "rl.json").read_text())
    files = {}
    for kind in ("image", "video"):
        sub = [r for r in recs if r["data_type"] == kind and r["problem_type"] == "multiple choice"] or \
              [r for r in recs if r["data_type"] == kind]
        f = work / f"{kind}.json"
        f.write_text(json.dumps(sub))
        files[kind] = f
    return model_dir, files, wdir


def _our_config(model_dir: str, data: Path, root: Path, work: Path, algo: str, frames: int):
    from pipelines.config import load_config
    from pipelines.models.families import adapter_for

    c = COMMON
    # 56x56 frames and images (4 visual tokens per frame pair) for 28-pixel patches; the same tokens, 64x64, for a
    # family with 32-pixel patches (Qwen3-VL / Qwen3.5).
    px = (2 * adapter_for(model_dir).factor) ** 2
    return load_config(overrides=[
        f"video.min_pixels={px}", f"video.max_pixels={px}", f"image.min_pixels={px}", f"image.max_pixels={px}",
        f"model.name_or_path={model_dir}", f"data.file={data}", f"data.root={root}", "data.shuffle=false",
        f"run.output_dir={work / 'runs'}", f"rl.algo={algo}", f"rl.num_generations={c['G']}",
        f"rl.max_completion_length={c['max_completion_length']}", "rl.per_device_prompts=1", f"rl.beta={c['beta']}",
        "rl.loss_type=grpo", "rl.length_bonus=false", f"rl.learning_rate={c['lr']}", "rl.lr_scheduler=constant",
        "rl.warmup_steps=0", f"rl.max_grad_norm={c['max_grad_norm']}", f"rl.top_p={c['top_p']}",
        f"rl.temperature={c['temperature']}", "rl.save_steps=100000", "rl.max_steps=100000",
        "rl.num_epochs=100000",  # the bench drives the steps: neither key may stop it
        "video.fps=8.0", "video.min_frames=4", f"video.max_frames={frames}",
    ])


def time_ours(cfg, work: Path, steps: int, warmup: int) -> dict[str, Any]:
    from pipelines.rl.trainer import RLTrainer

    tr = RLTrainer(cfg, _NullRun(), work / "run")
    tr.setup()
    times, gen, lens = [], [], []
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            m = tr.train_step()
            tr.step += 1
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                gen.append(m["gen_time"])
                lens.append(m["completion_length"])
    finally:
        tr.cleanup()
    return {"median_s": statistics.median(times), "times_s": times, "gen_median_s": statistics.median(gen),
            "completion_length": statistics.mean(lens)}


def time_trl(model_dir: str, data: Path, root: Path, work: Path, steps: int, warmup: int) -> dict[str, Any]:
    """trl.GRPOTrainer on the same image prompts (one prompt x G per step)."""
    import datasets
    from PIL import Image
    from transformers import AutoModelForImageTextToText, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from pipelines.config import load_config
    from pipelines.models import load_processor, suppressed_token_ids
    from pipelines.prompts import load_template, question_text
    from pipelines.records import resolve_media
    from pipelines.rewards import accuracy_reward, completion_text, format_reward
    from pipelines.video import load_image

    cfg = load_config()
    tpl = load_template(cfg.prompt.template)
    recs = json.loads(Path(data).read_text())
    rows = []
    for r in recs:
        img = Image.fromarray(load_image(resolve_media(r, root), cfg.image))
        rows.append({"prompt": [{"role": "user", "content": question_text(r, tpl, "train")}], "image": img,
                     "solution": r["solution"], "problem_type": r["problem_type"], "options": r["options"]})
    n = (warmup + steps + 1)
    rows = (rows * (n // max(1, len(rows)) + 1))[:n]
    ds = datasets.Dataset.from_list(rows)

    def accuracy(completions, solution, problem_type, options, **_):
        return accuracy_reward([completion_text(c) for c in completions], solution=solution,
                               problem_type=problem_type, options=options)

    def fmt(completions, **_):
        return format_reward([completion_text(c) for c in completions])

    processor = load_processor(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="float32")
    c = COMMON
    args = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=c["G"], num_generations=c["G"],
        max_completion_length=c["max_completion_length"], beta=c["beta"], loss_type="grpo",
        temperature=c["temperature"], top_p=c["top_p"], learning_rate=c["lr"], lr_scheduler_type="constant",
        weight_decay=0.01, max_grad_norm=c["max_grad_norm"], max_steps=warmup + steps, logging_steps=10**6,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, shuffle_dataset=False,
        generation_kwargs={"suppress_tokens": suppressed_token_ids(processor.tokenizer)}, disable_dropout=True,
    )

    class _Timer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kw):  # noqa: ARG002
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):  # noqa: ARG002
            self.ends.append(time.perf_counter())

    timer = _Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, fmt], args=args, train_dataset=ds,
                          processing_class=processor, callbacks=[timer])
    trainer.train()
    times = [b - a for a, b in zip(timer.ends, timer.ends[1:])][warmup:]
    return {"median_s": statistics.median(times), "times_s": times}


def _side(side) -> dict[str, Any]:
    return {"median_s": side.median_s, "min_s": side.min_s, "times_s": side.seconds}


def run_bench(out: str | Path | None = None, model_dir: str | None = None, steps: int = 10, warmup: int = 3,
              frames: tuple[int, ...] = (4, 16, 64), threads: int = 1, skip_trl: bool = False, repeats: int = 2,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    import torch

    from pipelines.bench import Timed, alternate, loadavg, machine

    torch.set_num_threads(threads)
    say = progress or (lambda s: None)
    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="videor1-bench-rl-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, files, root = _world(work, model_dir)
    res: dict[str, Any] = {"settings": dict(COMMON, steps=steps, warmup=warmup, threads=threads, repeats=repeats,
                                            prompts_per_step=1, image_px="56x56", video_px="56x56")}

    # Ours and TRL in alternating rounds (pipelines.bench.alternate; each round a fresh trainer per side, its first
    # `warmup` steps untimed), the timed steps pooled, so a noisy neighbour on a shared machine hits both sides alike.
    def side(fn):
        return lambda: Timed(fn()["times_s"])

    sides = {"ours": side(lambda: time_ours(_our_config(model_dir, files["image"], root, work, "grpo", 16), work,
                                            steps, warmup))}
    if not skip_trl:
        sides["trl"] = side(lambda: time_trl(model_dir, files["image"], root, work, steps, warmup))
    img = alternate(sides, rounds=repeats, warmup=0, progress=lambda s: say(f"grpo on images: {s}"))
    res["grpo_image"] = {name: _side(img[name]) for name in sides}
    res["grpo_image"]["method"] = img.summary()["method"]
    if not skip_trl:
        ratio = img.ratio("ours", "trl")
        res["grpo_image"].update(ratio=ratio, ratio_min=img.ratio("ours", "trl", "min"), target=IMAGE_RATIO_TARGET,
                                 met=ratio <= IMAGE_RATIO_TARGET)

    vid = alternate({algo: side(lambda algo=algo: time_ours(_our_config(model_dir, files["video"], root, work, algo,
                                                                         16), work, steps, warmup))
                     for algo in ("grpo", "tgrpo")}, rounds=repeats, warmup=0,
                    progress=lambda s: say(f"video at 16 frames: {s}"))
    ratio = vid.ratio("tgrpo", "grpo")
    res["video"] = {"grpo": _side(vid["grpo"]), "tgrpo": _side(vid["tgrpo"]), "ratio": ratio,
                    "ratio_min": vid.ratio("tgrpo", "grpo", "min"), "target": TGRPO_RATIO_TARGET,
                    "met": ratio <= TGRPO_RATIO_TARGET, "frames": 16, "method": vid.summary()["method"]}

    res["frames"] = {}
    for f in frames:  # no peer: one side, its steps after its warm-up steps
        say(f"tgrpo at {f} frames")
        r = time_ours(_our_config(model_dir, files["video"], root, work, "tgrpo", f), work, steps, warmup)
        res["frames"][str(f)] = {**r, "min_s": min(r["times_s"])}
    res["machine"] = machine()
    res["load_1min_end"] = loadavg()
    return res


__all__ = ["run_bench", "time_ours", "time_trl"]
