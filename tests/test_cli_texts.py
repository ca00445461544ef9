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
