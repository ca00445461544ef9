"""`videor1 doctor`: what is installed, which devices and readers work, where the registry is."""

from __future__ import annotations

import json

import typer
from rich.markup import escape
from rich.table import Table

from pipelines.config import Config
from pipelines.doctor import collect
from videor1_cli.common import config_command, console


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    @config_command()
    def doctor(cfg: Config, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Versions, devices, decord/PyAV/vLLM/DeepSpeed availability, registry path, free disk."""
        info = collect(cfg)
        if as_json:
            typer.echo(json.dumps(info, indent=2, default=str))
            return
        table = Table("check", "result", show_header=True)
        for k, v in info.items():
            table.add_row(k, escape(v if isinstance(v, str) else json.dumps(v, default=str)))
        console.print(table)
