"""Multi-node, simulated on one machine (slow): two "nodes" on localhost, one launcher and one process each
(`distributed.nnodes=2`, `distributed.node_rank=0|1`, an explicit master port), each with its own registry and output
folder as on two machines, against one launcher with `--nproc 2`.

The world is the same (2 ranks over gloo), so the SFT losses must be the same step for step; node 1 must say that its
results are on node 0 (it has no metrics, no model and no summary of its own) instead of printing an empty table, and
record no model artifact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.launch import free_port
from pipelines.registry import Registry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def _env(home: Path) -> dict:
    env = dict(os.environ, VIDEOR1_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", VIDEOR1_QUIET="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(argv: list[str], home: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "videor1_cli.app", *argv], env=_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for a launcher; on timeout kill its whole process group (torchrun and a worker waiting for its peer)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout:.0f} s:\n{out[-2000:]}\n{err[-4000:]}")
    return proc.returncode, out, err


def _only_run(home: Path) -> tuple[dict, dict]:
    reg = Registry(home / "registry.db")
    runs = reg.list_runs(kind="train-sft")
    assert len(runs) == 1, runs
    run = reg.get_run(runs[0]["id"])
    return run, reg.metrics(run["id"])


def test_two_nodes_on_localhost_train_like_two_processes(tiny_model_dir, synth_world, tmp_path):
    sft = ["train", "sft", "--model", str(tiny_model_dir), "--data", synth_world["sft"], "--root", synth_world["root"],
           "--max-steps", "3", "--set", "sft.per_device_batch_size=2", "--set", "sft.logging_steps=1",
           "--set", "sft.learning_rate=1e-3", "--set", "sft.save_steps=100", "--set", "data.shuffle=false"]
    port = free_port()
    nodes = [_start([*sft, "--set", f"run.output_dir={tmp_path / f'out{n}'}", "--set", "distributed.nnodes=2",
                     "--set", f"distributed.node_rank={n}", "--set", "distributed.master_addr=127.0.0.1",
                     "--master-port", str(port)], tmp_path / f"home{n}") for n in (0, 1)]
    (code0, out0, err0), (code1, out1, err1) = (_finish(p, 420) for p in nodes)
    assert code0 == 0, f"node 0:\n{out0[-2000:]}\n{err0[-4000:]}"
    assert code1 == 0, f"node 1:\n{out1[-2000:]}\n{err1[-4000:]}"
    code, out, err = _finish(_start([*sft, "--set", f"run.output_dir={tmp_path / 'out2'}", "--nproc", "2",
                                     "--master-port", str(free_port())], tmp_path / "home2"), 420)
    assert code == 0, f"--nproc 2:\n{out[-2000:]}\n{err[-4000:]}"

    node0, m0 = _only_run(tmp_path / "home0")
    one, m = _only_run(tmp_path / "home2")
    assert node0["status"] == one["status"] == "finished"
    assert [s for s, _ in m0["loss"]] == [s for s, _ in m["loss"]] == [1, 2, 3]
    assert [v for _, v in m0["loss"]] == pytest.approx([v for _, v in m["loss"]], rel=1e-6, abs=0)
    assert node0["summary"]["train_loss"] == pytest.approx(one["summary"]["train_loss"], rel=1e-6)
    assert "train sft" in out0 and "train sft" in out  # node 0 prints the table, as a single launcher does

    node1, m1 = _only_run(tmp_path / "home1")
    assert node1["status"] == "finished" and not m1
    assert node1["summary"] == {"node_rank": 1, "nnodes": 2, "results": "on node 0 (127.0.0.1)"}
    outputs = Registry(tmp_path / "home1" / "registry.db").artifacts_of(node1["id"])["outputs"]
    assert not [a for a in outputs if not a.kind.startswith("external:")]  # inputs are recorded as external:*
    assert "node 1 of 2" in out1 and "results (metrics, model, summary) are on node 0" in out1
    assert "train loss" not in out1  # no empty results table
