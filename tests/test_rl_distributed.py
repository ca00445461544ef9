"""RL across processes (slow): 2-rank gloo runs on the CPU (SIGKILL + resume: tests/test_resume.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.registry import Registry

pytestmark = pytest.mark.slow

SMALL = ["--set", "rl.num_generations=4", "--set", "rl.max_completion_length=12", "--set", "rl.per_device_prompts=2",
         "--set", "rl.logging_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path) -> dict:
    env = dict(os.environ, VIDEOR1_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", VIDEOR1_QUIET="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(tiny_model_dir, data, out_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "videor1_cli.app", "train", "rl", "--model", str(tiny_model_dir), "--data",
            str(data), "--set", f"run.output_dir={out_dir}", *SMALL, *extra]


def test_two_ranks_gloo(tiny_model_dir, synth_world, tmp_path):
    out = tmp_path / "runs"
    cmd = _cmd(tiny_model_dir, synth_world["rl"], out, "--nproc", "2", "--master-port", str(_free_port()),
               "--max-steps", "3", "--set", "rl.save_steps=100")
    p = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    reg = Registry(tmp_path / "home" / "registry.db")
    runs = reg.list_runs(kind="train-rl")
    assert len(runs) == 1  # the workers attached to the launcher's run
    run = reg.get_run(runs[0]["id"])
    assert run["status"] == "finished"
    run_dir = Path(run["run_dir"])
    r0 = json.loads((run_dir / "rank-0.json").read_text())
    r1 = json.loads((run_dir / "rank-1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    # parameters in sync
    assert r0["checksum"] == r1["checksum"]
    # ranks saw different prompts (disjoint shards), the same number of them
    seen0 = {i for s in r0["steps"] for i in s["indices"]}
    seen1 = {i for s in r1["steps"] for i in s["indices"]}
    assert seen0 and seen1 and not (seen0 & seen1)
    assert len(seen0) == len(seen1) == 3 * 2
    # metrics logged once per step by rank 0, as the mean over both ranks
    m = reg.metrics(run["id"])
    assert [s for s, _ in m["reward"]] == [1, 2, 3]
    for (step, value), a, b in zip(m["reward"], r0["steps"], r1["steps"]):
        assert value == pytest.approx((a["reward"] + b["reward"]) / 2, abs=1e-9)
    assert run["summary"]["world_size"] == 2
    assert (Path(run["summary"]["model"]) / "model.safetensors").exists()


def test_two_ranks_normalise_the_loss_over_the_whole_step(tiny_model_dir, synth_world, tmp_path):
    """Every third record points at a missing video, so the ranks keep different numbers of groups in some step (each
    broken record is skipped and counted, never replaced). `dapo` divides by the step's token count and `batch_std`
    by the step's reward std, both over the two ranks: each rank's normalisers are the all-reduced counts / 2."""
    records = json.loads(Path(synth_world["rl"]).read_text())
    for i, rec in enumerate(records):
        if i % 3 == 1:
            rec["path"] = "./videos/missing.mp4"
            rec["data_type"] = "video"
    data = Path(synth_world["rl"]).with_name("rl-some-broken.json")
    data.write_text(json.dumps(records))
    cmd = _cmd(tiny_model_dir, data, tmp_path / "runs", "--nproc", "2", "--master-port", str(_free_port()),
               "--max-steps", "3", "--set", "rl.save_steps=100", "--set", "rl.loss_type=dapo",
               "--set", "rl.advantage=batch_std",
               "--set", "data.max_skip_fraction=0.5")  # a third broken on purpose: past the end-of-stage check
    p = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    reg = Registry(tmp_path / "home" / "registry.db")
    run = reg.get_run(reg.list_runs(kind="train-rl")[0]["id"])
    run_dir = Path(run["run_dir"])
    r0 = json.loads((run_dir / "rank-0.json").read_text())
    r1 = json.loads((run_dir / "rank-1.json").read_text())
    assert r0["checksum"] == r1["checksum"]
    unequal = 0
    for a, b in zip(r0["steps"], r1["steps"]):
        la, lb = a["loss_counts"]["local"], b["loss_counts"]["local"]
        unequal += la[0] != lb[0]  # different numbers of sequences (groups), not only of tokens
        expected = dict(zip(["num_sequences", "num_tokens"], [(x + y) / 2 for x, y in zip(la, lb)]))
        # the normalisers logged are the very keyword arguments the trainer passes to policy_loss
        assert a["loss_counts"]["normalisers"] == b["loss_counts"]["normalisers"] == pytest.approx(expected)
        # batch_std: one std for the whole step, pooled over both ranks' rewards
        assert a["batch_std"] is not None and a["batch_std"] == pytest.approx(b["batch_std"], abs=1e-12)
    assert unequal, "the broken records did not make the ranks' group counts differ: the check above proves less"
    assert run["summary"].get("skipped", 0) > 0 or list(run_dir.glob("skipped-rank*.jsonl"))

