"""Output a person reads: plain progress lines off a terminal, no hard-wrapped paths, width-independent output."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from pipelines.progress import PlainProgress, fmt_duration, progress_bar, progress_line


def test_progress_line_by_hand():
    assert fmt_duration(12.3) == "12s" and fmt_duration(853) == "14m13s" and fmt_duration(7322) == "2h02m"
    line = progress_line("sft", 120, 675, elapsed=185.0, rate=0.65, info="[dim]loss 0.3412[/dim]", unit="steps")
    # 555 steps left at 0.65/s = 853.8 s
    assert line == "[progress] sft 120/675 (17.8%)  0.65 steps/s  ETA 14m14s  elapsed 3m05s  loss 0.3412"
    assert progress_line("synth", 5, None, 2.0, None) == "[progress] synth 5/?  elapsed 2s"


def test_plain_progress_prints_at_start_every_interval_and_at_stop():
    now = [0.0]
    buf = io.StringIO()
    p = PlainProgress("train rl", file=buf, every=10.0, unit="steps", clock=lambda: now[0])
    with p:
        t = p.add_task("rl", total=100, rate="9 steps/s", live="reward 0.500")
        for step in range(1, 31):
            now[0] = float(step)
            p.update(t, completed=step, live=f"reward {step / 100:.3f}")
    lines = buf.getvalue().splitlines()
    # step 1 (first update), 11, 21 (every 10 s of the clock), then the final line at stop
    assert len(lines) == 4, lines
    assert lines[0].startswith("[progress] train rl 1/100 (1.0%)")
    assert lines[1].startswith("[progress] train rl 11/100") and "reward 0.110" in lines[1]
    assert lines[-1].startswith("[progress] train rl 30/100 (30.0%)") and "ETA" in lines[-1]
    assert "9 steps/s" not in buf.getvalue()  # the task's own rate text is not repeated
    # all the work in one update (an eval of a few samples): one line, not the same line twice; and no rate from a
    # task added just as its first item ended (RL adds it after step 1)
    buf = io.StringIO()
    now[0] = 0.0
    with PlainProgress("eval", file=buf, every=10.0, clock=lambda: now[0]) as p:
        t = p.add_task("e", total=12)
        now[0] = 0.001
        p.update(t, completed=12)
    assert buf.getvalue().splitlines() == ["[progress] eval 12/12 (100.0%)  elapsed 0s"]


def test_progress_bar_is_rich_on_a_terminal_and_plain_elsewhere(monkeypatch):
    from rich.progress import Progress

    monkeypatch.delenv("VIDEOR1_QUIET", raising=False)
    assert isinstance(progress_bar("x", console=Console(file=io.StringIO())), PlainProgress)
    assert isinstance(progress_bar("x", console=Console(file=io.StringIO(), force_terminal=True)), Progress)
    assert progress_bar("x", console=Console(file=io.StringIO()), disable=True).disable


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), **extra)
    env.pop("VIDEOR1_QUIET", None)
    return env


def test_a_long_path_is_printed_whole_at_40_columns(tmp_path):
    """Output to a pipe with COLUMNS=40: the registry path (150+ characters) appears unbroken on one line."""
    home = tmp_path / ("a-rather-long-directory-name-" * 5) / "videor1-home"
    r = subprocess.run([sys.executable, "-m", "videor1_cli.app", "runs", "ls"], capture_output=True, text=True,
                       env=_env(COLUMNS="40", VIDEOR1_HOME=str(home)), timeout=120)
    assert r.returncode == 0, r.stderr
    assert str(home / "registry.db") in r.stdout, r.stdout


def test_a_long_stage_off_a_terminal_logs_plain_progress_lines(tiny_model_dir, synth_world, tmp_path):
    """`train rl` with stderr to a file: [progress] lines with step counts and ETA, and no rich redraw codes."""
    log = tmp_path / "rl.log"
    with open(log, "w") as f:
        r = subprocess.run(
            [sys.executable, "-m", "videor1_cli.app", "train", "rl", "--model", str(tiny_model_dir),
             "--data", synth_world["rl"], "--max-steps", "3", "--set", "rl.num_generations=2",
             "--set", "rl.max_completion_length=6", "--set", "rl.per_device_prompts=1",
             "--set", "rl.save_steps=100", "--set", "run.progress_every=0.001",
             "--set", f"run.output_dir={tmp_path / 'runs'}"],
            stdout=f, stderr=subprocess.STDOUT, env=_env(VIDEOR1_HOME=str(tmp_path / "home")), timeout=600)
    text = log.read_text()
    assert r.returncode == 0, text
    lines = [x for x in text.splitlines() if x.startswith("[progress] train rl")]
    assert lines and lines[-1].startswith("[progress] train rl 3/3 (100.0%)"), text
    assert any("reward" in x for x in lines)
    assert "\x1b[" not in text  # no cursor movement or colour codes in a log file


def test_report_to_a_tracker_that_is_not_installed_fails_at_once(tiny_model_dir, synth_world, tmp_path,
                                                                  monkeypatch):
    """trackio is in the [test] extra, so its absence is simulated: the check looks for a module that is not there."""
    from conftest import run_cli
    from videor1_cli import common

    monkeypatch.setitem(common.TRACKER_MODULES, "trackio", "videor1_no_such_tracker_module")
    r = run_cli("train", "sft", "--model", tiny_model_dir, "--data", synth_world["sft"], "--max-steps", "1",
                "--set", "run.report_to=[trackio]", "--set", f"run.output_dir={tmp_path / 'runs'}", check=False)
    assert r.exit_code == 1
    assert "error: run.report_to names trackio, which is not installed" in r.output
    assert "pip install trackio" in r.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing started


def test_report_to_trackio_logs_rl_metrics_locally(tiny_model_dir, synth_world, tmp_path):
    """`train rl --set run.report_to=[trackio]` logs to trackio's local store (TRACKIO_DIR), offline (checked under
    `unshare -n`: no network); the registry and metrics.jsonl get the metrics as always. trackio is in the [test]
    extra: the README's install and CI run this."""
    import pytest

    pytest.importorskip("trackio", reason="trackio is not installed (it is in the [test] extra: pip install -e "
                        "'.[test]')")
    tdir = tmp_path / "trackio"
    r = subprocess.run(
        [sys.executable, "-m", "videor1_cli.app", "train", "rl", "--model", str(tiny_model_dir),
         "--data", synth_world["rl"], "--max-steps", "2", "--set", "rl.num_generations=2",
         "--set", "rl.max_completion_length=6", "--set", "rl.per_device_prompts=1", "--set", "rl.save_steps=100",
         "--set", "run.report_to=[trackio]", "--set", f"run.output_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=600,
        env=_env(VIDEOR1_HOME=str(tmp_path / "home"), TRACKIO_DIR=str(tdir), GRADIO_ANALYTICS_ENABLED="False"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not started" not in r.stderr
    assert any(tdir.rglob("*.db")), sorted(str(p) for p in tdir.rglob("*"))
    assert list((tmp_path / "runs").glob("train-rl-*/metrics.jsonl"))


def test_scoring_columns_name_the_headline_and_the_quickstart_table_names_its_scoring():
    from videor1_cli.eval import headline_column
    from videor1_cli.quickstart import SCORING_NOTE, final_tables

    assert headline_column("official", "official") == "official (headline)"
    assert headline_column("video-r1", "official") == "video-r1"
    row = {"chance": 33.3, "untrained": 0.0, "sft": 60.0, "rl": 63.0}
    table = {**row, "order_dependent": row, "per_type": {}, "n_test": 10, "seeds": [{"seed": 1}]}
    assert "`official` scoring" in final_tables(table)[0].title
    assert "`official (headline)`" in SCORING_NOTE
    buf = io.StringIO()
    Console(file=buf, width=300).print(final_tables({**table, "smoke": True})[0])
    assert "[smoke: no accuracy claim]" in buf.getvalue()  # was eaten as a rich style tag
    # the RL column names the algorithm that ran (GRPO by default; --compare-algos adds the other one)
    buf = io.StringIO()
    Console(file=buf, width=300).print(final_tables({**table, "rl_algo": "grpo", "tgrpo": 62.0})[0])
    assert "after RL (GRPO)" in buf.getvalue() and "after RL (T-GRPO)" in buf.getvalue()
    buf = io.StringIO()
    Console(file=buf, width=300).print(final_tables({**table, "rl_algo": "tgrpo"})[0])
    assert "after RL (T-GRPO)" in buf.getvalue() and "(GRPO)" not in buf.getvalue()
