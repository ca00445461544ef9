"""`videor1 push RUN_ID|DIR --repo-id ORG/NAME [--private] [--revision] [--dry-run]`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipelines.config import Config
from pipelines.errors import VideoR1Error
from videor1_cli.common import Shortcut, config_command, console, registered_run

REPO = Shortcut("push.repo_id", ["--repo-id"], Optional[str], "Target model repo ORG/NAME (push.repo_id).")
PRIVATE = Shortcut("push.private", ["--private"], Optional[bool], "Create the repo private (push.private).")
REVISION = Shortcut("push.revision", ["--revision"], Optional[str], "Branch to push to (push.revision).")


def register(app: typer.Typer) -> None:
    @app.command("push")
    @config_command(REPO, PRIVATE, REVISION)
    def push(
        cfg: Config,
        target: str = typer.Argument(..., help="A run id (its model artifact) or a model directory."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the model card and file list; no network."),
    ) -> None:
        """Upload a model to the Hugging Face Hub with a model card built from the run's lineage."""
        from pipelines import push as P
        from pipelines.registry import Registry

        if not cfg.push.repo_id:
            raise VideoR1Error("no target repo", hint="pass --repo-id ORG/NAME")
        reg = Registry(cfg.registry_path())
        model_dir, run = P.resolve_model(reg, target)
        card = P.build_card(reg, model_dir, run, cfg.push.repo_id, cfg.push.license)
        files = P.file_list(model_dir)
        if dry_run:
            typer.echo(card)
            typer.echo("files:")
            for name, size in files + [("README.md", len(card.encode()))]:
                typer.echo(f"  {name}  {size} B")
            return
        with registered_run(cfg, "push") as (rec, run_dir):
            rec.use_path("model", model_dir)
            (Path(run_dir) / "README.md").write_text(card)
            res = P.push(model_dir, card, cfg.push.repo_id, private=cfg.push.private, revision=cfg.push.revision,
                         commit_message=cfg.push.commit_message)
            rec.log_artifact("model-card", Path(run_dir) / "README.md", meta=res)
            rec.set_summary({"repo_id": cfg.push.repo_id, **res, "files": len(files)})
        console.print(f"[green]pushed[/green] {cfg.push.repo_id} ({res['commit_url']})")
