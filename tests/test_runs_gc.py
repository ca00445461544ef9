"""`videor1 runs gc`: a dry run lists paths and sizes; a killed run that was never resumed keeps its checkpoints; a run
that a later --resume continued loses its checkpoints (the run stays, for the lineage), a failed run with nothing to
resume goes, and (with --checkpoints) a finished run's older checkpoints go."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import run_cli
from pipelines.registry import Registry


def _ckpt(run_dir: Path, step: int, size: int = 1000) -> Path:
    d = run_dir / "checkpoints" / f"step-{step}"
    d.mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"\0" * size)
    return d


@pytest.fixture
def runs(tmp_path):
    reg = Registry(os.path.join(os.environ["VIDEOR1_HOME"], "registry.db"))

    def run(kind: str, status: str, name: str) -> tuple[str, Path]:
        d = tmp_path / name
        d.mkdir()
        r = reg.start_run(kind, {}, run_dir=str(d))
        r.end(status)
        time.sleep(0.01)  # distinct start times: "later" is well defined
        return r.id, d

    killed, killed_dir = run("train-rl", "failed", "killed")            # checkpoints, never resumed: kept
    _ckpt(killed_dir, 2, 3000)
    resumed, resumed_dir = run("train-rl", "interrupted", "resumed")    # continued by `later`: collected
    ck = _ckpt(resumed_dir, 2, 2000)
    later = reg.start_run("train-rl", {}, run_dir=str(tmp_path / "later"))
    later.use_path("checkpoint", ck)  # what `train rl --resume` records
    later.end("finished")
    broken, broken_dir = run("eval", "failed", "broken")               # nothing to resume: collected
    (broken_dir / "rows.jsonl").write_bytes(b"x" * 500)
    done, done_dir = run("train-rl", "finished", "done")
    for s in (1, 2, 3):
        _ckpt(done_dir, s, 100)
    return {"reg": reg, "killed": (killed, killed_dir), "resumed": (resumed, resumed_dir), "later": later.id,
            "broken": (broken, broken_dir), "done": (done, done_dir)}


def test_gc_dry_run_lists_paths_and_sizes_and_deletes_nothing(runs):
    out = run_cli("runs", "gc", "--dry-run").output
    resumed, resumed_dir = runs["resumed"]
    broken, broken_dir = runs["broken"]
    killed, killed_dir = runs["killed"]
    assert f"would remove checkpoints of {resumed} (train-rl, interrupted; resumed by run {runs['later']}; the run " \
           f"stays for its lineage): {resumed_dir / 'checkpoints' / 'step-2'} 2.0 kB" in out, out
    assert f"would remove run {broken} (eval, failed; no checkpoint to resume from): {broken_dir} 500 B" in out
    assert f"kept {killed} (train-rl, failed): 1 checkpoint(s) never resumed" in out
    assert "would remove 1 run(s), 2.5 kB; kept 1" in out
    assert resumed_dir.exists() and broken_dir.exists() and len(runs["reg"].list_runs()) == 5


def test_gc_keeps_a_killed_run_never_resumed(runs):
    run_cli("runs", "gc")
    ids = {r["id"] for r in runs["reg"].list_runs()}
    killed, killed_dir = runs["killed"]
    assert killed in ids and (killed_dir / "checkpoints" / "step-2" / "weights.bin").exists()
    assert runs["resumed"][0] in ids and not (runs["resumed"][1] / "checkpoints" / "step-2").exists()
    out = run_cli("runs", "gc").output  # a second gc keeps the superseded run (now without checkpoints)
    assert f"kept {runs['resumed'][0]} (train-rl, interrupted): resumed by run {runs['later']}" in out
    assert runs["resumed"][0] in {r["id"] for r in runs["reg"].list_runs()}
    assert runs["broken"][0] not in ids and not runs["broken"][1].exists()
    assert runs["later"] in ids


def test_gc_checkpoints_drops_only_older_checkpoints_of_finished_runs(runs):
    done, done_dir = runs["done"]
    out = run_cli("runs", "gc", "--checkpoints", "--dry-run").output
    assert f"would remove checkpoints of {done} (train-rl, finished; 2 intermediate checkpoint(s)" in out
    assert (done_dir / "checkpoints" / "step-1").exists()
    run_cli("runs", "gc", "--checkpoints")
    assert sorted(p.name for p in (done_dir / "checkpoints").iterdir()) == ["step-3"]
    assert done in {r["id"] for r in runs["reg"].list_runs()}
