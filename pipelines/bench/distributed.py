"""`videor1 bench distributed`: 2-rank step time and peak memory per rank, DDP vs DeepSpeed ZeRO-2 / ZeRO-3 /
ZeRO-3 offload, for SFT and T-GRPO.

Each (stage, mode) is a real `videor1 train sft|rl --nproc 2` run (the CLI a user types: torchrun, gloo on the CPU or
NCCL on GPUs) on the tiny Qwen2.5-VL and a synthetic world of mixed image/video records. While it runs, the worker
processes are sampled every 0.1 s (psutil): the figure per rank is the peak resident set size (on the CPU, parameters,
gradients and optimizer state all live there, so this is what ZeRO partitions). Step time is the median over the
steps after `warmup`: T-GRPO's own per-step `step_time` metric; for SFT, samples per optimizer step / the
`samples_per_s` the trainer logs each step (rank 0's wall time between two logged steps).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

MODES = ("ddp", "zero2", "zero3", "zero3_offload")
STAGES = ("sft", "rl")


class RankMemory:
    """Peak RSS (bytes) per rank of the torchrun workers under a launcher process, sampled in a thread."""

    def __init__(self, root_pid: int, interval: float = 0.1):
        self.root_pid, self.interval = root_pid, interval
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "RankMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        import psutil

        ranks: dict[int, int] = {}  # pid -> rank
        while not self._stop.is_set():
            try:
                kids = psutil.Process(self.root_pid).children(recursive=True)
            except psutil.Error:
                break
            for p in kids:
                try:
                    if p.pid not in ranks:
                        env = p.environ()
                        if "RANK" not in env or "LOCAL_RANK" not in env:
                            continue
                        ranks[p.pid] = int(env["RANK"])
                    rss = p.memory_info().rss
                except (psutil.Error, ValueError):
                    continue
                r = ranks[p.pid]
                self.peak[r] = max(self.peak.get(r, 0), rss)
            self._stop.wait(self.interval)


def _world(work: Path, model_dir: str | None) -> tuple[str, dict[str, str]]:
    from pipelines.bench import cached_tiny_model
    from pipelines.synth import synthesize

    if model_dir is None:
        model_dir = cached_tiny_model(work / "tiny-model")
    wdir = work / "world"
    if not (wdir / "rl.json").exists():
        synthesize(wdir, train=48, test=1, seed=0, sft=48, frames=16, image_fraction=0.5)
    return model_dir, {"root": str(wdir), "sft": str(wdir / "sft.json"), "rl": str(wdir / "rl.json")}


def _command(stage: str, mode: str, model: str, world: dict[str, str], steps: int, out: Path, name: str,
             sft_batch: int) -> list[str]:
    cmd = [sys.executable, "-m", "videor1_cli.app", "train", stage, "--model", model, "--data", world[stage],
           "--root", world["root"], "--nproc", "2",  # the launcher picks a free master port
           "--set", f"run.output_dir={out}", "--set", f"run.name={name}", "--set", "data.max_skip_fraction=1"]
    if stage == "sft":
        cmd += ["--set", f"sft.max_steps={steps}", "--set", f"sft.per_device_batch_size={sft_batch}",
                "--set", "sft.logging_steps=1", "--set", f"sft.save_steps={steps + 100}"]
    else:
        cmd += ["--algo", "tgrpo", "--max-steps", str(steps), "--set", "rl.num_generations=4",
                "--set", "rl.max_completion_length=16", "--set", "rl.per_device_prompts=2",
                "--set", "rl.logging_steps=1", "--set", f"rl.save_steps={steps + 100}"]
    if mode != "ddp":
        cmd += ["--set", f"distributed.deepspeed={mode}"]
    return cmd


def _step_times(stage: str, metrics: dict[str, list[tuple[int, float]]], warmup: int, sft_batch: int) -> list[float]:
    if stage == "rl":
        return [v for s, v in metrics.get("step_time", []) if s > warmup]
    return [sft_batch / v for s, v in metrics.get("samples_per_s", []) if s > warmup and v > 0]


def run_one(stage: str, mode: str, work: Path, model: str, world: dict[str, str], *, steps: int, warmup: int,
            sft_batch: int = 2) -> dict[str, Any]:
    from pipelines.registry import Registry

    home = work / "home"
    name = f"bench-{stage}-{mode}-{time.time_ns()}"
    env = dict(os.environ, VIDEOR1_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", VIDEOR1_QUIET="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".torch-extensions"))
    cmd = _command(stage, mode, model, world, steps + warmup, work / "runs" / name, name, sft_batch)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with RankMemory(proc.pid) as mem:
        output, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"bench {stage}/{mode} failed (exit {proc.returncode}):\n{output[-3000:]}")
    reg = Registry(home / "registry.db")
    run = next(r for r in reg.list_runs() if r.get("name") == name)
    times = _step_times(stage, reg.metrics(run["id"]), warmup, sft_batch)
    return {"stage": stage, "mode": mode, "steps": len(times), "step_s_median": statistics.median(times) if times
            else None, "step_s": times, "peak_rss_mib": {r: round(b / 2**20, 1) for r, b in sorted(mem.peak.items())},
            "wall_s": round(wall, 1)}


def run_bench(work: str | Path, *, model_dir: str | None = None, steps: int = 4, warmup: int = 2,
              modes: tuple[str, ...] = MODES, stages: tuple[str, ...] = STAGES, rounds: int = 2,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per stage, the modes in `rounds` alternating rounds (`pipelines.bench.alternate`: each run's first `warmup`
    steps untimed, the order flipped every round); per mode the pooled step times (min, median), the peak RSS per
    rank over its runs, and its ratio to DDP (the peer) by median and by min."""
    from pipelines.bench import Timed, alternate, machine

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    model, world = _world(work, model_dir)
    rows, methods = [], {}
    for stage in stages:
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}

        def side(mode, stage=stage, runs=runs):
            def one():
                r = run_one(stage, mode, work, model, world, steps=steps, warmup=warmup)
                runs[mode].append(r)
                return Timed(r["step_s"], r)

            return one

        cmp = alternate({m: side(m) for m in modes}, rounds=rounds, warmup=0,
                        progress=lambda msg, stage=stage: progress and progress(f"{stage} / {msg}"))
        methods[stage] = cmp.summary()["method"]
        for mode in modes:
            peak: dict[int, float] = {}
            for r in runs[mode]:
                for rank, mib in r["peak_rss_mib"].items():
                    peak[rank] = max(peak.get(rank, 0.0), mib)
            side_ = cmp[mode]
            row = {"stage": stage, "mode": mode, "steps": len(side_.seconds),
                   "step_s_median": side_.median_s if side_.seconds else None,
                   "step_s_min": side_.min_s if side_.seconds else None, "step_s": side_.seconds,
                   "peak_rss_mib": peak, "wall_s": [r["wall_s"] for r in runs[mode]]}
            if "ddp" in modes and mode != "ddp" and side_.seconds and cmp["ddp"].seconds:
                row["vs_ddp"] = {"median": round(cmp.ratio(mode, "ddp"), 3),
                                 "min": round(cmp.ratio(mode, "ddp", "min"), 3)}
            rows.append(row)
    out = {"rows": rows, "steps": steps, "warmup": warmup, "rounds": rounds, "method": methods, "machine": machine()}
    (work / "bench-distributed.json").write_text(json.dumps(out, indent=2))
    return out
