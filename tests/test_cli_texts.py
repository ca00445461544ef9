"""What the CLI tells a reader: `config keys` shows the value in force and its source; help texts say what the
commands do."""

from __future__ import annotations

import re

from conftest import run_cli


def _row(out: str, key: str) -> list[str]:
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] == key:
            return cells
    raise AssertionError(f"no row {key}:\n{out}")


def test_config_keys_shows_the_value_in_force_and_where_it_came_from(tmp_path):
    out = run_cli("config", "keys", "sft").output
    assert _row(out, "sft.learning_rate")[1:3] == ["0.0005", "preset cpu-tiny"]
    assert _row(out, "sft.gradient_accumulation_steps")[1:3] == ["1", "default"]
    out = run_cli("config", "keys", "annotate").output
    assert _row(out, "annotate.backend")[1:3] == ['"hf"', "preset cpu-tiny"]
    out = run_cli("config", "keys", "sft", "--preset", "video-r1-7b").output
    assert _row(out, "sft.learning_rate")[2] == "preset video-r1-7b"
    f = tmp_path / "c.yaml"
    f.write_text("sft:\n  warmup_ratio: 0.2\n")
    out = run_cli("config", "keys", "sft", "--config", f, "--set", "sft.learning_rate=0.001").output
    assert _row(out, "sft.learning_rate")[1:3] == ["0.001", "--set sft.learning_rate=0.001"]
    assert _row(out, "sft.warmup_ratio")[1:3] == ["0.2", f"config file {f}"]


def _flat(text: str) -> str:
    """Help text without rich's box characters and line breaks (whatever width it was drawn at)."""
    return " ".join(re.sub(r"[│╭╮╰╯─┃━┏┓┗┛]", " ", text).split())


def _all_commands():
    import typer

    from videor1_cli.app import app

    root = typer.main.get_command(app)

    def walk(cmd, path: list[str]):
        yield path
        if getattr(cmd, "commands", None):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])

    return list(walk(root, []))


def test_no_help_text_shows_a_type_placeholder_on_a_flag(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # typer draws help at the terminal's width and cuts cells with "…"
    paths = _all_commands()
    assert len(paths) > 20
    for path in paths:
        out = run_cli(*path, "--help").output
        assert not re.search(r"<(bool|str|int|float|path|list\[)", out), (path, out)
    flat = _flat(run_cli("push", "--help").output)
    assert "--dry-run Print the model card" in flat and "--set -s KEY=VALUE" in flat


def test_help_texts_say_what_the_commands_do(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    ann = _flat(run_cli("annotate", "--help").output)
    assert "annotate [OPTIONS] [merge ...]" in ann and "COMMAND [ARGS]" not in ann
    ev = _flat(run_cli("eval", "--help").output)
    assert "--data TEXT A directory holding each benchmark's Video-R1 eval file" in ev
    assert "Input records, JSON or JSONL" not in ev
    assert "in place, into the directory that holds it" in _flat(run_cli("data", "unzip", "--help").output)


def test_runs_show_prints_the_config(tmp_path):
    from pipelines.config import load_config
    from pipelines.registry import Registry

    reg = Registry(tmp_path / "r.db")
    with reg.run("train-sft", load_config(overrides=["sft.max_steps=7"])) as run:
        pass
    out = run_cli("runs", "show", run.id, "--set", f"run.registry={tmp_path / 'r.db'}").output
    assert "config: preset cpu-tiny plus these keys" in out
    row = [x for x in out.splitlines() if "sft.max_steps" in x]
    assert row and "7" in row[0]


def test_readme_cpu_install_names_the_cpu_index_and_a_torch_pair_inside_the_pins():
    """README's CPU-only instruction installs torch/torchvision versions that pyproject's pins accept (else the
    following `pip install -e` would replace them with the CUDA build)."""
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    line = next(x for x in readme.splitlines() if "download.pytorch.org/whl/cpu" in x and x.startswith("pip install"))
    pins = {}
    import tomllib

    for dep in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]:
        r = Requirement(dep)
        pins[r.name] = r.specifier
    got = dict(tok.split("==") for tok in line.split() if "==" in tok)
    assert set(got) == {"torch", "torchvision"}
    for name, version in got.items():
        assert pins[name].contains(version), (name, version, pins[name])
