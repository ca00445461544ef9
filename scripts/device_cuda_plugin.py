"""pytest plugin of the GPU check (`scripts/device-check.sh`, step 1): the tests' models run on CUDA.

The tests build their configs from the `cpu-tiny` preset, whose `model.device` is `cpu`. With CUDA available this
plugin makes every preset that says `cpu` say `cuda` instead, so each in-process `train sft`, `train rl`, `eval`,
`annotate` and every `load_model(cfg.model)` of the run puts the model on the GPU -- in float32, with TF32 off, since
the tests' tolerances are float32's. What it does not move: tests that pin `torch.device("cpu")`, and the CLI
commands some tests start in subprocesses (torchrun ranks, SIGKILL/resume tests). It counts the tests that allocated
CUDA memory and prints that at the end, so "ran on the GPU" is a measured statement, not an assumption.
Without CUDA (the dry run) it changes nothing and says so.

Load it with `-p device_cuda_plugin` and `scripts/` on PYTHONPATH. Under pytest-xdist each worker writes its counts
to DEVICE_CUDA_PLUGIN_DIR (default: a folder in the temp dir) and the controller adds them up.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest


def _dir() -> Path:
    d = Path(os.environ.get("DEVICE_CUDA_PLUGIN_DIR") or Path(tempfile.gettempdir()) / "device-cuda-plugin")
    d.mkdir(parents=True, exist_ok=True)
    return d

_state: dict = {"cuda": False, "used": [], "tests": 0, "peak": 0}


def pytest_configure(config):
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import pipelines.config as C

    original = C.preset_data

    def on_cuda(name: str):
        data = original(name)
        model = data.get("model")
        if isinstance(model, dict) and model.get("device") == "cpu":
            data = dict(data, model=dict(model, device="cuda"))
        return data

    C.preset_data = on_cuda
    _state["cuda"] = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    if not _state["cuda"]:
        yield
        return
    import torch

    before = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    yield
    after = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    _state["tests"] += 1
    if after > before:
        _state["used"].append(item.nodeid)
    _state["peak"] = max(_state["peak"], torch.cuda.max_memory_allocated())


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist): a fresh tally
        for f in _dir().glob("usage-*.json"):
            f.unlink()


def pytest_sessionfinish(session, exitstatus):
    worker = getattr(session.config, "workerinput", {}).get("workerid", "main")
    if _state["cuda"] and _state["tests"]:
        (_dir() / f"usage-{worker}.json").write_text(json.dumps(
            {"tests": _state["tests"], "used": len(_state["used"]), "peak": _state["peak"]}))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    tr = terminalreporter
    if not _state["cuda"]:
        tr.write_line("device_cuda_plugin: CUDA is not available: these tests ran on the CPU")
        return
    import torch

    rows = [json.loads(f.read_text()) for f in _dir().glob("usage-*.json")]
    tests, used = sum(r["tests"] for r in rows), sum(r["used"] for r in rows)
    peak = max([r["peak"] for r in rows] or [0])
    tr.write_line(f"device_cuda_plugin: {used} of {tests} tests allocated CUDA memory on "
                  f"{torch.cuda.get_device_name(0)} (peak {peak / 2**20:.0f} MiB in one process); the others ran on "
                  "the CPU (pure functions, pinned devices, subprocesses)")
