"""`videor1 train` commands."""

from __future__ import annotations

from typing import Optional

import typer

from pipelines.config import Config
from videor1_cli.common import DATA, DISTRIBUTED, MODEL, ROOT, Shortcut, config_command, results_on_node0

app = typer.Typer(no_args_is_help=True)


# ---------------------------------------------------------------------------------------------------------------------
# train sft (pipelines.sft)
SFT_SHORTCUTS = (
    MODEL, DATA, ROOT, *DISTRIBUTED,
    Shortcut("sft.max_steps", ["--max-steps"], Optional[int], "Stop after N optimizer steps (sft.max_steps)."),
    Shortcut("sft.eval_file", ["--eval-data"], Optional[str],
             "Held-out COT records; their loss is logged (sft.eval_file)."),
    Shortcut("sft.output_dir", ["--out"], Optional[str],
             "Model output directory (sft.output_dir; default: the run directory)."),
)


@app.command("sft")
@config_command(*SFT_SHORTCUTS)
def sft(
    cfg: Config,
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Continue from a checkpoint: 'auto' (the latest checkpoint in sft.output_dir, or of the "
        "last unfinished train-sft run on the same model and data), a checkpoint dir, or an output dir."),
) -> None:
    """Supervised cold start on Video-R1-COT records: loss on the assistant turn only, batched video + image.

    Writes the model (+ processor) as a 'model' artifact whose lineage names the records and the base model.
    """
    import sys
    from pathlib import Path

    from rich.table import Table

    from pipelines.launch import check_deepspeed, is_distributed_worker, is_main_process, needs_launch, run_workers
    from pipelines.registry import Registry
    from pipelines.sft import find_resume_checkpoint, run_sft
    from videor1_cli.common import console, err_console, registered_run

    check_deepspeed(cfg)
    worker = is_distributed_worker()
    ckpt = find_resume_checkpoint(resume, cfg, Registry(cfg.registry_path()))
    if resume == "auto" and ckpt is None and not worker:
        err_console.print("[dim]--resume auto: no checkpoint found, starting fresh[/dim]")
    with registered_run(cfg, "train-sft") as (run, run_dir):
        out = Path(cfg.sft.output_dir) if cfg.sft.output_dir else (ckpt.parent if ckpt else run_dir)
        if not worker:
            run.use_path("model", cfg.model.name_or_path)
            if cfg.data.file:
                run.use_path("records", cfg.data.file)
            if cfg.sft.eval_file:
                run.use_path("records", cfg.sft.eval_file, role="eval-records")
            if ckpt is not None:
                err_console.print(f"[dim]resuming from {ckpt}[/dim]")
                run.continues(ckpt)  # lineage: this run continues the one that wrote the checkpoint
        summary: dict = {}
        if needs_launch(cfg):
            from pipelines.sft import latest_checkpoint

            run_workers(cfg, sys.argv[1:], run, what="training workers", checkpoint=lambda: latest_checkpoint(out))
            if results_on_node0(cfg, run, "train sft"):
                return
            summary = dict(run.info.get("summary") or {})  # written by the rank-0 worker
        else:
            def on_skip(rid: str, reason: str, detail: str, train: bool) -> None:
                if is_main_process():
                    from rich.text import Text

                    err_console.print(Text(f"skipped {'train' if train else 'eval'} record {rid} ({reason}): "
                                           f"{detail}", style="yellow"), soft_wrap=True)

            res = run_sft(cfg, run, output_dir=out, resume_from=ckpt, on_skip=on_skip)
            if not is_main_process():
                return
            summary = dict(steps=res.global_step, train_loss=res.train_loss, eval_loss_start=res.eval_loss_start,
                           eval_loss_end=res.eval_loss_end, skipped=res.skipped, samples=res.samples,
                           eval_samples=res.eval_samples, tokens_per_s=res.tokens_per_s,
                           seconds=round(res.seconds, 2), resumed_from=res.resumed_from)
            if worker:  # rank 0 under torchrun: the launcher records the artifact and prints
                run.set_summary(summary)
                return
        aid = run.log_artifact("model", out, meta={"stage": "sft", "base": cfg.model.name_or_path,
                                                   "data": cfg.data.file})
        summary.update(output_dir=str(Path(out).resolve()), artifact=aid)
        run.set_summary(summary)

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    skipped = sum(sum(v.values()) for v in (summary.get("skipped") or {}).values())
    table = Table("model", "steps", "train loss", "eval loss start -> end", "skipped", title="train sft")
    table.add_row(str(out), fmt(summary.get("steps")), fmt(summary.get("train_loss")),
                  f"{fmt(summary.get('eval_loss_start'))} -> {fmt(summary.get('eval_loss_end'))}", str(skipped))
    console.print(table)


# ---------------------------------------------------------------------------------------------------------------------
# train rl (pipelines.rl: GRPO / T-GRPO)
RL_SHORTCUTS = (
    MODEL, DATA, ROOT,
    Shortcut("rl.algo", ["--algo"], Optional[str], "tgrpo (temporal GRPO, Video-R1) or grpo (rl.algo)."),
    Shortcut("rl.max_steps", ["--max-steps"], Optional[int], "Steps (rollouts) to run (rl.max_steps)."),
    *DISTRIBUTED,
)


@app.command("rl")
@config_command(*RL_SHORTCUTS)
def rl(
    cfg: Config,
    resume: Optional[str] = typer.Option(
        None, "--resume", help="Resume from a checkpoint: 'auto' (the newest train-rl checkpoint in the registry) "
        "or PATH (a <run dir>/checkpoints/step-N directory, or a run directory).", rich_help_panel="Run control"),
) -> None:
    """GRPO / T-GRPO on video and image records (Video-R1's RL stage); the model is saved to <run dir>/model."""
    import sys

    from pipelines.launch import check_deepspeed, is_distributed_worker, needs_launch, rank, run_workers
    from videor1_cli.common import console, err_console, registered_run

    check_deepspeed(cfg)
    with registered_run(cfg, "train-rl") as (run, run_dir):
        if needs_launch(cfg):
            from pipelines.rl.checkpoint import checkpoint_steps

            def latest():
                steps = checkpoint_steps(run_dir)
                return steps[-1][1] if steps else None

            run_workers(cfg, sys.argv[1:], run, run_dir, what="training workers", checkpoint=latest)
            if results_on_node0(cfg, run, "train rl"):
                return
            _print_rl_summary(console, run.info.get("summary") or {})
            return
        from pipelines.rl.trainer import RLTrainer

        show = not is_distributed_worker() or rank() == 0
        with _rl_progress(err_console, enabled=show) as on_step:
            trainer = RLTrainer(cfg, run, run_dir, resume=resume, on_step=on_step)
            try:
                trainer.setup()
                summary = trainer.train()
            finally:
                trainer.cleanup()
        if show and not is_distributed_worker():  # under a launcher, the launching process prints the summary
            _print_rl_summary(console, summary)


def _rl_progress(err_console, enabled: bool = True):
    """A rich progress bar (steps/s, ETA, live reward) fed by the trainer's on_step callback."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if not enabled:
            yield None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from pipelines.progress import progress_bar

        columns = [TextColumn("[bold]train rl[/bold]"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[live]}")]
        with progress_bar("train rl", *columns, console=err_console, transient=True, unit="steps") as bar:
            task = None

            def on_step(step: int, total: int, m: dict) -> None:
                nonlocal task
                if task is None:
                    task = bar.add_task("rl", total=total, completed=step - 1, rate="", live="")
                st = m.get("step_time") or 0.0
                live = f"reward {m.get('reward', float('nan')):.3f}  kl {m.get('kl', float('nan')):.4f}"
                bar.update(task, completed=step, rate=f"{1.0 / st:.2f} steps/s" if st else "", live=live)

            yield on_step

    return cm()


def _print_rl_summary(console, s: dict) -> None:
    from rich.table import Table

    t = Table(title="train rl", show_header=False)
    for k in ("algo", "steps", "steps_run", "world_size", "resumed_from", "reward_first", "reward_last", "kl_last",
              "skipped", "step_time_median", "seconds", "model"):
        v = s.get(k)
        if v is None:
            continue
        t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    console.print(t)
