"""Progress of a long loop: rich's live bar on a terminal, a plain line every N seconds anywhere else.

On a terminal `rich.progress.Progress` redraws one line in place. With output going to a file, a pipe, CI or `nohup`
it draws nothing until the end, so a 30-minute stage would log nothing at all. `progress_bar(label, ...)` returns
rich's Progress on a terminal and a `PlainProgress` otherwise, with the subset of Progress's API the stages use
(add_task / update / advance / start / stop / context manager / tasks), which prints

    [progress] sft 120/675 (17.8%)  0.65 it/s  ETA 14m13s  elapsed 3m05s  loss 0.3412

at the start, every `interval` seconds (config `run.progress_every`, env VIDEOR1_PROGRESS_EVERY; default 30 s) and
at the end. The lines are plain text (no markup, no wrapping), one per call, flushed.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TextIO

ENV_INTERVAL = "VIDEOR1_PROGRESS_EVERY"
DEFAULT_INTERVAL = 30.0
MIN_RATE_SECONDS = 0.5
_MARKUP = re.compile(r"\[/?[a-z][a-z0-9 ._#-]*\]")


def configure(every: float | None) -> None:
    """Set the plain-progress interval for this process and the processes it starts (shards, ranks)."""
    if every is not None:
        os.environ[ENV_INTERVAL] = str(float(every))


def interval() -> float:
    try:
        v = float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return v if v > 0 else DEFAULT_INTERVAL


def fmt_duration(seconds: float | None) -> str:
    """12.3 -> '12s', 853 -> '14m13s', 7322 -> '2h02m'."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_line(label: str, completed: float, total: float | None, elapsed: float, rate: float | None,
                  info: str = "", unit: str = "it") -> str:
    """One plain progress line (pure: tested by hand)."""
    parts = [f"[progress] {label} {int(completed)}/{int(total) if total else '?'}"]
    if total:
        parts[0] += f" ({100.0 * completed / total:.1f}%)"
    if rate:
        parts.append(f"{rate:.3g} {unit}/s")
        if total:
            parts.append(f"ETA {fmt_duration(max(total - completed, 0) / rate)}")
    parts.append(f"elapsed {fmt_duration(elapsed)}")
    info = _MARKUP.sub("", info).strip()
    if info:
        parts.append(info)
    return "  ".join(parts)


@dataclass
class _Task:
    id: int
    description: str
    total: Optional[float]
    completed: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    start_completed: float = 0.0
    clock: Callable[[], float] = time.monotonic
    start_time: float = -1.0

    def __post_init__(self) -> None:
        if self.start_time < 0:
            self.start_time = self.clock()

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start_time

    @property
    def speed(self) -> Optional[float]:
        """Items per second since the task was added (work resumed from a checkpoint is not counted); None over the
        first half second, when one item's timing says nothing (a task added just as its first item ends)."""
        done, dt = self.completed - self.start_completed, self.elapsed
        return done / dt if done > 0 and dt >= MIN_RATE_SECONDS else None

    @property
    def finished(self) -> bool:
        return self.total is not None and self.completed >= self.total


class PlainProgress:
    """rich.progress.Progress's API, printing a plain line every `every` seconds (and at start and stop)."""

    def __init__(self, label: str, file: TextIO | None = None, every: float | None = None, unit: str = "it",
                 disable: bool = False, clock: Callable[[], float] = time.monotonic):
        self.label, self.unit, self.disable, self.clock = label, unit, disable, clock
        self.file = file
        self.every = every if every is not None else interval()
        self.tasks: list[_Task] = []
        self._last: float | None = None
        self._last_completed: float | None = None
        self._started = False

    # rich's API --------------------------------------------------------------------------------------------------
    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: float = 0,
                 visible: bool = True, **fields: Any) -> int:
        t = _Task(len(self.tasks), description, total, float(completed or 0), dict(fields), float(completed or 0),
                  self.clock)
        self.tasks.append(t)
        return t.id

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, visible: bool | None = None,
               refresh: bool = False, **fields: Any) -> None:
        t = self.tasks[task_id]
        if total is not None:
            t.total = total
        if completed is not None:
            t.completed = float(completed)
        if advance is not None:
            t.completed += advance
        t.fields.update(fields)
        self._maybe_print()

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def start(self) -> None:
        self._started = True

    def stop(self) -> None:
        if self._started and self.tasks and self.tasks[0].completed != self._last_completed:
            self._print()  # the final state, unless the last line already showed it
        self._started = False

    def refresh(self) -> None:
        pass

    def __enter__(self) -> "PlainProgress":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------------------------------------
    def _maybe_print(self) -> None:
        now = self.clock()
        if self._last is None or now - self._last >= self.every:
            self._print(now)

    def _print(self, now: float | None = None) -> None:
        self._last = self.clock() if now is None else now
        if self.disable or not self.tasks:
            return
        t = self.tasks[0]
        self._last_completed = t.completed
        # the rate is computed here; a task's own "rate" text (for rich's column) would repeat it
        info = "  ".join(str(v) for k, v in t.fields.items()
                         if k != "rate" and isinstance(v, (str, int, float)) and str(v).strip())
        line = progress_line(self.label, t.completed, t.total, t.elapsed, t.speed, info, self.unit)
        f = self.file or sys.stderr
        print(line, file=f, flush=True)


def is_terminal(console: Any = None) -> bool:
    """Whether rich would draw a live bar: the console's own verdict (FORCE_COLOR / TTY_COMPATIBLE respected)."""
    if console is not None and hasattr(console, "is_terminal"):
        return bool(console.is_terminal)
    return sys.stderr.isatty()


def progress_bar(label: str, *columns: Any, console: Any = None, transient: bool = False, disable: bool = False,
                 unit: str = "it", **kwargs: Any) -> Any:
    """rich's `Progress(*columns, console=..., ...)` on a terminal; a `PlainProgress(label)` otherwise."""
    if disable or os.environ.get("VIDEOR1_QUIET") == "1":
        return PlainProgress(label, disable=True)
    if is_terminal(console):
        from rich.progress import Progress

        return Progress(*columns, console=console, transient=transient, **kwargs)
    return PlainProgress(label, file=getattr(console, "file", None), unit=unit)
