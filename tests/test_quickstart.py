"""`videor1 quickstart`: the chain runs every stage as a registered run, linked by lineage; the table is read back
right. No test claims that training helps (that is a benchmark: BENCHMARKS.md "Quickstart")."""

from __future__ import annotations

import json

import pytest

from pipelines import quickstart as Q
from pipelines.config import load_config


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts
WORLD = {
    "chance": {
        "synthetic/color": {"problem_type": "multiple choice", "order_dependent": False, "chance": 0.25},
        "synthetic/order/direction": {"problem_type": "multiple choice", "order_dependent": True, "chance": 0.5},
        "synthetic/count-frames": {"problem_type": "numerical", "order_dependent": False, "chance": 0.1},
    },
    "counts": {"test": {"by_data_source": {"synthetic/color": 2, "synthetic/order/direction": 2,
                                           "synthetic/count-frames": 1}}},
}


def test_chance_is_weighted_by_the_test_split():
    c = Q.chance_of(WORLD)
    assert c["overall"] == pytest.approx(100 * (2 * 0.25 + 2 * 0.5 + 0.1) / 5)  # 32.0
    assert c["per_type"] == {"multiple choice": pytest.approx(37.5), "numerical": pytest.approx(10.0)}
    assert c["order_dependent"] == pytest.approx(50.0)


def _results(overall, mc, num, order):
    return {"benchmarks": {"synthetic": {"n": 5, "errors": 0, Q.SCORING: {
        "overall": overall,
        "by_problem_type": {"multiple choice": {"n": 4, "score": mc}, "numerical": {"n": 1, "score": num}},
        "by_order": {"order-dependent": {"n": 2, "score": order}, "other": {"n": 3, "score": 0.0}},
        "by_data_source": {"synthetic/color": {"n": 2, "score": mc}},
    }}}}


def test_seed_table_and_mean():
    chance = Q.chance_of(WORLD)
    scores = {"untrained": Q.scores_of(_results(0.0, 0.0, 0.0, 0.0)),
              "sft": Q.scores_of(_results(60.0, 75.0, 0.0, 50.0)),
              "rl-tgrpo": Q.scores_of(_results(80.0, 100.0, 0.0, 100.0)),
              "rl-grpo": Q.scores_of(_results(70.0, 87.5, 0.0, 50.0))}
    t = Q.seed_table(chance, scores, "tgrpo")
    assert (t["chance"], t["untrained"], t["sft"], t["rl"], t["grpo"]) == (32.0, 0.0, 60.0, 80.0, 70.0)
    assert t["order_dependent"] == {"chance": 50.0, "untrained": 0.0, "sft": 50.0, "rl": 100.0, "grpo": 50.0}
    assert t["per_type"]["multiple choice"]["rl"] == 100.0
    t2 = dict(t, sft=70.0, order_dependent=dict(t["order_dependent"], rl=90.0))
    m = Q.mean_tables([t, t2])
    assert m["sft"] == 65.0 and m["order_dependent"]["rl"] == 95.0 and m["rl"] == 80.0


def test_plan_chains_each_stage_on_the_previous_outputs(tmp_path):
    cfg = load_config(overrides=["quickstart.compare_algos=true"])
    sp = Q.plan_seed(cfg, 3, tmp_path, tmp_path / "c.yaml", "qs")
    keys = [s.key for s in sp.stages]
    assert keys == ["synth", "tiny", "eval-untrained", "sft", "eval-sft", "rl-grpo", "eval-rl-grpo", "rl-tgrpo",
                    "eval-rl-tgrpo"]  # quickstart.algo (GRPO) first, then the other one
    by = {s.key: s for s in sp.stages}
    assert str(by["tiny"].output) in by["sft"].argv and str(by["sft"].output) in by["rl-grpo"].argv
    assert str(by["rl-tgrpo"].output) in by["eval-rl-tgrpo"].argv
    assert by["rl-grpo"].argv[by["rl-grpo"].argv.index("--algo") + 1] == "grpo"
    assert by["rl-tgrpo"].argv[by["rl-tgrpo"].argv.index("--algo") + 1] == "tgrpo"
    one = [s.key for s in Q.plan_seed(load_config(overrides=["quickstart.algo=tgrpo"]), 3, tmp_path,
                                      tmp_path / "c.yaml", "qs").stages if s.key.startswith("rl-")]
    assert one == ["rl-tgrpo"]  # --algo tgrpo: Video-R1's rule alone
    assert all("run.seed=3" in s.argv for s in sp.stages)
    # the stage evals headline the scoring the final table uses (one name per number)
    assert all(f"eval.scoring={Q.SCORING}" in s.argv for s in sp.stages if s.key.startswith("eval-"))
    # the vision tower is frozen in the RL stages only (quickstart.rl_freeze_vision), never in SFT
    assert "model.freeze_vision=true" in by["rl-tgrpo"].argv and "model.freeze_vision=true" in by["rl-grpo"].argv
    assert not any("model.freeze_vision=true" in s.argv for s in sp.stages if not s.key.startswith("rl-"))
    off = Q.plan_seed(load_config(overrides=["quickstart.rl_freeze_vision=false"]), 3, tmp_path, tmp_path / "c.yaml",
                      "qs")
    assert not any("model.freeze_vision=true" in s.argv for s in off.stages)


def test_seeds_option_parses_a_comma_list():
    assert load_config(overrides=["quickstart.seeds=0,1,2"]).quickstart.seeds == [0, 1, 2]


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    d = tmp_path / "seed-0"
    d.mkdir()
    (d / "precious.txt").write_text("x")
    with pytest.raises(Q.QuickstartError):
        Q.prepare_dir(d)
    Q.prepare_dir(tmp_path / "seed-1")
    (tmp_path / "seed-1" / "old").write_text("x")
    Q.prepare_dir(tmp_path / "seed-1")  # ours: replaced
    assert not (tmp_path / "seed-1" / "old").exists()


# ---------------------------------------------------------------------------------------------------------------------
# The whole chain (--smoke: toy sizes, ~1-2 minutes on 2 cores)
def test_quickstart_smoke_runs_every_stage_linked_by_lineage(tmp_path):
    from conftest import run_cli
    from pipelines.registry import Registry

    out = tmp_path / "qs"
    res = run_cli("quickstart", "--smoke", "--json", "--out", out, "--seed", 5)
    table = json.loads(res.stdout)
    for key in ("chance", "untrained", "sft", "rl", "order_dependent", "per_type", "seconds", "seeds"):
        assert key in table, key
    assert set(table["order_dependent"]) >= {"chance", "untrained", "sft", "rl"}
    assert table["per_type"] and all(set(r) >= {"chance", "untrained", "sft", "rl"} for r in table["per_type"].values())
    for k in ("chance", "untrained", "sft", "rl"):
        assert isinstance(table[k], (int, float)), k
    assert table["seeds"][0]["seed"] == 5

    reg = Registry(tmp_path / "home" / "registry.db")
    runs = reg.list_runs()
    assert all(r["status"] == "finished" for r in runs), [(r["kind"], r["status"]) for r in runs]
    kinds = sorted(r["kind"] for r in runs)
    assert kinds == sorted(["quickstart", "data-synth", "model-tiny", "train-sft", "train-rl", "eval", "eval",
                            "eval"])
    (qs,) = [r for r in runs if r["kind"] == "quickstart"]
    tag = f"quickstart-{qs['id']}"
    assert all(tag in r["tags"] for r in runs if r["kind"] != "quickstart")
    kind_of = {r["id"]: r["kind"] for r in runs}

    def parents(rid):
        return sorted(kind_of[p] for p in reg.parents(rid))

    evals = {r["run_dir"].rsplit("/", 1)[-1]: r["id"] for r in runs if r["kind"] == "eval"}
    assert set(evals) == {"eval-untrained", "eval-sft", "eval-rl-grpo"}
    assert table["rl_algo"] == "grpo"
    # eval of the RL model <- train-rl <- train-sft <- model-tiny (+ data-synth for the records)
    assert parents(evals["eval-rl-grpo"]) == ["data-synth", "train-rl"]
    (rl,) = [p for p in reg.parents(evals["eval-rl-grpo"]) if kind_of[p] == "train-rl"]
    assert reg.get_run(rl)["summary"]["algo"] == "grpo"
    assert parents(rl) == ["data-synth", "train-sft"]
    (sft,) = [p for p in reg.parents(rl) if kind_of[p] == "train-sft"]
    assert parents(sft) == ["data-synth", "model-tiny"]
    assert parents(evals["eval-sft"]) == ["data-synth", "train-sft"]
    assert parents(evals["eval-untrained"]) == ["data-synth", "model-tiny"]
    assert sorted(reg.parents(qs["id"])) == sorted(evals.values())
    # each stage eval's headline (its run summary, its table) is the number the quickstart table shows
    label_of = {"eval-untrained": "untrained", "eval-sft": "sft", "eval-rl-grpo": "rl"}
    for name, rid in evals.items():
        s = reg.get_run(rid)["summary"]
        assert s["scoring"] == "official" and round(s["synthetic"], 2) == table["seeds"][0][label_of[name]]
    assert "official (headline)" in res.output  # the stage tables (stderr) name it the same way
    # every stage logged metrics
    for r in runs:
        if r["kind"] != "model-tiny":
            assert reg.metrics(r["id"]), f"{r['kind']} logged no metrics"
    assert (out / "quickstart.json").exists() and (out / "seed-5" / "quickstart.json").exists()
