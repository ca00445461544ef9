"""`videor1 rewards` commands."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from pipelines.config import Config
from pipelines.errors import DataError
from pipelines.prompts import PROBLEM_TYPES
from pipelines.rewards import compute_rewards, get_reward_fn, reward_kwargs
from videor1_cli.common import config_command, console, err_console, registered_run

app = typer.Typer(no_args_is_help=True)

REQUIRED = ("problem_type", "solution", "completion")
CHUNK = 256


def _parse_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    where = f"{path} line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg}, column {e.colno})", file=where) from None
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", file=where)
    for key in REQUIRED:
        if key not in row:
            raise DataError("missing", file=where, field=key)
        if not isinstance(row[key], str):
            raise DataError(f"must be a string, got {type(row[key]).__name__}", file=where, field=key)
    opts = row.get("options")
    if opts is not None and not (isinstance(opts, list) and all(isinstance(o, str) for o in opts)):
        raise DataError("must be a list of strings", file=where, field="options")
    return row


def _columns(rows: list[dict[str, Any]], outputs: set[str]) -> dict[str, list[Any]]:
    """Every input field but the completion and the fields this command writes, one list entry per row."""
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    cols = {k: [r.get(k) for r in rows] for k in keys if k not in ("completion", "completions") and k not in outputs}
    cols["options"] = [r.get("options") or [] for r in rows]
    if "completion_length" in keys and "completion_lengths" not in cols:
        cols["completion_lengths"] = cols["completion_length"]
    return cols


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


@app.command("score")
@config_command()
def score(
    cfg: Config,
    file: Path = typer.Argument(..., help="JSONL of {problem_type, solution, completion} (+ options, data_type, ...)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Scored JSONL (default: <run dir>/scored.jsonl)."),
) -> None:
    """Score completions with `format`, `accuracy` and every reward in `rl.rewards`; `reward` = weighted total.

    Bad lines (invalid JSON, missing or mistyped fields) are skipped and counted; the good lines are still scored and
    written, then the command exits 1 naming the first bad line.
    """
    if not file.is_file():
        raise DataError("file not found", file=str(file))
    names = list(cfg.rl.rewards)
    weights = cfg.rl.reward_weights
    for name in names:  # fail on a bad plugin before reading anything
        get_reward_fn(name)
    shown = list(dict.fromkeys(["format", "accuracy", *names]))
    outputs = set(shown) | {"reward"}

    with registered_run(cfg, "rewards-score") as (run, run_dir):
        run.use_path("completions", file)
        out_path = Path(output) if output else run_dir / "scored.jsonl"
        rows: list[dict[str, Any]] = []
        bad: list[DataError] = []
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(_parse_line(file, lineno, line))
                except DataError as e:
                    bad.append(e)

        kw = reward_kwargs(cfg.rl)
        progress = Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]} items/s"), TimeRemainingColumn(),
                            console=err_console, disable=os.environ.get("VIDEOR1_QUIET") == "1")
        with progress:
            task = progress.add_task("score", total=len(rows), rate="-")
            for start in range(0, len(rows), CHUNK):
                chunk = rows[start:start + CHUNK]
                completions = [r["completion"] for r in chunk]
                columns = {**_columns(chunk, outputs), **kw}
                _, per_shown = compute_rewards([n for n in shown if n not in names], completions, **columns)
                total, per_cfg = compute_rewards(names, completions, weights, **columns)
                per = {**per_shown, **per_cfg}
                for i, r in enumerate(chunk):
                    for name in shown:
                        r[name] = per[name][i]
                    r["reward"] = total[i]
                progress.update(task, advance=len(chunk))
                elapsed = progress.tasks[0].elapsed or 0
                if elapsed:
                    progress.update(task, rate=f"{progress.tasks[0].completed / elapsed:.0f}")

        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, out_path)

        metric_names = [*shown, "reward"]
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[r["problem_type"]].append(r)
        metrics: dict[str, float] = {"count": len(rows), "bad_lines": len(bad)}
        for name in metric_names:
            metrics[name] = _mean([r[name] for r in rows])
        for ptype, group in groups.items():
            metrics[f"{ptype}/count"] = len(group)
            for name in metric_names:
                metrics[f"{ptype}/{name}"] = _mean([r[name] for r in group])
        run.log_metrics(0, {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))})
        run.log_artifact("scored-completions", out_path, meta={"rewards": names, "weights": weights})
        run.set_summary({k: v for k, v in metrics.items() if "/" not in k} | {"output": str(out_path)})

        table = Table(title=f"rewards of {file.name}")
        table.add_column("problem_type")
        table.add_column("count", justify="right")
        for name in metric_names:
            table.add_column(name, justify="right")
        order = [t for t in PROBLEM_TYPES if t in groups] + sorted(t for t in groups if t not in PROBLEM_TYPES)
        for label, group in [(t, groups[t]) for t in order] + [("all", rows)]:
            if label == "all":
                table.add_section()
            cells = [f"{_mean([r[n] for r in group]):.4f}" if group else "-" for n in metric_names]
            table.add_row(label, str(len(group)), *cells)
        console.print(table)
        console.print(f"wrote {len(rows)} scored lines to {out_path}")
        unknown = [t for t in groups if t not in PROBLEM_TYPES]
        if unknown:
            err_console.print(f"[yellow]warning:[/yellow] unknown problem_type {', '.join(map(repr, unknown))} "
                              f"(built-in accuracy scores them 0); known: {', '.join(PROBLEM_TYPES)}")
        if bad:
            first = bad[0]
            first.hint = f"{len(bad)} bad line(s) skipped; the other {len(rows)} were scored and written to {out_path}"
            raise first
