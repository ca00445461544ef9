"""Shared fixtures: offline environment, a tiny Qwen2.5-VL and a small synthetic world, built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VIDEOR1_QUIET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _threads():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch, tmp_path_factory):
    """Each test gets its own registry (VIDEOR1_HOME) and working directory, so nothing lands in the repo."""
    monkeypatch.setenv("VIDEOR1_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("COLUMNS", raising=False)  # piped tables follow $COLUMNS; tests must not depend on it
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets-cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from pipelines.models import build_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(out, seed=0)
    return out


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory):
    """A small synthetic world: {'root': dir, 'train': rl.json, 'sft': sft.json, 'test': test.json}."""
    from pipelines.synth import synthesize

    out = tmp_path_factory.mktemp("world")
    return synthesize(out, train=24, test=12, seed=0)


def run_cli(*args, check: bool = True):
    """Invoke the Typer app in-process (errors map to exit codes as in the real CLI); returns the click Result."""
    from typer.testing import CliRunner

    from videor1_cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    if check and result.exit_code != 0:
        raise AssertionError(f"videor1 {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}")
    return result
