"""`--resume` resumes: a run killed with SIGKILL after checkpoint k, resumed with `--resume auto`, logs the same
per-step loss (SFT) and loss / KL / reward (RL) as the uninterrupted run from step k+1 to the end (within 1e-5,
float32), and ends with the same weights; checkpoints that cannot be restored in full are refused by name.

What is covered, and why this set (a full cross product of ranks x engine x LoRA x stage x family is ~100 runs):

- default suite: 1 rank, full fine-tuning, SFT and T-GRPO (the issue's bug 1 reproduced on one rank: the resumed SFT
  run started from the base weights), plus the refusals (incomplete checkpoint, other world size, other base model)
  and the conversion of every family's weights (`load_hf_weights`, unit level). 1-rank LoRA RL resume stays in
  tests/test_rl_trainer.py.
- slow suite, on Qwen2.5-VL, a covering design of ranks x {DDP, ZeRO-2, ZeRO-3} x {LoRA, full}: every pair of values
  of two factors appears in some cell (with the 1-rank cells above and tests/test_deepspeed.py's 2-rank ZeRO-3 full
  T-GRPO resume):
    SFT  2 ranks DDP full (bug 1 on two ranks: a missing-keys warning, then the base weights),
         2 ranks ZeRO-2 LoRA (two identical runs started from different adapters before the seed fix),
         2 ranks ZeRO-3 full, 2 ranks ZeRO-3 LoRA (the merged final model is gathered: it failed before);
    RL   2 ranks DDP full (bug 2: `map_location='cpu:0'`), 2 ranks ZeRO-3 LoRA (its final merge failed before).
  Each cell is three launches (uninterrupted, killed, resumed).
- slow suite, every other family (Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE), 1 rank, full fine-tuning
  SFT: the family-specific part of a resume is the weight layout (transformers' per-family key renaming and MoE
  expert fusion), so there the resumed run starts from a copy of the uninterrupted run's checkpoint (what a SIGKILL
  leaves, without the third launch). RL loads its policy through from_pretrained, which already converts; its
  family-independent restore is covered by the cells above.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _resume import (assert_same_tail, assert_same_weights, cli, env_for, kill_after_checkpoint, metrics, rl_checkpoint,
                     run, sft_checkpoint)
from conftest import run_cli

RL_SMALL = ["--algo", "tgrpo", "--set", "rl.num_generations=4", "--set", "rl.max_completion_length=12",
            "--set", "rl.per_device_prompts=2", "--set", "rl.logging_steps=1", "--set", "rl.save_steps=1",
            "--set", "rl.save_total_limit=10", "--set", "rl.num_iterations=2", "--set", "rl.learning_rate=1e-3",
            "--set", "rl.rewards=[format,tests._ds_probe:length_reward]"]
SFT_SMALL = ["--set", "sft.per_device_batch_size=2", "--set", "sft.logging_steps=1", "--set", "sft.save_steps=2",
             "--set", "sft.save_total_limit=10", "--set", "sft.learning_rate=1e-3"]
RL_KEYS = ("loss", "kl", "reward", "grad_norm")
SFT_KEYS = ("loss", "grad_norm")


def _sft_argv(model, world, out, steps, *extra):
    return ["train", "sft", "--model", model, "--data", world["sft"], "--root", world["root"], "--max-steps", steps,
            "--out", out, *SFT_SMALL, *extra]


def _rl_argv(model, world, out, steps, *extra):
    return ["train", "rl", "--model", model, "--data", world["rl"], "--root", world["root"], "--max-steps", steps,
            "--set", f"run.output_dir={out}", *RL_SMALL, *extra]


def sft_cell(tmp_path, model, world, steps, *extra, launches=False):
    """Uninterrupted, killed after a checkpoint, resumed with --resume auto; returns (k, max diffs, run dirs)."""
    a, b = tmp_path / "a", tmp_path / "b"
    full = _sft_argv(model, world, a / "out", steps, "--set", "run.name=full", "--set",
                     f"run.output_dir={a / 'runs'}", *extra)
    part = _sft_argv(model, world, b / "out", steps, "--set", f"run.output_dir={b / 'runs'}", *extra)
    _launch_or_cli(full, a / "home", launches)
    kill_after_checkpoint(cli(*part, "--set", "run.name=killed"), env_for(b / "home"), sft_checkpoint(b / "out"))
    _launch_or_cli([*part, "--set", "run.name=resumed", "--resume", "auto"], b / "home", launches)
    run_a, m_a = metrics(a / "home", "full")
    run_b, m_b = metrics(b / "home", "resumed")
    k = int(Path(run_b["summary"]["resumed_from"]).name.split("-")[1])
    assert 1 <= k < steps and run_b["summary"]["steps"] == steps
    worst = assert_same_tail(m_a, m_b, SFT_KEYS, after=k, last=steps)
    return k, worst, (a / "out", b / "out")


def rl_cell(tmp_path, model, world, steps, *extra, launches=False):
    a, b = tmp_path / "a", tmp_path / "b"
    full = _rl_argv(model, world, a / "runs", steps, "--set", "run.name=full", *extra)
    part = _rl_argv(model, world, b / "runs", steps, *extra)
    _launch_or_cli(full, a / "home", launches)
    kill_after_checkpoint(cli(*part, "--set", "run.name=killed"), env_for(b / "home"), rl_checkpoint(b / "runs"))
    _launch_or_cli([*part, "--set", "run.name=resumed", "--resume", "auto"], b / "home", launches)
    run_a, m_a = metrics(a / "home", "full")
    run_b, m_b = metrics(b / "home", "resumed")
    k = int(Path(run_b["summary"]["resumed_from"]).name[5:])
    assert 1 <= k < steps and run_b["summary"]["steps"] == steps and run_b["summary"]["steps_run"] == steps - k
    worst = assert_same_tail(m_a, m_b, RL_KEYS, after=k, last=steps)
    assert any(v != 0 for _, v in m_a["kl"] if _ > k), "KL is 0 after the checkpoint: the comparison proves less"
    return k, worst, (Path(run_a["summary"]["model"]), Path(run_b["summary"]["model"]))


def _launch_or_cli(argv, home: Path, launches: bool):
    if launches:
        run(cli(*argv), env_for(home))
    else:  # one process: in-process is as real and saves an interpreter start
        import os

        old = os.environ.get("VIDEOR1_HOME")
        os.environ["VIDEOR1_HOME"] = str(home)
        try:
            run_cli(*argv)
        finally:
            os.environ["VIDEOR1_HOME"] = old or ""


# ---------------------------------------------------------------------------------------------------------------------
# default suite: one rank
def test_sft_sigkill_resume_equals_uninterrupted(tiny_model_dir, synth_world, tmp_path):
    """The issue's bug 1: the resumed run continued from the base weights (step k+1's loss was the untrained one)."""
    k, worst, (out_a, out_b) = sft_cell(tmp_path, tiny_model_dir, synth_world, 6)
    assert worst == {"loss": 0.0, "grad_norm": 0.0}  # one process, float32: bit-identical
    assert_same_weights(out_a, out_b)
    manifest = json.loads((out_b / f"checkpoint-{k}" / "videor1_checkpoint.json").read_text())
    assert manifest["world_size"] == 1 and manifest["lora"] is False and manifest["zero_stage"] == 0


def test_rl_sigkill_resume_equals_uninterrupted(tiny_model_dir, synth_world, tmp_path):
    k, worst, (model_a, model_b) = rl_cell(tmp_path, tiny_model_dir, synth_world, 4)
    assert set(worst.values()) == {0.0}
    assert_same_weights(model_a, model_b)


def _rl_checkpoint_run(tiny_model_dir, synth_world, tmp_path):
    run_cli(*_rl_argv(tiny_model_dir, synth_world, tmp_path / "runs", 1, "--set", "rl.num_iterations=1"))
    return next((tmp_path / "runs").glob("train-rl-*/checkpoints/step-1"))


def test_incomplete_or_foreign_rl_checkpoints_are_refused(tiny_model_dir, synth_world, tmp_path):
    """Refused with CheckpointError before anything is loaded: a rank's file missing, another number of ranks, another
    base model (the frozen reference), another LoRA layout."""
    from pipelines.models import build_tiny_model

    ck = _rl_checkpoint_run(tiny_model_dir, synth_world, tmp_path)
    args = _rl_argv(tiny_model_dir, synth_world, tmp_path / "runs2", 2, "--set", "rl.num_iterations=1")

    bad = tmp_path / "bad" / "step-1"
    shutil.copytree(ck, bad)
    (bad / "rng-rank0.pt").unlink()
    res = run_cli(*args, "--resume", bad, check=False)
    assert res.exit_code == 1 and "incomplete checkpoint, missing rng-rank0.pt" in res.output

    state = json.loads((ck / "trainer_state.json").read_text())
    two = tmp_path / "two" / "step-1"
    shutil.copytree(ck, two)
    (two / "trainer_state.json").write_text(json.dumps(dict(state, world_size=2)))
    (two / "rng-rank1.pt").write_bytes((two / "rng-rank0.pt").read_bytes())
    res = run_cli(*args, "--resume", two, check=False)
    assert res.exit_code == 1 and "2 ranks (this run: 1 rank)" in res.output and "--nproc 2" in res.output

    other = build_tiny_model(tmp_path / "other-base", seed=1)
    res = run_cli(*_rl_argv(other, synth_world, tmp_path / "runs3", 2, "--set", "rl.num_iterations=1"),
                  "--resume", ck, check=False)
    assert res.exit_code == 1 and "base model" in res.output and "frozen reference" in res.output

    res = run_cli(*args, "--set", "model.lora.enabled=true", "--resume", ck, check=False)
    assert res.exit_code == 1 and "full fine-tuning (this run: LoRA adapters)" in res.output


def test_sft_checkpoint_half_written_is_passed_over_and_named_when_asked_for(tiny_model_dir, synth_world, tmp_path):
    from pipelines.sft import latest_checkpoint

    out = tmp_path / "out"
    run_cli(*_sft_argv(tiny_model_dir, synth_world, out, 4, "--set", f"run.output_dir={tmp_path / 'runs'}"))
    assert latest_checkpoint(out).name == "checkpoint-4"
    (out / "checkpoint-4" / "optimizer.pt").unlink()  # a save killed half-way
    assert latest_checkpoint(out).name == "checkpoint-2"
    res = run_cli(*_sft_argv(tiny_model_dir, synth_world, out, 6, "--set", f"run.output_dir={tmp_path / 'runs'}"),
                  "--resume", out / "checkpoint-4", check=False)
    assert res.exit_code == 1 and "incomplete checkpoint (missing optimizer.pt)" in res.output


def test_checkpoint_layouts_load_back_in_place(tiny_model_dir, tmp_path):
    """`load_hf_weights` (what SFT resume uses): save_pretrained's hub layout -> the live model through transformers'
    conversion rules (Qwen2.5-VL: key renaming; Qwen3.5-MoE: expert fusion), Parameter objects kept, verified; a
    checkpoint of another model is refused by name. (Every family end to end: the slow family test below.)"""
    from transformers import AutoModelForImageTextToText

    from pipelines.errors import CheckpointError
    from pipelines.models.families import ADAPTERS
    from pipelines.rl import checkpoint as C

    bases = {"qwen2_5_vl": Path(tiny_model_dir),
             "qwen3_5_moe": ADAPTERS["qwen3_5_moe"].build_tiny(tmp_path / "qwen3_5_moe", seed=0)}
    for family, base in bases.items():
        trained = AutoModelForImageTextToText.from_pretrained(base)
        with torch.no_grad():
            for i, p in enumerate(trained.parameters()):
                p.add_(0.01 * (i + 1))
        ck = tmp_path / f"{family}-ck"
        trained.save_pretrained(ck)
        model = AutoModelForImageTextToText.from_pretrained(base)
        params = {n: id(p) for n, p in model.named_parameters()}
        assert C.weight_mismatches(model, ck), family  # differs before loading
        C.load_hf_weights(model, ck)
        assert {n: id(p) for n, p in model.named_parameters()} == params, family
        for (n, a), b in zip(trained.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), (family, n)
        assert not C.weight_mismatches(model, ck)
    with pytest.raises(CheckpointError, match="weights do not fit this model"):
        C.load_hf_weights(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), tmp_path / "qwen3_5_moe-ck")


# ---------------------------------------------------------------------------------------------------------------------
# slow suite: two ranks, DDP / ZeRO-2 / ZeRO-3, LoRA / full
LORA = ["--set", "model.lora.enabled=true", "--set", "model.lora.r=4"]


@pytest.mark.slow
@pytest.mark.parametrize("engine,lora", [("ddp", False), ("zero2", True), ("zero3", False), ("zero3", True)],
                         ids=["ddp-full", "zero2-lora", "zero3-full", "zero3-lora"])
def test_sft_two_ranks_sigkill_resume_equals_uninterrupted(tiny_model_dir, synth_world, tmp_path, engine, lora):
    if engine != "ddp":
        pytest.importorskip("deepspeed")
    extra = ["--nproc", "2", "--set", "data.max_skip_fraction=1"]
    extra += ["--set", f"distributed.deepspeed={engine}"] if engine != "ddp" else []
    extra += LORA if lora else []
    k, worst, (out_a, out_b) = sft_cell(tmp_path, tiny_model_dir, synth_world, 4, *extra, launches=True)
    print(f"sft 2 ranks {engine} {'lora' if lora else 'full'}: resumed at {k}, max |diff| {worst}")
    assert_same_weights(out_a, out_b, atol=1e-6 if engine == "zero3" else 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("engine,lora", [("ddp", False), ("zero3", True)], ids=["ddp-full", "zero3-lora"])
def test_rl_two_ranks_sigkill_resume_equals_uninterrupted(tiny_model_dir, synth_world, tmp_path, engine, lora):
    if engine != "ddp":
        pytest.importorskip("deepspeed")
    extra = ["--nproc", "2", "--set", "data.max_skip_fraction=1"]
    extra += ["--set", f"distributed.deepspeed={engine}"] if engine != "ddp" else []
    extra += LORA if lora else []
    k, worst, (model_a, model_b) = rl_cell(tmp_path, tiny_model_dir, synth_world, 3, *extra, launches=True)
    print(f"rl 2 ranks {engine} {'lora' if lora else 'full'}: resumed at {k}, max |diff| {worst}")
    assert_same_weights(model_a, model_b, atol=1e-6 if engine == "zero3" else 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def test_sft_resume_of_every_family(family, synth_world, tmp_path):
    from pipelines.models.families import ADAPTERS

    model = ADAPTERS[family].build_tiny(tmp_path / "model", seed=0)
    a, b = tmp_path / "a", tmp_path / "b"
    _launch_or_cli(_sft_argv(model, synth_world, a / "out", 4, "--set", "run.name=full",
                             "--set", f"run.output_dir={a / 'runs'}"), a / "home", False)
    shutil.copytree(a / "out" / "checkpoint-2", b / "out" / "checkpoint-2")
    _launch_or_cli(_sft_argv(model, synth_world, b / "out", 4, "--set", "run.name=resumed", "--resume", "auto",
                             "--set", f"run.output_dir={b / 'runs'}"), b / "home", False)
    _, m_a = metrics(a / "home", "full")
    run_b, m_b = metrics(b / "home", "resumed")
    assert run_b["summary"]["resumed_from"].endswith("checkpoint-2")
    assert set(assert_same_tail(m_a, m_b, SFT_KEYS, after=2, last=4).values()) == {0.0}
    assert_same_weights(a / "out", b / "out")


def test_another_sequence_parallel_layout_is_refused_and_old_checkpoints_are_not():
    """A group of SP ranks reads one data shard with one RNG stream: a checkpoint written with another
    distributed.sequence_parallel holds another data position per rank, so it is refused by name. Checkpoints written
    before the key existed (no sequence_parallel in their state) were SP 1 and still resume."""
    from pipelines.errors import CheckpointError
    from pipelines.rl.checkpoint import _check_identity

    saved = {"world_size": 2, "lora": False, "zero_stage": 0, "sequence_parallel": 2}
    expect = dict(saved, sequence_parallel=1)
    with pytest.raises(CheckpointError, match=r"distributed.sequence_parallel=2 \(this run: distributed"):
        _check_identity(Path("ckpt"), saved, expect, resume_hint="h")
    old = {k: v for k, v in saved.items() if k != "sequence_parallel"}
    _check_identity(Path("ckpt"), old, expect, resume_hint="h")
