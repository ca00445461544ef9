"""`videor1 runs ls | show | lineage | compare | plot | rm | gc` over the local registry."""

from __future__ import annotations

import datetime as dt
import json
from typing import Optional

import typer
from rich.table import Table
from rich.tree import Tree

from pipelines import runs as R
from pipelines.config import Config
from pipelines.registry import Registry
from videor1_cli.common import config_command, console

app = typer.Typer(no_args_is_help=True)


def _reg(cfg: Config) -> Registry:
    return Registry(cfg.registry_path())


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _dur(r: dict) -> str:
    if not r.get("started_at"):
        return "-"
    end = r.get("ended_at") or dt.datetime.now().timestamp()
    s = int(end - r["started_at"])
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@app.command("ls")
@config_command()
def ls(
    cfg: Config,
    kind: Optional[str] = typer.Option(None, "--kind", help="Only runs of this kind (e.g. train-rl)."),
    status: Optional[str] = typer.Option(None, "--status", help="running, finished, failed or interrupted."),
    tag: Optional[str] = typer.Option(None, "--tag", help="Only runs with this tag."),
    limit: int = typer.Option(50, "--limit", help="Most runs shown."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List runs, newest first."""
    rows = _reg(cfg).list_runs(kind=kind, status=status, tag=tag, limit=limit)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    t = Table("id", "kind", "status", "started", "took", "tags", "error")
    colors = {"finished": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}
    for r in rows:
        t.add_row(r["id"], r["kind"], f"[{colors.get(r['status'], 'white')}]{r['status']}[/]",
                  _when(r["started_at"]), _dur(r), ",".join(r["tags"]), (r["error"] or "")[:60])
    console.print(t)
    console.print(f"[dim]{len(rows)} run(s) in {cfg.registry_path()}[/dim]")


@app.command("show")
@config_command()
def show(cfg: Config, run_id: str = typer.Argument(..., help="Run id (or a unique part of it)."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """A run's config, artifacts, metrics summary, parents and children."""
    reg = _reg(cfg)
    r = reg.get_run(run_id)
    arts = reg.artifacts_of(r["id"])
    info = {
        **{k: r[k] for k in ("id", "name", "kind", "status", "command", "config_hash", "git_commit", "git_dirty",
                             "host", "run_dir", "error", "tags", "versions", "summary")},
        "started": _when(r["started_at"]), "ended": _when(r["ended_at"]),
        "inputs": [a.__dict__ for a in arts["inputs"]], "outputs": [a.__dict__ for a in arts["outputs"]],
        "metrics": reg.metrics_summary(r["id"]), "parents": reg.parents(r["id"]), "children": reg.children(r["id"]),
        "config": r["config"],
    }
    from pipelines.models.families import family_label

    outputs = [a["path"] for a in info["outputs"] if a["kind"] == "model"]
    info["family"] = family_label(*outputs, ((r["config"] or {}).get("model") or {}).get("name_or_path"))
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    head = Table(show_header=False, box=None)
    for k in ("id", "name", "kind", "status", "command", "family", "started", "ended", "config_hash", "git_commit",
              "host", "run_dir", "error", "tags"):
        if info.get(k) not in (None, "", []):
            head.add_row(f"[bold]{k}[/bold]", str(info[k]))
    console.print(head)
    for label in ("inputs", "outputs"):
        if info[label]:
            t = Table("artifact", "kind", "path", "size", "hash", title=label, title_justify="left")
            for a in info[label]:
                t.add_row(a["id"], a["kind"], a["path"], str(a["size"]), (a["hash"] or "")[:24])
            console.print(t)
    if info["metrics"]:
        t = Table("metric", "last", "min", "max", "mean", "points", title="metrics", title_justify="left")
        for name, s in sorted(info["metrics"].items()):
            t.add_row(name, f"{s['last']:.4g}", f"{s['min']:.4g}", f"{s['max']:.4g}", f"{s['mean']:.4g}", str(s["n"]))
        console.print(t)
    if info["summary"]:
        console.print("[bold]summary[/bold]", json.dumps(info["summary"], default=str)[:2000])
    if r["config"]:
        preset, diff = R.config_as_preset(r["config"])
        t = Table("key", "value", title=f"config: preset {preset} plus these keys (--json: every key)",
                  title_justify="left")
        for k, v in diff.items():
            t.add_row(k, json.dumps(v, default=str))
        console.print(t)
    console.print(f"[bold]parents[/bold] {', '.join(info['parents']) or '-'}   "
                  f"[bold]children[/bold] {', '.join(info['children']) or '-'}")


@app.command("lineage")
@config_command()
def lineage(cfg: Config, run_id: str = typer.Argument(..., help="Run id."),
            down: bool = typer.Option(False, "--down", help="Follow children instead of parents."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The chain data -> annotate -> sft -> rl -> eval -> push around a run, as a tree."""
    reg = _reg(cfg)
    tree = reg.lineage(run_id, "down" if down else "up")
    if as_json:
        typer.echo(json.dumps(tree, indent=2))
        return

    def add(node, t):
        for n in node["next"]:
            add(n, t.add(f"{n['kind']} [dim]{n['id']}[/dim] ({n['status']})"))

    root = Tree(f"[bold]{tree['kind']}[/bold] [dim]{tree['id']}[/dim] ({tree['status']})")
    add(tree, root)
    console.print(root)


@app.command("compare")
@config_command()
def compare(cfg: Config, run_ids: list[str] = typer.Argument(..., help="Two or more run ids."),
            as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Config differences and final metrics side by side."""
    res = R.compare(_reg(cfg), run_ids)
    if as_json:
        typer.echo(json.dumps(res, indent=2, default=str))
        return
    from rich.markup import escape

    ids = [r["id"] for r in res["runs"]]
    t = Table("config key", *ids, title="config differences", title_justify="left")
    for c in t.columns:
        c.overflow = "fold"  # a long value wraps whole; nothing is cut out of its middle
    notes = []
    for k, vals in res["config_diff"].items():
        prefix = R.common_path_prefix(vals)
        if prefix:
            notes.append(f"{k}: paths under {prefix}")
        shown = [("…/" + v[len(prefix):]) if prefix and isinstance(v, str) else json.dumps(v, default=str)
                 for v in vals]
        t.add_row(k, *[escape(s) for s in shown])
    if notes:
        t.caption = "; ".join(notes)
        t.caption_justify = "left"
    console.print(t if res["config_diff"] else "[dim]configs are identical[/dim]")
    dlabel = f"Δ {ids[-1][-6:]} − {ids[0][-6:]}"
    t = Table("metric (last)", *ids, dlabel, title="metrics", title_justify="left")
    for k, vals in res["metrics"].items():
        d = res["delta"].get(k)
        t.add_row(k, *["-" if v is None else f"{v:.4g}" for v in vals], "-" if d is None else f"{d:+.4g}")
    console.print(t)


@app.command("plot")
@config_command()
def plot(cfg: Config, run_id: str = typer.Argument(..., help="Run id."),
         metrics: Optional[list[str]] = typer.Option(None, "--metrics", "-m", help="Metric names (repeatable)."),
         out: str = typer.Option("run.png", "--out", "-o", help="PNG file to write."),
         smooth: float = typer.Option(0.0, "--smooth", help="EMA smoothing weight in [0, 1), as in TensorBoard / "
                                      "trackio: 0 = raw, 0.6 = moderate, 0.9 = strong; the raw curve stays faint "
                                      "behind.")) -> None:
    """Plot a run's curves (accuracy/format reward, length, KL, temporal-bonus rate, p_ordered vs p_shuffled for
    T-GRPO) to a PNG; a run of single values (an eval) is drawn as one bar chart."""
    names = R.plot(_reg(cfg), run_id, out, metrics, smooth=smooth)
    console.print(f"[green]wrote[/green] {out} ({', '.join(names)})")


@app.command("rm")
@config_command()
def rm(cfg: Config, run_ids: list[str] = typer.Argument(..., help="Run ids to delete."),
       files: bool = typer.Option(False, "--files", help="Also delete the run directories.")) -> None:
    """Delete runs; refuses a run whose artifacts another run depends on."""
    reg = _reg(cfg)
    for rid in run_ids:
        R.remove(reg, rid, delete_files=files)
        console.print(f"removed {rid}")


@app.command("gc")
@config_command()
def gc(cfg: Config,
       status: list[str] = typer.Option(["failed", "interrupted"], "--status", help="Statuses to collect."),
       dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would go (paths and sizes)."),
       keep_files: bool = typer.Option(False, "--keep-files", help="Keep run directories on disk."),
       ckpts: bool = typer.Option(False, "--checkpoints", help="Also delete the intermediate checkpoints of finished "
                                  "runs (each run's newest checkpoint and its model stay).")) -> None:
    """Delete failed and interrupted runs that have nothing left to resume, with their files.

    Removed: a failed or interrupted run without checkpoints (the registry entry and its directory).

    Trimmed: a run that a later --resume continued loses its checkpoints; the run stays, for the lineage.

    Kept: a run with checkpoints that no run resumed (a killed run's only copy of its work: resume it with
    --resume, or remove it with `videor1 runs rm ID --files`), and a run whose outputs another run uses.

    --dry-run lists the paths and sizes first.
    """
    res = R.gc(_reg(cfg), tuple(status), dry_run=dry_run, delete_files=not keep_files, intermediate_checkpoints=ckpts)
    verb = "would remove" if dry_run else "removed"

    def mb(n: int) -> str:
        for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if n >= scale:
                return f"{n / scale:.1f} {unit}"
        return f"{n} B"

    total = sum(e["bytes"] for e in res["removed"])
    for e in res["removed"]:
        what = "checkpoints of" if e.get("files_only") else "run"
        console.print(f"{verb} {what} {e['id']} ({e['kind']}, {e['status']}; {e['reason']}): "
                      f"{', '.join(e['paths']) or 'registry entry only'} {mb(e['bytes'])}", soft_wrap=True,
                      markup=False, highlight=False)
    runs = sum(not e.get("files_only") for e in res["removed"])
    console.print(f"{verb} {runs} run(s), {mb(total)}; kept {len(res['kept'])}", soft_wrap=True)
    for e in res["kept"]:
        console.print(f"  kept {e['id']} ({e['kind']}, {e['status']}): {e['reason']}", soft_wrap=True, markup=False,
                      highlight=False)
