"""Config schema: presets, precedence preset < file < --set < shortcut, errors that name the key and the file."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli
from pipelines.config import Config, ConfigError, list_presets, load_config, parse_set


def test_video_knobs_have_the_contract_names_and_defaults():
    v = Config().video
    assert (v.fps, v.min_frames, v.max_frames) == (2.0, 4, 16)
    assert v.min_pixels == v.max_pixels == 128 * 28 * 28
    assert v.total_pixels == pytest.approx(128000 * 28 * 28 * 0.9)
    assert v.backend == "auto" and v.cache_dir is None
    assert (Config().image.min_pixels, Config().image.max_pixels) == (4 * 28 * 28, 256 * 28 * 28)


def test_presets_ship_and_validate():
    assert {"cpu-tiny", "video-r1-7b", "video-r1-eval"} <= set(list_presets())
    paper = load_config("video-r1-7b")
    assert paper.rl.beta == 0.04 and paper.rl.num_generations == 8 and paper.rl.temporal_alpha == 0.3
    assert paper.sft.learning_rate == 1e-6 and paper.distributed.deepspeed == "zero2"
    ev = load_config("video-r1-eval")
    assert ev.video.max_frames == 16 and ev.eval.frames is None
    assert ev.video.max_pixels == 256 * 28 * 28 and ev.eval.top_p == 0.001 and ev.model.dtype == "bfloat16"


def test_precedence_preset_file_set_shortcut(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"rl": {"beta": 0.1, "num_generations": 4}, "video": {"max_frames": 32}}))
    cfg = load_config("video-r1-7b", f, ["rl.beta=0.2"], {"model.name_or_path": "/m"})
    assert cfg.rl.beta == 0.2  # --set beats the file
    assert cfg.rl.num_generations == 4  # file beats the preset
    assert cfg.video.max_frames == 32
    assert cfg.rl.learning_rate == 1e-6  # preset beats defaults
    assert cfg.model.name_or_path == "/m"


def test_file_can_name_its_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inherits: video-r1-7b\nrl:\n  beta: 0.0\n")
    cfg = load_config(file=f)
    assert cfg.rl.beta == 0.0 and cfg.model.name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct"


def test_set_values_are_typed():
    assert parse_set("rl.beta=1e-3") == (["rl", "beta"], 1e-3)
    assert parse_set("rl.rewards=[format, accuracy]")[1] == ["format", "accuracy"]
    assert parse_set("model.lora.enabled=true")[1] is True
    with pytest.raises(ConfigError):
        parse_set("rl.beta")


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("rl:\n  betta: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(file=f)
    assert "rl.betta" in str(e.value) and str(f) in str(e.value)


def test_bad_value_names_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["video.backend=opencv"])
    assert "video.backend" in str(e.value) and "--set video.backend=opencv" in str(e.value)
    with pytest.raises(ConfigError, match="min_frames"):
        load_config(overrides=["video.min_frames=40"])


def test_eval_frames_sets_sampler_ceiling():
    cfg = load_config("video-r1-eval", shortcuts={"eval.frames": 64})
    assert cfg.video.max_frames == 64


def test_cli_config_show_schema_validate(tmp_path):
    out = run_cli("config", "show", "--preset", "video-r1-7b", "--set", "rl.beta=0.5").output
    assert yaml.safe_load(out)["rl"]["beta"] == 0.5
    schema = json.loads(run_cli("config", "schema").output)
    assert "rl" in schema["properties"] or "$defs" in schema
    good = tmp_path / "good.yaml"
    good.write_text("rl:\n  beta: 0.0\n")
    assert run_cli("config", "validate", good).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("video:\n  fpss: 3\n")
    r = run_cli("config", "validate", bad, check=False)
    assert r.exit_code == 2 and "video.fpss" in r.output and str(bad) in r.output
    r = run_cli("config", "show", "--set", "nope.x=1", check=False)
    assert r.exit_code == 2 and "nope" in r.output
    keys = run_cli("config", "keys", "video").output
    assert "video.total_pixels" in keys


def test_eval_picks_video_r1_protocol_for_real_benchmarks_only():
    from videor1_cli.eval import _protocol_preset

    assert _protocol_preset({"eval.bench": "vsi,videomme"}) == "video-r1-eval"
    assert _protocol_preset({"eval.bench": "synthetic"}) is None
    assert _protocol_preset({"eval.bench": None}) is None


def test_config_command_default_preset_yields_to_explicit_preset():
    import typer
    from typer.testing import CliRunner

    from videor1_cli.common import Shortcut, config_command

    app = typer.Typer()
    seen = {}

    @app.command()
    @config_command(Shortcut("eval.bench", ["--bench"], str | None, "b"),
                    default_preset=lambda v: "video-r1-eval" if v.get("eval.bench") == "vsi" else None)
    def show(cfg) -> None:
        seen["max_pixels"] = cfg.video.max_pixels

    CliRunner().invoke(app, ["--bench", "vsi"], catch_exceptions=False)
    assert seen["max_pixels"] == 256 * 28 * 28
    CliRunner().invoke(app, ["--bench", "vsi", "--preset", "cpu-tiny"], catch_exceptions=False)
    assert seen["max_pixels"] == 3136
