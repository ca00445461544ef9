"""What every command shares: the config flags, the registered run, the console.

`@config_command(...)` adds the same flags to every command that does work (--config, --preset, --set and the
shortcuts --model / --data / --root), resolves the Config once and hands it to the command. Extra shortcuts map a
flag to exactly one config key, so the CLI never knows a setting the schema does not (litgpt's rule).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console, ConsoleDimensions

from pipelines.config import Config, load_config
from pipelines.registry import Registry, Run

# Output that is not a terminal (a log file, a pipe, CI, nohup) has no width: rich would wrap at $COLUMNS or 80 and
# break paths mid-word. There, lines are printed whole (soft wrap) and tables get room for their widest cell.
NON_TTY_WIDTH = 10_000
RULE_WIDTH = 100


class ReadableConsole(Console):
    """rich's Console, deciding per print whether its stream is a terminal (CliRunner and redirects swap streams).

    On a terminal: rich's own width and wrapping. Elsewhere: no wrapping, no cropping, rules 100 columns wide, and
    tables as wide as their content, or as $COLUMNS when it is set."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._fixed_width = kwargs.get("width")  # rich turns $COLUMNS into a fixed width: only a given one counts
        super().__init__(*args, **kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        if self._fixed_width is None and not self.is_terminal:
            # A width the user asked for ($COLUMNS) sizes tables; lines are still printed whole (soft wrap).
            return ConsoleDimensions(env_columns() or NON_TTY_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._fixed_width = new_size[0]
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    @property
    def soft_wrap(self) -> bool:
        return self._soft_wrap or not self.is_terminal

    @soft_wrap.setter
    def soft_wrap(self, value: bool) -> None:
        self._soft_wrap = value

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if not self.is_terminal and self._fixed_width is None and env_columns():
            from rich.table import Table

            for obj in objects:  # at $COLUMNS a long word folds onto the next line instead of ending in "…"
                if isinstance(obj, Table):
                    for col in obj.columns:
                        if col.overflow == "ellipsis":
                            col.overflow = "fold"
        return super().print(*objects, **kwargs)

    def rule(self, *args: Any, **kwargs: Any) -> None:
        if self.is_terminal:
            return super().rule(*args, **kwargs)
        from rich.rule import Rule

        self.print(Rule(*args, **kwargs), width=RULE_WIDTH)


def env_columns() -> int | None:
    """$COLUMNS when set to a usable width (a pipe has no width of its own; `COLUMNS=120 videor1 ... | less`)."""
    try:
        n = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return None
    return n if n >= 20 else None


console = ReadableConsole(stderr=False, highlight=False)
err_console = ReadableConsole(stderr=True, highlight=False)


# Typer (0.29) prints a `<type>` placeholder after every option in --help, `<bool>` even after an on/off flag that takes
# no value. Flags get none; value options get click's names (TEXT, INTEGER, FLOAT, PATH; ranges are printed apart).
_VALUE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "file": "FILE", "directory": "DIR"}


def value_placeholder(label: str | None) -> str | None:
    """Typer's `<int range>` / `<list[str]>` / `<path>` -> INTEGER / TEXT / PATH; choices `a|b` stay as they are."""
    if label is None:
        return None
    core = label.strip("<>").removesuffix("...")
    if core.startswith("list[") and core.endswith("]"):
        core = core[5:-1]
    core = core.removesuffix(" range")
    return _VALUE_NAMES.get(core.lower(), core if "|" in core else core.upper())


def _readable_help_types() -> None:
    import typer.core as tc

    option_type, argument_type = tc.TyperOption.display_type_rich, tc.TyperArgument.display_type_rich

    def option(self: Any, ctx: Any) -> str | None:
        if self.metavar is not None:
            return self.metavar
        if self.is_flag:
            return None
        return value_placeholder(option_type(self, ctx))

    def argument(self: Any, ctx: Any) -> str | None:
        return self.metavar if self.metavar is not None else value_placeholder(argument_type(self, ctx))

    tc.TyperOption.display_type_rich = option  # type: ignore[method-assign]
    tc.TyperArgument.display_type_rich = argument  # type: ignore[method-assign]


_readable_help_types()


class Shortcut:
    """A command flag that sets one config key (e.g. --frames -> eval.frames)."""

    def __init__(self, key: str, flags: list[str], type_: Any, help: str):
        self.key, self.flags, self.type_, self.help = key, flags, type_, help


MODEL = Shortcut("model.name_or_path", ["--model"], Optional[str], "Model directory or hub id (model.name_or_path).")
DATA = Shortcut("data.file", ["--data"], Optional[str], "Input records, JSON or JSONL (data.file).")
ROOT = Shortcut("data.root", ["--root"], Optional[str], "Directory record paths resolve against (data.root).")
# Multi-process launch, shared by every command that can run on several processes/nodes (pipelines.launch).
DISTRIBUTED = (
    Shortcut("distributed.nproc", ["--nproc"], Optional[int], "Processes per node, one per GPU (distributed.nproc)."),
    Shortcut("distributed.nnodes", ["--nnodes"], Optional[int], "Number of nodes (distributed.nnodes)."),
    Shortcut("distributed.node_rank", ["--node-rank"], Optional[int], "Rank of this node (distributed.node_rank)."),
    Shortcut("distributed.master_addr", ["--master-addr"], Optional[str],
             "Address of the rank-0 node (distributed.master_addr)."),
    Shortcut("distributed.master_port", ["--master-port"], Optional[int],
             "Port of the rank-0 node (distributed.master_port)."),
)


def preset_help() -> str:
    """The --preset help, listing every preset file in pipelines/presets/ (so a new preset is never left out)."""
    from pipelines.config import DEFAULT_PRESET, list_presets

    names = [f"{n} (default)" if n == DEFAULT_PRESET else n for n in list_presets()]
    return f"Preset: {', '.join(names)}."


def _param(name: str, default: Any, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def config_command(*shortcuts: Shortcut, default_preset: Optional[Callable[[dict[str, Any]], Optional[str]]] = None
                   ) -> Callable:
    """Decorate a command `fn(cfg: Config, ...)`: adds the shared config flags and passes the resolved Config.

    `default_preset(shortcut values by config key)` may choose the preset when neither --preset nor --config is
    given (e.g. `eval` picks Video-R1's protocol for real benchmarks).
    """

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.name != "cfg"]
        extra = [
            _param("config_file", typer.Option(None, "--config", "-c", help="YAML config file (overrides the preset).",
                                               rich_help_panel="Config", metavar="FILE"), Optional[Path]),
            _param("preset", typer.Option(None, "--preset", "-p", help=preset_help(), rich_help_panel="Config",
                                          metavar="NAME"), Optional[str]),
            _param("set_", typer.Option(None, "--set", "-s", help="Override one key: dotted.key=value (repeatable).",
                                        rich_help_panel="Config", metavar="KEY=VALUE"), Optional[list[str]]),
        ]
        names = []
        for i, sc in enumerate(shortcuts):
            pname = f"_sc{i}"
            names.append((pname, sc.key))
            extra.append(_param(pname, typer.Option(None, *sc.flags, help=sc.help, rich_help_panel="Config"),
                                sc.type_))

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            config_file = kwargs.pop("config_file", None)
            preset = kwargs.pop("preset", None)
            overrides = kwargs.pop("set_", None) or []
            sc_values = {key: kwargs.pop(pname, None) for pname, key in names}
            if preset is None and config_file is None and default_preset is not None:
                preset = default_preset(sc_values)
            cfg = load_config(preset=preset, file=config_file, overrides=overrides, shortcuts=sc_values)
            return fn(cfg, *args, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        return wrapper

    return deco


def run_dir_for(cfg: Config, kind: str, run: Run) -> Path:
    d = Path(cfg.run.output_dir) / f"{kind}-{run.id}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def registered_run(cfg: Config, kind: str, run_dir: Optional[Path] = None) -> Iterator[tuple[Run, Path]]:
    """Open a registry run for this command; always ends it (finished / failed / interrupted)."""
    from pipelines import progress

    progress.configure(cfg.run.progress_every)
    check_trackers(cfg.run.report_to)
    reg = Registry(cfg.registry_path())
    attached = os.environ.get("VIDEOR1_RUN_ID")
    if attached:
        # A worker started by pipelines.launch (torchrun): the launching process owns the run and ends it.
        run = Run(reg, attached)
        d = Path(os.environ.get("VIDEOR1_RUN_DIR") or run_dir or run_dir_for(cfg, kind, run))
        run.attach_dir(d)
        yield run, d
        return
    if int(os.environ.get("RANK", "0") or 0) != 0:
        # A worker of a job launched by hand (torchrun/srun without `videor1 ... --nproc`): rank 0 records the
        # run; the others must not open one each.
        yield _NullRun(), Path(run_dir or Path(cfg.run.output_dir) / f"{kind}-rank{os.environ['RANK']}")
        return
    command = "videor1 " + " ".join(sys.argv[1:]) if sys.argv and "videor1" in Path(sys.argv[0]).name else None
    from pipelines.config import ConfigError
    from pipelines.errors import VideoR1Error

    no_work: tuple[str, Path] | None = None
    try:
        with reg.run(kind, cfg, command=command, name=cfg.run.name, tags=cfg.run.tags) as run:
            fresh = run_dir is None or not Path(run_dir).exists()  # run_dir_for makes a new one, named by run id
            d = Path(run_dir) if run_dir else run_dir_for(cfg, kind, run)
            d.mkdir(parents=True, exist_ok=True)
            run.set_run_dir(d)
            if os.environ.get("VIDEOR1_QUIET") != "1":
                err_console.print(f"[dim]run {run.id} ({kind}) -> {d}[/dim]")
            try:
                yield run, d
            except (VideoR1Error, ConfigError):
                if _did_no_work(reg, run.id, d):
                    no_work = (run.id, d if fresh else None)
                raise
    finally:
        if no_work is not None:
            _forget_run(reg, *no_work)


def _did_no_work(reg: Registry, run_id: str, run_dir: Path) -> bool:
    """A run that failed on the user's input before doing anything (no metric, no output, no file written): a
    missing --data, a model path with a typo, a checkpoint refused. Such a failure is an error message, not a run."""
    try:
        if reg.metrics(run_id):
            return False
        if any(not a.kind.startswith("external:") for a in reg.artifacts_of(run_id)["outputs"]):
            return False
    except Exception:  # noqa: BLE001 - when in doubt, keep the record
        return False
    return not (run_dir.is_dir() and any(p.is_file() for p in run_dir.rglob("*")))


def _forget_run(reg: Registry, run_id: str, run_dir: Optional[Path]) -> None:
    """Remove the row of a run that did no work, and the empty directory made for it."""
    try:
        reg.delete_run(run_id, force=True)
    except Exception:  # noqa: BLE001 - a failed clean-up must not hide the user's error
        return
    if run_dir is not None and run_dir.is_dir() and not any(p.is_file() for p in run_dir.rglob("*")):
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)


def results_on_node0(cfg: Config, run: Any, what: str) -> bool:
    """After a multi-node launch on a node other than 0: say where the results are and return True (the caller then
    prints no table and records no artifact: this node's launcher has none). The rank-0 worker runs on node 0 and
    reports to the run node 0's launcher registered: metrics, the model, the summary."""
    d = cfg.distributed
    if d.nnodes <= 1 or d.node_rank == 0:
        return False
    run.set_summary({"node_rank": d.node_rank, "nnodes": d.nnodes, "results": f"on node 0 ({d.master_addr})"})
    console.print(f"{what}: node {d.node_rank} of {d.nnodes} finished its share of the work; the results (metrics, "
                  f"model, summary) are on node 0 ({d.master_addr}), in the run its launcher registered",
                  soft_wrap=True)
    return True


# run.report_to name -> the module that must import (transformers' and accelerate's integrations load these)
TRACKER_MODULES = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "trackio": "trackio"}


def check_trackers(report_to: list[str]) -> None:
    """Fail before any work when run.report_to names a tracker that is not installed (one line, the pip command)."""
    import importlib.util

    from pipelines.errors import VideoR1Error

    for name in report_to or []:
        module = TRACKER_MODULES.get(name, name)
        if importlib.util.find_spec(module) is None and not (name == "tensorboard" and
                                                               importlib.util.find_spec("tensorboardX")):
            raise VideoR1Error(f"run.report_to names {name}, which is not installed",
                               hint=f"pip install {name}, or remove it from run.report_to (metrics always go to the "
                               "registry and <run dir>/metrics.jsonl)")


class _NullRun:
    """Stands in for a Run on non-zero ranks of a hand-launched job: records nothing."""

    id = "worker"

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None
