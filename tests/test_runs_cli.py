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
