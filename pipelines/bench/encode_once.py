"""`videor1 bench rl --encode-once`: RL step time with `rl.encode_once` against the repeated path (issue 22).

What is compared: T-GRPO steps (G = 8, G~ = 4, one video prompt per step, beta > 0 so the reference forward runs,
HF backend) with ``rl.encode_once=true`` (each video through the vision tower once per forward and once in
generation for the ordered and once for the shuffled copy) and ``false`` (every row's copy encoded), at 16 and 64
frames, on two tiny Qwen2.5-VL models:

(a) ``proportioned``: sized so that the vision tower's share of one forward's FLOPs equals Qwen2.5-VL-7B's at
    Video-R1's training budget (16 frames at 128*28*28 pixels, i.e. 1024 video tokens / 4096 patch rows, plus the
    prompt text and a completion). The 7B's share is computed from its config (`QWEN25_VL_7B`, the values of
    Qwen/Qwen2.5-VL-7B-Instruct's config.json) by `forward_flops`; the tiny's language model is fixed
    (`PROPORTIONED_TEXT`) and its vision tower's width chosen (`proportioned_spec`) so that the same formula on the
    tiny's own config and the bench's token counts (112x112 frames: 16 tokens per temporal patch, the tiny
    tokenizer's prompt, `COMPLETION` new tokens) gives the 7B's share at 16 frames.
(b) ``default``: the default tiny model (`TinySpec()`), the one every test and the quickstart use.

FLOPs are matmul FLOPs (2 per multiply-add) of the forward: per vision patch row the patch embedding, each block's
qkv / proj / SwiGLU MLP and its attention over its window (full-attention blocks: the temporal patch's frame), the
merger per merged token; per language token each layer's q/k/v/o, MLP and causal attention over the sequence, and
the LM head over the completion's logits only (`logits_to_keep`). Backward is ~2x forward on both sides, so the
share holds for a policy forward + backward too.

Timing follows BENCHMARKS.md's rules: every step of a run is timed from one optimizer step's end to the next's
(rollout, rewards, reference, policy forward/backward, optimizer), the first ``warmup`` steps of each run are
dropped, the two paths alternate in rounds (their order flips every round) so a noisy neighbour hits both alike,
min and median are reported with the ratio (repeated / encode-once) computed in the same run, and the 1-minute load
average is recorded around every run. The per-step metrics (loss, KL, reward, patches) of the two paths are
compared step by step: encode-once must not change what is trained.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Qwen/Qwen2.5-VL-7B-Instruct config.json (text and vision_config), the fields the FLOP count reads.
QWEN25_VL_7B = {
    "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064},
    "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3,
               "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
}
# Video-R1's training budget (qwen-vl-utils settings of its T-GRPO script): 16 frames of at most 128*28*28 pixels, i.e.
# 128 merged tokens per temporal patch at the cap; the prompt's text (the reasoning template + question + options +
# chat markup) ~150 tokens; a completion in the middle of its length reward's window (320..512 tokens).
VIDEO_R1_BUDGET = {"frames": 16, "tokens_per_temporal_patch": 128, "prompt_text_tokens": 150,
                   "completion_tokens": 416}
G, COMPLETION = 8, 32
FRAME_PX = 112  # bench frames: 112x112 -> 8x8 patches, 16 merged tokens per temporal patch
# The proportioned tiny's language model (head_dim 32, as the other families' tiny models), wide enough that its
# matmuls, not per-op overhead, dominate a CPU forward; the vision tower's width is then solved for.
PROPORTIONED_TEXT = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8,
                     "num_key_value_heads": 4, "mrope_section": (4, 6, 6)}
PROPORTIONED_VISION_DEPTHS = (2, 3, 4)
SPEEDUP_GOAL = 1.5  # issue 22: >= 1.5x faster RL step at 64 frames on the proportioned model


# ------------------------------------------------------------------------------------------------------- FLOPs
def vision_flops_per_patch(v: dict[str, Any], patches_per_frame: int) -> float:
    """Forward matmul FLOPs per patch row through a Qwen2.5-VL vision tower (merger amortised over its 4 rows)."""
    h, i = v["hidden_size"], v["intermediate_size"]
    p_in = v.get("in_chans", 3) * v["temporal_patch_size"] * v["patch_size"] ** 2
    merge = v["spatial_merge_size"] ** 2
    window = min(patches_per_frame, (v["window_size"] // v["patch_size"]) ** 2)
    full = set(v.get("fullatt_block_indexes", []))
    f = 2 * p_in * h
    for layer in range(v["depth"]):
        ctx = patches_per_frame if layer in full else window
        f += 2 * 4 * h * h + 2 * 3 * h * i + 4 * ctx * h  # qkv + proj, SwiGLU, scores + values
    f += (2 * (merge * h) ** 2 + 2 * merge * h * v["out_hidden_size"]) / merge
    return f


def text_flops(t: dict[str, Any], tokens: int, logits: int) -> float:
    """Forward matmul FLOPs of one sequence of `tokens` through the language model, `logits` positions of LM head."""
    h, i, heads, kv = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"], t["num_key_value_heads"]
    hd = h // heads
    per_token = 2 * (h * heads * hd + 2 * h * kv * hd + heads * hd * h) + 2 * 3 * h * i
    attention = 2 * tokens * tokens * heads * hd  # causal: QK^T and AV over ~tokens/2 keys each
    return t["num_hidden_layers"] * (tokens * per_token + attention) + 2 * h * t["vocab_size"] * logits


def forward_flops(text: dict, vision: dict, frames: int, tokens_per_temporal_patch: int, prompt_text_tokens: int,
                  completion_tokens: int) -> dict[str, float]:
    """Vision and language FLOPs of one prompt + completion row's forward, and the vision share."""
    merge = vision["spatial_merge_size"] ** 2
    temporal = math.ceil(frames / vision["temporal_patch_size"])
    video_tokens = temporal * tokens_per_temporal_patch
    patches = video_tokens * merge
    v = patches * vision_flops_per_patch(vision, tokens_per_temporal_patch * merge)
    seq = video_tokens + prompt_text_tokens + completion_tokens
    lang = text_flops(text, seq, completion_tokens + 1)
    return {"vision": v, "language": lang, "share": v / (v + lang), "patch_rows": patches,
            "video_tokens": video_tokens, "sequence": seq}


def reference_share(frames: int = 16) -> dict[str, float]:
    """Qwen2.5-VL-7B's vision share of a forward at Video-R1's per-frame budget and `frames` frames."""
    b = VIDEO_R1_BUDGET
    return forward_flops(QWEN25_VL_7B["text"], QWEN25_VL_7B["vision"], frames, b["tokens_per_temporal_patch"],
                         b["prompt_text_tokens"], b["completion_tokens"])


def tiny_config(spec) -> dict[str, dict[str, Any]]:
    """The FLOP-relevant config of a tiny Qwen2.5-VL built from `spec` (as pipelines.models.build_tiny_model
    writes it)."""
    text = {"hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_hidden_layers, "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.num_key_value_heads, "vocab_size": spec.vocab_size}
    vision = {"depth": spec.vision_depth, "hidden_size": spec.vision_hidden_size,
              "intermediate_size": spec.vision_intermediate_size, "num_heads": spec.vision_heads,
              "out_hidden_size": spec.hidden_size, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "in_chans": 3, "window_size": 112,
              "fullatt_block_indexes": [spec.vision_depth - 1]}
    return {"text": text, "vision": vision}


def tiny_share(spec, frames: int, prompt_text_tokens: int) -> dict[str, float]:
    c = tiny_config(spec)
    return forward_flops(c["text"], c["vision"], frames, (FRAME_PX // 28) ** 2, prompt_text_tokens, COMPLETION)


def proportioned_spec(prompt_text_tokens: int, target: float | None = None):
    """The tiny spec whose 16-frame vision share is closest to `target` (default: the 7B's at Video-R1's budget):
    the `PROPORTIONED_TEXT` language model and a vision tower of 2-4 blocks whose width is searched over multiples
    of 16 (heads of 16, SwiGLU intermediate 2x the width, the last block full attention as in the 7B's layout)."""
    from dataclasses import replace

    from pipelines.models import TinySpec

    target = reference_share(16)["share"] if target is None else target
    base = replace(TinySpec(), **PROPORTIONED_TEXT)
    best = None
    for depth in PROPORTIONED_VISION_DEPTHS:
        for width in range(16, 513, 16):
            spec = replace(base, vision_depth=depth, vision_hidden_size=width, vision_heads=width // 16,
                           vision_intermediate_size=2 * width)
            err = abs(tiny_share(spec, 16, prompt_text_tokens)["share"] - target)
            if best is None or err < best[0] - 1e-9:
                best = (err, spec)
    return best[1]


# ------------------------------------------------------------------------------------------------------- timing
def length_reward(completions, **_):
    """Bench-only reward (`rl.rewards=[accuracy,format,pipelines.bench.encode_once:length_reward]`): it varies inside
    a group on a random tiny model, so advantages, loss and KL are non-zero and the two paths' per-step metrics are a
    real comparison (accuracy and format alone are all zero there)."""
    return [min(1.0, len(c) / 80.0) for c in completions]


class _NullRun:
    id = "bench"

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _config(model_dir: str, data: Path, root: Path, work: Path, frames: int, encode_once: bool):
    from pipelines.config import load_config

    px = FRAME_PX * FRAME_PX
    return load_config(overrides=[
        f"model.name_or_path={model_dir}", f"data.file={data}", f"data.root={root}", "data.shuffle=false",
        f"run.output_dir={work / 'runs'}", "rl.algo=tgrpo", f"rl.num_generations={G}", "rl.num_shuffled=4",
        f"rl.max_completion_length={COMPLETION}", "rl.per_device_prompts=1", "rl.beta=0.04", "rl.num_iterations=1",
        "rl.loss_type=grpo", "rl.length_bonus=false", f"rl.rewards=[accuracy,format,{__name__}:length_reward]",
        "rl.learning_rate=1e-5", "rl.lr_scheduler=constant",
        "rl.warmup_steps=0", "rl.max_grad_norm=1.0", "rl.top_p=1.0", "rl.temperature=1.0", "rl.save_steps=100000",
        "rl.max_steps=100000", "rl.num_epochs=100000", "rl.backend=hf", f"rl.encode_once={str(encode_once).lower()}",
        f"video.min_pixels={px}", f"video.max_pixels={px}", "video.fps=8.0", f"video.min_frames={frames}",
        f"video.max_frames={frames}",
    ])


def time_run(cfg, work: Path, steps: int, warmup: int) -> dict[str, Any]:
    """`warmup + steps` steps of a fresh trainer; the timed steps' seconds and every step's metrics."""
    from pipelines.rl.trainer import RLTrainer

    tr = RLTrainer(cfg, _NullRun(), work / "run")
    tr.setup()
    times, rows = [], []
    load_before = _load()
    try:
        t_prev = time.perf_counter()
        for i in range(warmup + steps):
            m = tr.train_step()
            tr.step += 1
            now = time.perf_counter()
            if i >= warmup:
                times.append(now - t_prev)
            t_prev = now
            rows.append({k: m[k] for k in ("loss", "kl", "reward", "vision/patches_encoded",
                                           "vision/patches_distinct", "time/policy_fwd_bwd", "gen_time")})
    finally:
        tr.cleanup()
    return {"times_s": times, "metrics": rows, "load": [load_before, _load()]}


def _world(work: Path, frames: int) -> tuple[Path, Path]:
    from pipelines.synth import synthesize

    wdir = work / f"world-{FRAME_PX}px"
    if not (wdir / "rl.json").exists():
        synthesize(wdir, train=24, test=1, seed=0, frames=max(64, frames), fps=8.0, size=FRAME_PX,
                   image_fraction=0.0)
    recs = json.loads((wdir / "rl.json").read_text())
    vids = [r for r in recs if r["data_type"] == "video" and r["problem_type"] == "multiple choice"]
    data = work / "videos.json"
    data.write_text(json.dumps(vids))
    return data, wdir


def prompt_text_tokens(model_dir: str, data: Path) -> int:
    """Text tokens of the bench's first prompt (chat markup + template + question; the placeholder excluded)."""
    from pipelines.config import load_config
    from pipelines.models import load_processor
    from pipelines.prompts import load_template
    from pipelines.rl.rollout import render_prompt

    proc = load_processor(model_dir)
    rec = json.loads(Path(data).read_text())[0]
    prompt = render_prompt(rec, load_template(load_config().prompt.template), proc)
    return len(proc.tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 3  # start, pad, end of vision


def _summary(times: list[float]) -> dict[str, float]:
    return {"min_s": min(times), "median_s": statistics.median(times), "n": len(times)}


def _same_metrics(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Largest per-step difference of loss, KL and reward between the two paths (same seeds, same steps)."""
    out = {}
    for key in ("loss", "kl", "reward"):
        out[key] = max((abs(x[key] - y[key]) for x, y in zip(a, b)), default=float("nan"))
    return out


def run_compare(out: str | Path | None = None, frames: tuple[int, ...] = (16, 64), steps: int = 3, warmup: int = 1,
                repeats: int = 2, threads: int = 1, models: tuple[str, ...] = ("proportioned", "default"),
                progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    import torch

    from pipelines.bench import cached_tiny_model
    from pipelines.models import TinySpec

    torch.set_num_threads(threads)
    say = progress or (lambda s: None)
    work = Path(out) if out else Path(tempfile.mkdtemp(prefix="videor1-bench-encode-once-"))
    work.mkdir(parents=True, exist_ok=True)
    data, root = _world(work, max(frames))
    default_dir = cached_tiny_model(work / "tiny-default")
    text_tokens = prompt_text_tokens(default_dir, data)
    spec = proportioned_spec(text_tokens)
    dirs = {"default": default_dir, "proportioned": cached_tiny_model(work / "tiny-proportioned-v1", spec=spec)}
    ref16, ref64 = reference_share(16), reference_share(64)
    res: dict[str, Any] = {
        "settings": {"G": G, "G_shuffled": 4, "completion": COMPLETION, "frame_px": FRAME_PX, "steps": steps,
                     "warmup": warmup, "repeats": repeats, "threads": threads, "algo": "tgrpo", "beta": 0.04,
                     "prompts_per_step": 1, "backend": "hf"},
        "sizing": {
            "qwen2_5_vl_7b": {"16": ref16, "64": ref64, "budget": VIDEO_R1_BUDGET, "config": QWEN25_VL_7B},
            "prompt_text_tokens": text_tokens,
            "proportioned_spec": spec.__dict__ | {"mrope_section": list(spec.mrope_section)},
            "proportioned": {str(f): tiny_share(spec, f, text_tokens) for f in frames},
            "default": {str(f): tiny_share(TinySpec(), f, text_tokens) for f in frames},
        },
        "results": {},
    }
    for name in models:
        for f in frames:
            runs: dict[bool, list[dict]] = {True: [], False: []}
            for rep in range(repeats):
                order = (True, False) if rep % 2 == 0 else (False, True)
                for once in order:
                    say(f"{name} model, {f} frames, encode_once={once} ({rep + 1}/{repeats})")
                    runs[once].append(time_run(_config(dirs[name], data, root, work, f, once), work, steps, warmup))
            once_t = [t for r in runs[True] for t in r["times_s"]]
            rep_t = [t for r in runs[False] for t in r["times_s"]]
            a, b = _summary(once_t), _summary(rep_t)
            m_once, m_rep = runs[True][0]["metrics"], runs[False][0]["metrics"]
            res["results"][f"{name}/{f}"] = {
                "model": name, "frames": f, "encode_once": a, "repeated": b,
                "speedup_median": b["median_s"] / a["median_s"], "speedup_min": b["min_s"] / a["min_s"],
                "patches_encoded": {"encode_once": m_once[-1]["vision/patches_encoded"],
                                    "repeated": m_rep[-1]["vision/patches_encoded"],
                                    "distinct": m_once[-1]["vision/patches_distinct"]},
                "policy_fwd_bwd_s": {"encode_once": statistics.median(r["time/policy_fwd_bwd"] for r in m_once),
                                     "repeated": statistics.median(r["time/policy_fwd_bwd"] for r in m_rep)},
                "max_metric_diff": _same_metrics(m_once, m_rep),
                "load": {"encode_once": [r["load"] for r in runs[True]], "repeated": [r["load"] for r in runs[False]]},
            }
    p = res["results"].get(f"proportioned/{max(frames)}")
    if p is not None:
        res["goal"] = {"speedup": SPEEDUP_GOAL, "frames": max(frames), "met": p["speedup_median"] >= SPEEDUP_GOAL}
    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return res


__all__ = ["forward_flops", "proportioned_spec", "reference_share", "run_compare", "tiny_share"]
