"""Helpers of the resume tests (tests/test_resume.py): a run killed with SIGKILL after a checkpoint, the resumed run,
and the per-step comparison with an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parent.parent


def env_for(home: Path) -> dict[str, str]:
    env = dict(os.environ, VIDEOR1_HOME=str(home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", VIDEOR1_QUIET="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch-extensions"))  # DeepSpeed's JIT ops, built once
    return env


def cli(*argv) -> list[str]:
    return [sys.executable, "-m", "videor1_cli.app", *map(str, argv)]


def run(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run in its own session; on timeout kill the whole tree (the launcher, torchrun and its workers)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout:.0f} s:\n{out[-3000:]}\n{err[-5000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{out[-3000:]}\n{err[-6000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun starts its own session: a process group is not enough)."""
    kids = _children()
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += kids.get(p, [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_after_checkpoint(cmd: list[str], env: dict, checkpoint: Callable[[], Path | None],
                          timeout: float = 600) -> Path:
    """Start `cmd`, SIGKILL it (all its processes) as soon as `checkpoint()` finds a complete checkpoint; return it."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    found = None
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            found = checkpoint()
            if found is not None:
                break
            time.sleep(0.02)
    finally:
        kill_tree(proc.pid)
        _, err = proc.communicate(timeout=120)
    assert found is not None, f"no checkpoint appeared before the run ended (code {proc.returncode}):\n{err[-4000:]}"
    return found


def rl_checkpoint(out_dir: Path) -> Callable[[], Path | None]:
    def find() -> Path | None:
        done = sorted(Path(out_dir).glob("train-rl-*/checkpoints/step-*/trainer_state.json"),
                      key=lambda p: int(p.parent.name[5:]))
        return done[0].parent if done else None
    return find


def sft_checkpoint(out_dir: Path) -> Callable[[], Path | None]:
    from pipelines.sft import latest_checkpoint

    return lambda: latest_checkpoint(out_dir)


def step_of(ckpt: Path) -> int:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    return int(state.get("step", state.get("global_step", 0)))


def metrics(home: Path, name: str) -> tuple[dict, dict[str, list[tuple[int, float]]]]:
    """(registry run, metrics) of the run named `name` in the registry under `home`."""
    from pipelines.registry import Registry

    reg = Registry(home / "registry.db")
    runs = [r for r in reg.list_runs() if r.get("name") == name]
    assert len(runs) == 1, [(r.get("name"), r.get("status")) for r in reg.list_runs()]
    run = reg.get_run(runs[0]["id"])
    return run, reg.metrics(run["id"])


def assert_same_tail(full: dict, resumed: dict, keys, after: int, last: int, tol: float = 1e-5) -> dict[str, float]:
    """Per-step metrics of the resumed run equal the uninterrupted run's from step after+1 to `last`, within `tol`
    (absolute, float32 values); returns the largest difference per key."""
    worst = {}
    for key in keys:
        a = {s: v for s, v in full[key] if s > after}
        b = {s: v for s, v in resumed[key] if s > after}
        assert sorted(a) == sorted(b) == list(range(after + 1, last + 1)), (key, sorted(a), sorted(b))
        diffs = {s: abs(a[s] - b[s]) for s in a}
        worst[key] = max(diffs.values())
        assert worst[key] <= tol, f"{key}: uninterrupted {a} vs resumed {b}"
    return worst


def assert_same_weights(dir_a: Path, dir_b: Path, atol: float = 0.0) -> None:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(Path(dir_a) / "model.safetensors"), load_file(Path(dir_b) / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)
