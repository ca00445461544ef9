"""`videor1 eval`: benchmarks with Video-R1's protocol, both scoring modes side by side, resumable."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from pipelines.config import Config
from videor1_cli.common import MODEL, ROOT, Shortcut, config_command, console, err_console, registered_run

BENCH = Shortcut("eval.bench", ["--bench", "-b"], Optional[str],
                 "Benchmarks, comma-separated: vsi, videommmu, mmvu, mvbench, tempcompass, videomme, synthetic "
                 "(eval.bench).")
FRAMES = Shortcut("eval.frames", ["--frames"], Optional[int], "Frames per video: 16, 32 or 64 (eval.frames).")
BACKEND = Shortcut("eval.backend", ["--backend"], Optional[str], "hf or vllm (eval.backend).")
SCORING = Shortcut("eval.scoring", ["--scoring"], Optional[str],
                   "Headline scoring: video-r1 or official; both are always stored (eval.scoring).")
COMPARE = Shortcut("eval.compare", ["--compare"], Optional[str], "paper: add the paper's row and delta "
                   "(eval.compare).")
LIMIT = Shortcut("eval.limit", ["--limit"], Optional[int], "Only the first N samples per benchmark (eval.limit).")
BATCH = Shortcut("eval.batch_size", ["--batch-size"], Optional[int], "Samples per generation call "
                 "(eval.batch_size).")
NPROC = Shortcut("distributed.nproc", ["--nproc"], Optional[int], "Data-parallel processes (distributed.nproc).")
OUT = Shortcut("eval.output_dir", ["--out"], Optional[str], "Directory of the samples and results "
               "(eval.output_dir; default: keyed on the protocol, so a rerun resumes).")

EVAL_DATA = Shortcut("data.file", ["--data"], Optional[str],
                     "A directory holding each benchmark's Video-R1 eval file (eval_<bench>.json; the synthetic "
                     "world's test.json), or one JSON/JSONL file for a single --bench (data.file).")
_SHORTCUTS = (MODEL, EVAL_DATA, ROOT, BENCH, FRAMES, BACKEND, SCORING, COMPARE, LIMIT, BATCH, NPROC, OUT)


def _protocol_preset(values: dict[str, Any]) -> Optional[str]:
    """Without --preset/--config, the six benchmarks get Video-R1's protocol (video-r1-eval); the synthetic world
    keeps the CPU default (cpu-tiny)."""
    benches = [b.strip().lower() for b in (values.get("eval.bench") or "").split(",") if b.strip()]
    if not any(b not in ("synthetic", "synth") for b in benches):
        return None
    from pipelines.models.families import family_hint  # qwen3-vl-eval for Qwen3-VL / Qwen3.5: 32-pixel patches

    try:
        return family_hint(values.get("model.name_or_path")).eval_preset
    except Exception:  # noqa: BLE001 - an unreadable model dir is reported by the eval itself
        return "video-r1-eval"


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)


@config_command(*_SHORTCUTS, default_preset=_protocol_preset)
def eval_command(
    cfg: Config,
    rescore: Optional[Path] = typer.Option(
        None, "--rescore", help="Recompute every score from an eval directory or a <bench>.samples.jsonl (no model)."),
) -> None:
    """Evaluate a model on video benchmarks (Video-R1's protocol by default); resumable, data parallel."""
    from pipelines.evaluate import runner

    if rescore is not None:
        with registered_run(cfg, "eval") as (run, _):
            run.use_path("samples", rescore)
            out, results = runner.rescore(rescore)
            runner.record_run(run, out, results)
            run.set_summary(_summary(results, out))
        print_results(results)
        console.print(f"[green]rescored[/green] -> {out / 'results.json'}")
        return

    out = runner.output_dir(cfg)
    inputs = runner.resolve_inputs(cfg.eval.bench, cfg.data.file, cfg.data.root)  # fail fast on missing files
    for bi in inputs:  # and on a file of another benchmark, before any model or engine is loaded
        runner.check_format(bi, runner.load_eval_records(bi.file, cfg.eval.limit))
    distributed = cfg.distributed.nproc > 1 or cfg.distributed.nnodes > 1
    worker = _is_worker()
    from contextlib import nullcontext

    with nullcontext() if worker else runner.eval_lock(out), \
            registered_run(cfg, "eval", run_dir=out) as (run, run_dir):
        if not worker:
            run.use_path("model", cfg.model.name_or_path)
            for bi in inputs:
                run.use_path("data", bi.file, role=f"data:{bi.bench.name}")
        if distributed and not worker:
            from pipelines.launch import run_workers

            run_workers(cfg, _worker_argv(sys.argv[1:]), run, run_dir, what="eval workers")
            from videor1_cli.common import results_on_node0

            if results_on_node0(cfg, run, "eval"):
                return
            results = runner.load_results(out)
        else:
            results = runner.evaluate(cfg, out, run=run, progress_factory=_progress_factory,
                                      log=lambda m: err_console.print(m, soft_wrap=True))
            if results is None:  # a rank other than 0: rank 0 reports
                return
        if not worker:
            run.set_summary(_summary(results, out))
    if worker:
        return  # the launcher prints
    print_results(results)
    console.print(f"[green]results[/green] -> {out / 'results.json'}")


def _worker_argv(argv: list[str]) -> list[str]:
    """The command line for the workers, with `--nproc N` spelled `--set distributed.nproc=N`: torchrun's argument
    parser rejects `--nproc` anywhere on its command line (an ambiguous prefix of its --nproc-per-node)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--nproc" and i + 1 < len(argv):
            out += ["--set", f"distributed.nproc={argv[i + 1]}"]
            i += 2
            continue
        if a.startswith("--nproc="):
            out += ["--set", f"distributed.nproc={a.split('=', 1)[1]}"]
        else:
            out.append(a)
        i += 1
    return out


def _is_worker() -> bool:
    try:
        from pipelines.launch import is_distributed_worker

        return bool(is_distributed_worker())
    except ImportError:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _summary(results: dict[str, Any], out: Path) -> dict[str, Any]:
    mode = results.get("scoring") or "video-r1"
    return {"results": str(out / "results.json"), "scoring": mode, "frames": results.get("frames"),
            **{name: b[mode]["overall"] for name, b in results["benchmarks"].items()},
            "errors": sum(b["errors"] for b in results["benchmarks"].values())}


class _Bar:
    def __init__(self, name: str, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from pipelines.progress import progress_bar

        self.progress = progress_bar(f"eval {name}", TextColumn(f"eval {name}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("[dim]{task.fields[rate]}"),
                                     TimeRemainingColumn(), console=err_console, transient=True,
                                     disable=os.environ.get("VIDEOR1_QUIET") == "1", unit="samples")
        self.task = self.progress.add_task(name, total=total, rate="")
        self.progress.start()

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)
        t = self.progress.tasks[0]
        if t.speed:
            self.progress.update(self.task, rate=f"{t.speed:.2f} items/s")

    def close(self) -> None:
        self.progress.stop()


def _progress_factory(name: str, total: int) -> _Bar:
    return _Bar(name, total)


# --------------------------------------------------------------------------------------------------------------------
def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, (int, float)) else str(v)


def headline_column(col: str, headline: str) -> str:
    """The scoring columns keep the mode's name everywhere (`video-r1`, `official`); the headline one says so."""
    return f"{col} (headline)" if col == headline else col


def bench_table(name: str, b: dict[str, Any], headline: str) -> Table:
    vr, of = b["video-r1"], b["official"]
    has_paper = "paper" in b
    t = Table(title=f"{b['title']}  (n={b['n']}, errors={b['errors']}, headline: {headline})", title_justify="left",
              caption=f"overall: video-r1 = {vr['label']}; official = {of['label']}"
                      + (f". {of['note']}" if of.get("note") else ""), caption_justify="left")
    for col in ("", "n", "video-r1", "official"):
        t.add_column(headline_column(col, headline), justify="left" if not col else "right")
    t.add_row("[bold]overall[/bold]", str(b["n"]), f"[bold]{_f(vr['overall'])}[/bold]",
              f"[bold]{_f(of['overall'])}[/bold]")
    t.add_row("mean_acc (non-regression)", str(vr["n_acc"]), _f(vr["mean_acc"]), "")
    t.add_row("mean_mra (regression)", str(vr["n_mra"]), _f(vr["mean_mra"]), "")
    t.add_row("micro (all items)", str(vr["n"]), _f(vr["micro"]), _f(of.get("micro")))
    if name == "synthetic" and b.get("reward") is not None:
        t.add_row("training reward (mean)", str(b["n"]), "", _f(b["reward"]))
    for title, key in (("problem type", "by_problem_type"), (vr.get("group_key") or "group", "by_group"),
                       ("data_source", "by_data_source"), ("order", "by_order")):
        if key not in vr:
            continue
        if name == "synthetic" and key == "by_group":
            continue  # the same as by_data_source
        t.add_section()
        for g, v in vr[key].items():
            ov = of.get(key, {}).get(g, {}).get("score")
            err = f" [red]({v['errors']} err)[/red]" if v.get("errors") else ""
            if key == "by_data_source" and (b.get("chance") or {}).get(g) is not None:
                err += f" [dim](chance {100 * b['chance'][g]:.0f})[/dim]"
            t.add_row(f"{title}: {g}{err}", str(v["n"]), _f(v["score"]), _f(ov))
    if "tasks" in of:
        t.add_section()
        for g, v in of["tasks"].items():
            t.add_row(f"official task: {g}", "", "", _f(v))
    for key in ("by_duration", "by_domain", "by_task_type"):
        if key in of:
            t.add_section()
            for g, v in of[key].items():
                t.add_row(f"official {key[3:]}: {g}", "", "", _f(v))
    if has_paper:
        p = b["paper"]
        t.add_section()
        t.add_row(f"paper: {p['model']} @ {p['frames']} frames", "", _f(p["value"]), "")
        t.add_row("delta (video-r1 - paper)", "", f"{p['delta']:+.1f}" if p["delta"] is not None else "-", "")
    return t


def combined_table(results: dict[str, Any]) -> Table:
    mode = results.get("scoring") or "video-r1"
    t = Table(title=f"eval: {results.get('model')}  frames={results.get('frames')}  headline={mode}",
              title_justify="left")
    cols = ["benchmark", "n", "errors", "video-r1", "official"]
    paper = any("paper" in b for b in results["benchmarks"].values())
    if paper:
        cols += ["paper", "delta"]
    for c in cols:
        t.add_column(headline_column(c, mode), justify="left" if c == "benchmark" else "right")
    for name, b in results["benchmarks"].items():
        vr, of = _f(b["video-r1"]["overall"]), _f(b["official"]["overall"])
        if mode == "video-r1":
            vr = f"[bold]{vr}[/bold]"
        else:
            of = f"[bold]{of}[/bold]"
        row = [b["title"], str(b["n"]), str(b["errors"]), vr, of]
        if paper:
            p = b.get("paper") or {}
            row += [_f(p.get("value")), f"{p['delta']:+.1f}" if p.get("delta") is not None else "-"]
        t.add_row(*row)
    return t


def print_results(results: dict[str, Any]) -> None:
    mode = results.get("scoring") or "video-r1"
    for name, b in results["benchmarks"].items():
        console.print(bench_table(name, b, mode))
        print_errors(b)
    if len(results["benchmarks"]) > 1 or any("paper" in b for b in results["benchmarks"].values()):
        console.print(combined_table(results))
    if (results.get("paper") or {}).get("model") and not results["paper"].get("found"):
        console.print(f"[yellow]no paper row for {results['paper']['model']} at {results.get('frames')} "
                      f"frames[/yellow]")
    elif results.get("paper") and not results["paper"].get("model"):
        console.print("[yellow]--compare paper: no paper model matches this model path; "
                      "set --set eval.paper_model=NAME[/yellow]")


def print_errors(b: dict[str, Any]) -> None:
    """The samples counted in errors=N, each with its reason (an unreadable video names its file)."""
    from rich.text import Text

    examples = b.get("error_examples") or []
    if not b.get("errors"):
        return
    more = b["errors"] - len(examples)
    console.print(Text(f"{b['errors']} {b['title']} sample(s) not scored (score 0):", style="yellow"), soft_wrap=True)
    for e in examples:
        console.print(Text(f"  id {e.get('id')}: {e.get('error')}"), soft_wrap=True)
    if more > 0 or not examples:
        console.print(Text(f"  ... {more if examples else b['errors']} more: the rows with an \"error\" in "
                           f"{b['benchmark']}.samples.jsonl (ids: {', '.join(map(str, b.get('error_ids') or []))})",
                           style="dim"), soft_wrap=True)


def _json(results: dict[str, Any]) -> str:  # pragma: no cover - debugging aid
    return json.dumps(results, indent=1, default=str)
