"""`videor1 push`: model card from lineage, dry run without network, upload to a Hub stand-in, no token leak."""

from __future__ import annotations

import os
import sqlite3

import pytest

import hub_standin
from conftest import run_cli
from pipelines.config import Config
from pipelines.registry import Registry

TOKEN = "hf_SECRETtoken1234567890"


@pytest.fixture
def trained(tmp_path):
    reg = Registry(os.path.join(os.environ["VIDEOR1_HOME"], "registry.db"))
    data = tmp_path / "cot.json"
    data.write_text("[]")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    with reg.run("train-sft", Config(), command="videor1 train sft --data cot.json") as sft:
        sft.use_path("records", data)
        sft.use_path("model", base)
        sft.log_metrics(1, {"loss": 2.0})
        sft.log_metrics(2, {"loss": 1.0})
        sft_model = tmp_path / "sft-model"
        sft_model.mkdir()
        (sft_model / "config.json").write_text('{"a": 1}')
        sft.log_artifact("model", sft_model)
    with reg.run("train-rl", Config(), command="videor1 train rl --algo tgrpo") as rl:
        rl.use_path("model", sft_model)
        for s in range(3):
            rl.log_metrics(s, {"reward": 0.5 + s / 10, "rewards/accuracy": 0.4 + s / 10, "kl": 0.01})
        model = tmp_path / "rl-model"
        model.mkdir()
        (model / "config.json").write_text('{"b": 2}')
        (model / "model.safetensors").write_bytes(b"\0" * 64)
        rl.log_artifact("model", model)
    with reg.run("eval", Config(), command="videor1 eval --bench synthetic") as ev:
        ev.use_path("model", model)
        ev.set_summary({"benchmarks": {"synthetic": {"video-r1": {"overall": 0.71}, "official": {"overall": 0.69},
                                                    "n": 100, "errors": 0}}})
    return reg, rl.id, model


def test_dry_run_card_from_lineage(trained):
    reg, rl_id, model = trained
    out = run_cli("push", rl_id, "--repo-id", "me/tiny-r1", "--dry-run").output
    assert "train-sft" in out and "train-rl" in out and rl_id in out
    assert "rl.temporal_alpha" in out and "0.3" in out
    assert "videor1 train rl --preset" in out and "videor1 train sft --preset" in out
    assert "| `cot.json` | train-sft |" in out
    assert "- Base model: `base` (a local model directory" in out and str(model.parent) not in out
    assert "| synthetic | 0.71 | 0.69 | - | 100 | 0 |" in out  # no chance recorded in this eval summary
    assert "reward | 0.5 → 0.7" in out
    assert "arXiv:2503.21776" in out and "license: apache-2.0" in out
    assert "model.safetensors" in out
    assert not (model / "README.md").exists()  # dry run writes nothing


def test_push_to_hub_standin_without_leaking_token(trained, monkeypatch):
    reg, rl_id, model = trained
    srv, state, url = hub_standin.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        import huggingface_hub.constants as C

        monkeypatch.setattr(C, "ENDPOINT", url)
        monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True, raising=False)
        r = run_cli("push", str(model), "--repo-id", "me/tiny-r1", "--revision", "v1")
    finally:
        srv.shutdown()
    assert "pushed" in r.output and TOKEN not in r.output
    stored = state.files[("me/tiny-r1", "v1")]
    assert stored["config.json"] == b'{"b": 2}' and "README.md" in stored
    assert b"train-rl" in stored["README.md"] and TOKEN.encode() not in stored["README.md"]
    assert "v1" in state.repos["me/tiny-r1"]["branches"]
    assert any(h == f"Bearer {TOKEN}" for h in state.auth_headers)  # the token went only to the Hub
    db = os.path.join(os.environ["VIDEOR1_HOME"], "registry.db")
    dump = "\n".join(sqlite3.connect(db).iterdump())
    assert TOKEN not in dump
    push_runs = reg.list_runs(kind="push")
    assert push_runs and push_runs[0]["status"] == "finished"
    assert reg.parents(push_runs[0]["id"]) == [rl_id]


def test_push_needs_repo_id(trained):
    reg, rl_id, model = trained
    r = run_cli("push", rl_id, check=False)
    assert r.exit_code == 1 and "--repo-id" in r.output


def test_eval_rows_read_number_summaries_and_dict_summaries():
    """The eval run's summary is {"synthetic": 56.54, ...} (numbers in the headline mode) once its results.json is
    gone; older runs stored dicts with both modes. Both fill the card's table."""
    from pipelines.push import eval_rows

    e = {"summary": {"results": "/nonexistent/results.json", "scoring": "video-r1", "frames": 16,
                     "synthetic": 56.54, "errors": 2}, "config": {}}
    assert eval_rows(e) == ("video-r1", [{"bench": "synthetic", "video-r1": 56.54, "n": None, "errors": 2}])
    e = {"summary": {"benchmarks": {"vsi": {"video-r1": {"overall": 35.8}, "official": {"overall": 34.1},
                                            "n": 10, "errors": 0}}}, "config": {"eval": {"scoring": "official"}}}
    assert eval_rows(e) == ("official", [{"bench": "vsi", "video-r1": 35.8, "official": 34.1, "n": 10, "errors": 0}])


def test_public_name_drops_local_directories_and_keeps_hub_ids(tmp_path):
    from pipelines.push import public_name

    assert public_name("Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert public_name("/data/runs/train-sft-x/model") == "model"
    assert public_name(str(tmp_path / "m"), {str(tmp_path / "m"): "sft-model"}) == "sft-model"
    assert public_name({"a": ["/x/y.json", 3]}) == {"a": ["y.json", 3]}
