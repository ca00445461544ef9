"""`videor1 quickstart`: the whole Video-R1 recipe on the synthetic world and the tiny model, on a CPU.

Per seed, each stage is the real command with the previous stage's output paths, so every stage is a registered run
and lineage links them without any bookkeeping here (the registry matches an input path to the artifact that
produced it):

    data synth  -> world/{sft.json (gold CoT, small), rl.json (no CoT, larger), test.json}
    model tiny  -> tiny-model/                        (random weights)
    eval        -> eval-untrained/results.json        (the untrained model on test.json)
    train sft   -> sft-model/                         (cold start on sft.json)
    eval        -> eval-sft/results.json
    train rl    -> rl-grpo-model/                     (quickstart.algo, GRPO, from sft-model on rl.json)
    eval        -> eval-rl-grpo/results.json
    [train rl --algo tgrpo, eval]                     (--compare-algos: T-GRPO from the same SFT model)

Both cores (issue 18; BENCHMARKS.md "Quickstart on both cores"): train sft and train rl run on quickstart.nproc (2)
data-parallel ranks with the same global batch, one torch thread per process; the untrained and SFT evals run in a
background process beside the next training stage (quickstart.overlap_evals).

This module never imports the CLI: the caller passes ``invoke(argv)``, which runs one ``videor1`` command line
(in-process). Everything here is planning (the argv of each stage), reading results back, and the table: chance,
untrained, SFT and RL accuracy overall, per problem type and on the order-dependent questions, per seed and mean.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from pipelines.errors import VideoR1Error
from pipelines.models.families import DEFAULT_FAMILY

MARKER = ".videor1-quickstart"
PROBLEM_TYPES = ("multiple choice", "numerical", "OCR", "free-form", "regression")
ORDER_KEY = "order-dependent"

# --smoke: the same chain at toy sizes (CI; no accuracy claim). Keys are config keys set on every stage.
SMOKE_SIZES = {"train": 16, "sft": 16, "test": 12, "sft_steps": 2, "rl_steps": 1}
SMOKE_OVERRIDES = {
    "sft.per_device_batch_size": 4,
    "sft.logging_steps": 1,
    "sft.save_steps": 1000,
    "rl.per_device_prompts": 2,
    "rl.num_generations": 4,
    "rl.logging_steps": 1,
    "eval.batch_size": 16,
    "eval.max_new_tokens": 24,
}


class QuickstartError(VideoR1Error):
    """A stage of the quickstart failed, or its outputs are not where they should be."""


# ---------------------------------------------------------------------------------------------------------------------
# Plan
@dataclass
class Stage:
    key: str          # synth, tiny, eval-untrained, sft, eval-sft, rl-tgrpo, eval-rl-tgrpo, ...
    title: str        # what the progress line says
    argv: list[str]   # the videor1 command line (without "videor1")
    output: Path      # the directory/file it produces
    ranks: int = 1    # > 1: torchrun data-parallel ranks (a free master port is added when it starts)
    background: bool = False  # runs in its own process beside the next stages (nothing later reads its output)


@dataclass
class SeedPlan:
    seed: int
    dir: Path
    world: Path
    stages: list[Stage] = field(default_factory=list)
    evals: dict[str, Path] = field(default_factory=dict)  # model label -> eval dir (results.json inside)


def algos(cfg) -> list[str]:
    """The RL algorithms trained: quickstart.algo (GRPO by default), plus the other one with compare_algos."""
    main = cfg.quickstart.algo
    if cfg.quickstart.compare_algos:
        return [main] + [a for a in ("tgrpo", "grpo") if a != main]
    return [main]


def seeds_of(cfg) -> list[int]:
    return list(cfg.quickstart.seeds) if cfg.quickstart.seeds else [cfg.run.seed]


def plan_seed(cfg, seed: int, out: Path, config_file: Path, tag: str) -> SeedPlan:
    """The command line of every stage of one seed (all paths absolute, so the cwd never matters)."""
    q = cfg.quickstart
    d = (out / f"seed-{seed}").resolve()
    world = d / "world"
    sp = SeedPlan(seed=seed, dir=d, world=world)
    common = ["--config", str(config_file), "--set", f"run.seed={seed}"]
    if not cfg.video.cache_dir:  # decoded frames kept on disk: SFT epochs, RL and the three evals decode once
        common += ["--set", f"video.cache_dir={d / 'frame-cache'}"]

    def named(stage: str) -> list[str]:
        return ["--set", f"run.name={tag}-s{seed}-{stage}"]

    def add(key: str, title: str, argv: list[str], output: Path, ranks: int = 1, background: bool = False) -> None:
        sp.stages.append(Stage(key, title, argv, output, ranks, background))

    ranks = max(1, q.nproc)
    dist = ["--set", f"distributed.nproc={ranks}"] if ranks > 1 else []

    add("synth", f"data synth ({q.train} RL + {q.sft} SFT + {q.test} test records)",
        ["data", "synth", *common, *named("data"), "--out", str(world), "--train", str(q.train), "--sft", str(q.sft),
         "--test", str(q.test), "--seed", str(seed), *([] if q.shuffle_options else ["--fixed-options"])], world)
    tiny = d / "tiny-model"
    family = ["--family", q.family] if q.family != DEFAULT_FAMILY else []
    add("tiny", " ".join(["model tiny", *family]),
        ["model", "tiny", *common, *named("model"), "--out", str(tiny), "--seed", str(seed), *family], tiny)

    def evaluate(label: str, model: Path, background: bool = False) -> None:
        e = d / f"eval-{label}"
        sp.evals[label] = e
        add(f"eval-{label}", f"eval {label} model on {q.test} held-out questions"
            + (" (in the background)" if background else ""),
            ["eval", *common, *named(f"eval-{label}"), "--model", str(model), "--data", str(world / "test.json"),
             "--bench", "synthetic", "--out", str(e), "--set", f"eval.scoring={SCORING}"], e,  # one headline
            background=background)

    # With overlap_evals, an eval followed by a training stage runs beside it in its own process; the last one runs
    # in the foreground (nothing is left to overlap it with).
    evaluate("untrained", tiny, background=q.overlap_evals)
    sft = d / "sft-model"
    on = f" on {ranks} ranks" if ranks > 1 else ""
    add("sft", f"train sft ({q.sft_steps} steps on {q.sft} CoT records{on})",
        ["train", "sft", *common, *named("sft"), "--model", str(tiny), "--data", str(world / "sft.json"),
         "--max-steps", str(q.sft_steps), "--out", str(sft), *dist], sft, ranks)
    evaluate("sft", sft, background=q.overlap_evals)
    rl_algos = algos(cfg)
    for k, algo in enumerate(rl_algos):
        m = d / f"rl-{algo}-model"
        add(f"rl-{algo}", f"train rl --algo {algo} ({q.rl_steps} steps on {q.train} records without CoT{on})",
            ["train", "rl", *common, *named(f"rl-{algo}"), "--model", str(sft), "--data", str(world / "rl.json"),
             "--algo", algo, "--max-steps", str(q.rl_steps), "--set", f"rl.output_dir={m}",
             *(["--set", "model.freeze_vision=true"] if q.rl_freeze_vision else []), *dist], m, ranks)
        evaluate(f"rl-{algo}", m, background=q.overlap_evals and k + 1 < len(rl_algos))
    return sp


def per_rank(total: int, ranks: int, key: str) -> int:
    """A global batch split over data-parallel ranks (each rank gets an equal share)."""
    if total % ranks:
        raise QuickstartError(f"{key}={total} cannot be split over quickstart.nproc={ranks} data-parallel ranks",
                              hint=f"set quickstart.nproc to a divisor of {total}, or {key} to a multiple of {ranks}")
    return total // ranks


def stage_config(cfg, out: Path, registry: Path, tag: str, smoke: bool) -> dict[str, Any]:
    """The resolved config every stage starts from (written to <out>/quickstart-config.yaml)."""
    data = cfg.model_dump(mode="json")
    data["run"]["output_dir"] = str((out / "runs").resolve())
    data["run"]["registry"] = str(Path(registry).resolve())
    data["run"]["tags"] = list(dict.fromkeys([*data["run"].get("tags", []), tag]))
    data["run"]["name"] = None
    data["prompt"]["template"] = cfg.quickstart.template
    data["data"]["num_workers"] = cfg.quickstart.data_workers
    data["run"]["torch_threads"] = cfg.quickstart.torch_threads
    if cfg.quickstart.sft_learning_rate:
        data["sft"]["learning_rate"] = cfg.quickstart.sft_learning_rate
    if cfg.quickstart.rl_learning_rate:
        data["rl"]["learning_rate"] = cfg.quickstart.rl_learning_rate
    data["rl"]["algo"] = cfg.quickstart.algo  # what the config file records is what the RL stage runs
    if smoke:
        for key, value in SMOKE_OVERRIDES.items():
            sec, k = key.split(".")
            data[sec][k] = value
    family_budgets(data, cfg.quickstart.family)
    # The global batch is the configured one whatever the ranks: each rank takes its share (the SFT batches are the
    # same samples; RL's step draws the same prompts, each rank sampling with seed + rank).
    ranks = max(1, cfg.quickstart.nproc)
    data["sft"]["per_device_batch_size"] = per_rank(data["sft"]["per_device_batch_size"], ranks,
                                                    "sft.per_device_batch_size")
    data["rl"]["per_device_prompts"] = per_rank(data["rl"]["per_device_prompts"], ranks, "rl.per_device_prompts")
    data["rl"]["num_epochs"] = max(data["rl"]["num_epochs"], rl_epochs_needed(
        data, cfg.quickstart.rl_steps, cfg.quickstart.train, ranks))
    return data


def rl_epochs_needed(data: dict[str, Any], steps: int, records: int, ranks: int) -> int:
    """Passes over the RL pool that quickstart.rl_steps takes: `train rl` stops at rl.num_epochs, so without this a
    step count above one pass (4,000 prompts / 32 per step = 125) would be cut short silently. Counted by the RL
    trainer's own arithmetic (`pipelines.rl.schedule`), from the stage config it will run with."""
    from pipelines.rl.schedule import epochs_for, steps_per_epoch

    rl = data["rl"]
    if data["data"].get("max_samples"):
        records = min(records, data["data"]["max_samples"])
    data_ranks = max(1, ranks // max(1, data["distributed"].get("sequence_parallel") or 1))
    per_epoch = steps_per_epoch(records, data_ranks, rl["per_device_prompts"], rl["gradient_accumulation_steps"])
    return epochs_for(steps, per_epoch)


def family_budgets(data: dict[str, Any], family: str) -> None:
    """Pixel budgets in the family's terms: the same visual tokens per frame as the default family's settings
    (56x56 frames = 4 tokens per patch pair of 28 become 64x64 with Qwen3's 32)."""
    from pipelines.models.families import ADAPTERS, DEFAULT_FAMILY

    ratio = (ADAPTERS[family].factor / ADAPTERS[DEFAULT_FAMILY].factor) ** 2
    if ratio == 1:
        return
    for sec, keys in (("video", ("min_pixels", "max_pixels", "total_pixels")), ("image", ("min_pixels",
                                                                                        "max_pixels"))):
        for k in keys:
            data[sec][k] = round(data[sec][k] * ratio)


def apply_smoke(cfg) -> None:
    for k, v in SMOKE_SIZES.items():
        setattr(cfg.quickstart, k, v)


def prepare_dir(d: Path) -> None:
    """Empty a seed directory of a previous quickstart (only one this command made: it holds the marker)."""
    if d.exists() and any(d.iterdir()):
        if not (d / MARKER).exists():
            raise QuickstartError(f"{d} exists and was not written by `videor1 quickstart`; not overwriting it",
                                  hint="pass another --out directory")
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / MARKER).write_text("written by videor1 quickstart; the next quickstart into this directory replaces it\n")


# ---------------------------------------------------------------------------------------------------------------------
# Reading results back (pure over the dicts)
def _pct(x: float | None) -> float | None:
    return None if x is None else round(100.0 * x, 2)


def chance_of(world: dict[str, Any], split: str = "test") -> dict[str, Any]:
    """Chance (percent) of a uniform guess on a split: overall, per problem type and on order-dependent questions,
    weighted by the split's questions per data_source (world.json's chance table)."""
    table = world["chance"]
    by_src = world["counts"][split]["by_data_source"]

    def weighted(pred: Callable[[str], bool]) -> float | None:
        n = sum(c for s, c in by_src.items() if pred(s))
        if not n:
            return None
        return _pct(sum(table[s]["chance"] * c for s, c in by_src.items() if pred(s)) / n)

    per_type = {}
    for pt in PROBLEM_TYPES:
        v = weighted(lambda s, pt=pt: table[s]["problem_type"] == pt)
        if v is not None:
            per_type[pt] = v
    return {"overall": weighted(lambda s: True), "per_type": per_type,
            "order_dependent": weighted(lambda s: table[s]["order_dependent"])}


# The synthetic world's own scoring (the training accuracy reward: exact letter / number, OCR 1-WER, free-form
# ROUGE, regression 1 - relative error) is the one world.json's chance levels are computed in. Video-R1's eval mode
# scores OCR and free-form 0 whatever the answer, so it would put those questions below their own chance level.
SCORING = "official"


def scores_of(results: dict[str, Any], bench: str = "synthetic", mode: str = SCORING) -> dict[str, Any]:
    """Accuracy (percent) from an eval results.json: overall, per problem type, order-dependent, per data_source."""
    b = results["benchmarks"][bench][mode]

    def r(v: Any) -> Any:
        return round(v, 2) if isinstance(v, float) else v

    return {
        "overall": r(b["overall"]),
        "per_type": {pt: r(v["score"]) for pt, v in b["by_problem_type"].items()},
        "order_dependent": r((b.get("by_order") or {}).get(ORDER_KEY, {}).get("score")),
        "by_data_source": {s: r(v["score"]) for s, v in (b.get("by_data_source") or {}).items()},
        "n": results["benchmarks"][bench]["n"],
        "errors": results["benchmarks"][bench]["errors"],
    }


def column_name(label: str, main_algo: str) -> str:
    """The --json key of a model label: rl-<main algo> is "rl", another algorithm its own name (e.g. "grpo")."""
    return "rl" if label == f"rl-{main_algo}" else label.removeprefix("rl-")


def seed_table(chance: dict[str, Any], scores: dict[str, dict[str, Any]], main_algo: str) -> dict[str, Any]:
    """One seed's row set in the --json shape. `scores`: label (untrained, sft, rl-<algo>) -> scores_of(...)."""
    labels = {column_name(label, main_algo): label for label in ("untrained", "sft", f"rl-{main_algo}", *scores)}

    def col(get: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        return {name: get(scores[label]) if label in scores else None for name, label in labels.items()}

    out: dict[str, Any] = {"chance": chance["overall"]}
    out.update(col(lambda s: s["overall"]))
    out["order_dependent"] = {"chance": chance["order_dependent"], **col(lambda s: s["order_dependent"])}
    types = [pt for pt in PROBLEM_TYPES if pt in chance["per_type"] or any(pt in s["per_type"] for s in scores.values())]
    out["per_type"] = {pt: {"chance": chance["per_type"].get(pt), **col(lambda s, pt=pt: s["per_type"].get(pt))}
                       for pt in types}
    out["n_test"] = next((s["n"] for s in scores.values()), None)
    out["rl_algo"] = main_algo
    return out


def _mean(values: Sequence[Any]) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return round(sum(vals) / len(vals), 2) if vals else None


def mean_tables(tables: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The element-wise mean of per-seed tables (numbers averaged, nested dicts recursed)."""
    if len(tables) == 1:
        return {k: v for k, v in tables[0].items()}

    def merge(items: Sequence[Any]) -> Any:
        first = next((x for x in items if x is not None), None)
        if isinstance(first, dict):
            keys = list(dict.fromkeys(k for x in items if isinstance(x, dict) for k in x))
            return {k: merge([x.get(k) if isinstance(x, dict) else None for x in items]) for k in keys}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            return _mean(items)
        return first

    return merge(list(tables))


# ---------------------------------------------------------------------------------------------------------------------
# Orchestration
@dataclass
class QuickstartResult:
    table: dict[str, Any]                 # the --json object (means over seeds + "seeds": per-seed tables)
    seed_dirs: dict[int, Path]
    stage_seconds: dict[str, float]
    eval_results: list[Path]              # every results.json (the quickstart run's inputs)


def stage_argv(st: Stage) -> list[str]:
    """The command line a stage runs with: data-parallel ones get a free master port at the moment they start (the
    launcher would pick one too; naming it keeps the stage's command line complete in the log)."""
    from pipelines.launch import free_port

    return [*st.argv, "--set", f"distributed.master_port={free_port()}"] if st.ranks > 1 else list(st.argv)


class _Background:
    """Stages running in their own processes (spawn(argv, log) -> a Popen). A watcher thread per stage notes when it
    ends (its seconds are its own, not when the chain looks); the chain reports (or fails on) the ended ones after
    each foreground stage, and waits for all before the table is read."""

    def __init__(self, spawn: Callable[[list[str], Path], Any]):
        self.spawn = spawn
        self.running: list[dict[str, Any]] = []

    def start(self, st: Stage, log_file: Path) -> None:
        job = {"stage": st, "proc": self.spawn(stage_argv(st), log_file), "t0": time.perf_counter(), "log": log_file,
               "seconds": None, "code": None}

        def watch() -> None:
            job["code"] = job["proc"].wait()
            job["seconds"] = time.perf_counter() - job["t0"]

        job["thread"] = threading.Thread(target=watch, daemon=True)
        job["thread"].start()
        self.running.append(job)

    def stop(self) -> None:
        """The chain failed: end the background stages too (their runs are then marked interrupted)."""
        for job in self.running:
            if job["proc"].poll() is None:
                job["proc"].terminate()
        for job in self.running:
            job["thread"].join(timeout=30)
            if job["proc"].poll() is None:  # a stage that ignores SIGTERM is killed
                job["proc"].kill()
        self.running = []

    def reap(self, on_done: Callable[[Stage, float], None], wait: bool = False) -> None:
        """Report the stages that ended (all of them, waiting, with wait=True); raise on the first that failed."""
        for job in list(self.running):
            if wait:
                job["thread"].join()
            if job["seconds"] is None:
                continue
            self.running.remove(job)
            st, code, log_file = job["stage"], job["code"], job["log"]
            if code != 0:
                tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:]) if log_file.exists() else ""
                raise QuickstartError(f"stage `videor1 {' '.join(st.argv[:1])}` ({st.key}, in the background) failed "
                                      f"(exit {code}); the end of its log {log_file}:\n{tail}",
                                      hint="the stage's run is marked failed in the registry: videor1 runs ls")
            on_done(st, job["seconds"])


def run_quickstart(
    cfg,
    invoke: Callable[[list[str]], None],
    *,
    spawn: Callable[[list[str], Path], Any] | None = None,
    registry: Path,
    smoke: bool = False,
    tag: str = "quickstart",
    log: Callable[[str], None] = lambda s: None,
    on_stage: Callable[[int, int, int, Stage, float | None], None] | None = None,
) -> QuickstartResult:
    """Run the chain for every seed; `invoke(argv)` runs one videor1 command in this process (raising on failure);
    `spawn(argv, log_file)` starts one in its own process (returning a Popen) for the background stages (without it,
    every stage runs through invoke)."""
    if smoke:
        apply_smoke(cfg)
    out = Path(cfg.quickstart.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "quickstart-config.yaml"
    config_file.write_text(
        "# The resolved config every stage of `videor1 quickstart` starts from (each adds its own --set).\n"
        + yaml.safe_dump(stage_config(cfg, out, registry, tag, smoke), sort_keys=False))
    seeds = seeds_of(cfg)
    main_algo = algos(cfg)[0]
    t0 = time.perf_counter()
    tables, seed_dirs, stage_seconds, eval_files = [], {}, {}, []
    for si, seed in enumerate(seeds):
        sp = plan_seed(cfg, seed, out, config_file, tag)
        prepare_dir(sp.dir)
        seed_dirs[seed] = sp.dir
        background = _Background(spawn) if spawn else None

        def done(st: Stage, dt: float, i: int) -> None:
            stage_seconds[f"seed-{seed}/{st.key}"] = round(dt, 1)
            if not st.output.exists():
                raise QuickstartError(f"stage `videor1 {' '.join(st.argv[:2])}` finished but wrote no {st.output}")
            if on_stage:
                on_stage(si, i, len(sp.stages), st, dt)

        t_seed = time.perf_counter()
        index = {st.key: i for i, st in enumerate(sp.stages)}
        try:
            for i, st in enumerate(sp.stages):
                if on_stage:
                    on_stage(si, i, len(sp.stages), st, None)
                if st.background and background is not None:
                    background.start(st, sp.dir / f"{st.key}.log")
                    continue
                ts = time.perf_counter()
                invoke(stage_argv(st))
                done(st, time.perf_counter() - ts, i)
                if background is not None:
                    background.reap(lambda b, dt: done(b, dt, index[b.key]))
            if background is not None:
                background.reap(lambda b, dt: done(b, dt, index[b.key]), wait=True)
        except BaseException:
            if background is not None:
                background.stop()
            raise
        seed_seconds = time.perf_counter() - t_seed
        world = json.loads((sp.world / "world.json").read_text())
        scores = {}
        for label, e in sp.evals.items():
            res_file = e / "results.json"
            if not res_file.exists():
                raise QuickstartError(f"eval of the {label} model wrote no {res_file}")
            eval_files.append(res_file)
            scores[label] = scores_of(json.loads(res_file.read_text()))
        t = seed_table(chance_of(world), scores, main_algo)
        t["seed"] = seed
        t["by_data_source"] = {
            src: {"chance": _pct(world["chance"][src]["chance"]),
                  **{column_name(label, main_algo): s["by_data_source"].get(src) for label, s in scores.items()}}
            for src in world["counts"]["test"]["by_data_source"]
        }
        t["stage_seconds"] = {k.split("/", 1)[1]: v for k, v in stage_seconds.items() if k.startswith(f"seed-{seed}/")}
        t["seconds"] = round(seed_seconds, 1)  # wall time (background stages overlap the others)
        (sp.dir / "quickstart.json").write_text(json.dumps(t, indent=1) + "\n")
        tables.append(t)
        log(f"seed {seed}: chance {t['chance']}, untrained {t['untrained']}, SFT {t['sft']}, RL {t['rl']} "
            f"({t['seconds']:.0f}s)")
    table = mean_tables([{k: v for k, v in t.items() if k not in ("seed", "by_data_source", "stage_seconds")}
                         for t in tables])
    table["n_test"] = tables[0]["n_test"]
    table["seconds"] = round(time.perf_counter() - t0, 1)
    table["seeds"] = tables
    table["smoke"] = smoke
    table["config"] = {"train": cfg.quickstart.train, "sft": cfg.quickstart.sft, "test": cfg.quickstart.test,
                       "sft_steps": cfg.quickstart.sft_steps, "rl_steps": cfg.quickstart.rl_steps,
                       "algos": algos(cfg), "seeds": seeds}
    (out / "quickstart.json").write_text(json.dumps(table, indent=1) + "\n")
    return QuickstartResult(table, seed_dirs, stage_seconds, eval_files)
