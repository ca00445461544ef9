"""Every stage on every family through the CLI on its tiny model: train sft, train rl (tgrpo, grpo), eval, annotate
(hf); LoRA and freeze_vision; the forward-hook check that visual tensors reach the policy and reference forwards.

Qwen3-VL runs in the default suite; the other families (same code paths, other classes) are marked slow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from pipelines.models.families import ADAPTERS, FAMILIES
from pipelines.registry import Registry

DEFAULT = ("qwen3_vl",)
FAST_HOOK = ("qwen3_vl", "qwen3_5")


def _params(fast=DEFAULT):
    return [pytest.param(f, marks=() if f in fast else pytest.mark.slow) for f in FAMILIES]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-cli")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = ADAPTERS[family].build_tiny(root / family, seed=0)
        return built[family]

    return get


def registry() -> Registry:
    return Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db")


def last_run(kind: str) -> dict:
    return registry().get_run(registry().list_runs(kind=kind)[0]["id"])


def _length_reward(completions, **_):
    return [min(1.0, len(c) / 40.0) for c in completions]


@pytest.fixture
def length_reward():
    from pipelines import rewards

    rewards.REWARDS["test_length"] = _length_reward
    yield "test_length"
    rewards.REWARDS.pop("test_length", None)


RL_SMALL = ["--set", "rl.num_generations=2", "--set", "rl.num_shuffled=2", "--set", "rl.max_completion_length=8",
            "--set", "rl.per_device_prompts=2", "--set", "rl.save_steps=100", "--set", "rl.logging_steps=1"]


@pytest.mark.parametrize("family", _params())
def test_sft_tgrpo_eval_annotate_chain(family, models, synth_world, tmp_path, length_reward):
    """SFT -> T-GRPO -> eval -> annotate (hf) on the family's tiny model; each run finishes and records its family."""
    root = synth_world["root"]
    runs = ["--set", f"run.output_dir={tmp_path / 'runs'}"]
    sft = tmp_path / "sft"
    run_cli("train", "sft", "--model", models(family), "--data", synth_world["sft"], "--root", root, "--max-steps", "1",
            "--out", sft, "--set", "sft.per_device_batch_size=4", *runs)
    assert last_run("train-sft")["status"] == "finished"
    run_cli("train", "rl", "--model", sft, "--data", synth_world["rl"], "--root", root, "--algo", "tgrpo",
            "--max-steps", "1", "--set", "rl.rewards=[accuracy,format,test_length]", *RL_SMALL, *runs)
    rl = last_run("train-rl")
    assert rl["status"] == "finished" and rl["summary"]["algo"] == "tgrpo"
    m = registry().metrics(rl["id"])
    assert "p_shuffled" in m and "temporal_bonus_rate" in m  # shuffled rollouts ran on this family
    rl_model = rl["summary"]["model"]
    assert json.loads((Path(rl_model) / "config.json").read_text())["model_type"] == family
    label = f"{ADAPTERS[family].label} ({family})"
    assert json.loads(run_cli("runs", "show", rl["id"], "--json").output)["family"] == label
    card = run_cli("push", rl["id"], "--repo-id", "me/tiny", "--dry-run").output
    assert f"Model family: {ADAPTERS[family].label} (`{family}`" in card and f"{ADAPTERS[family].label.lower()}, video-reasoning" in card
    out = tmp_path / "eval"
    run_cli("eval", "--bench", "synthetic", "--model", rl_model, "--data", synth_world["test"], "--root", root,
            "--out", out, "--set", "eval.max_new_tokens=8", "--set", "eval.temperature=0", "--set", "eval.limit=4",
            *runs)
    rows = [json.loads(x) for x in (out / "synthetic.samples.jsonl").read_text().splitlines() if x.strip()]
    assert len(rows) == 4 and not any(r.get("error") for r in rows)
    ann = tmp_path / "ann"
    run_cli("annotate", "--data", synth_world["rl"], "--root", root, "--teacher", rl_model, "--backend", "hf",
            "--batch-size", "2", "--out", ann, "--limit", "2", "--set", "annotate.max_new_tokens=6", *runs)
    lines = [json.loads(x) for x in Path(str(ann) + ".jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all("process" in r for r in lines)


@pytest.mark.parametrize("family", _params())
def test_grpo_freeze_vision_keeps_the_tower(family, models, synth_world, tmp_path, length_reward):
    """GRPO with model.freeze_vision: the language model moves, the family's vision tower does not."""
    from safetensors.torch import load_file

    base = models(family)
    run_cli("train", "rl", "--model", base, "--data", synth_world["rl"], "--root", synth_world["root"], "--algo",
            "grpo", "--max-steps", "1", "--set", "rl.rewards=[format,test_length]", "--set", "rl.beta=0",
            "--set", "model.freeze_vision=true", "--set", f"run.output_dir={tmp_path / 'runs'}", *RL_SMALL,
            "--set", "rl.num_generations=4", "--set", "rl.max_completion_length=12", "--set", "rl.warmup_steps=0")
    run = last_run("train-rl")
    before = load_file(Path(base) / "model.safetensors")
    after = load_file(Path(run["summary"]["model"]) / "model.safetensors")
    visual = [k for k in before if ".visual." in k or k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in visual)


@pytest.mark.parametrize("family", _params())
def test_sft_lora_adapts_the_language_model_only(family, models, synth_world, tmp_path):
    """LoRA on the family's language-model projections (its `lora_target_modules`), never the vision tower; merged
    into plain weights with the base's keys."""
    from safetensors.torch import load_file

    base = models(family)
    out = tmp_path / "lora"
    run_cli("train", "sft", "--model", base, "--data", synth_world["sft"], "--root", synth_world["root"],
            "--max-steps", "2", "--out", out, "--set", "sft.per_device_batch_size=4", "--set", "sft.learning_rate=0.01",
            "--set", "sft.warmup_ratio=0", "--set", "model.lora.enabled=true", "--set", "model.lora.r=4",
            "--set", "model.lora.alpha=8", "--set", "model.lora.dropout=0.0",
            "--set", f"run.output_dir={tmp_path / 'runs'}")
    before = load_file(Path(base) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = ADAPTERS[family].lora_target_modules
    assert changed and all("visual" not in k and any(f".{t}." in k for t in targets) for k in changed), changed


@pytest.mark.parametrize("family", _params(FAST_HOOK))
def test_visual_tensors_reach_policy_and_reference_forwards(family, models, synth_world, tmp_path):
    """The log-prob forwards of the policy and the reference get every visual input of the family (videos and
    images in one batch), mm_token_type_ids extended over the completions."""
    from pipelines.config import load_config
    from pipelines.rl.trainer import RLTrainer

    recs = json.loads(Path(synth_world["rl"]).read_text())
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([r for r in recs if r["data_type"] == "video"][:2]
                               + [r for r in recs if r["data_type"] == "image"][:1]))
    cfg = load_config(overrides=[f"model.name_or_path={models(family)}", f"data.file={data}",
                                 f"data.root={synth_world['root']}", "rl.num_generations=2",
                                 "rl.max_completion_length=6", "rl.per_device_prompts=3", "rl.max_steps=1",
                                 "data.shuffle=false", f"run.output_dir={tmp_path}"])
    calls: dict[str, list[dict]] = {"policy": [], "ref": []}

    def hook(name):
        def fn(module, args, kwargs):
            if name == "policy" and not torch.is_grad_enabled():
                return
            calls[name].append(dict(kwargs))
        return fn

    with registry().run("train-rl", cfg) as run:
        tr = RLTrainer(cfg, run, tmp_path / "run")
        tr.setup()
        h1 = tr.unwrapped.register_forward_pre_hook(hook("policy"), with_kwargs=True)
        h2 = tr.ref_model.register_forward_pre_hook(hook("ref"), with_kwargs=True)
        tr.train_step()
        h1.remove()
        h2.remove()
    a = ADAPTERS[family]
    config = tr.unwrapped.config
    keys = ["pixel_values_videos", "video_grid_thw", "pixel_values", "image_grid_thw", "mm_token_type_ids"]
    keys += ["second_per_grid_ts"] if a.second_per_grid_ts else []
    for name in ("policy", "ref"):
        assert len(calls[name]) == 1, name
        kw = calls[name][0]
        ids = kw["input_ids"]
        assert ids.shape[0] == 3 * 2
        for key in keys:
            assert key in kw and kw[key] is not None and kw[key].numel() > 0, (name, key)
        assert a.second_per_grid_ts or "second_per_grid_ts" not in kw
        assert kw["video_grid_thw"].shape[0] == 2 * 2 and kw["image_grid_thw"].shape[0] == 1 * 2
        assert int((ids == config.video_token_id).sum()) == int(kw["video_grid_thw"].prod(-1).sum()) // 4
        assert int((ids == config.image_token_id).sum()) == int(kw["image_grid_thw"].prod(-1).sum()) // 4
        # rl.encode_once (default): each video's pixels once, shared by its G = 2 rows (grids stay per row)
        assert kw["pixel_values_videos"].shape[0] * 2 == int(kw["video_grid_thw"].prod(-1).sum())
        assert kw["pixel_values"].shape[0] * 2 == int(kw["image_grid_thw"].prod(-1).sum())
        assert kw["mm_token_type_ids"].shape == ids.shape


def test_quickstart_smoke_on_qwen3_vl(tmp_path):
    """`videor1 quickstart --family qwen3_vl --smoke`: the whole chain on a tiny Qwen3-VL, 64x64 frames (the default
    family's 4 tokens per frame pair in 32-pixel patches)."""
    out = tmp_path / "qs"
    res = run_cli("quickstart", "--smoke", "--json", "--out", out, "--seed", 3, "--family", "qwen3_vl")
    table = json.loads(res.stdout)
    for k in ("chance", "untrained", "sft", "rl"):
        assert isinstance(table[k], (int, float)), k
    runs = registry().list_runs()
    assert all(r["status"] == "finished" for r in runs), [(r["kind"], r["status"]) for r in runs]
    (tiny,) = [r for r in runs if r["kind"] == "model-tiny"]
    assert tiny["summary"]["family"] == "qwen3_vl"
    model = json.loads((out / "seed-3" / "tiny-model" / "config.json").read_text())
    assert model["model_type"] == "qwen3_vl"
    (rl,) = [r for r in runs if r["kind"] == "train-rl"]
    cfg = registry().get_run(rl["id"])["config"]
    assert cfg["video"]["min_pixels"] == cfg["video"]["max_pixels"] == 64 * 64


def test_bench_frames_quick_on_qwen3_vl(tmp_path):
    """`bench frames --family qwen3_vl --preset qwen3-vl-8b`: our sampler at factor 32 agrees with qwen-vl-utils at
    image_patch_size 16 (indices, sizes multiples of 32, pixels)."""
    out = tmp_path / "bench.json"
    run_cli("bench", "frames", "--quick", "--repeats", "1", "--no-pyav", "--clips-dir", tmp_path / "clips",
            "--out", out, "--family", "qwen3_vl", "--preset", "qwen3-vl-8b", "--set", f"run.output_dir={tmp_path}")
    data = json.loads(out.read_text())
    assert data["ok"] and data["settings"]["factor"] == 32 and data["settings"]["min_pixels"] == 128 * 32 * 32
    (clip,) = data["clips"]
    assert clip["indices_match"] and clip["size_match"] and clip["mad"] < 1.0
    h, w = (int(x) for x in clip["resized"].split("x"))
    assert h % 32 == 0 and w % 32 == 0
