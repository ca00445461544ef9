"""`videor1 runs ...` as a user sees them: ls filters, show, lineage, compare, plot, rm/gc safety."""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_cli
from pipelines.config import Config
from pipelines.registry import Registry


@pytest.fixture
def chain(tmp_path):
    reg = Registry(os.path.join(os.environ["VIDEOR1_HOME"], "registry.db"))
    data = tmp_path / "d.json"
    data.write_text("[]")
    model = tmp_path / "model"
    model.mkdir()
    (model / "w").write_text("w")
    with reg.run("data-synth", Config()) as a:
        a.log_artifact("records", data)
    cfg = Config()
    cfg.rl.beta = 0.0
    with reg.run("train-rl", cfg) as b:
        b.use_path("records", data)
        for s in range(5):
            b.log_metrics(s, {"rewards/accuracy": s / 5, "kl": 0.01 * s, "completion_length": 10 + s})
        b.log_artifact("model", model)
        b.tag("exp")
    with reg.run("eval", Config()) as c:
        c.use_path("model", model)
    with pytest.raises(RuntimeError):
        with reg.run("train-sft", Config()):
            raise RuntimeError("x")
    return reg, a.id, b.id, c.id


def test_ls_filters_and_json(chain):
    reg, a, b, c = chain
    rows = json.loads(run_cli("runs", "ls", "--json").output)
    assert len(rows) == 4
    rows = json.loads(run_cli("runs", "ls", "--json", "--kind", "train-rl").output)
    assert [r["id"] for r in rows] == [b]
    rows = json.loads(run_cli("runs", "ls", "--json", "--status", "failed").output)
    assert rows[0]["kind"] == "train-sft" and "x" in rows[0]["error"]
    assert [r["id"] for r in json.loads(run_cli("runs", "ls", "--json", "--tag", "exp").output)] == [b]
    assert "train-rl" in run_cli("runs", "ls").output


def test_show_lineage_compare(chain):
    reg, a, b, c = chain
    info = json.loads(run_cli("runs", "show", b, "--json").output)
    assert info["parents"] == [a] and info["children"] == [c]
    assert info["metrics"]["rewards/accuracy"]["last"] == pytest.approx(0.8)
    assert info["outputs"][0]["kind"] == "model"
    tree = json.loads(run_cli("runs", "lineage", c, "--json").output)
    assert tree["next"][0]["id"] == b and tree["next"][0]["next"][0]["id"] == a
    assert "data-synth" in run_cli("runs", "lineage", c).output
    res = json.loads(run_cli("runs", "compare", a, b, "--json").output)
    assert res["config_diff"]["rl.beta"] == [0.04, 0.0]


def test_plot_png_has_expected_series(chain, tmp_path):
    reg, a, b, c = chain
    out = tmp_path / "p.png"
    r = run_cli("runs", "plot", b, "-o", out)
    assert "rewards/accuracy" in r.output and "kl" in r.output and "completion_length" in r.output
    from PIL import Image

    im = Image.open(out)
    assert im.size[0] > 300 and len(set(im.convert("L").getdata())) > 10  # drawn, not blank
    r = run_cli("runs", "plot", b, "-m", "nope", "-o", out, check=False)
    assert r.exit_code == 1 and "nope" in r.output


def test_rm_and_gc_keep_depended_on_runs(chain):
    reg, a, b, c = chain
    r = run_cli("runs", "rm", b, check=False)
    assert r.exit_code == 1 and c in r.output
    # a failed run that someone depends on survives gc
    reg.get_run(b)
    reg._write("UPDATE runs SET status='failed' WHERE id=?", (b,))
    out = run_cli("runs", "gc").output
    assert "removed 1" in out and "kept 1" in out
    ids = {x["id"] for x in reg.list_runs()}
    assert b in ids and a in ids and c in ids
    run_cli("runs", "rm", c)
    run_cli("runs", "rm", b)
    assert {x["id"] for x in reg.list_runs()} == {a}


def test_common_path_prefix_delta_and_ema_by_hand():
    from pipelines.runs import common_path_prefix, delta, ema

    assert common_path_prefix(["/tmp/x/long/a/d.json", "/tmp/x/long/b/d.json"]) == "/tmp/x/long/"
    assert common_path_prefix(["/a/d.json", "rel/d.json"]) == "" and common_path_prefix([1, 2]) == ""
    assert common_path_prefix(["/m/run/model", "/m/run/model2"]) == "/m/run/"  # the file name is never cut
    assert delta([0.5, 0.75]) == 0.25 and delta([None, 1.0]) is None and delta(["a", "b"]) is None
    # debiased EMA, weight 0.5: 1 -> 0.5 / 0.5 = 1; 3 -> (0.25 + 1.5) / 0.75 = 2.333
    assert ema([1.0, 3.0], 0.5) == pytest.approx([1.0, 7 / 3]) and ema([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_compare_shows_the_differing_part_of_paths_and_a_delta(tmp_path):
    reg = Registry(os.path.join(os.environ["VIDEOR1_HOME"], "registry.db"))
    base = tmp_path / ("a-long-directory-name-" * 4)
    ids = []
    for name, acc in (("first", 0.5), ("second", 0.75)):
        cfg = Config()
        cfg.data.file = str(base / name / "records.json")
        with reg.run("train-rl", cfg) as r:
            r.log_metrics(1, {"rewards/accuracy": acc})
        ids.append(r.id)
    out = run_cli("runs", "compare", *ids).output
    row = [x for x in out.splitlines() if "data.file" in x][0]
    assert "…/first/records.json" in row and "…/second/records.json" in row
    assert f"paths under {base}/" in out
    assert "Δ" in out and "+0.25" in [x for x in out.splitlines() if "rewards/accuracy" in x][0]
    res = json.loads(run_cli("runs", "compare", *ids, "--json").output)
    assert res["delta"]["rewards/accuracy"] == pytest.approx(0.25)


def test_plot_smooths_draws_the_temporal_panel_and_bars_for_an_eval(tmp_path):
    from PIL import Image

    reg = Registry(os.path.join(os.environ["VIDEOR1_HOME"], "registry.db"))
    with reg.run("train-rl", Config()) as r:
        for s in range(1, 21):
            r.log_metrics(s, {"reward": (s % 3) / 2, "p_ordered": 0.5 + s / 50, "p_shuffled": 0.5, "kl": 0.01})
    raw, smooth = tmp_path / "raw.png", tmp_path / "smooth.png"
    out = run_cli("runs", "plot", r.id, "-o", raw).output
    assert "p_ordered vs p_shuffled" in out
    run_cli("runs", "plot", r.id, "-o", smooth, "--smooth", "0.8")
    assert list(Image.open(raw).convert("L").getdata()) != list(Image.open(smooth).convert("L").getdata())
    bad = run_cli("runs", "plot", r.id, "-o", smooth, "--smooth", "1.5", check=False)
    assert bad.exit_code == 1 and "--smooth 1.5: the EMA weight must be in [0, 1)" in bad.output
    with reg.run("eval", Config()) as e:
        e.log_metrics(0, {"eval/synthetic/overall": 56.5, "eval/synthetic/official": 60.1, "eval/synthetic/errors": 0})
    bars = tmp_path / "eval.png"
    out = run_cli("runs", "plot", e.id, "-o", bars).output
    assert "eval/synthetic/overall" in out
    # one 7.5 x 2 inch bar chart at 110 dpi, not a 3-panel grid (12.6 x 3 inches) of one-point lines
    assert Image.open(bars).size == (825, 220)
