"""`videor1 config show | validate | schema | keys`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipelines.config import Config, describe, json_schema, list_presets, validate_file
from videor1_cli.common import config_command, console, preset_help

app = typer.Typer(no_args_is_help=True)


@app.command("show")
@config_command()
def show(cfg: Config) -> None:
    """Print the resolved configuration (preset < --config file < --set) as YAML."""
    typer.echo(cfg.to_yaml(), nl=False)


@app.command("validate")
def validate(
    file: Optional[Path] = typer.Argument(None, help="Config YAML file to check (the same as --config FILE).",
                                          metavar="FILE"),
    config_file: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file (overrides the preset).",
                                               rich_help_panel="Config", metavar="FILE"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help=preset_help(), rich_help_panel="Config",
                                         metavar="NAME"),
    set_: Optional[list[str]] = typer.Option(None, "--set", "-s", help="Override one key: dotted.key=value "
                                             "(repeatable).", rich_help_panel="Config", metavar="KEY=VALUE"),
) -> None:
    """Check a configuration against the schema; names every unknown key and bad value.

    A file alone (FILE or --config FILE) is checked on its own, on the schema's defaults. With --preset or --set,
    what a command given the same --preset / --config / --set would run with is checked.
    """
    from pipelines.config import ConfigError, load_config

    if file is not None and config_file is not None and file != config_file:
        raise ConfigError(f"two config files given ({file} and --config {config_file})", hint="give one")
    path = file or config_file
    if path is not None and preset is None and not set_:
        validate_file(path)
        console.print(f"[green]ok[/green] {path}")
        return
    if path is None and preset is None and not set_:
        raise ConfigError("nothing to validate", hint="videor1 config validate FILE (or --preset NAME / --set KEY=VALUE)")
    load_config(preset=preset, file=path, overrides=set_ or [])
    what = " + ".join(x for x in (f"preset {preset}" if preset else "", str(path) if path else "",
                                  " ".join(f"--set {s}" for s in set_ or [])) if x)
    console.print(f"[green]ok[/green] {what}")


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
