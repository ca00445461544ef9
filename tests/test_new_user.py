"""What a new user hit (issue 21): ports, worker errors, disk-full errors naming the path, no registry row for a
command that never started work, help texts (examples, presets, `config keys`), `config validate`, piped tables at
$COLUMNS, `doctor`, the eval fallbacks and refusals, the model card."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from pipelines.registry import Registry


def _registry() -> Registry:
    return Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db")


def _flat(text: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─┃━┏┓┗┛]", " ", text).split())


# ---------------------------------------------------------------------------------------------------------------------
# Ports
def test_master_port_defaults_to_a_free_port_and_multi_node_must_name_one():
    from pipelines import launch as L
    from pipelines.config import load_config
    from pipelines.errors import VideoR1Error

    cfg = load_config(overrides=["distributed.nproc=2"])
    assert cfg.distributed.master_port is None
    ports = {int(L.build_launch_command(cfg, ["x"])[L.build_launch_command(cfg, ["x"]).index("--master_port") + 1])
             for _ in range(3)}
    assert 29500 not in ports or len(ports) > 1
    import socket

    for port in ports:  # free: it can be bound right now
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    explicit = load_config(overrides=["distributed.nproc=2", "distributed.master_port=29555"])
    assert "29555" in L.build_launch_command(explicit, ["x"])
    with pytest.raises(VideoR1Error, match="2-node run needs distributed.master_port") as e:
        L.build_launch_command(load_config(overrides=["distributed.nnodes=2"]), ["x"])
    assert "--master-port" in e.value.hint and "every node" in e.value.hint


def test_one_free_port_helper():
    """The three copies (vLLM's engine env, the quickstart's stages, bench distributed) use pipelines.launch's."""
    import inspect

    from pipelines import quickstart
    from pipelines.bench import distributed, sp
    from pipelines.generation import vllm

    for mod in (quickstart, distributed, sp, vllm):
        src = inspect.getsource(mod)
        assert "def free_port" not in src and "def _free_port" not in src and "socket.socket(" not in src, mod


# ---------------------------------------------------------------------------------------------------------------------
# Worker errors
def test_worker_errors_become_one_line_with_the_resume_hint_only_when_it_can_help(tmp_path):
    from pipelines.errors import DataError
    from pipelines.launch import worker_failure

    bad = {"rank": 0, "known": True, "message": "x.json: 1 records cannot feed 2 ranks", "hint": "use --nproc 1",
           "resumable": DataError.resumable, "time": 1.0}
    e = worker_failure(1, [bad, dict(bad, rank=1, time=1.1)], checkpoint=lambda: tmp_path / "step-10")
    assert str(e) == "ranks 0, 1: x.json: 1 records cannot feed 2 ranks"
    assert e.hint == "use --nproc 1"  # a data error: no resume hint, even with a checkpoint
    oom = {"rank": 1, "known": False, "message": "OutOfMemoryError: CUDA out of memory", "hint": None,
           "resumable": True, "time": 2.0}
    peer = {"rank": 0, "known": False, "message": "RuntimeError: [pair.cc:561] Connection closed by peer",
            "hint": None, "resumable": False, "time": 2.5}
    e = worker_failure(1, [peer, oom], checkpoint=lambda: tmp_path / "step-10")
    assert str(e) == "rank 1: OutOfMemoryError: CUDA out of memory"  # the cause, not the peer that lost it
    assert "--debug" in e.hint and f"resume with --resume auto (latest checkpoint: {tmp_path / 'step-10'})" in e.hint
    e = worker_failure(1, [oom], checkpoint=lambda: None)
    assert "resume" not in e.hint  # nothing to resume from
    e = worker_failure(137, [], what="training workers", checkpoint=lambda: tmp_path / "step-10")
    assert "killed by signal 9" in str(e) and "--resume auto" in e.hint


def test_a_worker_reports_its_error_to_the_launcher_instead_of_printing_it(tmp_path, monkeypatch):
    from pipelines.errors import DataError
    from pipelines.launch import read_worker_errors, report_worker_error

    assert not report_worker_error(DataError("bad"), None)  # not a launched worker: prints as usual
    monkeypatch.setenv("VIDEOR1_ERROR_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert report_worker_error(DataError("x.json: bad", hint="fix it"), "fix it")
    [rec] = read_worker_errors(tmp_path)
    assert rec["rank"] == 1 and rec["message"] == "x.json: bad" and rec["hint"] == "fix it" and rec["known"]
    assert rec["resumable"] is False


def test_a_full_disk_names_the_checkpoint_path(tiny_model_dir, synth_world, tmp_path, monkeypatch):
    """ENOSPC while writing an RL checkpoint: one line naming the directory and errno, a hint about space; the run
    is failed in the registry (it did work: a step's metrics)."""
    import torch

    from pipelines.rl import checkpoint as C

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if "rng-rank" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(C.torch, "save", full_disk)
    r = run_cli("train", "rl", "--model", tiny_model_dir, "--data", synth_world["rl"], "--max-steps", "1",
                "--set", "rl.num_generations=2", "--set", "rl.max_completion_length=4", "--set", "rl.save_steps=1",
                "--set", "rl.per_device_prompts=1", "--set", f"run.output_dir={tmp_path / 'runs'}", check=False)
    assert r.exit_code == 1
    line = next(x for x in r.output.splitlines() if x.startswith("error:"))
    assert re.search(r"error: cannot write checkpoint .*/checkpoints/\.step-1\.tmp: No space left on device "
                     r"\(errno 28: ENOSPC\)", line), r.output
    assert "hint: free space on the disk holding" in r.output
    [run] = _registry().list_runs(kind="train-rl")
    assert run["status"] == "failed"


# ---------------------------------------------------------------------------------------------------------------------
# Registry rows
def test_a_command_that_never_started_work_leaves_no_run(tiny_model_dir, synth_world, tmp_path):
    runs = tmp_path / "runs"
    for args in (["train", "sft", "--set", f"run.output_dir={runs}"],  # no --data
                 ["train", "sft", "--model", tmp_path / "no-such-model", "--data", synth_world["sft"],
                  "--set", f"run.output_dir={runs}"],
                 ["train", "rl", "--model", tiny_model_dir, "--data", tmp_path / "nope.json",
                  "--set", f"run.output_dir={runs}"],
                 ["train", "sft", "--set", "sft.bogus=1"]):
        assert run_cli(*args, check=False).exit_code != 0
    assert _registry().list_runs() == []
    assert not runs.exists() or not any(runs.iterdir())  # no empty run directories either
    run_cli("data", "validate", synth_world["rl"], "--root", synth_world["root"],
            "--set", f"run.output_dir={runs}")  # a command that does its work is recorded
    assert [r["status"] for r in _registry().list_runs()] == ["finished"]


# ---------------------------------------------------------------------------------------------------------------------
# Help texts
def test_every_command_help_has_an_example_and_the_preset_list_comes_from_the_presets_folder(monkeypatch):
    import typer

    from pipelines.config import list_presets
    from videor1_cli.app import app

    monkeypatch.setenv("COLUMNS", "250")
    root = typer.main.get_command(app)

    def leaves(cmd, path):
        subs = getattr(cmd, "commands", None)
        if not subs or getattr(cmd, "invoke_without_command", False):
            yield path
        for name, sub in (subs or {}).items():
            yield from leaves(sub, [*path, name])

    paths = [p for p in leaves(root, []) if p]
    assert len(paths) >= 30
    for path in paths:
        out = _flat(run_cli(*path, "--help").output)
        assert "Example:" in out or "Examples:" in out, path
        assert f"videor1 {' '.join(path)}" in out.split("Example", 1)[1], path
        if "--preset" in out:
            assert f"Preset: {', '.join(n + (' (default)' if n == 'cpu-tiny' else '') for n in list_presets())}." \
                in out, path
    assert len(list_presets()) >= 5


def test_a_mistyped_option_gets_the_usage_line_not_a_traceback_hint():
    r = run_cli("doctor", "--modle", "x", check=False)
    assert r.exit_code == 2 and "No such option: --modle" in r.output and "--help" in r.output
    assert "NoSuchOption" not in r.output and "--debug" not in r.output


def test_hints_name_config_keys():
    r = run_cli("train", "sft", "--set", "sft.bogus=1", check=False)
    assert r.exit_code == 2 and "hint: `videor1 config keys` lists every key" in r.output
    r = run_cli("train", "sft", "--set", "sft.learning_rate=fast", check=False)
    assert "`videor1 config keys`" in r.output


def test_config_validate_takes_a_file_or_the_flags_every_command_takes(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("rl:\n  beta: 0.04\n")
    bad.write_text("rl:\n  betta: 0.04\n")
    assert "ok" in run_cli("config", "validate", good).output
    assert "ok" in run_cli("config", "validate", "--config", good).output
    assert "ok" in run_cli("config", "validate", "--preset", "video-r1-7b", "--set", "rl.num_generations=8").output
    r = run_cli("config", "validate", "--config", bad, check=False)
    assert r.exit_code == 2 and "rl.betta" in r.output
    r = run_cli("config", "validate", "--preset", "video-r1-7b", "--set", "rl.beta=x", check=False)
    assert r.exit_code == 2 and "rl.beta" in r.output


def test_runs_gc_help_puts_each_rule_on_its_own_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    out = run_cli("runs", "gc", "--help").output
    lines = [x.strip() for x in out.splitlines()]
    for head in ("Removed:", "Trimmed:", "Kept:"):
        assert any(x.startswith(head) for x in lines), (head, out)


def test_piped_tables_follow_columns_without_cropping(monkeypatch):
    from rich.table import Table

    from videor1_cli.common import ReadableConsole

    table = Table("key", "value")
    table.add_row("a-long-path", "/a/" + "x" * 150 + "/model.safetensors")

    def render() -> str:
        buf = io.StringIO()
        ReadableConsole(file=buf, highlight=False).print(table)
        return buf.getvalue()

    wide = render()
    assert max(len(x) for x in wide.splitlines()) > 150  # no COLUMNS: as wide as the content
    monkeypatch.setenv("COLUMNS", "80")
    narrow = render()
    assert max(len(x) for x in narrow.splitlines()) <= 80
    assert "…" not in narrow and "model.safetensors" in narrow.replace("│", "").replace(" ", "").replace("\n", "")


# ---------------------------------------------------------------------------------------------------------------------
# doctor
def test_doctor_prints_the_torch_build_and_flags_a_model_path_that_does_not_exist(tiny_model_dir):
    import torch

    info = json.loads(run_cli("doctor", "--json", "--set", "model.name_or_path=videor1-runs/no-model").output)
    assert info["torch"].startswith(str(torch.__version__))
    assert info["model"].startswith("videor1-runs/no-model: PROBLEM: ")  # not a local dir, not a cached Hub id
    assert "videor1 model tiny" in info["model"]
    (Path.cwd() / "videor1-runs").mkdir()
    info = json.loads(run_cli("doctor", "--json", "--set", "model.name_or_path=videor1-runs/no-model").output)
    assert info["model"].startswith("videor1-runs/no-model: PROBLEM: model directory not found")
    info = json.loads(run_cli("doctor", "--json", "--set", f"model.name_or_path={tiny_model_dir}").output)
    assert info["model"] == str(tiny_model_dir)


# ---------------------------------------------------------------------------------------------------------------------
# eval
def test_flash_attention_where_it_cannot_run_falls_back_to_sdpa_with_one_warning(tiny_model_dir, capsys):
    import torch

    from pipelines.models import load_model, resolve_attn
    from pipelines.config import load_config

    assert resolve_attn("flash_attention_2", torch.device("cpu")) == "sdpa"
    assert resolve_attn("eager", torch.device("cpu")) == "eager"
    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", "model.attn_implementation=flash_attention_2"])
    model = load_model(cfg.model, device=torch.device("cpu"))
    assert model.config._attn_implementation == "sdpa"
    err = capsys.readouterr().err
    assert err.count("flash_attention_2 cannot run here") == 1 and "using sdpa" in err


def test_eval_refuses_a_file_of_another_benchmark(tiny_model_dir, synth_world):
    r = run_cli("eval", "--bench", "vsi", "--model", tiny_model_dir, "--data", synth_world["test"], check=False)
    assert r.exit_code == 1
    assert "holds Synthetic world records" in r.output and "not VSI-Bench" in r.output
    assert "--bench synthetic" in r.output
    assert _registry().list_runs() == []  # refused before anything started


def test_eval_names_the_unreadable_video_of_each_error(tiny_model_dir, synth_world, tmp_path):
    records = json.loads(Path(synth_world["test"]).read_text())
    video = next(r for r in records if r["data_type"] == "video")
    world = tmp_path / "world"
    shutil.copytree(synth_world["root"], world)
    broken = world / video["path"][2:]
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    data = world / "three.json"
    data.write_text(json.dumps([video] + [r for r in records if r["data_type"] == "image"][:2]))
    out = run_cli("eval", "--bench", "synthetic", "--model", tiny_model_dir, "--data", data,
                  "--set", "eval.max_new_tokens=4", "--set", "data.max_skip_fraction=1",
                  "--set", f"eval.output_dir={tmp_path / 'ev'}").output
    assert "errors=1" in out
    assert "1 Synthetic world sample(s) not scored" in out
    assert f"id {video['problem_id']}: cannot read media {broken}" in out


# ---------------------------------------------------------------------------------------------------------------------
# slow: real 2-rank launches
def _cli_env(tmp_path) -> dict:
    env = dict(os.environ, VIDEOR1_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", VIDEOR1_QUIET="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("VIDEOR1_DEBUG", None)
    return env


@pytest.mark.slow
def test_a_rank_error_is_one_line_without_the_torchrun_traceback(tiny_model_dir, synth_world, tmp_path):
    """`train rl --nproc 2` on one record: every rank raises the same DataError; the user sees it once, as one line
    naming the ranks, with its hint and no resume hint (no resume gets past it); --debug shows the tracebacks."""
    import subprocess
    import sys

    one = tmp_path / "one.json"
    one.write_text(json.dumps(json.loads(Path(synth_world["rl"]).read_text())[:1]))
    cmd = [sys.executable, "-m", "videor1_cli.app", "train", "rl", "--model", str(tiny_model_dir), "--data", str(one),
           "--root", synth_world["root"], "--nproc", "2", "--set", f"run.output_dir={tmp_path / 'runs'}"]
    p = subprocess.run(cmd, env=_cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    errors = [x for x in out.splitlines() if x.startswith("error:")]
    assert errors == [f"error: ranks 0, 1: {one}: 1 records cannot feed 2 ranks"], out
    assert "hint: run on at most 1 rank(s) (--nproc), or give more records" in out
    assert "Traceback" not in out and "ChildFailedError" not in out and "--resume" not in out, out
    p = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], env=_cli_env(tmp_path), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 1 and "Traceback" in p.stdout + p.stderr


@pytest.mark.slow
def test_two_data_parallel_trainings_at_once_on_one_machine(tiny_model_dir, synth_world, tmp_path):
    """No --master-port: each launch picks a free one (they shared 29500 and the second died with EADDRINUSE)."""
    import subprocess
    import sys

    procs = []
    for i in range(2):
        cmd = [sys.executable, "-m", "videor1_cli.app", "train", "sft", "--model", str(tiny_model_dir),
               "--data", synth_world["sft"], "--root", synth_world["root"], "--nproc", "2", "--max-steps", "2",
               "--set", "sft.per_device_batch_size=1", "--out", str(tmp_path / f"out{i}"),
               "--set", f"run.output_dir={tmp_path / 'runs'}"]
        procs.append(subprocess.Popen(cmd, env=_cli_env(tmp_path / f"h{i}"), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert "EADDRINUSE" not in out and "address already in use" not in out.lower()
    assert all((tmp_path / f"out{i}" / "model.safetensors").is_file() for i in range(2))
