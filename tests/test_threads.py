"""torch threads per process (run.torch_threads), what `doctor` says about them, and how the quickstart spreads its
stages over the cores (data-parallel ranks, background evals). No timing is asserted here: the speed figures are in
BENCHMARKS.md ("Quickstart on both cores")."""

from __future__ import annotations

import pytest
import torch

from pipelines import quickstart as Q
from pipelines import threads as T
from pipelines.config import load_config


# ---------------------------------------------------------------------------------------------------------------------
# The rule
def test_explicit_setting_wins_else_an_equal_share_of_the_cores():
    assert T.resolve_torch_threads(3, cores=2, processes=2) == 3
    assert T.resolve_torch_threads(None, cores=2, processes=1) == 2
    assert T.resolve_torch_threads(None, cores=2, processes=2) == 1
    assert T.resolve_torch_threads(None, cores=16, processes=4) == 4
    assert T.resolve_torch_threads(None, cores=1, processes=4) == 1  # never 0


def test_cores_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert T.cores_available() == 3


def test_processes_on_node_inside_a_torchrun_worker(monkeypatch):
    cfg = load_config(overrides=["distributed.nproc=4"])
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert T.processes_on_node(cfg) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # what torchrun sets in each worker
    assert T.processes_on_node(cfg) == 2


def test_apply_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert T.apply_torch_threads(load_config(overrides=["run.torch_threads=1"])) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_torch_threads_rejects_zero():
    with pytest.raises(Exception):
        load_config(overrides=["run.torch_threads=0"])


class _Applied(Exception):
    pass


@pytest.fixture
def applied(monkeypatch):
    """Replace apply_torch_threads by one that records the config and stops the stage right there."""
    seen = []

    def fake(cfg):
        seen.append(cfg.run.torch_threads)
        raise _Applied

    monkeypatch.setattr(T, "apply_torch_threads", fake)
    return seen


def test_train_sft_applies_the_setting_first(applied, tmp_path):
    from pipelines.sft import run_sft

    cfg = load_config(overrides=["run.torch_threads=1", f"data.file={tmp_path / 'cot.json'}"])
    with pytest.raises(_Applied):
        run_sft(cfg, None, output_dir=tmp_path / "out")
    assert applied == [1]


def test_train_rl_applies_the_setting_first(applied, tmp_path):
    from pipelines.rl.trainer import RLTrainer

    cfg = load_config(overrides=["run.torch_threads=1", f"data.file={tmp_path / 'rl.json'}"])
    with pytest.raises(_Applied):
        RLTrainer(cfg, None, tmp_path).setup()
    assert applied == [1]


def test_eval_applies_the_setting_first(applied, tmp_path):
    from pipelines.evaluate.runner import evaluate

    cfg = load_config(overrides=["run.torch_threads=1", f"data.file={tmp_path / 'test.json'}"])
    with pytest.raises(_Applied):
        evaluate(cfg, tmp_path / "eval")
    assert applied == [1]


def test_doctor_says_what_each_stage_uses():
    from pipelines.doctor import collect

    info = collect(load_config(overrides=["run.torch_threads=3", "distributed.nproc=2"]))  # what doctor prints
    assert info["cpu cores available"] >= 1
    assert info["threads setting"] == "run.torch_threads = 3"
    assert info["threads: train rl"] == "2 processes x 3 torch threads"
    assert info["threads: eval"] == "2 processes x 3 torch threads"
    assert info["threads: quickstart"].startswith("train sft: 2 processes x 1 torch thread")
    auto = T.stage_plan(load_config(overrides=["data.num_workers=1", "run.torch_threads=null"]))  # cpu-tiny sets 1
    n = T.cores_available()
    assert auto["threads: train sft"] == (f"1 process x {n} torch thread{'s' if n > 1 else ''} + 1 DataLoader worker "
                                          "each")


# ---------------------------------------------------------------------------------------------------------------------
# The quickstart's use of the cores
def test_quickstart_splits_the_global_batch_over_its_ranks(tmp_path):
    cfg = load_config(overrides=["quickstart.nproc=2", "sft.per_device_batch_size=32", "rl.per_device_prompts=32"])
    data = Q.stage_config(cfg, tmp_path, tmp_path / "r.db", "qs", smoke=False)
    assert data["sft"]["per_device_batch_size"] == 16 and data["rl"]["per_device_prompts"] == 16
    assert data["run"]["torch_threads"] == 1  # one thread per process (quickstart.torch_threads)
    one = Q.stage_config(load_config(overrides=["quickstart.nproc=1", "sft.per_device_batch_size=32"]), tmp_path,
                         tmp_path / "r.db", "qs", smoke=False)
    assert one["sft"]["per_device_batch_size"] == 32
    with pytest.raises(Q.QuickstartError, match="quickstart.nproc=3"):
        Q.stage_config(load_config(overrides=["quickstart.nproc=3", "sft.per_device_batch_size=32"]), tmp_path,
                       tmp_path / "r.db", "qs", smoke=False)


def test_quickstart_rl_steps_run_in_full_past_one_pass_of_the_pool(tmp_path):
    # 4,000 prompts / 32 per step = 125 steps per pass: 250 steps need 2 passes, 126 need 2, 125 need 1
    for steps, epochs in ((125, 1), (126, 2), (250, 2), (40, 1)):
        cfg = load_config(overrides=["quickstart.nproc=2", "rl.per_device_prompts=32", "quickstart.train=4000",
                                     f"quickstart.rl_steps={steps}", "rl.num_epochs=1"])
        data = Q.stage_config(cfg, tmp_path, tmp_path / "r.db", "qs", smoke=False)
        assert data["rl"]["num_epochs"] == epochs, steps
        spe = -(-(4000 // 2) // data["rl"]["per_device_prompts"])  # the RL trainer's steps per epoch
        assert int(data["rl"]["num_epochs"] * spe) >= steps
    # what else changes a pass (the first copy of this arithmetic ignored them and cut the run short):
    # gradient accumulation (2 x 16 prompts per rank per step: 63 steps a pass), data.max_samples (1,000 records:
    # 32 steps a pass), sequence parallelism (2 ranks, one data-parallel rank: 4,000 / 16 = 250 steps a pass)
    from pipelines.rl.schedule import steps_per_epoch, total_steps

    for extra, epochs in ((["rl.gradient_accumulation_steps=2"], 2), (["data.max_samples=1000"], 4),
                          (["distributed.sequence_parallel=2", "distributed.nproc=2"], 1)):
        cfg = load_config(overrides=["quickstart.nproc=2", "rl.per_device_prompts=32", "quickstart.train=4000",
                                     "quickstart.rl_steps=125", "rl.num_epochs=1", *extra])
        data = Q.stage_config(cfg, tmp_path, tmp_path / "r.db", "qs", smoke=False)
        assert data["rl"]["num_epochs"] == epochs, extra
        dp = 2 // data["distributed"]["sequence_parallel"]
        per_epoch = steps_per_epoch(min(4000, data["data"]["max_samples"] or 4000), dp,
                                    data["rl"]["per_device_prompts"], data["rl"]["gradient_accumulation_steps"])
        assert total_steps(125, data["rl"]["num_epochs"], per_epoch) == 125, extra  # the trainer's count
    more = load_config(overrides=["quickstart.rl_steps=10", "rl.num_epochs=3"])  # a larger setting is kept
    assert Q.stage_config(more, tmp_path, tmp_path / "r.db", "qs", smoke=False)["rl"]["num_epochs"] == 3


def test_quickstart_plan_ranks_and_background_evals(tmp_path):
    sp = Q.plan_seed(load_config(overrides=["quickstart.compare_algos=true"]), 0, tmp_path, tmp_path / "c.yaml", "qs")
    by = {s.key: s for s in sp.stages}
    for key in ("sft", "rl-tgrpo", "rl-grpo"):
        assert by[key].ranks == 2 and "distributed.nproc=2" in by[key].argv, key
    assert [s.key for s in sp.stages if s.background] == ["eval-untrained", "eval-sft", "eval-rl-grpo"]
    assert not by["eval-rl-tgrpo"].background  # the last stage: nothing left to overlap it with
    seq = Q.plan_seed(load_config(overrides=["quickstart.nproc=1", "quickstart.overlap_evals=false"]), 0, tmp_path,
                      tmp_path / "c.yaml", "qs")
    assert not any(s.background or s.ranks > 1 for s in seq.stages)
    assert not any("distributed.nproc" in a for s in seq.stages for a in s.argv)


def test_each_data_parallel_stage_gets_a_free_master_port(tmp_path):
    sp = Q.plan_seed(load_config(), 0, tmp_path, tmp_path / "c.yaml", "qs")
    by = {s.key: s for s in sp.stages}
    argv = Q.stage_argv(by["sft"])
    port = int(argv[-1].split("=", 1)[1])
    assert argv[-2:-1] == ["--set"] and argv[-1].startswith("distributed.master_port=") and 0 < port < 65536
    assert Q.stage_argv(by["eval-sft"]) == by["eval-sft"].argv  # one process: no port


class _Proc:
    """A stand-in Popen: ends at once with `code`, or (running=True) only when terminated."""

    def __init__(self, code=0, running=False):
        import threading

        self.code, self.terminated, self.ended = code, False, threading.Event()
        if not running:
            self.ended.set()

    def poll(self):
        return self.code if self.ended.is_set() else None

    def wait(self, timeout=None):
        self.ended.wait(timeout)
        return self.poll()

    def terminate(self):
        self.terminated, self.code = True, -15
        self.ended.set()

    kill = terminate


def _cfg(tmp_path):
    return load_config(overrides=[f"quickstart.out_dir={tmp_path / 'qs'}", "run.seed=0"])


def test_a_failed_background_stage_fails_the_quickstart_with_its_log(tmp_path):
    def invoke(argv):  # every foreground stage "succeeds": it makes its output
        out = argv[argv.index("--out") + 1] if "--out" in argv else next(
            a.split("=", 1)[1] for a in argv if a.startswith("rl.output_dir="))
        (tmp_path / "qs").mkdir(exist_ok=True)
        __import__("pathlib").Path(out).mkdir(parents=True, exist_ok=True)

    def spawn(argv, log_file):
        log_file.write_text("Traceback ...\nEvalError: the model file is broken\n")
        return _Proc(code=1)

    with pytest.raises(Q.QuickstartError, match=r"(?s)eval-untrained.*the model file is broken"):
        Q.run_quickstart(_cfg(tmp_path), invoke, spawn=spawn, registry=tmp_path / "r.db")


def test_a_failed_foreground_stage_stops_the_background_ones(tmp_path):
    procs = []

    def invoke(argv):
        if argv[:2] == ["train", "sft"]:
            raise Q.QuickstartError("stage `videor1 train sft` failed (exit 1)")
        __import__("pathlib").Path(argv[argv.index("--out") + 1]).mkdir(parents=True, exist_ok=True)

    def spawn(argv, log_file):
        procs.append(_Proc(running=True))
        return procs[-1]

    with pytest.raises(Q.QuickstartError, match="train sft"):
        Q.run_quickstart(_cfg(tmp_path), invoke, spawn=spawn, registry=tmp_path / "r.db")
    assert len(procs) == 1 and procs[0].terminated  # the untrained model's eval, started beside SFT


def test_quickstart_stage_output_of_child_processes_stays_off_stdout():
    """torchrun ranks inherit file descriptor 1: with --json, their prints must go to stderr, not into the table."""
    import subprocess
    import sys

    code = ("import subprocess, sys\n"
            "from videor1_cli.quickstart import _stdout_to_stderr\n"
            "with _stdout_to_stderr():\n"
            "    print('stage', flush=True)\n"
            "    subprocess.run([sys.executable, '-c', 'print(\"rank\")'], check=True)\n"
            "print('{\"table\": 1}')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout == '{"table": 1}\n'
    assert "stage" in res.stderr and "rank" in res.stderr
