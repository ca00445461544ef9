"""Views over the run registry: comparisons, lineage trees, curve plots and garbage collection.

The registry itself (pipelines/registry.py) stores; this module answers the questions a user asks of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pipelines.registry import Registry, RegistryError

# The curves the paper shows, by the names the trainers log.
DEFAULT_PLOT_METRICS = [
    "rewards/accuracy", "rewards/format", "completion_length", "kl", "temporal_bonus_rate", "reward", "loss",
    "rollout/logp_diff_mean", "rollout/logp_diff_max",  # rl.backend=vllm: rollout vs trainer log-prob mismatch
    "rollout/is_ratio_mean", "rollout/is_masked_fraction",  # rl.rollout_correction
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


# Where the trainers write resumable checkpoints, relative to a run's directory: RL <run>/checkpoints/step-N,
# SFT (transformers.Trainer) <output dir>/checkpoint-N.
CHECKPOINT_GLOBS = ("checkpoints/step-*", "checkpoint-*")


def dir_size(path: str | Path) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()) if p.exists() else 0


def checkpoints(r: dict[str, Any]) -> list[Path]:
    """A run's resumable checkpoints (its run directory, and sft.output_dir for train-sft), oldest step first."""
    dirs = [Path(r["run_dir"])] if r.get("run_dir") else []
    cfg = r.get("config") or {}
    if isinstance(cfg, str):  # list_runs leaves the config as stored (JSON text)
        try:
            cfg = json.loads(cfg)
        except ValueError:
            cfg = {}
    out_dir = (cfg.get("sft") or {}).get("output_dir") if r.get("kind") == "train-sft" else None
    if out_dir:
        dirs.append(Path(out_dir))
    found = {p.resolve() for d in dirs if d.is_dir() for g in CHECKPOINT_GLOBS for p in d.glob(g) if p.is_dir()}

    def step(p: Path) -> int:
        tail = p.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    return sorted(found, key=lambda p: (step(p), str(p)))


def resumed_by(reg: Registry, r: dict[str, Any], runs: list[dict[str, Any]]) -> str | None:
    """The id of a later run that continued this one: it recorded a path inside this run's directory (the checkpoint
    it resumed from, or the output directory SFT resumes into) or names one as `resumed_from`."""
    if not r.get("run_dir"):
        return None
    rd = Path(r["run_dir"]).resolve()

    def inside(p: Any) -> bool:
        return isinstance(p, str) and bool(p) and Path(p).resolve().is_relative_to(rd)

    for o in runs:
        if o["id"] == r["id"] or (o.get("started_at") or 0) < (r.get("started_at") or 0):
            continue
        arts = reg.artifacts_of(o["id"])
        if any(inside(a.path) for a in arts["inputs"] + arts["outputs"]):
            return o["id"]
        if inside((o.get("summary") or {}).get("resumed_from")):
            return o["id"]
    return None


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
       delete_files: bool = True, intermediate_checkpoints: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Collect runs with these statuses, and with ``intermediate_checkpoints`` the older checkpoints of finished runs.

    What goes: a failed/interrupted run with no checkpoint (nothing to resume): the run and its directory; and the
    checkpoints of one that a later run resumed from (superseded): only the checkpoints, the run stays in the registry
    so the lineage of the run that continued it keeps its steps. What stays: a run whose outputs another run uses, and
    a failed/interrupted run with checkpoints that no run has resumed (a killed run's only copy of its work:
    `--resume` it, or `videor1 runs rm ID --files`). Of a finished run only checkpoints older than its newest go (the
    newest extends the run with --resume; the final model is never touched). Returns {"removed": [...], "kept":
    [...]}, each {id, kind, status, reason, paths, bytes, files_only?}; with ``dry_run`` nothing is deleted."""
    removed: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    runs = reg.list_runs()

    def drop_checkpoints(entry: dict[str, Any], paths: list[Path], reason: str) -> None:
        if not delete_files:  # --keep-files: checkpoints are files
            return
        entry.update(reason=reason, paths=[str(p) for p in paths], bytes=sum(dir_size(p) for p in paths),
                     files_only=True)
        removed.append(entry)
        if not dry_run:
            for p in paths:
                shutil.rmtree(p, ignore_errors=True)

    for r in runs:
        entry = {"id": r["id"], "kind": r["kind"], "status": r["status"], "paths": [], "bytes": 0}
        if r["status"] == "finished" and intermediate_checkpoints:
            old = checkpoints(r)[:-1]
            if old:
                drop_checkpoints(entry, old, f"{len(old)} intermediate checkpoint(s) of a finished run (newest kept)")
            continue
        if r["status"] not in statuses:
            continue
        ckpts = checkpoints(r)
        by = resumed_by(reg, r, runs)
        if by is not None:  # superseded: its checkpoints may go, the run itself stays (a later gc too)
            if ckpts and delete_files:
                drop_checkpoints(entry, ckpts, f"resumed by run {by}; the run stays for its lineage")
            else:
                kept.append({**entry, "reason": f"resumed by run {by}: kept for its lineage"})
            continue
        if ckpts:
            kept.append({**entry, "reason": f"{len(ckpts)} checkpoint(s) never resumed (resume it with --resume, or "
                         f"`videor1 runs rm {r['id']} --files`)", "paths": [str(p) for p in ckpts],
                         "bytes": sum(dir_size(p) for p in ckpts)})
            continue
        deps = reg.dependents(r["id"])
        if deps:
            kept.append({**entry, "reason": f"runs {', '.join(deps)} use its outputs"})
            continue
        rd = r.get("run_dir")
        files = delete_files and rd and Path(rd).exists() and not _holds_other_outputs(reg, r)
        entry.update(reason="no checkpoint to resume from", paths=[str(rd)] if files else [],
                     bytes=dir_size(rd) if files else 0)
        removed.append(entry)
        if dry_run:
            continue
        if files:
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
    if not run_dir or not Path(run_dir).exists() or _holds_other_outputs(reg, r):
        return
    shutil.rmtree(Path(run_dir).resolve(), ignore_errors=True)


def _holds_other_outputs(reg: Registry, r: dict[str, Any]) -> bool:
    """Some other run's output lives inside this run's directory (e.g. an SFT resumed into the same folder). Inputs
    recorded as 'external:*' (the checkpoint a resume started from) are not outputs of that run."""
    rd = Path(r["run_dir"]).resolve()
    others = {a.path for rid in _all_ids(reg) if rid != r["id"] for a in reg.artifacts_of(rid)["outputs"]
              if not a.kind.startswith("external:")}
    return any(Path(p).resolve().is_relative_to(rd) for p in others)


def _all_ids(reg: Registry) -> list[str]:
    return [r["id"] for r in reg.list_runs()]
