"""Run registry: lifecycle statuses, crash/interrupt handling, lineage, concurrency, deletion rules."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest

from pipelines.config import Config
from pipelines.registry import Registry, RegistryError, content_hash


def test_run_finished_with_config_and_metrics(tmp_path):
    reg = Registry(tmp_path / "r.db")
    cfg = Config()
    with reg.run("train-rl", cfg, command="videor1 train rl") as run:
        run.log_metrics(1, {"reward": 0.5, "kl": 0.01})
        run.log_metrics(2, {"reward": 0.75})
        run.tag("exp1")
    r = reg.get_run(run.id)
    assert r["status"] == "finished" and r["kind"] == "train-rl" and r["config_hash"] == cfg.hash()
    assert r["config"]["rl"]["beta"] == 0.04 and r["tags"] == ["exp1"] and r["versions"]["python"]
    assert reg.metrics(run.id)["reward"] == [(1, 0.5), (2, 0.75)]
    assert reg.metrics_summary(run.id)["reward"]["last"] == 0.75


def test_exception_marks_failed_with_reason(tmp_path):
    reg = Registry(tmp_path / "r.db")
    with pytest.raises(ValueError):
        with reg.run("x") as run:
            raise ValueError("boom")
    r = reg.get_run(run.id)
    assert r["status"] == "failed" and "boom" in r["error"]


def test_ctrl_c_marks_interrupted(tmp_path):
    reg = Registry(tmp_path / "r.db")
    with pytest.raises(KeyboardInterrupt):
        with reg.run("x") as run:
            raise KeyboardInterrupt
    assert reg.get_run(run.id)["status"] == "interrupted"


_CHILD = """
import sys, time
from pipelines.registry import Registry
reg = Registry(sys.argv[1])
with reg.run("long") as run:
    print(run.id, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, "interrupted"), (signal.SIGKILL, "failed")])
def test_killed_process_is_never_left_running(tmp_path, sig, status):
    db = tmp_path / "r.db"
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(db)], stdout=subprocess.PIPE, text=True)
    run_id = p.stdout.readline().strip()
    os.kill(p.pid, sig)
    p.wait(timeout=30)
    r = Registry(db).get_run(run_id)
    assert r["status"] == status, r


def _writer(db, n, tag):
    reg = Registry(db)
    with reg.run("w") as run:
        for i in range(n):
            run.log_metrics(i, {f"m{tag}": float(i)})
        run.log_artifact("file", __file__)


def test_two_processes_write_at_once(tmp_path):
    db = tmp_path / "r.db"
    Registry(db)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(db), 150, t)) for t in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reg = Registry(db)
    runs = reg.list_runs()
    assert len(runs) == 2 and all(r["status"] == "finished" for r in runs)
    for r in runs:
        series = reg.metrics(r["id"])
        assert len(next(iter(series.values()))) == 150
    import sqlite3

    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_lineage_and_delete_protection(tmp_path):
    reg = Registry(tmp_path / "r.db")
    data = tmp_path / "data.json"
    data.write_text("[]")
    with reg.run("data-synth") as r1:
        a = r1.log_artifact("records", data)
    with reg.run("train-sft") as r2:
        assert r2.use_path("records", data) == a  # same content -> the producing artifact
        model = tmp_path / "model"
        model.mkdir()
        (model / "w.bin").write_bytes(b"123")
        r2.log_artifact("model", model)
    with reg.run("eval") as r3:
        r3.use_path("model", model)
    assert reg.parents(r2.id) == [r1.id] and reg.children(r2.id) == [r3.id]
    tree = reg.lineage(r3.id, "up")
    assert tree["next"][0]["id"] == r2.id and tree["next"][0]["next"][0]["id"] == r1.id
    with pytest.raises(RegistryError):
        reg.delete_run(r2.id)
    reg.delete_run(r3.id)
    reg.delete_run(r2.id)
    assert [r["id"] for r in reg.list_runs()] == [r1.id]


def test_changed_content_is_a_new_external_input(tmp_path):
    reg = Registry(tmp_path / "r.db")
    f = tmp_path / "d.json"
    f.write_text("[1]")
    with reg.run("a") as r1:
        r1.log_artifact("records", f)
    f.write_text("[2]")
    with reg.run("b") as r2:
        aid = r2.use_path("records", f)
    assert reg.get_artifact(aid).run_id == r2.id and reg.parents(r2.id) == []


def test_content_hash_dir_is_manifest(tmp_path):
    (tmp_path / "a").write_text("x")
    size, h = content_hash(tmp_path)
    assert size == 1 and h.startswith("manifest:")
    (tmp_path / "a").write_text("y")
    assert content_hash(tmp_path)[1] != h


_CHILD_WITH_METRIC = """
import sys, time
from pipelines.registry import Registry
reg = Registry(sys.argv[1])
with reg.run("long") as run:
    run.log_metrics(1, {"loss": 1.0})
    print(run.id, flush=True)
    time.sleep(60)
"""


def test_a_killed_run_ends_when_it_was_last_seen_not_when_noticed(tmp_path):
    """SIGKILL leaves the run 'running'; the reader that notices marks it failed with ended_at = its last metric's
    time, so `runs ls` does not count the time nobody was looking as the run's duration."""
    import time

    db = tmp_path / "r.db"
    p = subprocess.Popen([sys.executable, "-c", _CHILD_WITH_METRIC, str(db)], stdout=subprocess.PIPE, text=True)
    run_id = p.stdout.readline().strip()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    time.sleep(1.0)  # noticed later
    reg = Registry(db)
    r = reg.get_run(run_id)
    import sqlite3

    last_metric = sqlite3.connect(db).execute("SELECT MAX(time) FROM metrics WHERE run_id = ?", (run_id,)).fetchone()[0]
    assert r["status"] == "failed" and r["ended_at"] == last_metric
