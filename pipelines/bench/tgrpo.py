"""`videor1 bench tgrpo`: does T-GRPO's temporal reward help, on a world where it should? (issue 25)

Per seed, the quickstart's own stages (every one a registered `videor1` command, lineage-linked, same resolved config
as `videor1 quickstart` writes, SFT and RL on `quickstart.nproc` data-parallel ranks):

    data synth --shortcut S  -> the shortcut world: order-dependent answers follow the clip's majority colour with
                                probability S (pipelines.synth), so an order-blind policy scores S on them and only the
                                frame order answers the rest (the counter-shortcut questions)
    model tiny, train sft    -> one SFT model per seed (the cold start every arm starts from)
    train rl, per arm        -> GRPO, T-GRPO with Video-R1's rule (mu 0.8 / 1.0, alpha 0.3) and the variants
                                (rl.temporal_rule, rl.temporal_term), identical budgets (steps, prompts, rollouts)
    eval, per model          -> the held-out test split, per-question scores

and then, over seeds and questions (`summarise`): accuracy per arm on order-dependent, order-free and counter-shortcut
questions with 95% bootstrap intervals (seeds resampled, then questions within each seed, paired across arms so the
differences to GRPO carry their own interval), p_ordered - p_shuffled over training (GRPO logs it through
rl.shuffled_probe, which leaves its training bit-identical), how often the temporal bonus fired and how much of the
advantages it still moved after normalisation, and the step time per arm (median after warm-up, GRPO's probe
excluded). Written by hand: the hierarchical, paired bootstrap is a few lines of numpy that scipy's `bootstrap` does
not do (it resamples one level).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipelines.errors import VideoR1Error
from pipelines.quickstart import (MARKER, SCORING, Stage, _Background, chance_of, prepare_dir, stage_argv,
                                  stage_config)

REFERENCE = "grpo"  # differences are reported against this arm
WARMUP_STEPS = 3  # step times of the first steps (allocations, caches) are left out of the medians
# The full form's RL budget (every arm; `--rl-steps` changes it). Sized so the default study (5 seeds x 4 arms) takes
# about 90 minutes on a quiet 2-core machine.
FULL = {"rl_steps": 100}
SMOKE = {"train": 24, "sft": 16, "test": 24, "sft_steps": 2, "rl_steps": 2, "seeds": [0, 1],
         "arms": ["grpo", "tgrpo"], "nproc": 1}


class BenchTgrpoError(VideoR1Error):
    pass


@dataclass(frozen=True)
class Arm:
    name: str
    title: str
    algo: str
    overrides: tuple[str, ...] = ()


ARMS: dict[str, Arm] = {a.name: a for a in [
    Arm("grpo", "GRPO (p~ from rl.shuffled_probe: no reward, no gradient)", "grpo", ("rl.shuffled_probe=true",)),
    Arm("tgrpo", "T-GRPO, Video-R1's rule (mu 0.8, alpha 0.3)", "tgrpo",
        ("rl.temporal_rule=video_r1", "rl.temporal_mu=0.8", "rl.temporal_alpha=0.3")),
    Arm("tgrpo-mu1", "T-GRPO, the paper's rule p >= p~ (mu 1.0, alpha 0.3)", "tgrpo",
        ("rl.temporal_rule=video_r1", "rl.temporal_mu=1.0", "rl.temporal_alpha=0.3")),
    Arm("separate", "T-GRPO, Video-R1's rule as a separate advantage term (mu 0.8, alpha 0.3)", "tgrpo",
        ("rl.temporal_rule=video_r1", "rl.temporal_mu=0.8", "rl.temporal_alpha=0.3", "rl.temporal_term=advantage")),
    Arm("contrast", "T-GRPO, per-sample contrast with the shuffled answers (alpha 0.3)", "tgrpo",
        ("rl.temporal_rule=contrast", "rl.temporal_alpha=0.3")),
]}
DEFAULT_ARMS = ("grpo", "tgrpo", "tgrpo-mu1", "contrast")


def parse_arm(spec: str) -> Arm:
    """`NAME` (a key of ARMS) or `NAME:key=value[:key=value]` (that arm with more overrides, e.g.
    `contrast:rl.temporal_alpha=1.0`); the spec is the arm's label."""
    name, *extra = spec.split(":")
    if name not in ARMS:
        raise BenchTgrpoError(f"unknown arm '{name}'", hint=f"arms: {', '.join(ARMS)} (optionally NAME:key=value)")
    for e in extra:
        if "=" not in e:
            raise BenchTgrpoError(f"arm '{spec}': '{e}' is not key=value")
    base = ARMS[name]
    if not extra:
        return base
    return Arm(spec, f"{base.title} + {', '.join(extra)}", base.algo, base.overrides + tuple(extra))


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


# ---------------------------------------------------------------------------------------------------------------------
# Plan (the argv of every stage of one seed)
@dataclass
class SeedPlan:
    seed: int
    dir: Path
    world: Path
    stages: list[Stage] = field(default_factory=list)
    evals: dict[str, Path] = field(default_factory=dict)  # label (sft, arm) -> eval dir
    rl_names: dict[str, str] = field(default_factory=dict)  # arm -> run.name of its train-rl run


@dataclass
class Study:
    seeds: list[int]
    arms: list[Arm]
    shortcut: float | None  # None: the default world (the quickstart's), no counter-shortcut questions
    train: int
    sft: int
    test: int
    sft_steps: int
    rl_steps: int
    nproc: int
    smoke: bool = False


def plan_seed(study: Study, cfg, seed: int, out: Path, config_file: Path, tag: str) -> SeedPlan:
    d = (out / f"seed-{seed}").resolve()
    world = d / "world"
    sp = SeedPlan(seed=seed, dir=d, world=world)
    common = ["--config", str(config_file), "--set", f"run.seed={seed}"]
    if not cfg.video.cache_dir:
        common += ["--set", f"video.cache_dir={d / 'frame-cache'}"]
    ranks = max(1, study.nproc)
    dist = ["--set", f"distributed.nproc={ranks}"] if ranks > 1 else []

    def named(stage: str) -> list[str]:
        return ["--set", f"run.name={tag}-s{seed}-{stage}"]

    def add(key, title, argv, output, ranks=1, background=False):
        sp.stages.append(Stage(key, title, argv, output, ranks, background))

    opts = [] if cfg.quickstart.shuffle_options else ["--fixed-options"]
    if study.shortcut is not None:
        opts += ["--shortcut", str(study.shortcut)]
    what = f"--shortcut {study.shortcut}" if study.shortcut is not None else "(default world)"
    add("synth", f"data synth {what} ({study.train} RL + {study.sft} SFT + {study.test} test)",
        ["data", "synth", *common, *named("data"), "--out", str(world), "--train", str(study.train), "--sft",
         str(study.sft), "--test", str(study.test), "--seed", str(seed), *opts], world)
    tiny = d / "tiny-model"
    add("tiny", "model tiny", ["model", "tiny", *common, *named("model"), "--out", str(tiny), "--seed", str(seed)],
        tiny)
    sft = d / "sft-model"
    add("sft", f"train sft ({study.sft_steps} steps)",
        ["train", "sft", *common, *named("sft"), "--model", str(tiny), "--data", str(world / "sft.json"),
         "--max-steps", str(study.sft_steps), "--out", str(sft), *dist], sft, ranks)

    def evaluate(label: str, model: Path, background: bool) -> None:
        e = d / f"eval-{_slug(label)}"
        sp.evals[label] = e
        add(f"eval-{label}", f"eval {label}", ["eval", *common, *named(f"eval-{_slug(label)}"), "--model", str(model),
                                               "--data", str(world / "test.json"), "--bench", "synthetic", "--out",
                                               str(e), "--set", f"eval.scoring={SCORING}"], e, background=background)

    evaluate("sft", sft, background=ranks > 1)
    for k, arm in enumerate(study.arms):
        m = d / f"rl-{_slug(arm.name)}-model"
        sp.rl_names[arm.name] = f"{tag}-s{seed}-rl-{_slug(arm.name)}"
        sets = [x for o in arm.overrides for x in ("--set", o)]
        add(f"rl-{arm.name}", f"train rl: {arm.title} ({study.rl_steps} steps)",
            ["train", "rl", *common, "--set", f"run.name={sp.rl_names[arm.name]}", "--model", str(sft), "--data",
             str(world / "rl.json"), "--algo", arm.algo, "--max-steps", str(study.rl_steps), "--set",
             f"rl.output_dir={m}", *(["--set", "model.freeze_vision=true"] if cfg.quickstart.rl_freeze_vision else []),
             *sets, *dist], m, ranks)
        evaluate(arm.name, m, background=ranks > 1 and k + 1 < len(study.arms))
    return sp


# ---------------------------------------------------------------------------------------------------------------------
# Statistics (pure)
def bootstrap_means(per_seed: Sequence[np.ndarray], *, reference: int | None = None, n_boot: int = 2000,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Hierarchical, paired bootstrap of a mean over seeds of per-seed question means.

    per_seed[s]: (L, Q_s) scores of L models on the Q_s questions of seed s (the same questions for every model).
    Each replicate draws S seeds with replacement, then Q_s questions with replacement within each drawn seed, the
    same draw for every model (paired). Returns {"point": (L,) mean over seeds of the question means, "lo", "hi":
    (L,) 2.5 / 97.5 percentiles, and with `reference` the same three for each model minus the reference model
    ("diff_point", "diff_lo", "diff_hi")}. Seeds without questions are left out."""
    mats = [np.asarray(m, dtype=np.float64) for m in per_seed if np.asarray(m).shape[-1] > 0]
    if not mats:
        raise BenchTgrpoError("no questions to summarise")
    L, S = mats[0].shape[0], len(mats)
    rng = np.random.default_rng(seed)
    reps = np.empty((n_boot, L))
    for b in range(n_boot):
        acc = np.zeros(L)
        for s in rng.integers(0, S, S):
            m = mats[s]
            acc += m[:, rng.integers(0, m.shape[1], m.shape[1])].mean(axis=1)
        reps[b] = acc / S
    point = np.mean([m.mean(axis=1) for m in mats], axis=0)
    out = {"point": point, "lo": np.percentile(reps, 2.5, axis=0), "hi": np.percentile(reps, 97.5, axis=0)}
    if reference is not None:
        d = reps - reps[:, [reference]]
        out.update(diff_point=point - point[reference], diff_lo=np.percentile(d, 2.5, axis=0),
                   diff_hi=np.percentile(d, 97.5, axis=0))
    return out


CATEGORIES = {
    "order_dependent": "data_source contains 'order': the answer depends on the frame order",
    "order_free": "every other question (videos and images)",
    "counter_shortcut": "order-dependent questions the shortcut gets wrong (score < 1): only the order answers them",
}


def categorise(rows: list[dict[str, Any]], shortcut_rows: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Boolean masks over eval rows (ordered by index) for each of CATEGORIES."""
    order = np.array(["order" in str(r.get("data_source") or "") for r in rows], dtype=bool)
    out = {"order_dependent": order, "order_free": ~order}
    if shortcut_rows:  # the shortcut world only
        counter = np.zeros(len(rows), dtype=bool)
        for i, r in enumerate(rows):
            s = shortcut_rows.get(str(r.get("id")))
            counter[i] = bool(order[i] and s is not None and s["score"] < 1.0)
        out["counter_shortcut"] = counter
    return out


def _series_mean(series: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Step-wise mean over seeds of (step, value) series (steps missing in a seed are left out of that step)."""
    by_step: dict[int, list[float]] = {}
    for s in series:
        for step, v in s:
            if v is not None and v == v:
                by_step.setdefault(int(step), []).append(float(v))
    return [(k, float(np.mean(v))) for k, v in sorted(by_step.items())]


def _quarter_means(series: Sequence[tuple[int, float]]) -> tuple[float | None, float | None]:
    vals = [v for _, v in series]
    if not vals:
        return None, None
    k = max(1, len(vals) // 4)
    return float(np.mean(vals[:k])), float(np.mean(vals[-k:]))


# "/order" and "/other": the same over the order-dependent video groups and the other video groups (the trainer logs
# both when the records mark order-dependent data_sources, as the synthetic world does)
_SPLIT = ("p_ordered", "p_shuffled", "p_gap", "temporal_bonus_rate", "temporal_bonus_mean")
TRAIN_METRICS = (*_SPLIT, *(f"{m}/{p}" for m in _SPLIT for p in ("order", "other")), "temporal_adv_change",
                 "rewards/accuracy", "reward", "kl", "step_time", "gen_time")


def summarise(study: Study, scores: dict[int, dict[str, list[dict[str, Any]]]],
              shortcut_rows: dict[int, dict[str, Any]], train: dict[int, dict[str, dict[str, list]]],
              chance: dict[int, dict[str, Any]], n_boot: int = 2000) -> dict[str, Any]:
    """The study's table. scores[seed][label] = eval rows (label: "sft" and every arm); train[seed][arm] = metric
    series of its train-rl run; shortcut_rows[seed] = shortcut.json's test rows; chance[seed] = chance_of(world)."""
    labels = ["sft"] + [a.name for a in study.arms]
    ref = labels.index(REFERENCE) if REFERENCE in labels else None
    seeds = sorted(scores)
    acc: dict[str, Any] = {}
    for cat in CATEGORIES:
        per_seed = []
        for s in seeds:
            rows0 = scores[s][labels[0]]
            ids = [r["id"] for r in rows0]
            for lab in labels[1:]:
                if [r["id"] for r in scores[s][lab]] != ids:
                    raise BenchTgrpoError(f"seed {s}: the evals of sft and {lab} scored different questions")
            masks = categorise(rows0, shortcut_rows.get(s))
            if cat not in masks:
                continue
            mask = masks[cat]
            per_seed.append(100.0 * np.array([[float(r["official_score"]) for r, m in zip(scores[s][lab], mask) if m]
                                              for lab in labels]))
        if not per_seed or all(m.shape[1] == 0 for m in per_seed):
            continue
        b = bootstrap_means(per_seed, reference=ref, n_boot=n_boot)
        acc[cat] = {lab: {"mean": round(float(b["point"][i]), 2), "ci95": [round(float(b["lo"][i]), 2),
                                                                            round(float(b["hi"][i]), 2)],
                          **({"minus_grpo": round(float(b["diff_point"][i]), 2),
                              "minus_grpo_ci95": [round(float(b["diff_lo"][i]), 2), round(float(b["diff_hi"][i]), 2)]}
                             if ref is not None else {})}
                    for i, lab in enumerate(labels)}
        acc[cat]["questions_per_seed"] = [int(m.shape[1]) for m in per_seed]
    per_seed_table = {}
    for s in seeds:
        masks = categorise(scores[s]["sft"], shortcut_rows.get(s))
        per_seed_table[str(s)] = {lab: {cat: round(100.0 * float(np.mean([float(r["official_score"]) for r, m in
                                                                           zip(scores[s][lab], masks[cat]) if m])), 2)
                                        if masks[cat].any() else None for cat in masks} for lab in labels}
    training: dict[str, Any] = {}
    for arm in study.arms:
        runs = [train[s].get(arm.name, {}) for s in seeds]
        curves = {m: _series_mean([r.get(m, []) for r in runs]) for m in TRAIN_METRICS}
        step_times = [float(np.median([v for st, v in r.get("step_time", []) if st > WARMUP_STEPS] or
                                      [v for _, v in r.get("step_time", [])] or [float("nan")])) for r in runs]
        first, last = _quarter_means(curves["p_gap"])
        change = [v for _, v in curves["temporal_adv_change"] if v == v]

        def mean_of(metric: str) -> float | None:
            vals = [v for _, v in curves.get(metric, [])]
            return _r(float(np.mean(vals))) if vals else None

        training[arm.name] = {
            "title": arm.title, "algo": arm.algo, "overrides": list(arm.overrides),
            "p_gap_first_quarter": _r(first), "p_gap_last_quarter": _r(last),
            "p_ordered_last_quarter": _r(_quarter_means(curves["p_ordered"])[1]),
            "p_shuffled_last_quarter": _r(_quarter_means(curves["p_shuffled"])[1]),
            **{f"{m}_{part}_{q}": _r(_quarter_means(curves[f"{m}/{part}"])[i])
               for m in ("p_gap", "p_ordered", "p_shuffled") for part in ("order", "other")
               for i, q in enumerate(("first_quarter", "last_quarter"))},
            "bonus_rate_mean": mean_of("temporal_bonus_rate"),
            "bonus_rate_order_mean": mean_of("temporal_bonus_rate/order"),
            "bonus_rate_other_mean": mean_of("temporal_bonus_rate/other"),
            "bonus_mean": mean_of("temporal_bonus_mean"),
            "bonus_mean_order": mean_of("temporal_bonus_mean/order"),
            "bonus_mean_other": mean_of("temporal_bonus_mean/other"),
            "adv_change_mean": _r(float(np.mean(change))) if change else None,
            "step_time_median_s": _r(float(np.nanmean(step_times)), 3),
            "curves": {m: [[k, _r(v)] for k, v in c] for m, c in curves.items() if c},
        }
    ref_time = training.get(REFERENCE, {}).get("step_time_median_s")
    for name, t in training.items():
        t["step_time_vs_grpo"] = _r(t["step_time_median_s"] / ref_time, 3) if ref_time and t[
            "step_time_median_s"] == t["step_time_median_s"] else None
    verdict = {}
    if ref is not None and "order_dependent" in acc and "order_free" in acc:
        for arm in study.arms:
            if arm.name == REFERENCE:
                continue
            od, of = acc["order_dependent"][arm.name], acc["order_free"][arm.name]
            verdict[arm.name] = {
                "order_dependent_minus_grpo": od["minus_grpo"], "ci95": od["minus_grpo_ci95"],
                "order_free_minus_grpo": of["minus_grpo"],
                "meets_goal": bool(od["minus_grpo"] >= 3.0 and od["minus_grpo_ci95"][0] > 0
                                   and of["minus_grpo"] >= -1.0),
            }
    ch = {k: _r(float(np.mean([chance[s][k] for s in seeds if chance[s].get(k) is not None])))
          for k in ("overall", "order_dependent")}
    return {"accuracy": acc, "per_seed": per_seed_table, "training": training, "goal": verdict, "chance": ch,
            "categories": CATEGORIES, "bootstrap": {"replicates": n_boot, "levels": "seeds, then questions within "
                                                    "each seed; paired across models", "interval": "95% percentile"}}


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), nd)


# ---------------------------------------------------------------------------------------------------------------------
# Orchestration
@dataclass
class StudyResult:
    table: dict[str, Any]
    eval_results: list[Path]
    rl_run_ids: dict[int, dict[str, str]]
    out: Path


def stage_complete(st: Stage) -> bool:
    """The stage's output is there whole: what each command writes last (a world's test.json and world.json, a
    model's config.json beside its weights, an eval's results.json beside its per-question rows). A stage killed
    part-way has not written it, so `--resume` runs it again."""
    o = st.output
    if st.key == "synth":
        return (o / "world.json").exists() and (o / "test.json").exists()
    if st.key.startswith("eval-"):
        return (o / "results.json").exists() and (o / "synthetic.samples.jsonl").exists()
    return (o / "config.json").exists() and any(o.glob("*.safetensors"))


def run_study(study: Study, cfg, invoke: Callable[[list[str]], None], *, spawn=None, registry: Path, tag: str,
              log: Callable[[str], None] = lambda s: None,
              on_stage: Callable[[int, int, int, Stage, float | None], None] | None = None,
              n_boot: int = 2000, resume: bool = False) -> StudyResult:
    """Run every seed's stages (background evals beside the next training stage when spawn is given and nproc > 1),
    then read the evals and the train-rl runs' metrics back and summarise.

    `resume`: keep what an earlier invocation into the same directory finished (`stage_complete`) and run the rest;
    the stages are deterministic per seed, so the table is the one an uninterrupted study gives (its train-rl runs
    must be in the same registry: run with the same VIDEOR1_HOME / run.registry)."""
    from pipelines.registry import Registry

    cfg.quickstart.train, cfg.quickstart.sft, cfg.quickstart.test = study.train, study.sft, study.test
    cfg.quickstart.nproc = study.nproc
    # The study's RL settings are rl.* (the preset's lr 2e-4, the 5-seed study's setting), not the quickstart's RL
    # stage's (quickstart.rl_learning_rate, .algo): each arm names its algorithm, and --set rl.learning_rate=... or
    # an arm override changes the rate.
    cfg.quickstart.rl_learning_rate, cfg.quickstart.rl_steps = None, study.rl_steps
    out = Path(cfg.quickstart.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_file = out / "bench-tgrpo-config.yaml"
    import yaml

    resolved = stage_config(cfg, out, registry, tag, study.smoke)
    config_file.write_text("# The resolved config every stage of `videor1 bench tgrpo` starts from (each adds its "
                           "own --set).\n" + yaml.safe_dump(resolved, sort_keys=False))
    reg = Registry(registry)
    t0 = time.perf_counter()
    scores: dict[int, dict[str, list]] = {}
    shortcut_rows: dict[int, dict[str, Any]] = {}
    train: dict[int, dict[str, dict[str, list]]] = {}
    chance: dict[int, dict[str, Any]] = {}
    rl_ids: dict[int, dict[str, str]] = {}
    eval_files: list[Path] = []
    seconds: dict[str, float] = {}
    for si, seed in enumerate(study.seeds):
        sp = plan_seed(study, cfg, seed, out, config_file, tag)
        if not (resume and (sp.dir / MARKER).exists()):
            prepare_dir(sp.dir)
        background = _Background(spawn) if (spawn and study.nproc > 1) else None
        index = {st.key: i for i, st in enumerate(sp.stages)}

        def done(st: Stage, dt: float, i: int) -> None:
            seconds[f"seed-{seed}/{st.key}"] = round(dt, 1)
            if not st.output.exists():
                raise BenchTgrpoError(f"stage `videor1 {' '.join(st.argv[:2])}` finished but wrote no {st.output}")
            if on_stage:
                on_stage(si, i, len(sp.stages), st, dt)

        try:
            rerun: list[str] = []  # outputs written again in this invocation: the stages reading them run again too
            for i, st in enumerate(sp.stages):
                if resume and stage_complete(st) and not any(o in a for o in rerun for a in st.argv):
                    log(f"seed {seed}: {st.title}: already complete in {st.output}, kept (--resume)")
                    continue
                rerun.append(str(st.output))
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
        c = collect_seed(sp.dir, seed, study.arms, reg)
        chance[seed], shortcut_rows[seed], scores[seed], train[seed], rl_ids[seed] = (
            c["chance"], c["shortcut_rows"], c["scores"], c["train"], c["rl_ids"])
        eval_files += c["eval_files"]
        log(f"seed {seed}: " + ", ".join(
            f"{lab} {100 * np.mean([float(x['official_score']) for x in rows]):.1f}" for lab, rows in
            scores[seed].items()) + f" ({time.perf_counter() - t0:.0f}s)")
    table = finish_table(study, {s: out for s in study.seeds}, scores, shortcut_rows, train, chance, rl_ids, n_boot)
    table["config"]["rl"] = rl_settings(resolved, study.nproc)
    table["stage_seconds"] = seconds
    table["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "bench-tgrpo.json").write_text(json.dumps(table, indent=1) + "\n")
    return StudyResult(table, eval_files, rl_ids, out)


def rl_settings(resolved: dict[str, Any], nproc: int) -> dict[str, Any]:
    """The RL settings every arm shares (from the resolved stage config)."""
    return {"prompts_per_step": resolved["rl"]["per_device_prompts"] * max(1, nproc),
            **{k: resolved["rl"][k] for k in ("num_generations", "num_shuffled", "learning_rate", "advantage",
                                              "temperature", "beta", "max_completion_length")}}


def collect_seed(seed_dir: Path, seed: int, arms: Sequence[Arm], reg) -> dict[str, Any]:
    """Read one seed's results back: its world's chance and shortcut rows, the per-question eval rows of the SFT model
    and every arm, and the metric series of each arm's train-rl run (the registry run whose model is this seed's
    rl-<arm>-model, newest first)."""
    seed_dir = Path(seed_dir)
    world = seed_dir / "world"
    if not (world / "world.json").exists():
        raise BenchTgrpoError(f"{seed_dir}: no world/world.json", hint="the study's seed did not run to its end")
    sc_file = world / "shortcut.json"
    out: dict[str, Any] = {"chance": chance_of(json.loads((world / "world.json").read_text())),
                           "shortcut_rows": json.loads(sc_file.read_text()).get("test", {}) if sc_file.exists()
                           else {}, "scores": {}, "train": {}, "rl_ids": {}, "eval_files": []}
    for label in ["sft", *(a.name for a in arms)]:
        e = seed_dir / f"eval-{_slug(label)}"
        f = e / "synthetic.samples.jsonl"
        if not f.exists() or not (e / "results.json").exists():
            raise BenchTgrpoError(f"eval of {label} (seed {seed}) wrote no {f}",
                                  hint="the study's seed did not run to its end")
        out["eval_files"].append(e / "results.json")
        out["scores"][label] = sorted((json.loads(x) for x in f.read_text().splitlines() if x.strip()),
                                      key=lambda r: r["index"])
    runs = reg.list_runs(kind="train-rl", status="finished")
    for arm in arms:
        model = str((seed_dir / f"rl-{_slug(arm.name)}-model").resolve())
        r = next((r for r in runs if str(r.get("summary", {}).get("model")) == model), None)
        if r is None:
            raise BenchTgrpoError(f"no finished train-rl run wrote {model} in the registry {reg.path}")
        out["rl_ids"][arm.name] = r["id"]
        out["train"][arm.name] = reg.metrics(r["id"], list(TRAIN_METRICS))
    return out


def finish_table(study: Study, seed_dirs: dict[int, Path], scores, shortcut_rows, train, chance, rl_ids,
                 n_boot: int) -> dict[str, Any]:
    table = summarise(study, scores, shortcut_rows, train, chance, n_boot=n_boot)
    table["world"] = {"shortcut": study.shortcut, "shortcut_accuracy_test":
                      _shortcut_accuracy(seed_dirs, study.seeds) if study.shortcut is not None else None}
    table["config"] = {"seeds": study.seeds, "arms": [a.name for a in study.arms], "train": study.train,
                       "sft": study.sft, "test": study.test, "sft_steps": study.sft_steps, "rl_steps": study.rl_steps,
                       "nproc": study.nproc, "smoke": study.smoke}
    table["rl_runs"] = {str(s): ids for s, ids in rl_ids.items()}
    return table


def merge_studies(dirs: Sequence[str | Path], arms: Sequence[Arm], n_boot: int = 2000) -> tuple[dict[str, Any],
                                                                                              list[Path]]:
    """The table of studies that ran in pieces (e.g. seeds 0-2 and 3-4 as two invocations side by side): every
    complete seed-N directory under `dirs` is read back (`collect_seed`), with the registry and settings each study
    recorded in its bench-tgrpo-config.yaml. Stages are per seed and deterministic, so the merged table is the one a
    single invocation over the same seeds gives."""
    import yaml

    from pipelines.registry import Registry

    scores, shortcut_rows, train, chance, rl_ids, seed_dirs, files = {}, {}, {}, {}, {}, {}, []
    settings: list[dict[str, Any]] = []
    for d in map(Path, dirs):
        cfg_file = d / "bench-tgrpo-config.yaml"
        if not cfg_file.exists():
            raise BenchTgrpoError(f"{d} is not a bench tgrpo study (no bench-tgrpo-config.yaml)")
        resolved = yaml.safe_load(cfg_file.read_text())
        reg = Registry(resolved["run"]["registry"])
        for sd in sorted(d.glob("seed-*"), key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1):
            if not sd.name[5:].isdigit():
                continue
            seed = int(sd.name[5:])
            try:
                c = collect_seed(sd, seed, arms, reg)
            except BenchTgrpoError:
                continue  # an unfinished seed (a study stopped part-way)
            if seed in scores:
                raise BenchTgrpoError(f"seed {seed} is complete in two of the merged studies", hint="merge each once")
            scores[seed], shortcut_rows[seed], train[seed], chance[seed], rl_ids[seed] = (
                c["scores"], c["shortcut_rows"], c["train"], c["chance"], c["rl_ids"])
            seed_dirs[seed] = d
            files += c["eval_files"]
            world = json.loads((sd / "world" / "world.json").read_text())
            p = world["params"]
            settings.append({"shortcut": p.get("shortcut"), "train": p["train"], "sft": p["sft"], "test": p["test"],
                             "rl": rl_settings(resolved, resolved["quickstart"].get("nproc") or 1)})
    if not scores:
        raise BenchTgrpoError(f"no complete seed in {', '.join(map(str, dirs))}")
    if any(s != settings[0] for s in settings[1:]):
        raise BenchTgrpoError("the merged studies differ in world or RL settings; merge only one study's pieces")
    seeds = sorted(scores)
    steps = {len(train[s][a.name].get("step_time", [])) for s in seeds for a in arms}
    study = Study(seeds=seeds, arms=list(arms), shortcut=settings[0]["shortcut"], train=settings[0]["train"],
                  sft=settings[0]["sft"], test=settings[0]["test"], sft_steps=0, rl_steps=max(steps), nproc=0)
    table = finish_table(study, {s: seed_dirs[s] for s in seeds}, scores, shortcut_rows, train, chance, rl_ids,
                         n_boot)
    table["config"].update(sft_steps=None, nproc=None, rl=settings[0]["rl"], merged_from=[str(d) for d in dirs])
    return table, files


def _shortcut_accuracy(seed_dirs: dict[int, Path], seeds: Sequence[int]) -> dict[str, float]:
    """Mean over seeds of the shortcut's test accuracy per order-dependent data_source (world.json)."""
    acc: dict[str, list[float]] = {}
    for s in seeds:
        w = json.loads((Path(seed_dirs[s]) / f"seed-{s}" / "world" / "world.json").read_text())
        for src, row in w["shortcut"]["by_data_source"].items():
            if row["accuracy"]["test"] is not None:
                acc.setdefault(src, []).append(row["accuracy"]["test"])
    return {k: round(float(np.mean(v)), 4) for k, v in acc.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Plot (`runs plot` style: matplotlib, Agg, one PNG)
def plot(table: dict[str, Any], path: str | Path, smooth: float = 0.8) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.runs import ema

    acc = table["accuracy"]
    labels = [lab for lab in acc.get("order_dependent", {}) if lab != "questions_per_seed"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    cats = [c for c in ("order_dependent", "order_free", "counter_shortcut") if c in acc]
    width = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        xs = [j + i * width for j in range(len(cats))]
        means = [acc[c][lab]["mean"] for c in cats]
        err = [[acc[c][lab]["mean"] - acc[c][lab]["ci95"][0] for c in cats],
               [acc[c][lab]["ci95"][1] - acc[c][lab]["mean"] for c in cats]]
        ax.bar(xs, means, width, yerr=err, capsize=2, label=lab, color=f"C{i}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cats))], [c.replace("_", "-") for c in cats])
    ax.set_ylabel("held-out accuracy (%), 95% CI")
    ax.legend(fontsize=7)
    ax.set_title("accuracy per question kind (mean over seeds)", fontsize=10)
    ax = axes[0][1]
    arms = [lab for lab in labels if lab != "sft"]
    for i, lab in enumerate(arms):
        if "order_dependent" in acc and acc["order_dependent"][lab].get("minus_grpo") is not None:
            for j, c in enumerate(cats):
                d = acc[c][lab]
                ax.errorbar(j + i * 0.12, d["minus_grpo"], yerr=[[d["minus_grpo"] - d["minus_grpo_ci95"][0]],
                                                                [d["minus_grpo_ci95"][1] - d["minus_grpo"]]],
                            fmt="o", color=f"C{labels.index(lab)}", capsize=3, label=lab if j == 0 else None)
    ax.axhline(0, color="k", lw=0.6)
    ax.axhline(3, color="k", lw=0.6, ls=":")
    ax.set_xticks(range(len(cats)), [c.replace("_", "-") for c in cats])
    ax.set_ylabel("minus GRPO (points), 95% CI")
    ax.legend(fontsize=7)
    ax.set_title("difference to GRPO (paired bootstrap); dotted: the +3 goal", fontsize=10)
    for ax, metric, title in ((axes[1][0], "p_gap", "p_ordered - p_shuffled over training (mean over seeds)"),
                              (axes[1][1], "temporal_bonus_rate", "temporal bonus fired (share of video groups)")):
        for lab in arms:
            curves = table["training"][lab]["curves"]
            split = f"{metric}/order" in curves
            for key, ls, suffix in ((f"{metric}/order", "-", " (order)"), (f"{metric}/other", "--", " (other)")) \
                    if split else ((metric, "-", ""),):
                c = curves.get(key)
                if not c:
                    continue
                steps, vals = zip(*c)
                col = f"C{labels.index(lab)}"
                ax.plot(steps, vals, lw=0.6, alpha=0.25, color=col, ls=ls)
                ax.plot(steps, ema(list(vals), smooth), lw=1.4, color=col, ls=ls, label=lab + suffix)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    cfg = table.get("config", {})
    strength = table.get("world", {}).get("shortcut")
    world = f"shortcut world {strength}" if strength is not None else "default world"
    fig.suptitle(f"bench tgrpo: {world}, seeds {cfg.get('seeds')}, "
                 f"{cfg.get('rl_steps')} RL steps" + ("  [smoke: no claim]" if cfg.get("smoke") else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
