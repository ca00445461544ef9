"""pipelines.launch: command assembly (torchrun / accelerate, multi-node, DeepSpeed), DeepSpeed configs, and real
2-process gloo runs on the CPU through launch() (rank, world size, all_reduce, registry attachment, exit codes,
signal forwarding)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines import launch as L
from pipelines.config import Config, load_config
from pipelines.errors import VideoR1Error

TESTS_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cfg_with(**dist) -> Config:
    return load_config(overrides=[f"distributed.{k}={v}" for k, v in dist.items()])


@pytest.fixture
def no_worker_env(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "VIDEOR1_RUN_ID", "VIDEOR1_RUN_DIR", "VIDEOR1_LAUNCHED"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def probe_env(monkeypatch, tmp_path, no_worker_env):
    out = tmp_path / "probe"
    out.mkdir()
    monkeypatch.setenv("PROBE_OUT", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    return out


def read_ranks(out: Path, n: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Pure: where am I, command lines
def test_worker_detection(monkeypatch, no_worker_env):
    assert not L.is_distributed_worker()
    assert (L.rank(), L.world_size(), L.local_rank()) == (0, 1, 0)
    cfg = cfg_with(nproc=2)
    assert L.needs_launch(cfg)
    assert not L.needs_launch(Config())
    assert L.needs_launch(cfg_with(nnodes=2))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert L.is_distributed_worker()
    assert (L.rank(), L.world_size(), L.local_rank()) == (3, 4, 1)
    assert not L.needs_launch(cfg)  # workers never relaunch
    assert not L.is_main_process()


def test_torchrun_command_multi_node():
    cfg = cfg_with(nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29555)
    argv = ["train", "rl", "--preset", "video-r1-7b", "--set", "distributed.nproc=8"]
    cmd = L.build_launch_command(cfg, argv, python="/py")
    assert cmd == [
        "/py", "-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes", "2", "--node_rank", "1",
        "--master_addr", "10.0.0.1", "--master_port", "29555", "-m", "videor1_cli.app", *argv,
    ]


def test_torchrun_command_uses_this_interpreter():
    cmd = L.build_launch_command(cfg_with(nproc=2), ["eval"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[-3:] == ["-m", "videor1_cli.app", "eval"]


def test_accelerate_command_multi_node_never_cpu_flag():
    cfg = cfg_with(nproc=4, nnodes=2, node_rank=0, master_addr="node0", master_port=1234, launcher="accelerate")
    cmd = L.build_launch_command(cfg, ["train", "sft"], python="/py")
    assert cmd[:3] == ["/py", "-m", "accelerate.commands.launch"]
    assert "--cpu" not in cmd  # `--cpu --num_processes 2` silently starts one process
    assert "--multi_gpu" in cmd
    flags = dict(zip(cmd[3::1], cmd[4::1]))
    assert flags["--num_processes"] == "8"  # total over nodes
    assert flags["--num_machines"] == "2"
    assert flags["--machine_rank"] == "0"
    assert flags["--main_process_ip"] == "node0"
    assert flags["--main_process_port"] == "1234"
    assert cmd[-4:] == ["-m", "videor1_cli.app", "train", "sft"]


def test_accelerate_command_deepspeed():
    cfg = cfg_with(nproc=2, nnodes=2, launcher="accelerate", deepspeed="zero3", master_port=29511)
    cmd = L.build_launch_command(cfg, ["train", "rl"])
    assert "--use_deepspeed" in cmd and "--multi_gpu" not in cmd
    assert cmd[cmd.index("--deepspeed_config_file") + 1] == str(L.LAUNCH_CONFIG_DIR / "zero3.json")
    assert cmd[cmd.index("--deepspeed_multinode_launcher") + 1] == "standard"


def test_launch_env():
    env = L.launch_env("r-123", "/tmp/x", base={"PATH": "/bin"})
    assert env["VIDEOR1_RUN_ID"] == "r-123"
    assert env["VIDEOR1_RUN_DIR"] == str(Path("/tmp/x").resolve())
    assert env["VIDEOR1_LAUNCHED"] == "1"
    assert env["PATH"] == "/bin"


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed configs
@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_shipped_deepspeed_configs_parse(name, stage):
    path = L.deepspeed_config_path(name)
    assert path.is_file() and path.parent == L.LAUNCH_CONFIG_DIR
    ds = json.loads(path.read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert "optimizer" not in ds  # the trainers build their own AdamW (Video-R1's RL config has no optimizer block)
    if name == "zero3_offload":
        assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_deepspeed_config_path_custom_and_missing(tmp_path):
    p = tmp_path / "my.json"
    p.write_text("{}")
    assert L.deepspeed_config_path(str(p)) == p.resolve()
    with pytest.raises(VideoR1Error) as e:
        L.deepspeed_config_path("zero9")
    assert "zero2" in e.value.hint


def test_accelerate_yaml_examples_parse():
    import yaml

    for name in ("accelerate_multinode.yaml", "accelerate_deepspeed_zero3.yaml"):
        y = yaml.safe_load((L.LAUNCH_CONFIG_DIR / name).read_text())
        assert y["num_machines"] == 2 and y["num_processes"] == 16


def test_resolve_deepspeed_config_fills_autos():
    ds = L.resolve_deepspeed_config("zero3", micro_batch_size=1, gradient_accumulation_steps=2, world_size=4,
                                    max_grad_norm=5.0, mixed_precision="bf16", hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 5.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    zo = ds["zero_optimization"]
    assert zo["reduce_bucket_size"] == 64 * 64
    assert zo["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zo["stage3_param_persistence_threshold"] == 640
    # untouched when unknown; the shipped file itself is never modified
    ds2 = L.resolve_deepspeed_config("zero3")
    assert ds2["train_micro_batch_size_per_gpu"] == "auto"
    assert json.loads(L.deepspeed_config_path("zero3").read_text())["gradient_clipping"] == "auto"


def test_model_hidden_size_reads_text_config(tiny_model_dir):
    from transformers import AutoConfig

    class M:
        config = AutoConfig.from_pretrained(tiny_model_dir)

    assert L.model_hidden_size(M()) == 64


def test_make_accelerator_cpu(no_worker_env):
    import torch

    acc = L.make_accelerator(Config(), gradient_accumulation_steps=2)
    assert acc.device.type == "cpu"
    assert acc.num_processes == 1
    assert acc.gradient_accumulation_steps == 2
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    loss = model(torch.ones(2, 3)).sum()
    acc.backward(loss)
    opt.step()


def test_make_accelerator_deepspeed_missing_is_user_error(monkeypatch, no_worker_env):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "deepspeed":
            raise ImportError("no deepspeed")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(VideoR1Error) as e:
        L.make_accelerator(load_config(overrides=["distributed.deepspeed=zero2"]))
    assert "not importable" in str(e.value) and "pip install" in e.value.hint
    assert "\n" not in str(e.value)


def test_deepspeed_is_allowed_without_a_gpu(monkeypatch, no_worker_env, tmp_path):
    """DeepSpeed runs on the CPU (gloo): neither the library nor the CLI refuses it; only an unknown config is."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]'; CI installs "
                        "it)")
    import torch

    from tests.conftest import run_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    L.check_deepspeed(cfg_with(deepspeed="zero3"))
    L.check_deepspeed(cfg_with())
    with pytest.raises(VideoR1Error, match="zero9"):
        L.check_deepspeed(cfg_with(deepspeed="zero9"))
    assert L.deepspeed_zero_stage(cfg_with(deepspeed="zero3_offload")) == 3
    assert L.deepspeed_zero_stage(cfg_with()) == 0
    assert L.needs_launch(cfg_with(deepspeed="zero2"))  # DeepSpeed needs a process group: torchrun, 1 process too
    # The CLI gets past the DeepSpeed check and launches; the worker then fails on the missing model.
    args = ["train", "rl", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no.json"),
            "--set", "distributed.deepspeed=zero2", "--set", f"run.output_dir={tmp_path / 'runs'}"]
    monkeypatch.setattr(sys, "argv", ["videor1", *args])  # what the launcher re-runs on each rank
    r = run_cli(*args, check=False)
    assert r.exit_code != 0 and "CUDA" not in r.output, r.output
    assert "error: rank 0: " in r.output and "not found" in r.output, r.output  # the worker's own error, once


def test_init_distributed_outside_worker_is_noop(no_worker_env):
    assert L.init_distributed(Config()) is False


def test_launch_refuses_inside_worker(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError):
        L.launch(cfg_with(nproc=2), [])


@pytest.mark.parametrize("argv, code, ends", [
    (["config", "keys"], 0, True),                    # success: the process groups are destroyed before exit
    (["config", "show", "--set", "no.such=1"], 2, False),  # failure: another rank may sit in a collective; no barrier
])
def test_a_worker_ends_its_process_group_on_success_only(monkeypatch, capsys, argv, code, ends):
    """The CI failure this guards: a finished 2-rank ZeRO-3 `train sft` (model saved) aborted at exit, "terminate
    called without an active exception" (signal 6), because its gloo process group was still alive when the
    interpreter was torn down. `videor1` now calls `end_worker` (barrier, destroy) when a launched rank succeeds.
    Its real effect on two gloo ranks is in test_launch_torchrun_two_ranks_all_reduce_and_registry."""
    from videor1_cli import app as A

    calls: list[int] = []
    monkeypatch.setattr(L, "end_worker", lambda: calls.append(1))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv(L.ERROR_DIR_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", ["videor1", *argv])
    with pytest.raises(SystemExit) as e:
        A.main()
    assert (e.value.code or 0) == code
    assert calls == ([1] if ends else [])
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_RANK")
    calls.clear()
    with pytest.raises(SystemExit):
        A.main()
    assert calls == []  # not a launched rank: nothing to end


# ---------------------------------------------------------------------------------------------------------------------
# Real 2-process gloo runs on the CPU
def test_launch_torchrun_two_ranks_all_reduce_and_registry(probe_env, monkeypatch):
    from pipelines.registry import Registry
    from videor1_cli.common import registered_run

    monkeypatch.setenv("PROBE_REGISTRY", "1")
    cfg = cfg_with(nproc=2, master_port=free_port())
    with registered_run(cfg, "probe") as (run, run_dir):
        code = L.launch(cfg, ["--x", "y"], run, run_dir, module="_dist_probe")
    assert code == 0
    ranks = read_ranks(probe_env)
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    assert [r["env_rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["world_size"] == 2 and r["sum"] == 3.0 and r["backend"] == "gloo"
        assert r["is_worker"] and not r["needs_launch"]
        assert r["argv"] == ["--x", "y"]  # argv reaches the workers untouched
        assert r["launched"] == "1"
        assert r["run_id"] == run.id and r["attached_run"] == run.id  # workers attach to the launcher's run
        assert r["attached_dir"] == str(Path(run_dir).resolve())
        assert r["initialized_after_end"] is False  # end_worker destroyed the process group on both ranks
    reg = Registry(cfg.registry_path())
    assert [x["id"] for x in reg.list_runs()] == [run.id]  # no run per worker
    assert reg.metrics(run.id)["probe_sum"] == [(0, 3.0)]


@pytest.mark.slow
def test_launch_accelerate_multi_gpu_flag_gives_two_cpu_ranks(probe_env, monkeypatch):
    monkeypatch.setenv("PROBE_ACCEL", "1")
    cfg = cfg_with(nproc=2, master_port=free_port(), launcher="accelerate")
    assert L.launch(cfg, [], module="_dist_probe") == 0
    ranks = read_ranks(probe_env)
    for r in ranks:
        assert r["accel"]["num_processes"] == 2
        assert r["accel"]["device"].startswith("cpu")
        assert r["accel"]["sum"] == 3.0
        assert r["world_size"] == 2 and r["sum"] == 3.0
    assert sorted(r["accel"]["process_index"] for r in ranks) == [0, 1]


@pytest.mark.slow
def test_launch_returns_nonzero_when_a_worker_fails(probe_env, monkeypatch):
    monkeypatch.setenv("PROBE_MODE", "fail")
    cfg = cfg_with(nproc=2, master_port=free_port())
    assert L.launch(cfg, [], module="_dist_probe") != 0


@pytest.mark.slow
def test_launch_forwards_sigterm_to_workers(probe_env, monkeypatch):
    monkeypatch.setenv("PROBE_MODE", "hang")
    cfg = cfg_with(nproc=2, master_port=free_port())

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not all((probe_env / f"ready{r}").exists() for r in (0, 1)):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=killer, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        L.launch(cfg, [], module="_dist_probe")
    pids = [int((probe_env / f"ready{r}").read_text()) for r in (0, 1)]
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by torchrun) counts as dead
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_launch_runs_the_real_cli_on_each_rank(no_worker_env, capfd):
    cfg = cfg_with(nproc=2, master_port=free_port())
    assert L.launch(cfg, ["--help"]) == 0
    out = capfd.readouterr()
    assert (out.out + out.err).count("Usage:") == 2  # python -m videor1_cli.app --help, once per rank


def test_worker_argv_spells_distributed_flags_as_set():
    from pipelines.launch import worker_argv

    argv = ["train", "sft", "--nproc", "2", "--master-port=29511", "--nnodes", "1", "--data", "x.json"]
    assert worker_argv(argv) == ["train", "sft", "--set", "distributed.nproc=2", "--set",
                                 "distributed.master_port=29511", "--set", "distributed.nnodes=1", "--data", "x.json"]
    assert worker_argv(worker_argv(argv)) == worker_argv(argv)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) counts as gone
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_launched_process_dies_with_the_launching_one(tmp_path):
    """The launcher's child arms its parent-death signal itself (no preexec_fn: Python code between fork and exec
    can deadlock in a threaded parent). Killing the parent with SIGKILL takes the child down; a child whose parent is
    already gone when it starts exits at once."""
    import subprocess

    root = str(Path(L.__file__).resolve().parent.parent)
    pidfile = tmp_path / "child.pid"
    child = (f"import os, sys, time; sys.path.insert(0, {root!r}); from pipelines.launch import die_with_parent; "
             f"die_with_parent(os.getppid()); open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"])
    deadline = time.time() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.time() < deadline, "the child never started"
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    assert _alive(pid)
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while _alive(pid):
        assert time.time() < deadline, "the child outlived its parent"
        time.sleep(0.1)
    gone = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {root!r}); "
                           "from pipelines.launch import die_with_parent; die_with_parent(1 << 30); print('ran on')"],
                          capture_output=True, text=True)
    assert gone.returncode == 128 + signal.SIGTERM and "ran on" not in gone.stdout
