"""`videor1 quickstart`: data synth -> model tiny -> train sft -> train rl (GRPO) -> eval, on a CPU, in one command.

Every stage is invoked in-process as its real command line (`videor1 data synth ...`, `videor1 train sft ...`), with
the previous stage's output paths, so each is a registered run and lineage links them automatically; the quickstart
itself is one more run whose inputs are the three evaluations (so `videor1 runs lineage <quickstart run>` shows the
whole chain). The work is planned and read back in `pipelines.quickstart`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from pipelines.config import Config
from pipelines.models.families import families_help
from videor1_cli.common import Shortcut, config_command, console, err_console, registered_run

OUT = Shortcut("quickstart.out_dir", ["--out"], Optional[str],
               "Directory everything is written to (quickstart.out_dir; default videor1-runs/quickstart).")
TRAIN = Shortcut("quickstart.train", ["--train"], Optional[int], "RL pool size, records without CoT (quickstart.train).")
SFT = Shortcut("quickstart.sft", ["--sft"], Optional[int], "Cold-start records with gold CoT (quickstart.sft).")
TEST = Shortcut("quickstart.test", ["--test"], Optional[int], "Held-out questions (quickstart.test).")
SEED = Shortcut("run.seed", ["--seed"], Optional[int], "Seed of the world, the model and training (run.seed).")
SEEDS = Shortcut("quickstart.seeds", ["--seeds"], Optional[str],
                 "Several seeds, comma-separated, e.g. 0,1,2: per-seed rows and their mean (quickstart.seeds).")
SFT_STEPS = Shortcut("quickstart.sft_steps", ["--sft-steps"], Optional[int], "SFT optimizer steps "
                     "(quickstart.sft_steps).")
RL_STEPS = Shortcut("quickstart.rl_steps", ["--rl-steps"], Optional[int], "RL steps (quickstart.rl_steps).")
ALGO = Shortcut("quickstart.algo", ["--algo"], Optional[str], "RL algorithm of the RL stage: grpo (default) or tgrpo "
                "(quickstart.algo).")
COMPARE = Shortcut("quickstart.compare_algos", ["--compare-algos"], Optional[bool],
                   "Also train the other algorithm from the same SFT model; report both (quickstart.compare_algos).")
FAMILY = Shortcut("quickstart.family", ["--family"], Optional[str], "Model family of the tiny model: "
                  f"{families_help()} (quickstart.family).")

_SHORTCUTS = (OUT, TRAIN, SFT, TEST, SEED, SEEDS, SFT_STEPS, RL_STEPS, ALGO, COMPARE, FAMILY)


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart)


@config_command(*_SHORTCUTS)
def quickstart(
    cfg: Config,
    smoke: bool = typer.Option(False, "--smoke", help="The same chain at toy sizes in ~1-2 minutes (CI; no accuracy "
                               "claim)."),
    as_json: bool = typer.Option(False, "--json", help="Print the final table as JSON on stdout (progress stays on "
                                 "stderr)."),
) -> None:
    """The Video-R1 recipe end to end on the synthetic world and a tiny Qwen2.5-VL, on a CPU.

    data synth -> model tiny -> eval (untrained) -> train sft (cold start, gold CoT) -> eval -> train rl
    (GRPO, questions without CoT; --algo tgrpo for Video-R1's T-GRPO) -> eval; prints chance, untrained, SFT and RL accuracy overall, per problem type
    and on the order-dependent questions. Every stage is a registered run linked by lineage.
    """
    import torch

    registry = cfg.registry_path().resolve()
    cfg.run.registry = str(registry)
    out = Path(cfg.quickstart.out_dir).resolve()
    cfg.run.output_dir = str(out / "runs")

    threads = torch.get_num_threads()
    if cfg.quickstart.torch_threads:
        torch.set_num_threads(cfg.quickstart.torch_threads)
    try:
        res, run = _run(cfg, out, registry, smoke)
    finally:
        torch.set_num_threads(threads)
    if as_json:
        typer.echo(json.dumps({k: v for k, v in res.table.items() if k != "config"} | {"run": run.id}, indent=1))
        return
    for t in final_tables(res.table):
        console.print(t)
    console.print(SCORING_NOTE, soft_wrap=True)
    console.print(f"{res.table['seconds']:.0f}s; everything in {out}; lineage: [bold]videor1 runs lineage {run.id}"
                  f"[/bold]  (stages tagged quickstart-{run.id})", soft_wrap=True)


def _run(cfg: Config, out: Path, registry: Path, smoke: bool):
    from pipelines.quickstart import run_quickstart

    t0 = time.perf_counter()
    with registered_run(cfg, "quickstart") as (run, _run_dir):
        tag = f"quickstart-{run.id}"

        def on_stage(si: int, i: int, n: int, st, seconds: float | None) -> None:
            seeds = cfg.quickstart.seeds or [cfg.run.seed]
            where = f"seed {seeds[si]} ({si + 1}/{len(seeds)}) · {i + 1}/{n}" if len(seeds) > 1 else f"{i + 1}/{n}"
            if seconds is None:
                err_console.rule(f"[bold]{where}[/bold] {st.title}", align="left", style="dim")
            else:
                err_console.print(f"[green]✓[/green] {st.title} [dim]{seconds:.1f}s "
                                  f"(total {time.perf_counter() - t0:.0f}s)[/dim]")

        res = run_quickstart(cfg, _invoke, spawn=_spawn, registry=registry, smoke=smoke, tag=tag, on_stage=on_stage,
                             log=lambda s: err_console.print(f"[dim]{s}[/dim]"))
        for f in res.eval_results:
            run.use_path("eval-results", f)
        table_file = out / "quickstart.json"
        run.log_artifact("quickstart-table", table_file)
        run.log_metrics(0, _flat_metrics(res.table))
        run.set_summary({"out": str(out), "tag": tag, "seconds": res.table["seconds"], "smoke": smoke,
                         **{k: res.table.get(k) for k in ("chance", "untrained", "sft", "rl", "grpo", "tgrpo",
                                                            "order_dependent", "per_type", "config")
                            if k in res.table}})
    return res, run


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send a stage's stdout to stderr: Python's sys.stdout AND file descriptor 1, which the processes it starts
    (torchrun and its ranks) inherit, so that `--json` leaves only the table on stdout."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 (a detached process): Python's stdout is all there is to redirect
        saved = None
    try:
        if saved is not None:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _invoke(argv: list[str]) -> None:
    """Run one `videor1 ...` command line in this process; its stdout goes to stderr (ours is the table/JSON)."""
    import click

    from pipelines.quickstart import QuickstartError
    from videor1_cli.app import app

    cmd = "videor1 " + " ".join(argv[:2])
    saved = sys.argv
    sys.argv = ["videor1", *argv]  # what the stage's run records as its command
    try:
        with _stdout_to_stderr():
            rv = app(argv, prog_name="videor1", standalone_mode=False)
    except SystemExit as e:
        if e.code not in (0, None):
            raise QuickstartError(f"stage `{cmd}` failed (exit {e.code}); its error is printed above",
                                  hint="the stage's run is marked failed in the registry: videor1 runs ls") from None
        rv = None
    except click.ClickException as e:
        raise QuickstartError(f"stage `{cmd}` rejected its arguments: {e.format_message()}",
                              hint="the stage's command line changed; update pipelines/quickstart.py") from None
    finally:
        sys.argv = saved
    if isinstance(rv, int) and rv != 0:
        raise QuickstartError(f"stage `{cmd}` exited {rv}")


def _spawn(argv: list[str], log_file: Path):
    """Start one `videor1 ...` command line in its own process (a background stage), output to log_file."""
    import subprocess

    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "videor1_cli.app", *argv], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _flat_metrics(table: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ("chance", "untrained", "sft", "rl", "grpo", "tgrpo", "seconds"):
        if isinstance(table.get(k), (int, float)):
            out[k] = table[k]
    for k, v in (table.get("order_dependent") or {}).items():
        if isinstance(v, (int, float)):
            out[f"order_dependent/{k}"] = v
    for pt, row in (table.get("per_type") or {}).items():
        for k, v in row.items():
            if isinstance(v, (int, float)):
                out[f"per_type/{pt}/{k}"] = v
    return out


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def _cols(table: dict[str, Any]) -> list[tuple[str, str]]:
    algo = table.get("rl_algo") or "grpo"
    cols = [("chance", "chance"), ("untrained", "untrained"), ("sft", "after SFT"),
            ("rl", f"after RL ({'T-GRPO' if algo == 'tgrpo' else 'GRPO'})")]
    for other, title in (("grpo", "GRPO"), ("tgrpo", "T-GRPO")):
        if other in table:
            cols.append((other, f"after RL ({title})"))
    return cols


def final_tables(table: dict[str, Any]) -> list[Table]:
    seeds = table["seeds"]
    cols = _cols(table)
    title = ("quickstart: held-out score (%, `official` scoring)"
             + (f", mean of seeds {', '.join(str(s['seed']) for s in seeds)}" if len(seeds) > 1
                else f", seed {seeds[0]['seed']}")
             + f", {table.get('n_test')} held-out questions"
             + ("  \\[smoke: no accuracy claim]" if table.get("smoke") else ""))  # escaped: not a rich style tag
    t = Table(title=title, title_justify="left")
    t.add_column("")
    for _, label in cols:
        t.add_column(label, justify="right")
    t.add_row("[bold]overall[/bold]", *[f"[bold]{_f(table.get(k))}[/bold]" for k, _ in cols])
    t.add_row("order-dependent", *[_f(table["order_dependent"].get(k)) for k, _ in cols])
    t.add_section()
    for pt, row in table["per_type"].items():
        t.add_row(pt, *[_f(row.get(k)) for k, _ in cols])
    out = [t]
    if len(seeds) > 1:
        s = Table(title="per seed: overall / order-dependent", title_justify="left")
        s.add_column("seed")
        for _, label in cols:
            s.add_column(label, justify="right")
        s.add_column("seconds", justify="right")
        for row in seeds:
            s.add_row(str(row["seed"]), *[f"{_f(row.get(k))} / {_f(row['order_dependent'].get(k))}" for k, _ in cols],
                      f"{row['seconds']:.0f}")
        out.append(s)
    return out


SCORING_NOTE = ("[dim]score = `videor1 eval`'s `official` scoring of the synthetic bench, the world's own "
                "(training-reward) scoring: exact option letter / number, OCR 1-WER, free-form ROUGE, regression "
                "1 - relative error; each stage's eval table shows the same number in its `official (headline)` "
                "column (the `video-r1` column scores OCR and free-form 0, docs/eval.md). chance = a uniform guess "
                "under the same scoring (world.json). Order-dependent: direction, which colour first/last, "
                "descriptions of motion.[/dim]")
