"""`videor1 bench tgrpo` (issue 25): the bootstrap and the bookkeeping as pure functions, and the --smoke study end
to end (every stage a registered run, the JSON and the plot)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipelines.bench import tgrpo as T


def test_bootstrap_point_is_the_mean_over_seeds_of_question_means():
    # seed 0: 2 questions, seed 1: 4 questions -> the point is (mean of seed 0 + mean of seed 1) / 2, not pooled
    a = [np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])]
    b = T.bootstrap_means(a, reference=0, n_boot=200)
    assert b["point"].tolist() == pytest.approx([(0.5 + 0.25) / 2, 1.0])
    assert b["diff_point"].tolist() == pytest.approx([0.0, 1.0 - 0.375])
    assert b["lo"][1] == b["hi"][1] == 1.0  # a model right everywhere has no spread
    assert b["lo"][0] <= b["point"][0] <= b["hi"][0]


def test_bootstrap_is_paired_across_models():
    # model 1 = model 0 + 0.1 on every question of every seed: the difference has no spread at all (paired draws),
    # although each model's own interval is wide
    rng = np.random.default_rng(0)
    mats = []
    for q in (30, 50, 40):
        x = rng.random(q)
        mats.append(np.stack([x, x + 0.1]))
    b = T.bootstrap_means(mats, reference=0, n_boot=300)
    assert b["diff_lo"][1] == pytest.approx(0.1) and b["diff_hi"][1] == pytest.approx(0.1)
    assert b["hi"][0] - b["lo"][0] > 0.05
    with pytest.raises(T.BenchTgrpoError):
        T.bootstrap_means([np.zeros((2, 0))])


def test_bootstrap_interval_covers_the_seed_spread():
    # two seeds whose means differ by 0.5: resampling seeds must widen the interval far beyond the question noise
    mats = [np.full((1, 200), 0.25), np.full((1, 200), 0.75)]
    b = T.bootstrap_means(mats, n_boot=500)
    assert b["point"][0] == pytest.approx(0.5)
    assert b["lo"][0] == pytest.approx(0.25) and b["hi"][0] == pytest.approx(0.75)


def test_categorise_and_arms():
    rows = [{"id": 1, "data_source": "synthetic/order/direction"}, {"id": 2, "data_source": "synthetic/color"},
            {"id": 3, "data_source": "synthetic/order/first-color"}]
    m = T.categorise(rows, {"1": {"score": 0.0}, "3": {"score": 1.0}})
    assert m["order_dependent"].tolist() == [True, False, True] and m["order_free"].tolist() == [False, True, False]
    assert m["counter_shortcut"].tolist() == [True, False, False]
    arm = T.parse_arm("contrast:rl.temporal_alpha=1.0")
    assert arm.algo == "tgrpo" and arm.overrides[-1] == "rl.temporal_alpha=1.0" and arm.name.startswith("contrast:")
    assert T.parse_arm("grpo") is T.ARMS["grpo"] and "rl.shuffled_probe=true" in T.ARMS["grpo"].overrides
    with pytest.raises(T.BenchTgrpoError):
        T.parse_arm("ppo")
    import inspect

    from videor1_cli.bench import tgrpo_bench

    assert inspect.signature(tgrpo_bench).parameters["arms"].default.default == ",".join(T.DEFAULT_ARMS)
    with pytest.raises(T.BenchTgrpoError):
        T.parse_arm("contrast:alpha")


def _rows(scores, sources):
    return [{"index": i, "id": i, "data_source": src, "official_score": sc}
            for i, (sc, src) in enumerate(zip(scores, sources))]


def test_summarise_goal_and_default_world():
    # default world (no shortcut rows): no counter-shortcut category. T-GRPO is right on 2 more of the 20 order
    # questions of each seed (+10 points, the same questions: no spread), the same elsewhere -> goal met; "tgrpo-mu1"
    # is GRPO exactly -> not met
    srcs = ["synthetic/order/direction"] * 20 + ["synthetic/color"] * 20
    study = T.Study(seeds=[0, 1], arms=[T.ARMS["grpo"], T.ARMS["tgrpo"], T.ARMS["tgrpo-mu1"]], shortcut=None,
                    train=1, sft=1, test=40, sft_steps=1, rl_steps=2, nproc=1)
    base = [1.0] * 10 + [0.0] * 10 + [1.0] * 15 + [0.0] * 5
    better = [1.0] * 12 + [0.0] * 8 + [1.0] * 15 + [0.0] * 5
    scores = {s: {"sft": _rows(base, srcs), "grpo": _rows(base, srcs), "tgrpo": _rows(better, srcs),
                  "tgrpo-mu1": _rows(base, srcs)} for s in (0, 1)}
    curve = {"p_gap": [(1, 0.1), (2, 0.3)], "step_time": [(1, 2.0), (2, 1.0)], "temporal_bonus_rate": [(1, 0.5)]}
    train = {s: {a: curve for a in ("grpo", "tgrpo", "tgrpo-mu1")} for s in (0, 1)}
    chance = {s: {"overall": 30.0, "order_dependent": 40.0} for s in (0, 1)}
    t = T.summarise(study, scores, {}, train, chance, n_boot=200)
    assert set(t["accuracy"]) == {"order_dependent", "order_free"}
    od = t["accuracy"]["order_dependent"]
    assert od["grpo"]["mean"] == 50.0 and od["tgrpo"]["mean"] == 60.0
    assert od["tgrpo"]["minus_grpo"] == 10.0 and od["tgrpo"]["minus_grpo_ci95"][0] > 0
    assert t["goal"]["tgrpo"]["meets_goal"] and not t["goal"]["tgrpo-mu1"]["meets_goal"]
    assert t["accuracy"]["order_free"]["tgrpo"]["minus_grpo"] == 0.0
    tr = t["training"]["tgrpo"]
    assert tr["p_gap_first_quarter"] == 0.1 and tr["p_gap_last_quarter"] == 0.3
    assert tr["step_time_median_s"] == 1.5 and tr["step_time_vs_grpo"] == 1.0 and tr["bonus_rate_mean"] == 0.5
    assert t["per_seed"]["0"]["tgrpo"] == {"order_dependent": 60.0, "order_free": 75.0}
    assert t["chance"] == {"overall": 30.0, "order_dependent": 40.0}


def test_bench_tgrpo_smoke(tmp_path):
    """The --smoke study: 2 seeds x (SFT, GRPO, T-GRPO) on a toy shortcut world, every stage registered and tagged,
    GRPO logging p~ through its probe, the table, the JSON and the plot."""
    from conftest import run_cli
    from pipelines.config import load_config
    from pipelines.registry import Registry

    out = tmp_path / "study"
    res = run_cli("bench", "tgrpo", "--smoke", "--json", "--out", out)
    table = json.loads(res.stdout)
    assert table["config"]["smoke"] and table["config"]["seeds"] == [0, 1]
    # the study's RL rate is rl.learning_rate (the preset's, as in the 5-seed study), not the quickstart RL stage's
    assert table["config"]["rl"]["learning_rate"] == 2e-4 != load_config().quickstart.rl_learning_rate
    for cat in ("order_dependent", "order_free"):
        rows = table["accuracy"][cat]
        assert set(rows) >= {"sft", "grpo", "tgrpo"}
        for lab in ("sft", "grpo", "tgrpo"):
            lo, hi = rows[lab]["ci95"]
            assert lo <= rows[lab]["mean"] <= hi
        assert rows["grpo"]["minus_grpo"] == 0.0
    assert table["goal"]["tgrpo"]["meets_goal"] in (True, False)
    tr = table["training"]
    for arm in ("grpo", "tgrpo"):  # GRPO's p~ comes from its probe
        assert [s for s, _ in tr[arm]["curves"]["p_gap"]] == [1, 2]
    assert "temporal_bonus_rate" in tr["tgrpo"]["curves"] and "temporal_bonus_rate" not in tr["grpo"]["curves"]
    assert Path(table["plot"]).stat().st_size > 10_000
    reg = Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db")
    (bench,) = reg.list_runs(kind="bench-tgrpo")
    assert bench["status"] == "finished" and bench["id"] == table["run"]
    tagged = reg.list_runs(tag=f"bench-tgrpo-{bench['id']}")
    kinds = sorted(r["kind"] for r in tagged)
    assert kinds == sorted(["data-synth", "model-tiny", "train-sft", "eval", "train-rl", "eval", "train-rl", "eval"]
                           * 2)
    assert all(r["status"] == "finished" for r in tagged)
    # the train-rl runs of a seed are the ones `runs compare` gets; they differ in algo and the probe
    from pipelines import runs as R

    cmp = R.compare(reg, list(table["rl_runs"]["0"].values()))
    assert "rl.algo" in cmp["config_diff"] and "rl.shuffled_probe" in cmp["config_diff"]
    assert len(reg.parents(bench["id"])) == 6  # the six evals are its inputs
    world = json.loads((out / "seed-0" / "world" / "world.json").read_text())
    assert world["params"]["shortcut"] == 0.75 and (out / "bench-tgrpo.json").exists()
    # --merge reads the finished seeds back (a study run in pieces): the same table, nothing re-run
    merged = json.loads(run_cli("bench", "tgrpo", "--merge", out, "--arms", "grpo,tgrpo", "--json", "--out",
                                tmp_path / "merged").stdout)
    assert merged["accuracy"] == table["accuracy"] and merged["training"] == table["training"]
    assert merged["rl_runs"] == table["rl_runs"] and merged["config"]["merged_from"] == [str(out.resolve())]
    assert len(reg.list_runs(kind="train-rl")) == 4  # nothing trained again
    # --resume after an interruption: seed 1's T-GRPO model and its eval lost -> only those two stages run again;
    # everything else is kept, and the table equals the uninterrupted one
    import shutil

    shutil.rmtree(out / "seed-1" / "rl-tgrpo-model")
    shutil.rmtree(out / "seed-1" / "eval-tgrpo")
    evals_before = len(reg.list_runs(kind="eval"))
    resumed = json.loads(run_cli("bench", "tgrpo", "--smoke", "--json", "--out", out, "--resume").stdout)
    assert len(reg.list_runs(kind="train-rl")) == 5 and len(reg.list_runs(kind="eval")) == evals_before + 1
    assert len(reg.list_runs(kind="train-sft")) == 2 and len(reg.list_runs(kind="data-synth")) == 2
    assert resumed["accuracy"] == table["accuracy"]


def test_stage_complete_reads_what_each_command_writes_last(tmp_path):
    from pipelines.bench.tgrpo import stage_complete
    from pipelines.quickstart import Stage

    world, model, ev = tmp_path / "w", tmp_path / "m", tmp_path / "e"
    for d in (world, model, ev):
        d.mkdir()
    st = {k: Stage(k, k, [], o) for k, o in (("synth", world), ("rl-grpo", model), ("eval-grpo", ev))}
    assert not any(stage_complete(x) for x in st.values())
    (world / "world.json").write_text("{}")
    (model / "config.json").write_text("{}")
    (ev / "synthetic.samples.jsonl").write_text("")
    assert not any(stage_complete(x) for x in st.values())  # half-written: the last file is missing
    (world / "test.json").write_text("[]")
    (model / "model.safetensors").write_bytes(b"")
    (ev / "results.json").write_text("{}")
    assert all(stage_complete(x) for x in st.values())
