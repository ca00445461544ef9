"""`videor1 config show | validate | schema | keys`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipelines.config import Config, describe, json_schema, list_presets, validate_file
from videor1_cli.common import config_command, console

app = typer.Typer(no_args_is_help=True)


@app.command("show")
@config_command()
def show(cfg: Config) -> None:
    """Print the resolved configuration (preset < --config file < --set) as YAML."""
    typer.echo(cfg.to_yaml(), nl=False)


@app.command("validate")
def validate(file: Path = typer.Argument(..., help="Config YAML file to check.")) -> None:
    """Check a config file against the schema; names every unknown key and bad value."""
    validate_file(file)
    console.print(f"[green]ok[/green] {file}")


@app.command("schema")
def schema() -> None:
    """Print the JSON schema of the configuration (field help included)."""
    typer.echo(json.dumps(json_schema(), indent=2))


@app.command("keys")
@config_command()
def keys(cfg: Config, section: Optional[str] = typer.Argument(None, help="Only keys of this section (e.g. rl).")
         ) -> None:
    """List every config key with the value in force (preset < --config file < --set), where that value came from
    (default, preset NAME, config file, --set) and its help text."""
    from pipelines.runs import flatten

    values = flatten(cfg.model_dump(mode="json"))
    table = Table("key", "value", "from", "help", show_lines=False)
    for key, help_, _default in describe(Config):
        if section and not key.startswith(section + "."):
            continue
        table.add_row(key, json.dumps(values.get(key), default=str), cfg.origin(key), help_)
    console.print(table)
    if not section:
        console.print(f"presets: {', '.join(list_presets())}")
