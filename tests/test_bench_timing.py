"""The one timing method of `videor1 bench` (pipelines/bench/__init__.py): warm-up excluded, alternating rounds, min
and median, the load; and `bench eval` end to end on the tiny model (no timing asserted)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from pipelines.bench import Timed, alternate


def test_rounds_alternate_and_warmup_is_not_timed():
    calls: list[str] = []
    clock = iter(range(100))

    def side(name, seconds=None):
        def run():
            calls.append(name)
            return Timed(seconds=[seconds or float(next(clock))], value=name) if seconds else name

        return run

    cmp = alternate({"a": side("a"), "b": side("b", 2.0)}, rounds=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then AB BA AB BA
    assert len(cmp["a"].seconds) == 4 and cmp["b"].seconds == [2.0] * 4  # Timed: the side's own seconds
    assert cmp["a"].value == "a" and cmp["b"].value == "b"
    m = cmp.summary(ratios=[("b", "a")])["method"]
    assert m["rounds"] == 4 and m["warmup"] == 1 and "load_1min_before" in m and "load_1min_after" in m


def test_min_median_and_ratios():
    seconds = {"ours": iter([3.0, 1.0, 2.0]), "peer": iter([4.0, 6.0, 5.0])}
    cmp = alternate({k: (lambda k=k: Timed([next(seconds[k])])) for k in seconds}, rounds=3, warmup=0)
    assert (cmp["ours"].min_s, cmp["ours"].median_s) == (1.0, 2.0)
    assert cmp.ratio("peer", "ours") == 2.5 and cmp.ratio("peer", "ours", "min") == 4.0
    s = cmp.summary(ratios=[("peer", "ours")])
    assert s["peer/ours"] == {"median": 2.5, "min": 4.0} and s["ours"]["seconds"] == [3.0, 1.0, 2.0]
    with pytest.raises(ValueError):
        alternate({"x": lambda: None}, rounds=0)


def test_bench_eval_reports_min_median_and_load(tmp_path):
    run_cli("bench", "eval", "--samples", "3", "--batch-size", "2", "--repeats", "2", "--warmup", "1",
            "--workdir", tmp_path / "w", "--set", "eval.max_new_tokens=4")
    (path,) = tmp_path.glob("**/bench-eval.json")
    res = json.loads(path.read_text())
    for side in ("batched", "sequential"):
        assert len(res[side]["seconds"]) == 2 and res[side]["min_s"] <= res[side]["median_s"]
    assert res["method"]["rounds"] == 2 and res["method"]["warmup"] == 1
    assert res["speedup"] > 0 and res["speedup_min"] > 0 and res["machine"]["cpus"]


def test_bench_results_are_recorded_in_the_registry_and_as_json(tmp_path):
    """The tail every bench command shares: metrics + summary in the registry, the results JSON as an artifact."""
    import json

    from pipelines.config import Config
    from pipelines.registry import Registry
    from videor1_cli.bench import _record_results

    reg = Registry(tmp_path / "registry.db")
    with reg.run("bench-rl", Config(), command="videor1 bench rl") as run:
        _record_results(run, {"ratio": 1.5}, {"rows": [1, 2]}, tmp_path / "bench-rl.json")
    assert json.loads((tmp_path / "bench-rl.json").read_text()) == {"rows": [1, 2]}
    assert reg.metrics(run.id)["ratio"] == [(0, 1.5)]
    (row,) = reg.list_runs(kind="bench-rl")
    assert row["summary"] == {"ratio": 1.5}
    assert [a.kind for a in reg.artifacts_of(run.id)["outputs"]] == ["bench"]
