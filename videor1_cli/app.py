"""Root of the `videor1` command: global options, the command groups, and errors as one line + exit code."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import click
import typer
from typer.core import TyperGroup

from pipelines.config import ConfigError
from pipelines.errors import VideoR1Error
from videor1_cli.common import err_console

try:  # typer 0.29 vendors click: its usage errors are typer's classes, not click's
    from typer import exceptions as _te

    _TYPER_CLICK: tuple[type[BaseException], ...] = (_te.TyperException, _te.Abort, _te.Exit)
except (ImportError, AttributeError):  # pragma: no cover - an older typer on plain click
    _TYPER_CLICK = ()


class VideoR1Group(TyperGroup):
    """Maps errors to one readable line and an exit code, for the real CLI and for CliRunner in tests alike."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            _fail(e, 2, e.hint or "`videor1 config keys` lists every key with its value and help")
        except VideoR1Error as e:
            _fail(e, e.exit_code, e.hint)
        except (click.exceptions.Exit, typer.Exit, click.ClickException, click.exceptions.Abort, SystemExit,
                KeyboardInterrupt, *_TYPER_CLICK):
            raise  # usage errors (no such option...) print click's usage line and `--help` pointer, exit 2
        except Exception as e:  # noqa: BLE001 - one readable line for anything unexpected
            _fail(e, 1, "run again with --debug for the full traceback")


app = typer.Typer(
    cls=VideoR1Group,
    name="videor1",
    help="The Video-R1 pipeline: data -> annotate -> train sft -> train rl (T-GRPO) -> eval -> push, "
    "configured in one schema and recorded in a local run registry.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# (module, name, help). Groups are Typer sub-apps; single commands register themselves on `app` via `register`.
GROUPS = [
    ("data", "data", "Fetch, unzip, validate, describe and synthesise Video-R1 records."),
    ("model", "model", "Build models (the tiny offline Qwen2.5-VL)."),
    ("config", "config", "Show, validate and describe the configuration."),
    ("runs", "runs", "The local run registry: list, show, lineage, compare, plot, delete."),
    ("train", "train", "Training stages: sft (cold start) and rl (GRPO / T-GRPO)."),
    ("rewards", "rewards", "Score completions with the reward functions."),
    ("bench", "bench", "Performance benchmarks against peers (figures go to BENCHMARKS.md)."),
]
COMMANDS = ["annotate", "eval", "push", "doctor", "quickstart"]


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.", envvar="VIDEOR1_DEBUG"),
) -> None:
    if debug:
        os.environ["VIDEOR1_DEBUG"] = "1"


def _load() -> None:
    for module, name, help_ in GROUPS:
        mod = importlib.import_module(f"videor1_cli.{module}")
        app.add_typer(mod.app, name=name, help=help_)
    for module in COMMANDS:
        mod = importlib.import_module(f"videor1_cli.{module}")
        mod.register(app)
    from videor1_cli.examples import attach

    attach(app)


_load()


def _debug() -> bool:
    return os.environ.get("VIDEOR1_DEBUG") == "1" or "--debug" in sys.argv


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)
    except SystemExit as e:  # click ends every command with SystemExit, 0 on success
        if e.code in (0, None):
            _end_worker()
        raise
    _end_worker()


def _end_worker() -> None:
    """A launched rank that succeeded destroys its process groups before the interpreter exits (or gloo can abort
    it at exit: `pipelines.launch.end_worker`)."""
    from pipelines.launch import end_worker, is_distributed_worker

    if is_distributed_worker():
        end_worker()


def _fail(e: BaseException, code: int, hint: str | None) -> None:
    if _debug():
        traceback.print_exc()
    from rich.text import Text

    from pipelines.launch import report_worker_error

    if isinstance(e, OSError) and not isinstance(e, VideoR1Error):
        e, hint = _os_error(e, hint)
    if report_worker_error(e, hint) and not _debug():
        sys.exit(code)  # a rank of a launched job: the launching process prints it once, for every rank

    msg = str(e) if isinstance(e, (ConfigError, VideoR1Error)) else f"{type(e).__name__}: {e}"
    # Plain Text, never markup: messages quote paths and library errors (gloo's "[/__w/...pair.cc:464]" made rich
    # raise MarkupError and hid the real error).
    err_console.print(Text.assemble(("error:", "bold red"), " ", msg), soft_wrap=True)
    if hint:
        err_console.print(Text(f"hint: {hint}", style="dim"), soft_wrap=True)
    sys.exit(code)


def _os_error(e: OSError, hint: str | None) -> tuple[BaseException, str | None]:
    """An OSError as a StorageError naming its path (the message of a failed write often has none)."""
    from pipelines.errors import StorageError

    if not e.filename:
        return e, hint
    err = StorageError(str(e.filename), e, "file", "access")
    return err, err.hint or hint


if __name__ == "__main__":
    main()

