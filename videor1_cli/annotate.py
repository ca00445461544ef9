"""`videor1 annotate` (CoT traces from a teacher, resumable, sharded) and `videor1 annotate merge`."""

from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from pipelines.config import Config
from videor1_cli.common import DATA, ROOT, Shortcut, config_command, console, err_console, registered_run

TEACHER = Shortcut("annotate.model", ["--teacher"], Optional[str], "Teacher model, hub id or directory "
                   "(annotate.model).")
BACKEND = Shortcut("annotate.backend", ["--backend"], Optional[str], "vllm (GPU) or hf (annotate.backend).")
BATCH = Shortcut("annotate.batch_size", ["--batch-size"], Optional[int], "Records per generation call "
                 "(annotate.batch_size).")
TP = Shortcut("annotate.tensor_parallel_size", ["--tp"], Optional[int], "vLLM tensor-parallel GPUs "
              "(annotate.tensor_parallel_size).")
OUT = Shortcut("annotate.output", ["--out"], Optional[str], "Output prefix: PREFIX.jsonl + PREFIX.cot.json "
               "(annotate.output; default <run.output_dir>/annotate/<data stem>).")
MAX_SAMPLES = Shortcut("data.max_samples", ["--limit"], Optional[int], "Only the first N input records "
                       "(data.max_samples).")
NPROC = Shortcut("annotate.nproc", ["--nproc"], Optional[int], "Shard processes on this node, each on its own "
                 "--tp GPUs, merged at the end (annotate.nproc).")

app = typer.Typer(help="Annotate records with a teacher's reasoning traces (Video-R1-COT), then filter. Runs with no "
                  "command; `videor1 annotate merge` joins the shards of --shard runs.",
                  subcommand_metavar="[merge ...]")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="annotate")


@app.callback(invoke_without_command=True)
@config_command(DATA, ROOT, TEACHER, BACKEND, BATCH, TP, OUT, MAX_SAMPLES, NPROC)
def annotate_command(
    cfg: Config,
    ctx: typer.Context,
    shard: Optional[str] = typer.Option(None, "--shard", help="Process only shard i of n ('i/n', records by a "
                                        "stable hash of problem_id); join shards with `videor1 annotate merge`."),
) -> None:
    """Ask the teacher each record's question once (paper: T 1.0, top_p 0.95, 512 tokens); keep the traces whose
    answer matches the ground truth (reward > annotate.min_reward). Rerun the same command to resume.

    Writes PREFIX.jsonl (everything, append-only) and, when complete, PREFIX.cot.json (the kept records in the exact
    Video-R1-COT format that `videor1 train sft` reads). With --nproc N: N shard processes on this node (each on its
    own --tp GPUs), then the merge.
    """
    if ctx.invoked_subcommand:
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from pipelines import annotate as A
    from pipelines.progress import progress_bar

    sh = A.parse_shard(shard)
    if cfg.annotate.nproc > 1 and sh is None:
        _annotate_in_parallel(cfg)
        return
    with registered_run(cfg, "annotate") as (run, _run_dir):
        if cfg.data.file:
            run.use_path("records", cfg.data.file)
        run.use_path("model", cfg.annotate.model)
        with err_console.status(f"loading teacher {cfg.annotate.model} ({cfg.annotate.backend})"):
            backend, processor = A.make_teacher(cfg)
        progress = progress_bar("annotate", TextColumn("annotate"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=err_console, transient=True, unit="records")
        task = progress.add_task("annotate", total=None, rate="")
        first: list[tuple[int, float]] = []

        def on_progress(done: int, total: int) -> None:
            import time

            now = time.perf_counter()
            if not first:
                first.append((done, now))
            d0, t0 = first[0]
            rate = f"{(done - d0) / (now - t0):.2f} rec/s" if now > t0 and done > d0 else ""
            progress.update(task, completed=done, total=total, rate=rate)

        def on_error(rid: str, error: str) -> None:
            err_console.print(f"[yellow]record {rid}: {error}[/yellow]", soft_wrap=True)

        with progress:
            res = A.annotate(cfg, backend=backend, processor=processor, shard=sh, run=run, progress=on_progress,
                             on_error=on_error)
        run.log_artifact("annotations", res.jsonl, meta={"teacher": cfg.annotate.model, "shard": shard})
        if res.cot is not None:
            run.log_artifact("records", res.cot, meta={"format": "video-r1-cot", "teacher": cfg.annotate.model,
                                                      "kept": res.stats["kept"]})
        summary = {**res.stats, "jsonl": str(res.jsonl), "cot": str(res.cot) if res.cot else None,
                   "complete": res.cot is not None, "processed": res.processed, "resumed": res.resumed,
                   "records_per_s": res.records_per_s, "tokens_per_s": res.tokens_per_s,
                   "completion_tokens": res.completion_tokens, "seconds": res.seconds,
                   "batch_size": cfg.annotate.batch_size, "shard": shard}
        run.set_summary(summary)
    print_summary(res.stats, title=f"annotate {res.prefix}")
    console.print(f"processed {res.processed} (resumed past {res.resumed}) in {res.seconds:.1f} s: "
                  f"{res.records_per_s:.2f} records/s, {res.tokens_per_s:.1f} tokens/s")
    if res.cot is not None:
        console.print(f"[green]kept {res.stats['kept']} of {res.stats['records']}[/green] -> {res.cot}")
    else:
        console.print(f"[yellow]incomplete[/yellow]: rerun the same command to resume ({res.jsonl})")


def _annotate_in_parallel(cfg: Config) -> None:
    """`annotate --nproc N` on one node: N shard processes (`--shard i/N`, each on its own GPUs: `--tp` of them with
    vLLM), the parent showing their joint progress, then the merge. Each shard resumes on its own, so a rerun after a
    failure or an interrupt redoes nothing already written."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from pipelines import annotate as A
    from pipelines.progress import progress_bar
    from pipelines.records import load_records

    n = cfg.annotate.nproc
    prefix = cfg.annotate.output or A.default_prefix(cfg)
    per_process = cfg.annotate.tensor_parallel_size if cfg.annotate.backend == "vllm" else 1
    groups = A.device_groups(n, per_process, A.visible_gpus())
    total = None
    if cfg.data.file:
        total = len(load_records(cfg.data.file, validate=False))  # only the count: each shard validates
        total = total if cfg.data.max_samples is None else min(total, cfg.data.max_samples)
    t0 = time.perf_counter()
    with registered_run(cfg, "annotate") as (run, run_dir):
        if cfg.data.file:
            run.use_path("records", cfg.data.file)
        run.use_path("model", cfg.annotate.model)
        child = cfg.model_copy(deep=True)
        child.annotate.nproc = 1
        child.annotate.output = prefix
        child_cfg = Path(run_dir) / "annotate-shard-config.yaml"
        child_cfg.write_text(child.to_yaml())
        progress = progress_bar(f"annotate x{n}", TextColumn(f"annotate x{n}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
                                unit="records")
        with progress:
            task = progress.add_task("annotate", total=total)
            files, logs = A.run_shard_processes(child_cfg, prefix, groups, run_dir,
                                                on_poll=lambda done: progress.update(task, completed=done))
        res = A.merge(files, Path(prefix + ".cot.json"), data_file=cfg.data.file, max_samples=cfg.data.max_samples)
        for f in files:
            run.log_artifact("annotations", f, meta={"teacher": cfg.annotate.model})
        run.log_artifact("records", res.cot, meta={"format": "video-r1-cot", "teacher": cfg.annotate.model,
                                                  "kept": res.kept, "shards": n})
        seconds = time.perf_counter() - t0
        run.set_summary({**res.stats, "cot": str(res.cot), "complete": True, "nproc": n,
                         "shards": [str(f) for f in files], "logs": [str(x) for x in logs], "seconds": seconds,
                         "records_per_s": res.stats["records"] / max(seconds, 1e-9)})
    print_summary(res.stats, title=f"annotate {prefix} ({n} processes)")
    console.print(f"[green]kept {res.kept} of {res.stats['records']}[/green] -> {res.cot} "
                  f"({n} shard processes, {seconds:.1f} s)")


def print_summary(stats: dict[str, Any], title: str) -> None:
    table = Table("group", "value", "records", "kept", "kept rate", title=title)
    table.add_row("all", "", str(stats["records"]), str(stats["kept"]), f"{stats['kept_rate']:.1%}")
    for key in ("problem_type", "data_type", "data_source"):
        for name, c in stats["by"].get(key, {}).items():
            table.add_row(key, name, str(c["n"]), str(c["kept"]), f"{c['kept_rate']:.1%}")
    console.print(table)
    if stats["errors"]:
        err_console.print(f"[yellow]{stats['errors']} record(s) with errors (never kept), e.g. "
                          f"{', '.join(stats['error_ids'][:5])}[/yellow]")


@app.command("merge")
@config_command(DATA)
def merge_command(
    cfg: Config,
    inputs: list[str] = typer.Argument(..., help="PREFIX (joins PREFIX.shard-*-of-*.jsonl) or annotation .jsonl "
                                       "files."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="COT file to write (default: PREFIX.cot.json)."),
) -> None:
    """Join shard logs, check that no input id is missing or duplicated, write the Video-R1-COT file."""
    from pipelines import annotate as A
    from pipelines.errors import DataError

    if len(inputs) == 1 and not inputs[0].endswith(".jsonl"):
        prefix = inputs[0]
        files = A.shard_files(prefix)
        if not files:
            raise DataError(f"no shard files {prefix}.shard-*-of-*.jsonl", hint="pass the --out prefix of the shards")
    else:
        files = [Path(f) for f in inputs]
        prefix = A._SHARD_RE.sub("", str(files[0])[: -len(".jsonl")]) if str(files[0]).endswith(".jsonl") else None
    target = out or (Path(prefix + ".cot.json") if prefix else None)
    if target is None:
        raise DataError("cannot derive the output name", hint="pass --out FILE")
    with registered_run(cfg, "annotate-merge") as (run, _run_dir):
        for f in files:
            run.use_path("annotations", f)
        res = A.merge(files, target, data_file=cfg.data.file, max_samples=cfg.data.max_samples)
        run.log_artifact("records", res.cot, meta={"format": "video-r1-cot", "kept": res.kept,
                                                  "shards": len(files)})
        run.set_summary({**res.stats, "cot": str(res.cot), "files": [str(f) for f in files]})
    print_summary(res.stats, title=f"annotate merge ({len(files)} files)")
    console.print(f"[green]kept {res.kept} of {res.stats['records']}[/green] -> {res.cot}")
