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
    "rollout/logp_diff_mean", "rollout/logp_diff_max",  # rl.backend=vllm: rollout vs trainer log-prob mismatch
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
        "summary": [r.get("summary") or {} for r in runs],
    }


def plot(reg: Registry, run_id: str, out: str | Path, metrics: list[str] | None = None) -> list[str]:
    """Write a PNG with one panel per metric series; returns the names plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = reg.get_run(run_id)
    series = reg.metrics(run["id"])
    wanted = metrics or [m for m in DEFAULT_PLOT_METRICS if m in series]
    if not wanted:
        wanted = sorted(series)[:6]
    missing = [m for m in wanted if m not in series]
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
        steps, vals = zip(*series[name])
        ax.plot(steps, vals, lw=1.2)
        ax.set_title(name, fontsize=10)
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
