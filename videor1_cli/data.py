"""`videor1 data` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.config import Config
from pipelines.models.families import DEFAULT_FAMILY, families_help
from videor1_cli.common import DATA, ROOT, config_command

app = typer.Typer(no_args_is_help=True)


# ---------------------------------------------------------------------------------------------------------------------
# fetch / unzip / validate / stats (pipelines.fetch, pipelines.unzip, pipelines.validate)
def _records_file(cfg, file) -> str:
    """The records file of a command: positional FILE wins over --data (data.file)."""
    from pipelines.errors import DataError

    if file is not None:
        cfg.data.file = str(file)
    if not cfg.data.file:
        raise DataError("no records file given", hint="pass FILE (or --data FILE)")
    return cfg.data.file


def _fetch_shortcuts():
    from videor1_cli.common import Shortcut

    return (
        Shortcut("data.repo_id", ["--repo-id"], Optional[str], "Dataset repo on the hub (data.repo_id)."),
        Shortcut("data.revision", ["--revision"], Optional[str], "Branch, tag or commit (data.revision)."),
        Shortcut("data.include", ["--include"], Optional[list[str]],
                 "Glob of files to get, repeatable, e.g. --include '*.json' --include 'CLEVRER/*' (data.include)."),
    )


@app.command("fetch")
@config_command(*_fetch_shortcuts())
def fetch(
    cfg: Config,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Target directory (default: ./<repo name>)."),
    source: Optional[Path] = typer.Option(
        None, "--source", help="Copy from this local mirror directory instead of the hub (hardlinks when possible)."
    ),
) -> None:
    """Download Video-R1-data (records JSON by default; media zips via --include) from the hub or a local mirror.

    Resumes an interrupted download; a second run only checks. Records the directory as a 'dataset' artifact.
    """
    from rich.table import Table

    from pipelines.fetch import fetch_hub, fetch_mirror
    from videor1_cli.common import console, err_console, registered_run

    target = out or Path(cfg.data.repo_id.rstrip("/").split("/")[-1])
    with registered_run(cfg, "data-fetch") as (run, _run_dir):
        if source is not None:
            with err_console.status(f"linking/copying from {source}"):
                res = fetch_mirror(source, target, repo_id=cfg.data.repo_id, revision=cfg.data.revision,
                                   include=cfg.data.include)
            run.use_path("mirror", source)
        else:
            res = fetch_hub(cfg.data.repo_id, target, revision=cfg.data.revision, include=cfg.data.include)
        # The directory is recorded without hashing its content (after `data unzip` it holds the extracted media);
        # each fetched records file is recorded with its hash, so validate/train runs that read it link back here.
        aid = run.log_artifact("dataset", target, meta={**res.meta(), "files": len(res.files),
                                                        "manifest": res.manifest()}, hash_content=False)
        for rel in res.files:
            if rel.endswith((".json", ".jsonl")):
                run.log_artifact("records", target / rel, meta={**res.meta(), "file": rel})
        run.log_metrics(0, {"files": len(res.files), "bytes": res.bytes, "linked": res.linked, "copied": res.copied,
                            "skipped": res.skipped})
        run.set_summary({"out": str(target.resolve()), "files": len(res.files), "bytes": res.bytes,
                         "artifact": aid, **res.meta()})
    table = Table("dataset", "revision", "files", "bytes", "out", title="data fetch")
    table.add_row(res.repo_id, res.revision or "-", str(len(res.files)), f"{res.bytes:,}", str(target))
    console.print(table)
    if source is not None:
        console.print(f"linked {res.linked}, copied {res.copied}, already present {res.skipped}")
    if not res.files:
        err_console.print(f"[yellow]no file matched include={cfg.data.include}[/yellow]")


@app.command("unzip")
@config_command()
def unzip(
    cfg: Config,
    root: Optional[Path] = typer.Argument(None, help="Directory searched for *.zip (default: data.root)."),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, help="Archives extracted in parallel (threads)."),
    force: bool = typer.Option(False, "--force", help="Extract again even when the marker says it is done."),
) -> None:
    """Extract every *.zip under ROOT in place, into the directory that holds it (CLEVRER/CLEVRER.zip -> CLEVRER/...,
    as the records' ./CLEVRER/... paths expect); safe, idempotent, restartable.

    Refuses archives with entries escaping the target or symlinks; a corrupt archive is named, the others are still
    extracted, and the command exits 1 at the end.
    """
    import json as _json

    from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.table import Table

    from pipelines.errors import DataError
    from pipelines.progress import progress_bar
    from pipelines.unzip import archive_size, extract_all, find_archives
    from videor1_cli.common import console, err_console, registered_run

    root = root or (Path(cfg.data.root) if cfg.data.root else None)
    if root is None or not root.is_dir():
        raise DataError(f"not a directory: {root}", hint="videor1 data unzip ROOT (the fetched Video-R1-data dir)")
    archives = find_archives(root)
    with registered_run(cfg, "data-unzip") as (run, run_dir):
        sizes = {str(a): archive_size(a) for a in archives}
        columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with progress_bar("data unzip", *columns, console=err_console, transient=True, unit="B") as bar:
            task = bar.add_task(f"{len(archives)} archives", total=sum(sizes.values()) or None)

            def done(r):
                if r.status != "extracted":  # skipped / failed: count the rest of its bytes as processed
                    bar.update(task, advance=max(0, sizes[r.archive] - (r.bytes if r.status == "error" else 0)))

            results = extract_all(root, jobs=jobs, force=force, progress=lambda n: bar.update(task, advance=n),
                                  on_result=done)
        report = run_dir / "unzip.json"
        report.write_text(_json.dumps([r.to_dict() for r in results], indent=2))
        run.log_artifact("unzip-report", report)
        failed = [r for r in results if r.status == "error"]
        metrics = {"archives": len(results), "extracted": sum(r.status == "extracted" for r in results),
                   "skipped": sum(r.status == "skipped" for r in results),
                   "files": sum(r.files for r in results if r.status == "extracted"),
                   "bytes": sum(r.bytes for r in results if r.status == "extracted"), "errors": len(failed)}
        run.log_metrics(0, metrics)
        run.set_summary({"root": str(root.resolve()), **metrics, "failed": [r.archive for r in failed]})
    table = Table("archive", "status", "files", "bytes", "seconds", "error", title=f"data unzip {root}")
    for r in results:
        style = {"error": "red", "skipped": "dim"}.get(r.status, "green")
        table.add_row(str(Path(r.archive).relative_to(root)), f"[{style}]{r.status}[/{style}]", str(r.files),
                      f"{r.bytes:,}", f"{r.seconds:.1f}", r.error or "")
    console.print(table)
    console.print(f"{metrics['extracted']} extracted, {metrics['skipped']} already done, {len(failed)} failed")
    if not archives:
        err_console.print(f"[yellow]no *.zip under {root}[/yellow]")
    if failed:
        err_console.print(f"[bold red]error:[/bold red] {len(failed)} archive(s) failed: "
                          + ", ".join(str(Path(r.archive).relative_to(root)) for r in failed), soft_wrap=True)
        raise SystemExit(1)


@app.command("validate")
@config_command(DATA, ROOT)
def validate(
    cfg: Config,
    file: Optional[Path] = typer.Argument(None, help="Records file, JSON list or JSONL (overrides --data)."),
    decode: bool = typer.Option(False, "--decode", help="Also decode every video/image once (slow)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here (always in the run dir)."),
    allow_errors: bool = typer.Option(False, "--allow-errors", help="Exit 0 even when errors are found."),
) -> None:
    """Check records: schema, media present (and decodable with --decode), options vs answer, answer tags,
    duplicates, data_type vs extension. Exits 1 on errors unless --allow-errors."""
    import json as _json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from pipelines.validate import ERROR_KINDS, validate_file
    from videor1_cli.common import console, err_console, registered_run

    path = _records_file(cfg, file)
    root = cfg.data_root()
    with registered_run(cfg, "data-validate") as (run, run_dir):
        run.use_path("records", path)
        columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err_console, transient=True) as bar:
            task = bar.add_task("validating", total=None)
            rep = validate_file(path, root, decode=decode, video_cfg=cfg.video, image_cfg=cfg.image,
                                progress=lambda i: bar.update(task, completed=i + 1))
        data = rep.to_dict()
        out = run_dir / "validation.json"
        out.write_text(_json.dumps(data, indent=2, default=str))
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(out.read_text())
        run.log_artifact("validation-report", out)
        metrics = {"records": rep.records, "errors": len(rep.errors), "warnings": len(rep.warnings),
                   "media_checked": rep.media_checked, **{f"issues/{k}": v for k, v in rep.counts().items()}}
        run.log_metrics(0, metrics)
        run.set_summary({"file": path, "root": str(root), "records": rep.records, "errors": len(rep.errors),
                         "warnings": len(rep.warnings), "by_kind": rep.counts()})
    table = Table("kind", "severity", "count", "first records", title=f"data validate {path}")
    for kind, n in rep.counts().items():
        firsts = [str(i.index) for i in rep.issues if i.kind == kind][:5]
        sev = "error" if kind in ERROR_KINDS else "warning"
        style = "red" if sev == "error" else "yellow"
        table.add_row(kind, f"[{style}]{sev}[/{style}]", str(n), ", ".join(firsts))
    if rep.issues:
        console.print(table)
    media = [i for i in rep.issues if i.kind in ("missing_media", "empty_media", "undecodable_media")]
    shown: set[str] = set()
    for i in media:  # one line per bad media file (its first record), whatever the decoder printed
        if i.message not in shown and len(shown) < 20:
            shown.add(i.message)
            console.print(f"  record {i.index}: {i.message}", soft_wrap=True, markup=False, highlight=False)
    if len({i.message for i in media}) > len(shown):
        console.print(f"  ... {len({i.message for i in media}) - len(shown)} more bad media files in the report")
    status = "[green]ok[/green]" if not rep.errors else "[red]errors[/red]"
    console.print(f"{status}: {rep.records} records, {rep.media_checked} media files checked"
                  f"{' and decoded' if decode else ''}, {len(rep.errors)} errors, {len(rep.warnings)} warnings; "
                  f"report {report or out}", soft_wrap=True)
    if rep.errors and not allow_errors:
        raise SystemExit(1)


@app.command("stats")
@config_command(DATA)
def stats(
    cfg: Config,
    file: Optional[Path] = typer.Argument(None, help="Records file, JSON list or JSONL (overrides --data)."),
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
) -> None:
    """Describe records: counts by data_type, problem_type, data_source; unique media; questions per video."""
    import json as _json

    from rich.table import Table

    from pipelines.records import load_records
    from pipelines.validate import compute_stats
    from videor1_cli.common import console

    path = _records_file(cfg, file)
    ds = load_records(path)
    cols = [c for c in ("data_type", "problem_type", "data_source", "path") if c in ds.column_names]
    s = compute_stats(ds.select_columns(cols))
    if as_json:
        typer.echo(_json.dumps(s, indent=2))
        return
    total = s["records"] or 1
    for key, title in (("by_data_type", "data_type"), ("by_problem_type", "problem_type"),
                       ("by_data_source", "data_source")):
        t = Table(title, "records", "share")
        for k, v in s[key].items():
            t.add_row(str(k), f"{v:,}", f"{100 * v / total:.1f}%")
        console.print(t)
    t = Table("media", "unique", "questions", "questions per item (mean)", "max")
    for k in ("videos", "images"):
        m = s[k]
        t.add_row(k, f"{m['unique']:,}", f"{m['questions']:,}", f"{m['questions_per_item_mean']:.2f}",
                  str(m["questions_per_item_max"]))
    console.print(t)
    console.print(f"{s['records']:,} records, {s['unique_media']:,} unique media files")


@app.command("synth")
@config_command()
def synth(
    cfg: Config,
    out: Path = typer.Option(Path("videor1-synth"), "--out", "-o", help="Directory of the world (created)."),
    train: int = typer.Option(4000, "--train", min=0, help="RL pool records, without CoT (rl.json)."),
    test: int = typer.Option(1000, "--test", min=0, help="Held-out records (test.json)."),
    sft: Optional[int] = typer.Option(None, "--sft", min=0,
                                      help="Cold-start records with gold <think> CoT (sft.json; default train/4)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the world (default: run.seed)."),
    frames: int = typer.Option(8, "--frames", min=2, help="Frames per video."),
    size: int = typer.Option(56, "--size", min=16, help="Width = height of videos and images (even)."),
    fps: float = typer.Option(4.0, "--fps", min=0.1, help="Frame rate written into the mp4s."),
    image_fraction: float = typer.Option(0.25, "--image-fraction", min=0.0, max=1.0, help="Share of image records."),
    fixed_options: bool = typer.Option(False, "--fixed-options", help="List multiple-choice options in one fixed "
                                       "order per question kind instead of shuffling them per record."),
    shortcut: Optional[float] = typer.Option(
        None, "--shortcut", min=0.0, max=1.0,
        help="The shortcut world: order-dependent answers follow the clip's majority colour with this probability "
        "(direction: the colour's preferred way; first/last colour: majority/minority), so they can be partly answered "
        "without the frame order; the full answer still needs it. world.json reports the shortcut's accuracy per "
        "data_source beside chance; shortcut.json its answer per record. Default: off (the default world, "
        "unchanged)."),
) -> None:
    """Write the synthetic world: Video-R1 records (rl.json, sft.json with CoT, test.json) + mp4 videos + png images.

    All five problem types on videos and images (colour, direction, which colour first, frame counts, OCR words,
    descriptions, distances); data_sources containing 'order' need frame order. Same seed, same bytes. world.json
    holds counts and the chance level of every data_source.
    """
    import time as _time

    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TimeRemainingColumn
    from rich.table import Table
    from rich.text import Text

    from pipelines.progress import progress_bar

    from pipelines.synth import synthesize
    from videor1_cli.common import console, err_console, registered_run

    class _Rate(ProgressColumn):
        def render(self, task):  # noqa: D102
            return Text(f"{task.speed:,.0f} items/s" if task.speed else "- items/s", style="progress.data.speed")

    if seed is not None:
        cfg.run.seed = seed  # recorded with the run's config
    seed = cfg.run.seed
    with registered_run(cfg, "data-synth") as (run, _run_dir):
        t0 = _time.perf_counter()
        columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), _Rate(),
                   TimeRemainingColumn())
        with progress_bar("data synth", *columns, console=err_console, transient=True, unit="records") as bar:
            task = bar.add_task("synthesizing records", total=None)
            world = synthesize(out, train=train, test=test, seed=seed, sft=sft, frames=frames, size=size, fps=fps,
                               image_fraction=image_fraction, shuffle_options=not fixed_options, shortcut=shortcut,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
        seconds = _time.perf_counter() - t0
        man, counts = world["manifest"], world["counts"]
        aid = run.log_artifact("dataset", out, meta={"format": man["format"], "seed": seed, **counts})
        for split in ("rl", "sft", "test"):
            run.log_artifact("records", world[split], meta={"split": split, "dataset": aid,
                                                            "records": counts[split]})
        metrics = {"records": counts["records"], "videos": counts["videos"], "images": counts["images"],
                   "seconds": seconds, "records_per_s": counts["records"] / max(seconds, 1e-9)}
        for split in ("rl", "sft", "test"):
            metrics[f"{split}/records"] = counts[split]
            metrics[f"{split}/chance"] = man["counts"][split]["chance"]
            metrics[f"{split}/questions_per_video"] = man["counts"][split]["questions_per_video"]
        run.log_metrics(0, metrics)
        run.set_summary({"out": str(Path(out).resolve()), "seed": seed, "counts": counts, "dataset": aid,
                         "files": {s: world[s] for s in ("rl", "sft", "test", "world")},
                         "chance": {s: man["counts"][s]["chance"] for s in ("rl", "sft", "test")},
                         "seconds": round(seconds, 2)})
    table = Table("split", "file", "records", "videos", "images", "q/video", "MC/num/OCR/free/regr",
                  "chance", title=f"data synth {out} (seed {seed})")
    for split in ("rl", "sft", "test"):
        c = man["counts"][split]
        bt = c["by_problem_type"]
        mix = "/".join(str(bt.get(k, 0)) for k in ("multiple choice", "numerical", "OCR", "free-form", "regression"))
        table.add_row(split, Path(world[split]).name, f"{c['records']:,}", f"{c['videos']:,}", f"{c['images']:,}",
                      f"{c['questions_per_video'] or 0:.2f}", mix, f"{c['chance'] or 0:.3f}")
    console.print(table)
    if "shortcut" in man:
        st = Table("data_source", "shortcut", "chance", "shortcut accuracy (rl / sft / test)",
                   title=f"shortcut world (strength {man['shortcut']['strength']}): order questions answered from "
                         "the majority colour, without the order")
        for src, row in man["shortcut"]["by_data_source"].items():
            st.add_row(src, row["rule"], f"{row['chance']:.3f}",
                       " / ".join("-" if row["accuracy"][sp] is None else f"{row['accuracy'][sp]:.3f}"
                                  for sp in ("rl", "sft", "test")))
        console.print(st)
    console.print(f"{counts['records']:,} records in {seconds:.1f}s -> {out} (world.json: chance per data_source)",
                  soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------------------
# probe (pipelines.video)
@app.command("probe")
@config_command()
def probe(
    cfg: Config,
    media: Path = typer.Argument(..., help="A video or image file."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    family: str = typer.Option(
        None, "--family", help=f"Model family whose patch size sizes the frames ({families_help(None)}); "
        f"default: the family of model.name_or_path when it is a local model, else {DEFAULT_FAMILY}."),
) -> None:
    """Show how a video or image would be sampled and sized (video.* / image.* settings): frame count, indices,
    resized size, sampled fps and visual tokens (in the model family's patches). Decodes nothing but the stream
    headers."""
    import json as _json

    from rich.table import Table

    from pipelines.video import probe as probe_media
    from videor1_cli.common import console

    from pipelines.models.families import family_for_settings

    adapter = family_for_settings(family, cfg.model.name_or_path)
    info = {"family": adapter.family,
            **probe_media(media, cfg.video, cfg.image, factor=adapter.factor, tokens=adapter.visual_tokens)}
    if as_json:
        typer.echo(_json.dumps(info, indent=2))
        return
    table = Table("field", "value", title=f"data probe {media}")
    for key, value in info.items():
        if key == "indices":
            value = ", ".join(str(i) for i in value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(key, str(value))
    console.print(table)
