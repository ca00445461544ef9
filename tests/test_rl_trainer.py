"""`videor1 train rl` end to end on the tiny model and the synthetic world (CPU, a few steps each)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from pipelines.registry import Registry

SMALL = ["--set", "rl.num_generations=4", "--set", "rl.max_completion_length=12", "--set", "rl.per_device_prompts=2",
         "--set", "rl.save_steps=100", "--set", "rl.logging_steps=1"]


def registry() -> Registry:
    return Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db")


def rl_args(tiny_model_dir, data, tmp_path, *extra):
    return ["train", "rl", "--model", tiny_model_dir, "--data", data, "--set", f"run.output_dir={tmp_path / 'runs'}",
            *SMALL, *extra]


def only_run(kind="train-rl"):
    runs = registry().list_runs(kind=kind)
    assert len(runs) == 1, runs
    return registry().get_run(runs[0]["id"])


def _length_reward(completions, **_):
    """A test reward that varies inside a group, so advantages (and gradients) are non-zero on a random model."""
    return [min(1.0, len(c) / 40.0) for c in completions]


@pytest.fixture
def length_reward():
    from pipelines import rewards

    rewards.REWARDS["test_length"] = _length_reward
    yield "test_length"
    rewards.REWARDS.pop("test_length", None)


def test_train_rl_tgrpo_cli(tiny_model_dir, synth_world, tmp_path, length_reward, capfd):
    res = run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path, "--algo", "tgrpo", "--max-steps", "2",
                           "--set", "rl.rewards=[accuracy,format,test_length]"))
    assert "train rl" in res.output
    assert "is cut to" not in res.output + capfd.readouterr().err  # 2 steps fit in one pass
    run = only_run()
    assert run["status"] == "finished"
    reg = registry()
    m = reg.metrics(run["id"])
    for name in ("reward", "reward_std", "rewards/accuracy", "rewards/format", "rewards/test_length", "kl",
                 "completion_length", "temporal_bonus_rate", "p_ordered", "p_shuffled", "frac_all_correct",
                 "frac_all_wrong", "clip_ratio", "loss", "lr", "grad_norm", "step_time", "tokens_per_s", "skipped"):
        assert name in m, name
        assert [s for s, _ in m[name]] == [1, 2], name
    assert all(v > 0 for _, v in m["grad_norm"])  # the length reward gives non-zero advantages
    # model artifact, loadable, with lineage to the base model and the records
    arts = reg.artifacts_of(run["id"])
    model_dir = Path(next(a.path for a in arts["outputs"] if a.kind == "model"))
    assert (model_dir / "config.json").exists() and (model_dir / "processor_config.json").exists()
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(model_dir)
    inputs = {a.path for a in arts["inputs"]}
    assert str(Path(tiny_model_dir).resolve()) in inputs
    assert str(Path(synth_world["rl"]).resolve()) in inputs
    assert run["summary"]["steps"] == 2 and run["summary"]["algo"] == "tgrpo"


def test_rl_says_when_the_epochs_cut_max_steps_short(tiny_model_dir, synth_world, tmp_path, capfd, length_reward):
    # 2 records at 2 prompts a step: one step per pass, so rl.num_epochs=1 runs 1 of the 3 steps asked for
    res = run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path, "--algo", "grpo", "--max-steps", "3",
                           "--set", "data.max_samples=2", "--set", "rl.rewards=[format,test_length]"))
    said = res.output + capfd.readouterr().err
    assert "rl.max_steps=3 is cut to 1 step(s) by rl.num_epochs=1 (1 step(s) per pass over 2 records)" in said
    assert only_run()["summary"]["steps"] == 1


def test_a_warning_is_printed_once_when_logging_is_not_configured():
    # the CLI configures no logging: a log.warning beside the print went out a second time through logging's
    # last-resort handler ("warning: X" then "X" on every RL warning)
    import subprocess
    import sys

    code = ("from pipelines.rl.trainer import _warn; from pipelines.models import _warn_once; "
            "_warn('cut short'); _warn_once('no GPU')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert p.stderr.count("cut short") == 1 and p.stderr.count("no GPU") == 1, p.stderr


def test_train_rl_grpo_cli_changes_weights(tiny_model_dir, synth_world, tmp_path, length_reward):
    run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path, "--algo", "grpo", "--max-steps", "2",
                     "--set", "rl.rewards=[format,test_length]", "--set", "rl.loss_type=dapo",
                     "--set", "rl.num_iterations=2", "--set", "rl.beta=0"))
    run = only_run()
    m = registry().metrics(run["id"])
    assert "temporal_bonus_rate" not in m and "p_shuffled" not in m
    assert "rewards/accuracy" not in m and "rewards/test_length" in m
    from safetensors.torch import load_file

    out = Path(run["summary"]["model"])
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no parameter changed"


def test_freeze_vision_keeps_the_vision_tower_fixed_in_rl(tiny_model_dir, synth_world, tmp_path, length_reward):
    """model.freeze_vision (the quickstart sets it for RL only): the language model learns, the vision tower does not."""
    run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path, "--algo", "tgrpo", "--max-steps", "2",
                     "--set", "rl.rewards=[format,test_length]", "--set", "rl.beta=0",
                     "--set", "model.freeze_vision=true"))
    from safetensors.torch import load_file

    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(Path(only_run()["summary"]["model"]) / "model.safetensors")
    visual = [k for k in before if ".visual." in k or k.startswith("visual.")]
    assert visual
    assert all(torch.equal(before[k], after[k]) for k in visual)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in visual)


def _mixed_records(synth_world, tmp_path, n_video=2, n_image=1, extra=()):
    recs = json.loads(Path(synth_world["rl"]).read_text())
    vids = [r for r in recs if r["data_type"] == "video"][:n_video]
    imgs = [r for r in recs if r["data_type"] == "image"][:n_image]
    out = tmp_path / "mixed.json"
    out.write_text(json.dumps(vids + imgs + list(extra)))
    return out


@pytest.mark.parametrize("encode_once", [True, False])
def test_visual_tensors_reach_policy_and_reference_forwards(tiny_model_dir, synth_world, tmp_path, encode_once):
    """TRL's GRPOTrainer drops pixel_values_videos / video_grid_thw from the log-prob forward; we must not. With
    rl.encode_once the pixels of each media item reach the vision tower once per loss forward (its features go to
    the G rows); without, every row's copy does."""
    from pipelines.config import load_config
    from pipelines.rl.trainer import RLTrainer

    data = _mixed_records(synth_world, tmp_path)
    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"data.file={data}",
                                 f"data.root={synth_world['root']}", "rl.num_generations=2",
                                 "rl.max_completion_length=6", "rl.per_device_prompts=3", "rl.max_steps=1",
                                 "data.shuffle=false", f"run.output_dir={tmp_path}",
                                 f"rl.encode_once={str(encode_once).lower()}"])
    calls: dict[str, list[dict]] = {"policy": [], "ref": []}
    tower_rows: dict[str, list[int]] = {"policy": [], "ref": []}

    def hook(name):
        def fn(module, args, kwargs):
            if name == "policy" and not torch.is_grad_enabled():
                return  # generate's forwards; we want the log-prob (loss) forward
            calls[name].append(dict(kwargs))
        return fn

    def tower_hook(name):
        def fn(module, args, kwargs):
            if name == "policy" and not torch.is_grad_enabled():
                return
            tower_rows[name].append(int(args[0].shape[0]))
        return fn

    with registry().run("train-rl", cfg) as run:
        tr = RLTrainer(cfg, run, tmp_path / "run")
        tr.setup()
        h1 = tr.unwrapped.register_forward_pre_hook(hook("policy"), with_kwargs=True)
        h2 = tr.ref_model.register_forward_pre_hook(hook("ref"), with_kwargs=True)
        h3 = tr.unwrapped.model.visual.register_forward_pre_hook(tower_hook("policy"), with_kwargs=True)
        h4 = tr.ref_model.model.visual.register_forward_pre_hook(tower_hook("ref"), with_kwargs=True)
        tr.train_step()
        for h in (h1, h2, h3, h4):
            h.remove()
    video_id = tr.unwrapped.config.video_token_id
    image_id = tr.unwrapped.config.image_token_id
    G = 2
    for name in ("policy", "ref"):
        assert len(calls[name]) == 1, name
        kw = calls[name][0]
        ids = kw["input_ids"]
        assert ids.shape[0] == 3 * G  # 3 prompts x G, one batched forward
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "pixel_values", "image_grid_thw",
                    "mm_token_type_ids"):
            assert key in kw and kw[key] is not None and kw[key].numel() > 0, (name, key)
        assert kw["video_grid_thw"].shape[0] == 2 * G and kw["image_grid_thw"].shape[0] == 1 * G
        merge = 4  # spatial_merge_size ** 2
        assert int((ids == video_id).sum()) == int(kw["video_grid_thw"].prod(-1).sum()) // merge
        assert int((ids == image_id).sum()) == int(kw["image_grid_thw"].prod(-1).sum()) // merge
        rows_per_row = int(kw["video_grid_thw"].prod(-1).sum()) + int(kw["image_grid_thw"].prod(-1).sum())
        copies = 1 if encode_once else G  # pixel rows reaching the forward: each item once, or every row's copy
        assert kw["pixel_values_videos"].shape[0] * G == int(kw["video_grid_thw"].prod(-1).sum()) * copies
        # the tower encodes the images and the videos (two calls), every item's pixels in this loss forward
        assert len(tower_rows[name]) == 2 and sum(tower_rows[name]) * G == rows_per_row * copies, name
        assert kw["mm_token_type_ids"].shape == ids.shape  # extended over the completion tokens
        assert kw["attention_mask"].shape == ids.shape


def test_broken_records_are_skipped_not_replaced(tiny_model_dir, synth_world, tmp_path, capfd):
    recs = json.loads(Path(synth_world["rl"]).read_text())
    good = [r for r in recs if r["data_type"] == "video"][:2]
    missing = dict(good[0], problem_id=90001, path="./videos/does-not-exist.mp4")
    corrupt_file = tmp_path / "corrupt.mp4"
    corrupt_file.write_bytes(b"not a video at all")
    corrupt = dict(good[1], problem_id=90002, path=str(corrupt_file))
    data = tmp_path / "broken.json"
    data.write_text(json.dumps([good[0], missing, corrupt, good[1]]))
    res = run_cli(*rl_args(tiny_model_dir, data, tmp_path, "--root", synth_world["root"], "--max-steps", "1",
                           "--set", "rl.per_device_prompts=4", "--set", "data.shuffle=false",
                           "--set", "data.max_skip_fraction=0.5"))
    run = only_run()
    assert run["status"] == "finished"
    m = registry().metrics(run["id"])
    assert m["skipped"] == [(1, 2.0)]
    lines = [json.loads(x) for x in (Path(run["run_dir"]) / "skipped-rank0.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == [90001, 90002]
    err = res.output + capfd.readouterr().err
    assert "skipped record 90001" in err and "skipped record 90002" in err
    # never replaced: the step trained on exactly the 2 good records (2 groups x G=4 completions)
    assert run["summary"]["skipped"] == 2


def test_rl_stops_when_more_prompts_are_skipped_than_allowed(tiny_model_dir, synth_world, tmp_path):
    """3 of 4 prompts unreadable with the default data.max_skip_fraction (0.1): the run stops at step 1 with one
    line that names the records file and the first failing record, and is recorded as failed."""
    recs = [r for r in json.loads(Path(synth_world["rl"]).read_text()) if r["data_type"] == "video"][:4]
    recs = [recs[0]] + [dict(r, problem_id=91000 + i, path=f"./videos/gone-{i}.mp4") for i, r in enumerate(recs[1:])]
    data = tmp_path / "mostly-broken.json"
    data.write_text(json.dumps(recs))
    res = run_cli(*rl_args(tiny_model_dir, data, tmp_path, "--root", synth_world["root"], "--max-steps", "2",
                           "--set", "rl.per_device_prompts=4", "--set", "data.shuffle=false"), check=False)
    assert res.exit_code == 1
    text = " ".join(res.output.split())
    assert "Traceback" not in res.output
    assert f"{data}: skipped 3 of 4 RL prompts so far (e.g. record 91000: cannot read media" in text
    assert "data.max_skip_fraction = 0.1" in text
    run = only_run()
    assert run["status"] == "failed" and "skipped 3 of 4" in run["error"]


def test_nan_loss_stops_with_training_error_and_keeps_checkpoint(tiny_model_dir, synth_world, tmp_path,
                                                                  monkeypatch):
    from pipelines.rl import losses

    real = losses.policy_loss
    calls = {"n": 0}

    def nan_after_first_step(*a, **kw):
        out = real(*a, **kw)
        calls["n"] += 1
        if calls["n"] > 1:  # step 1 is fine (1 chunk), step 2 goes NaN
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(losses, "policy_loss", nan_after_first_step)
    res = run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path, "--max-steps", "3",
                           "--set", "rl.save_steps=1"), check=False)
    assert res.exit_code == 1
    assert "non-finite loss at step 2" in res.output
    run = only_run()
    assert run["status"] == "failed"
    ck = Path(run["run_dir"]) / "checkpoints"
    assert (ck / "step-1" / "trainer_state.json").exists()
    assert not (Path(run["run_dir"]) / "model").exists()


def _straight_then_resumed(tiny_model_dir, synth_world, tmp_path, first: int, total: int, common):
    """Runs `total` steps straight, then `first` steps and a --resume auto to `total`; returns (weights of the straight
    run, the resumed run's registry record, weights of the resumed run)."""
    from safetensors.torch import load_file

    run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path / "a", "--max-steps", str(total), *common))
    straight = Path(registry().list_runs(kind="train-rl")[0]["run_dir"]) / "model"
    run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path / "b", "--max-steps", str(first), *common))
    run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path / "b", "--max-steps", str(total), "--resume", "auto",
                     *common))
    runs = registry().list_runs(kind="train-rl")
    resumed = registry().get_run(max(runs, key=lambda r: r["started_at"])["id"])
    return (load_file(straight / "model.safetensors"), resumed,
            load_file(Path(resumed["summary"]["model"]) / "model.safetensors"))


def _video_only_reward(completions, data_type, **_):
    """Varies inside a group for video records only; every image completion gets the same 0.5."""
    return [min(1.0, len(c) / 40.0) if dt == "video" else 0.5 for c, dt in zip(completions, data_type)]


@pytest.mark.parametrize("case", ["informative", "none-informative"])
def test_dynamic_sampling_trains_only_on_informative_groups(tiny_model_dir, synth_world, tmp_path, monkeypatch, case):
    """rl.dynamic_sampling (DAPO): groups whose rewards are all equal never reach the advantage/loss; more prompts are
    drawn until the step is full or max_sampling_rounds is reached, and the metrics say how many."""
    from pipelines import rewards
    from pipelines.rl import advantages as A

    # data order (shuffle off): images first, then videos -> round 1 draws 2 images (dropped), round 2 two videos
    recs = json.loads(Path(synth_world["rl"]).read_text())
    imgs = [r for r in recs if r["data_type"] == "image"][:2]
    vids = [r for r in recs if r["data_type"] == "video"][:2] if case == "informative" else []
    data = tmp_path / "ordered.json"
    data.write_text(json.dumps(imgs + vids + imgs))
    from pipelines.config import load_config
    from pipelines.rl.trainer import RLTrainer

    rewards.REWARDS["test_dyn"] = _video_only_reward
    seen: list[torch.Tensor] = []
    real = A.compute_advantages
    monkeypatch.setattr(A, "compute_advantages", lambda r, mode="group", eps=1e-4, **kw: (seen.append(r),
                                                                                   real(r, mode, eps, **kw))[1])
    try:
        cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"data.file={data}",
                                     f"data.root={synth_world['root']}", "rl.rewards=[test_dyn]",
                                     "rl.num_generations=3", "rl.max_completion_length=8", "rl.per_device_prompts=2",
                                     "rl.max_steps=1", "data.shuffle=false", "rl.dynamic_sampling=true",
                                     "rl.max_sampling_rounds=3", "rl.algo=grpo", f"run.output_dir={tmp_path}"])
        with registry().run("train-rl", cfg) as run:
            tr = RLTrainer(cfg, run, tmp_path / "run")
            tr.setup()
            m = tr.train_step()
    finally:
        rewards.REWARDS.pop("test_dyn", None)
    if case == "informative":
        assert m["dynamic/rounds"] == 2 and m["dynamic/generated_groups"] == 4 and m["dynamic/kept_groups"] == 2
        assert len(seen) == 1 and seen[0].shape == (2, 3)
        assert bool(((seen[0].max(1).values - seen[0].min(1).values) > 0).all())  # only the varying (video) groups
        assert tr.position == 4
    else:  # nothing informative: three rounds drawn, no advantage computed, the step still completes (zero update)
        assert m["dynamic/rounds"] == 3 and m["dynamic/generated_groups"] == 6 and m["dynamic/kept_groups"] == 0
        assert seen == []
    # the rollout metrics describe every generated group, kept or not
    assert m["rewards/test_dyn"] == pytest.approx(m["reward"])
    assert 0.0 <= m["frac_all_correct"] <= 1.0


def test_loss_forward_logprobs_equal_the_sampling_logprobs(tiny_model_dir, synth_world, tmp_path):
    """The policy-gradient is only right if the loss forward scores each completion exactly as the sampler did: same
    prompt, same visual tensors (G repeated rows per prompt, videos and images in one batch), same positions."""
    from pipelines.config import load_config
    from pipelines.models import encode_batch
    from pipelines.rl import rollout as R
    from pipelines.rl.trainer import RLTrainer

    G, L = 3, 10
    data = _mixed_records(synth_world, tmp_path, n_video=2, n_image=2)
    cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"data.file={data}",
                                 f"data.root={synth_world['root']}", "rl.per_device_prompts=4", "rl.max_steps=1",
                                 "data.shuffle=false", f"run.output_dir={tmp_path}"])
    with registry().run("train-rl", cfg) as run:
        tr = RLTrainer(cfg, run, tmp_path / "run")
        tr.setup()
        samples, _ = R.prepare_samples(tr._next_rows(), cfg, tr.processor, tr.template, tr.root, tr.shuffle_gen, False)
    assert sorted(s.media.kind for s in samples) == ["image", "image", "video", "video"]
    model, eos, pad = tr.unwrapped, tr.backend.eos_id, tr.backend.pad_id
    model.eval()
    torch.manual_seed(0)
    ids, mask, sampled = [], [], []
    for s in samples:  # each prompt generated alone: no batching effect on the reference numbers
        batch = encode_batch(tr.processor, [s.prompt], [s.media])
        out = model.generate(**batch, max_new_tokens=L, min_new_tokens=L, do_sample=True, top_k=0, top_p=1.0,
                             num_return_sequences=G, pad_token_id=pad, eos_token_id=eos, output_logits=True,
                             return_dict_in_generate=True)
        comp = out.sequences[:, batch["input_ids"].shape[1]:]
        logps = torch.stack([torch.log_softmax(x.float(), -1) for x in out.logits], 1)
        sampled.append(logps.gather(2, comp.unsqueeze(-1)).squeeze(-1))
        ids.append(comp)
        mask.append(torch.ones_like(comp))
    ids, mask, sampled = torch.cat(ids), torch.cat(mask), torch.cat(sampled)
    model.train()
    for share in (True, False):  # rl.encode_once and the repeated path
        with torch.no_grad():
            scored = R.completion_logprobs(model, R.policy_inputs(tr.processor, samples, G, ids, mask,
                                                                  share_vision=share), ids, 1.0)
        assert scored.shape == sampled.shape == (4 * G, L)
        assert torch.allclose(scored, sampled, atol=1e-4), (share, (scored - sampled).abs().max())


LORA = ["--set", "model.lora.enabled=true", "--set", "model.lora.r=4", "--set", "model.lora.alpha=8",
        "--set", "model.lora.dropout=0.0", "--set", "rl.rewards=[format,test_length]", "--set", "rl.learning_rate=0.01",
        "--set", "rl.warmup_steps=0"]


def test_lora_rl_trains_adapters_on_the_language_model_and_saves_merged_weights(tiny_model_dir, synth_world, tmp_path,
                                                                               length_reward):
    """model.lora.enabled: adapters on the language model's projections only (never the vision tower, as in SFT); the
    reference is the policy with its adapters off, so the KL starts at 0; the final model is merged (plain weights,
    the base's keys) and loads without peft."""
    run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path, "--algo", "grpo", "--max-steps", "2", *LORA,
                     "--set", "rl.beta=0.04"))
    run = only_run()
    assert run["status"] == "finished"
    m = registry().metrics(run["id"])
    assert m["kl"][0][1] == pytest.approx(0.0, abs=1e-7) and m["kl"][1][1] > 0
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    out = Path(run["summary"]["model"])
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert set(after) == set(before)  # merged: no lora_A/lora_B keys, no "base_model.model." prefix
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all("visual" not in k and any(t in k for t in targets) for k in changed), sorted(changed)
    assert any("mlp" in k for k in changed) and any("self_attn" in k for k in changed)
    AutoModelForImageTextToText.from_pretrained(out)


def test_lora_rl_resumes_from_its_checkpoint(tiny_model_dir, synth_world, tmp_path, length_reward):
    """A LoRA run resumed from its step-1 checkpoint ends with the weights of an uninterrupted 2-step run."""
    common = [*LORA, "--set", "rl.lr_scheduler=constant", "--set", "rl.save_steps=1", "--set", "rl.beta=0.04"]
    a, resumed, b = _straight_then_resumed(tiny_model_dir, synth_world, tmp_path, 1, 2, common)
    assert resumed["summary"]["steps"] == 2 and resumed["summary"]["steps_run"] == 1
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# -- issue 25: temporal-rule plumbing and GRPO's shuffled probe ------------------------------------------------------
def _const_reward(completions, **_):
    return [1.0 for _ in completions]


@pytest.mark.parametrize("term", ["reward", "advantage"])
def test_temporal_term_reaches_the_loss_advantages(tiny_model_dir, synth_world, tmp_path, monkeypatch, term):
    """rl.temporal_term: the rule's bonus enters the advantages the loss gets, inside the reward (normalised with it)
    or as a separate group-centred term; the trainer logs how much of the advantages it moved."""
    from pipelines import rewards
    from pipelines.config import load_config
    from pipelines.rl import advantages as A
    from pipelines.rl.trainer import RLTrainer

    def fixed_rule(acc, shuf, vid, **_):  # 0.5 for the first completion of every video group
        bonus = torch.zeros_like(acc, dtype=torch.float64)
        bonus[vid, 0] = 0.5
        return A.TemporalReward(bonus, vid.clone(), acc.double().mean(1), torch.zeros(len(acc), dtype=torch.float64))

    monkeypatch.setitem(A.TEMPORAL_RULES, "contrast", fixed_rule)
    rewards.REWARDS["test_const"] = _const_reward
    data = _mixed_records(synth_world, tmp_path, n_video=2, n_image=0)
    try:
        cfg = load_config(overrides=[f"model.name_or_path={tiny_model_dir}", f"data.file={data}",
                                     f"data.root={synth_world['root']}", "rl.rewards=[test_const]",
                                     "rl.num_generations=4", "rl.max_completion_length=4", "rl.per_device_prompts=2",
                                     "rl.max_steps=1", "data.shuffle=false", "rl.algo=tgrpo", "rl.advantage=group",
                                     "rl.temporal_rule=contrast", f"rl.temporal_term={term}",
                                     f"run.output_dir={tmp_path}"])
        with registry().run("train-rl", cfg) as run:
            tr = RLTrainer(cfg, run, tmp_path / "run")
            tr.setup()
            seen = []
            real = tr._optimize
            monkeypatch.setattr(tr, "_optimize", lambda g, adv, st: (seen.append(adv.clone()), real(g, adv, st))[1])
            m = tr.train_step()
    finally:
        rewards.REWARDS.pop("test_const", None)
    (adv,) = seen
    if term == "reward":  # (R + b - mean) / (std + eps) on rewards [1.5, 1, 1, 1]: std = 0.25
        expected = [(x - 1.125) / (0.25 + 1e-4) for x in (1.5, 1, 1, 1)]
    else:  # plain advantages are 0 (constant rewards); + (b - mean b)
        expected = [0.375, -0.125, -0.125, -0.125]
    assert adv.tolist() == [pytest.approx(expected, rel=1e-6)] * 2
    assert m["temporal_bonus_rate"] == 1.0 and m["temporal_bonus_mean"] == pytest.approx(0.125)
    assert math.isnan(m["temporal_adv_change"])  # moved / |plain advantages| with constant rewards: 0 / 0
    assert m["p_gap"] == pytest.approx(m["p_ordered"] - m["p_shuffled"])


def test_grpo_shuffled_probe_logs_p_shuffled_and_changes_nothing(tiny_model_dir, synth_world, tmp_path,
                                                                 length_reward):
    """rl.shuffled_probe (GRPO): p_shuffled and p_gap are logged as under T-GRPO, and the trained weights are
    bit-identical to a run without the probe (its generate call gives its random numbers back)."""
    from safetensors.torch import load_file

    weights, metrics = [], []
    for probe in ("false", "true"):
        run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path / probe, "--algo", "grpo", "--max-steps", "2",
                         "--set", "rl.rewards=[accuracy,format,test_length]", "--set", f"rl.shuffled_probe={probe}",
                         "--set", "rl.lr_scheduler=constant", "--set", "rl.warmup_steps=0"))
        run = registry().get_run(max(registry().list_runs(kind="train-rl"), key=lambda r: r["started_at"])["id"])
        weights.append(load_file(Path(run["summary"]["model"]) / "model.safetensors"))
        metrics.append(registry().metrics(run["id"]))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert "p_shuffled" not in metrics[0] and "temporal_bonus_rate" not in metrics[1]
    for name in ("p_ordered", "p_shuffled", "p_gap", "time/shuffled_probe", "p_gap/order", "p_ordered/other"):
        assert [s for s, _ in metrics[1][name]] == [1, 2], name  # the world marks order-dependent data_sources
    assert metrics[0]["reward"] == metrics[1]["reward"]


def test_bf16_reference_runs_under_the_policys_autocast(tiny_model_dir, synth_world, tmp_path, length_reward):
    """rl.bf16: the prepared policy runs inside accelerate's autocast; the separate reference copy must run inside it
    too, or step 1's KL (policy == reference) is the bf16 rounding difference instead of 0."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier in-process runs fixed mixed_precision="no"
    try:
        run_cli(*rl_args(tiny_model_dir, synth_world["rl"], tmp_path, "--algo", "grpo", "--max-steps", "1",
                         "--set", "rl.bf16=true", "--set", "rl.beta=0.04",
                         "--set", "rl.rewards=[accuracy,format,test_length]"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    m = registry().metrics(only_run()["id"])
    assert m["kl"] == [(1, 0.0)]
