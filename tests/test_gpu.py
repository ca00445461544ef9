"""The GPU check (scripts/device-check.sh, pipelines/bench/gpu.py).

- CUDA-only tests (skipped without CUDA; step 1 of the check runs them on the lent GPU): the tiny model's per-token
  log-probs of a video prompt on CUDA against the CPU (float32 tight, bfloat16 within its precision), greedy
  generation on CUDA float32 against the CPU, and the reference M-RoPE positions computed on CUDA tensors.
- CPU tests of the check's own pieces: the comparison rule, the stored expected values against the current plan, the
  7B configuration's parameter count, and the random-weight loading that the probe binds for one directory only.
- Slow: `scripts/device-check.sh --dry-run` end to end, so the script cannot rot unnoticed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.bench import gpu as G

REPO = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the lent GPU machine)")


# ---------------------------------------------------------------------------------------------------------- helpers
def _video_batch(tiny_model_dir, synth_world, n: int = 2):
    """Prompt + completion inputs of `n` video records (the RL loss forward's inputs) on the CPU."""
    from pipelines.config import load_config
    from pipelines.models import load_processor
    from pipelines.prompts import load_template
    from pipelines.rl import rollout as R

    cfg = load_config(overrides=[f"data.file={synth_world['train']}", f"data.root={synth_world['root']}"])
    proc = load_processor(tiny_model_dir)
    recs = [r for r in json.loads(Path(synth_world["train"]).read_text()) if r["data_type"] == "video"][:n]
    samples, skipped = R.prepare_samples(list(enumerate(recs)), cfg, proc, load_template(cfg.prompt.template),
                                         synth_world["root"], torch.Generator().manual_seed(0), False)
    assert samples and not skipped
    tok = proc.tokenizer
    texts = ["<think>The square moves.</think>\n<answer>A</answer>", "<answer>B</answer>"][:n]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    comp = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros_like(comp)
    for i, row in enumerate(ids):
        comp[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    inputs = R.policy_inputs(proc, samples, 1, comp, mask)
    return cfg, proc, inputs, comp, mask


def _logprobs(cfg, model_dir, inputs, comp, device: str, dtype: str):
    from pipelines.models import load_model
    from pipelines.rl import rollout as R

    cfg.model.dtype = dtype
    model = load_model(cfg.model, model_dir, device=torch.device(device))
    moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
    with torch.no_grad():
        return R.completion_logprobs(model, moved, comp.to(device)).float().cpu()


# --------------------------------------------------------------------------------------------------------- on CUDA
@cuda
def test_video_logprobs_on_cuda_match_the_cpu(tiny_model_dir, synth_world):
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        cfg, _, inputs, comp, mask = _video_batch(tiny_model_dir, synth_world)
        ref = _logprobs(cfg, tiny_model_dir, inputs, comp, "cpu", "float32")
        fp32 = _logprobs(cfg, tiny_model_dir, inputs, comp, "cuda", "float32")
        bf16 = _logprobs(cfg, tiny_model_dir, inputs, comp, "cuda", "bfloat16")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    m = mask.bool()
    assert torch.isfinite(fp32[m]).all() and torch.isfinite(bf16[m]).all()
    assert (fp32 - ref)[m].abs().max() < 1e-4
    # bf16 weights and activations: ~3 significant digits per op; the tiny model's log-probs stay within 0.1 nats
    assert (bf16 - ref)[m].abs().max() < 0.1
    assert (bf16 - ref)[m].abs().mean() < 0.03


@cuda
def test_greedy_generation_on_cuda_float32_matches_the_cpu(tiny_model_dir, synth_world):
    from pipelines.generation import Sampling
    from pipelines.generation.hf import HFBackend
    from pipelines.models import load_model, load_processor
    from pipelines.prompts import load_template
    from pipelines.rl import rollout as R
    from pipelines.config import load_config

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg = load_config(overrides=[f"data.file={synth_world['train']}", f"data.root={synth_world['root']}"])
    proc = load_processor(tiny_model_dir)
    recs = json.loads(Path(synth_world["train"]).read_text())[:6]
    samples, _ = R.prepare_samples(list(enumerate(recs)), cfg, proc, load_template(cfg.prompt.template),
                                   synth_world["root"], torch.Generator().manual_seed(0), False)
    outs = {}
    for device in ("cpu", "cuda"):
        model = load_model(cfg.model, tiny_model_dir, device=torch.device(device))
        backend = HFBackend(model, proc, batch_size=8)
        res = backend.generate([s.prompt for s in samples], [s.media for s in samples],
                               Sampling(max_new_tokens=16, temperature=0.0))
        outs[device] = [tuple(c[0].token_ids) for c in res]
    same = sum(a == b for a, b in zip(outs["cpu"], outs["cuda"]))
    # float32 on both (TF32 off): identical unless two logits tie to ~1e-6; allow one such prompt
    assert same >= len(samples) - 1, (outs["cpu"], outs["cuda"])


@cuda
def test_reference_mrope_positions_on_cuda_equal_the_cpu(tiny_model_dir, synth_world):
    from pipelines.models import load_model
    from pipelines.models.families import model_core

    cfg, _, inputs, comp, mask = _video_batch(tiny_model_dir, synth_world)
    pos = {}
    for device in ("cpu", "cuda"):
        model = load_model(cfg.model, tiny_model_dir, device=torch.device(device))
        owner = model_core(model)
        assert owner._videor1_reference_rope  # the reference rule is bound (transformers 5.17 on the machine)
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        p, _ = owner.get_rope_index(moved["input_ids"], mm_token_type_ids=moved["mm_token_type_ids"],
                                    video_grid_thw=moved.get("video_grid_thw"),
                                    second_per_grid_ts=moved.get("second_per_grid_ts"),
                                    attention_mask=moved["attention_mask"])
        pos[device] = p.cpu()
    assert torch.equal(pos["cpu"], pos["cuda"])


# ------------------------------------------------------------------------------------------------- the check itself
def test_compare_applies_relative_and_absolute_tolerances():
    exp = {"sft/loss_step1": 2.0, "rl/format_reward_mean": 0.5, "eval/sft_accuracy_official": 0.2,
           "rl/kl_step1": 0.0}
    # first: rel 2e-2 * 2.0 + 1e-3 = 0.041 allowed (bf16); sampled: 0.25; accuracy: 0.12; kl_step1: 1e-3
    ok = G.compare({"sft/loss_step1": 2.04, "rl/format_reward_mean": 0.74, "eval/sft_accuracy_official": 0.31,
                    "rl/kl_step1": 0.0009}, exp, "bf16")
    assert [r["ok"] for r in ok] == [True, True, True, True]
    bad = G.compare({"sft/loss_step1": 2.05, "rl/format_reward_mean": 0.76, "eval/sft_accuracy_official": 0.33,
                     "rl/kl_step1": 0.002}, exp, "bf16")
    assert [r["ok"] for r in bad] == [False, False, False, False]
    assert math.isclose(bad[0]["tolerance"], 0.041)
    missing = G.compare({"sft/loss_step1": float("nan")}, {"sft/loss_step1": 2.0, "rl/kl_mean": 0.0}, "fp32")
    assert [r["ok"] for r in missing] == [False, False]  # NaN never passes; an absent metric fails
    assert "NO" in G.format_rows(missing, "cuda fp32")


def test_expected_values_are_recorded_for_the_current_plan():
    exp = json.loads((REPO / "scripts" / "device-expected.json").read_text())
    assert exp["format"] == G.EXPECTED_FORMAT
    plan = {"world": G.TINY_WORLD, "sft": G.TINY_SFT, "rl": G.TINY_RL, "eval_max_new_tokens": G.TINY_EVAL_TOKENS}
    assert exp["plan"] == json.loads(json.dumps(plan)), "re-record: scripts/device-check.sh --record-expected"
    assert set(exp["metrics"]) == set(G.METRIC_KIND)
    # A chain whose metrics are all zero proves nothing on the device: the recorded run must have learned something.
    m = exp["metrics"]
    assert m["rl/format_reward_mean"] > 0 and m["eval/sft_accuracy_official"] > 0 and m["rl/kl_mean"] > 0
    assert m["rl/kl_step1"] == 0.0  # the policy is the reference at step 1 (CPU float32)


def test_the_7b_configuration_has_qwen2_5_vl_7b_parameter_count(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    d = G.write_probe_model(tmp_path / "m", G.QWEN2_5_VL_7B)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(d))
    n = sum(p.numel() for p in model.parameters())
    assert n == 8_292_166_656  # Qwen/Qwen2.5-VL-7B-Instruct's safetensors index: 16,584,333,312 bytes in bf16
    assert model.config.vision_config.fullatt_block_indexes == [7, 15, 23, 31]


def test_random_weights_binds_only_its_directory(tmp_path, tiny_model_dir):
    from pipelines.config import load_config
    from pipelines.errors import VideoR1Error
    from pipelines.models import load_model
    from pipelines.models.families import model_core

    d = G.write_probe_model(tmp_path / "small", G.SMALL_PROBE_CONFIG)
    cfg = load_config(overrides=["model.dtype=float32"])
    with pytest.raises((VideoR1Error, OSError)):
        load_model(cfg.model, d, device=torch.device("cpu"))  # no weights: never random outside the probe
    plain = load_model(cfg.model, tiny_model_dir, device=torch.device("cpu"))
    with G.random_weights(d, "cpu"):
        model = load_model(cfg.model, d, device=torch.device("cpu"))
        tiny = load_model(cfg.model, tiny_model_dir, device=torch.device("cpu"))
    assert model.config.text_config.hidden_size == 64 and model.config.vision_config.depth == 2
    assert model_core(model)._videor1_reference_rope  # load_model's own steps ran on the random model
    # any other directory still loads its saved weights
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), tiny.state_dict().values()))
    # and the binding is gone afterwards
    with pytest.raises((VideoR1Error, OSError)):
        load_model(cfg.model, d, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------------------ slow: dry run
@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~6 min on 2 quiet cores (the tiny chain's 150 SFT steps on the CPU); 20 on a loaded one
def test_device_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), DEVICE_CHECK_WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    # Its own process group: on a timeout the CLI processes of the tiny chain go too, not only bash.
    proc = subprocess.Popen(["bash", "scripts/device-check.sh", "--dry-run"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=3300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    summary = (out / "summary.txt").read_text() if (out / "summary.txt").exists() else proc.stdout[-4000:]
    assert proc.returncode == 0, summary + proc.stderr[-3000:]
    for step in ("wheel folder", "environment and imports", "1 tests on cpu", "2 tiny chain cpu fp32",
                 "3 probe code"):
        assert step in summary and "FAIL" not in summary
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "check.log" in files and "tiny-cpu-fp32.json" in files, files
    tiny = json.loads((out / "tiny-cpu-fp32.json").read_text())
    assert tiny["ok"] and tiny["metrics"]["rl/format_reward_mean"] > 0
