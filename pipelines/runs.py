"""Views over the run registry: comparisons, lineage trees, curve plots and garbage collection.

The registry itself (pipelines/registry.py) stores; this module answers the questions a user asks of it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipelines.registry import Registry, RegistryError

# The curves the paper shows, by the names the trainers log.
DEFAULT_PLOT_METRICS = [
    "rewards/accuracy", "rewards/format", "completion_length", "kl", "temporal_bonus_rate", "reward", "loss",
]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_as_preset(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A recorded config as (the preset it is closest to, {dotted key: value} of every key that differs from it):
    the whole config, exactly, in a few lines."""
    from pipelines.config import list_presets, load_config

    flat = flatten(config)
    best: tuple[str, dict[str, Any]] | None = None
    for preset in list_presets():
        ref = flatten(load_config(preset=preset).model_dump(mode="json"))
        diff = {k: v for k, v in flat.items() if ref.get(k) != v}
        if best is None or len(diff) < len(best[1]):
            best = (preset, diff)
    assert best is not None
    return best


def common_path_prefix(values: list[Any]) -> str:
    """The directory all the string values that are paths share ('' when fewer than two or none shared): compare
    tables show what follows it, the part that differs, instead of cutting long paths."""
    paths = [v for v in values if isinstance(v, str) and v.startswith("/")]
    if len(paths) < 2 or len(paths) != len([v for v in values if v is not None]):
        return ""
    parts = [p.split("/") for p in paths]
    common: list[str] = []
    for bits in zip(*(x[:-1] for x in parts)):  # directories only: a file name is never cut
        if len(set(bits)) != 1:
            break
        common.append(bits[0])
    prefix = "/".join(common)
    return prefix + "/" if len(prefix) > 1 else ""


def delta(values: list[Any]) -> float | None:
    """Last run minus first run, when both are numbers."""
    a, b = (values[0], values[-1]) if values else (None, None)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(b) - float(a)
    return None


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's / trackio's debiased exponential moving average: weight 0 = raw, 0.9 = strong smoothing."""
    out, last, n = [], 0.0, 0
    for v in values:
        if v is None or v != v:
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out.append(last / (1 - weight ** n) if weight > 0 else v)
    return out


def compare(reg: Registry, run_ids: list[str]) -> dict[str, Any]:
    """Config keys that differ between the runs, and each run's final metrics."""
    runs = [reg.get_run(r) for r in run_ids]
    flat = [flatten(r["config"]) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    diff = {k: [f.get(k) for f in flat] for k in keys if len({repr(f.get(k)) for f in flat}) > 1}
    metrics = [
        {name: s["last"] for name, s in reg.metrics_summary(r["id"]).items()} for r in runs
    ]
    names = sorted(set().union(*[m.keys() for m in metrics])) if metrics else []
    return {
        "runs": [{"id": r["id"], "kind": r["kind"], "status": r["status"], "name": r["name"]} for r in runs],
        "config_diff": diff,
        "metrics": {n: [m.get(n) for m in metrics] for n in names},
        "delta": {n: delta([m.get(n) for m in metrics]) for n in names},
        "summary": [r.get("summary") or {} for r in runs],
    }


# T-GRPO's check (Video-R1 eq. 3): the share of correct answers with ordered frames vs shuffled ones, in one panel.
TEMPORAL_PANEL = ("p_ordered", "p_shuffled")


def plot(reg: Registry, run_id: str, out: str | Path, metrics: list[str] | None = None,
         smooth: float = 0.0) -> list[str]:
    """Write a PNG with one panel per metric series (raw in light, EMA-smoothed on top when `smooth` > 0; p_ordered
    and p_shuffled share a panel); returns the names plotted. A run whose metrics are single points (an eval) gets
    a bar chart of them instead of one-point line panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not 0 <= smooth < 1:
        raise RegistryError(f"--smooth {smooth}: the EMA weight must be in [0, 1) (0 = raw, 0.9 = strong)")
    run = reg.get_run(run_id)
    series = reg.metrics(run["id"])
    if series and not metrics and all(len(v) == 1 for v in series.values()):
        return _plot_points(plt, run, series, out)
    wanted = metrics or [m for m in DEFAULT_PLOT_METRICS if m in series]
    if not metrics and all(m in series for m in TEMPORAL_PANEL):
        wanted.append("p_ordered vs p_shuffled")
    if not wanted:
        wanted = sorted(series)[:6]
    missing = [m for m in wanted if m not in series and m != "p_ordered vs p_shuffled"]
    if missing:
        raise RegistryError(
            f"run {run['id']} has no metric {', '.join(missing)}; it has: {', '.join(sorted(series)) or 'none'}"
        )
    if not wanted:
        raise RegistryError(f"run {run['id']} logged no metrics to plot")
    cols = min(3, len(wanted))
    rows = (len(wanted) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, wanted):
        lines = TEMPORAL_PANEL if name == "p_ordered vs p_shuffled" else (name,)
        for i, m in enumerate(lines):
            steps, vals = zip(*series[m])
            color = f"C{i}"
            if smooth > 0:
                ax.plot(steps, vals, lw=0.8, alpha=0.3, color=color)
                ax.plot(steps, ema(list(vals), smooth), lw=1.4, color=color, label=m)
            else:
                ax.plot(steps, vals, lw=1.2, color=color, label=m)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        ax.set_title(name + (f" (EMA {smooth:g})" if smooth > 0 else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(wanted):]:
        ax.axis("off")
    fig.suptitle(f"{run['kind']} {run['id']}", fontsize=11)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return list(wanted)


def _plot_points(plt: Any, run: dict[str, Any], series: dict[str, list], out: str | Path) -> list[str]:
    """Single-value metrics (an eval run: one value per benchmark and mode) as one horizontal bar chart."""
    names = sorted(series)
    values = [series[n][0][1] for n in names]
    fig, ax = plt.subplots(figsize=(7.5, max(2.0, 0.28 * len(names) + 1.0)))
    ax.barh(range(len(names)), values, color="C0")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        if v is not None:
            ax.text(v, i, f" {v:.4g}", va="center", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{run['kind']} {run['id']}: one value per metric", fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return names


def gc(reg: Registry, statuses: tuple[str, ...] = ("failed", "interrupted"), dry_run: bool = False,
       delete_files: bool = True) -> dict[str, list[str]]:
    """Delete runs with these statuses (and their run directories), never one whose outputs another run uses."""
    removed, kept = [], []
    for r in reg.list_runs():
        if r["status"] not in statuses:
            continue
        if reg.dependents(r["id"]):
            kept.append(r["id"])
            continue
        removed.append(r["id"])
        if dry_run:
            continue
        if delete_files:
            _remove_run_files(reg, r)
        reg.delete_run(r["id"])
    return {"removed": removed, "kept": kept}


def remove(reg: Registry, run_id: str, delete_files: bool = False) -> None:
    r = reg.get_run(run_id)
    reg.delete_run(r["id"])  # raises when another run depends on it
    if delete_files:
        _remove_run_files(reg, r)


def _remove_run_files(reg: Registry, r: dict[str, Any]) -> None:
    """Remove the run directory and its output artifacts, unless some other run's artifact lives inside them."""
    run_dir = r.get("run_dir")
    if not run_dir or not Path(run_dir).exists():
        return
    others = {a.path for rid in _all_ids(reg) if rid != r["id"] for a in reg.artifacts_of(rid)["outputs"]}
    rd = Path(run_dir).resolve()
    if any(Path(p).resolve().is_relative_to(rd) for p in others):
        return
    shutil.rmtree(rd, ignore_errors=True)


def _all_ids(reg: Registry) -> list[str]:
    return [r["id"] for r in reg.list_runs()]
