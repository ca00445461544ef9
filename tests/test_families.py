"""Model families through one adapter (`pipelines.models.families`): tiny models of every family, per-family
processing (sizes, timestamps, M-RoPE), the Qwen2.5-VL path unchanged, bad input named."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from pipelines.models.families import ADAPTERS, FAMILIES, FamilyError, adapter_for

NEW_FAMILIES = [f for f in FAMILIES if f != "qwen2_5_vl"]


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """family -> directory of its tiny model (built on first use)."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = ADAPTERS[family].build_tiny(root / family, seed=0)
        return built[family]

    return get


def _video_media(n=8, size=64, fps=4.0):
    from pipelines.models import Media

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
    return Media(video=frames, fps=fps, indices=list(range(0, 2 * n, 2)), video_fps=2 * fps)


# ---------------------------------------------------------------------------------------------------------------------
def test_qwen25vl_sft_losses_unchanged(tmp_path):
    """The default family's path is unchanged since main before the adapters: SFT losses of 3 steps on the tiny
    Qwen2.5-VL, measured on main (20d1824) with the same command, CPU float32. Compared to 1e-6 relative, not bit
    for bit: another CPU's kernels (oneDNN / MKL paths, thread count) change the last float32 bits (~1e-7), while a
    real change of the path moves more: transformers' own M-RoPE rule instead of the reference moved the second and
    third losses by 2e-6 and 3e-6 relative (checked by bypassing the binding)."""
    from pipelines.models import build_tiny_model
    from pipelines.registry import Registry
    from pipelines.synth import synthesize

    model = build_tiny_model(tmp_path / "m", seed=0)
    w = synthesize(tmp_path / "w", train=4, test=4, seed=1, sft=16)
    run_cli("train", "sft", "--model", model, "--data", w["sft"], "--root", tmp_path / "w", "--max-steps", "3",
            "--out", tmp_path / "o", "--set", "sft.per_device_batch_size=4", "--set", "sft.logging_steps=1",
            "--set", "data.shuffle=false", "--set", f"run.output_dir={tmp_path / 'runs'}")
    reg = Registry(Path(os.environ["VIDEOR1_HOME"]) / "registry.db")
    losses = [v for _, v in reg.metrics(reg.list_runs(kind="train-sft")[0]["id"])["loss"]]
    assert losses == pytest.approx([6.548044681549072, 6.5551323890686035, 6.450923442840576], rel=1e-6)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_tiny_model_round_trips_with_real_classes(family, family_models):
    """Real transformers classes, saved and reloaded bit-identically; head_dim >= 32 for vLLM's CPU build."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    a = ADAPTERS[family]
    path = family_models(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert type(model).__name__ == a.model_class_name
    assert type(AutoProcessor.from_pretrained(path)).__name__ == a.processor_class_name
    again = AutoModelForImageTextToText.from_pretrained(path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if family != "qwen2_vl":
        assert head_dim >= 32
    assert adapter_for(path) is a and adapter_for(model) is a
    assert a.factor == model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size


def test_sizing_factor_and_budgets_match_qwen_vl_utils():
    """28 for Qwen2/2.5-VL, 32 for Qwen3-VL/3.5; the per-family budgets and resized sizes are qwen-vl-utils'
    (0.0.14) with the matching image_patch_size."""
    import qwen_vl_utils.vision_process as vp

    from pipelines import video as V

    for family, a in ADAPTERS.items():
        patch = 16 if family.startswith("qwen3") else 14
        assert a.patch_size == patch and a.factor == patch * vp.SPATIAL_MERGE_SIZE
        d = a.sampler_defaults()
        assert d["video.min_pixels"] == vp.VIDEO_MIN_TOKEN_NUM * a.factor ** 2
        assert d["video.total_pixels"] == vp.MODEL_SEQ_LEN * a.factor ** 2 * 0.9
        assert d["image.min_pixels"] == vp.IMAGE_MIN_TOKEN_NUM * a.factor ** 2
        for h, w in ((360, 640), (720, 1280), (57, 91), (1080, 1920)):
            for lo, hi in ((d["video.min_pixels"], d["video.max_pixels"]), (a.factor ** 2 * 4, a.factor ** 2 * 768)):
                assert V.smart_resize(h, w, a.factor, lo, hi) == vp.smart_resize(h, w, a.factor, lo, hi)


def test_frames_are_sized_by_the_family_factor(synth_world):
    from pipelines.config import load_config
    from pipelines.models import decode_media

    recs = json.loads(Path(synth_world["rl"]).read_text())
    rec = next(r for r in recs if r["data_type"] == "video")
    cfg = load_config(overrides=["video.min_pixels=3136", "video.max_pixels=4096"])
    m28 = decode_media(rec, cfg, synth_world["root"], factor=ADAPTERS["qwen2_5_vl"].factor)
    m32 = decode_media(rec, cfg, synth_world["root"], factor=ADAPTERS["qwen3_vl"].factor)
    assert m28.video.shape[1:3] == (56, 56) and m32.video.shape[1:3] == (64, 64)
    assert m32.indices == m28.indices and m32.video_fps == m28.video_fps


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_timestamps_come_from_the_clip_metadata(family, family_models):
    """Qwen3VLProcessor writes "<t seconds>" per temporal patch from (frame index / video fps), averaged over the
    patch's two frames, as qwen-vl-utils' metadata gives it; never the 24-fps fallback."""
    from pipelines.models import encode_batch, load_processor

    proc = load_processor(family_models(family))
    media = _video_media(n=8, fps=4.0)  # indices 0,2,..,14 of an 8-fps file
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Q<|im_end|>\n"
    batch = encode_batch(proc, [text], [media])
    decoded = proc.tokenizer.decode(batch["input_ids"][0])
    want = [(media.indices[i] + media.indices[i + 1]) / 2 / media.video_fps for i in range(0, 8, 2)]
    assert [f"<{t:.1f} seconds>" for t in want] == [x + ">" for x in decoded.split(">") if "seconds" in x]
    assert "second_per_grid_ts" not in batch
    grid = batch["video_grid_thw"][0].tolist()
    assert grid == [4, 4, 4]  # 64x64 frames, patch 16
    assert int((batch["input_ids"] == proc.video_token_id).sum()) == ADAPTERS[family].visual_tokens(64, 64, 8)


def test_qwen3_rope_of_transformers_equals_the_reference_rule(family_models):
    """Qwen3-VL's per-frame grids make transformers 5.20's rule ("resume at start + max(h, w) / merge") equal the
    reference ("resume at max(vision positions) + 1", as vLLM), so no patch is installed for Qwen3 families."""
    from pipelines.models import encode_batch, load_model, load_processor
    from pipelines.models.mrope import reference_rope_index
    from pipelines.config import load_config

    path = family_models("qwen3_vl")
    proc = load_processor(path)
    model = load_model(load_config(overrides=[f"model.name_or_path={path}"]).model)
    assert not getattr(model.model, "_videor1_reference_rope", False)
    prompts = ["<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What moves?<|im_end|>\n",
               "<|im_start|>user\nA<|vision_start|><|video_pad|><|vision_end|>B<|im_end|>\n<|im_start|>assistant\n"]
    media = [_video_media(n=8, size=64), _video_media(n=4, size=96)]
    b = encode_batch(proc, prompts, media)
    hf_pos, hf_delta = model.model.get_rope_index(b["input_ids"], b["mm_token_type_ids"], None,
                                                  b["video_grid_thw"].clone(), b["attention_mask"])
    per_frame = torch.repeat_interleave(b["video_grid_thw"], b["video_grid_thw"][:, 0], dim=0)
    per_frame[:, 0] = 1
    ref_pos, ref_delta = reference_rope_index(b["input_ids"], b["mm_token_type_ids"], None, per_frame, None,
                                              b["attention_mask"], spatial_merge_size=2, tokens_per_second=None)
    assert torch.equal(hf_pos, ref_pos) and torch.equal(hf_delta, ref_delta)


def test_qwen2_families_keep_the_reference_rope(family_models):
    from pipelines.config import load_config
    from pipelines.models import load_model

    for family in ("qwen2_vl", "qwen2_5_vl"):
        path = family_models(family)
        model = load_model(load_config(overrides=[f"model.name_or_path={path}"]).model)
        assert getattr(model.model, "_videor1_reference_rope", False), family


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_and_generation_cover_completions(family, family_models):
    """prompt + completion forward: mm_token_type_ids extended with text (0) over the completion; the cached
    generation's greedy tokens equal the argmax of the full forward (positions agree across the two paths)."""
    from pipelines.config import load_config
    from pipelines.models import encode_batch, extend_for_completion, load_model, load_processor

    path = family_models(family)
    proc = load_processor(path)
    model = load_model(load_config(overrides=[f"model.name_or_path={path}"]).model)
    a = ADAPTERS[family]
    size = a.factor * 2
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                                         "text": "Which colour?"}]}],
                                      add_generation_prompt=True, tokenize=False)
    b = encode_batch(proc, [prompt], [_video_media(n=8, size=size)])
    with torch.no_grad():
        gen = model.generate(**b, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        comp = gen[:, b["input_ids"].shape[1]:]
        full = extend_for_completion(dict(b), comp)
        assert full["mm_token_type_ids"].shape == full["input_ids"].shape
        assert int(full["mm_token_type_ids"][0, -4:].abs().sum()) == 0
        logits = model(**full).logits
    assert torch.equal(logits[0, -5:-1].argmax(-1), comp[0])


# ---------------------------------------------------------------------------------------------------------------------
def test_shuffled_video_keeps_the_ordered_timestamps(family_models):
    """T-GRPO on a timestamped family: the shuffled prompt's timestamp text equals the ordered prompt's (the
    presented order's monotone times), while the frames (pixel rows) differ."""
    from pipelines.models import encode_batch, load_processor, shuffled

    proc = load_processor(family_models("qwen3_vl"))
    media = _video_media(n=8, size=64)
    shuf = shuffled(media, torch.Generator().manual_seed(0))
    assert not np.array_equal(shuf.video, media.video)
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Q<|im_end|>\n"
    ordered = encode_batch(proc, [text], [media])
    shuffled_b = encode_batch(proc, [text], [shuf])
    assert torch.equal(ordered["input_ids"], shuffled_b["input_ids"])  # same timestamps, same token layout
    times = [x for x in proc.tokenizer.decode(ordered["input_ids"][0]).split("<") if "seconds" in x]
    values = [float(x.split(" ")[0]) for x in times]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert not torch.equal(ordered["pixel_values_videos"], shuffled_b["pixel_values_videos"])


# ---------------------------------------------------------------------------------------------------------------------
def test_unsupported_family_is_one_line_listing_the_supported(tmp_path, family_models):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FamilyError) as e:
        adapter_for(d)
    msg = str(e.value)
    assert "\n" not in msg and "'llama' is not supported" in msg and all(f in msg for f in FAMILIES)
    r = run_cli("train", "sft", "--model", d, "--data", "x.json", check=False)
    assert r.exit_code != 0 and "is not supported; supported: qwen2_vl, qwen2_5_vl" in r.output
    r = run_cli("model", "tiny", "--family", "gemma3", "--out", tmp_path / "g", check=False)
    assert r.exit_code != 0 and "supported: qwen2_vl" in r.output


def test_mismatched_processor_and_config_lacking_a_field_are_named(tmp_path, family_models):
    import shutil

    from pipelines.config import load_config
    from pipelines.models import load_model, load_processor
    from pipelines.models.families import check_pair

    q3 = family_models("qwen3_vl")
    q25 = family_models("qwen2_5_vl")
    mixed = tmp_path / "mixed"
    shutil.copytree(q25, mixed)
    for f in Path(q3).glob("*.json"):  # Qwen3-VL config + processor files over Qwen2.5-VL's
        if f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, mixed / f.name)
    model = load_model(load_config(overrides=[f"model.name_or_path={q25}"]).model)
    with pytest.raises(FamilyError, match="processor Qwen3VLProcessor .*does not match the Qwen2.5-VL model"):
        check_pair(model, load_processor(q3))
    with pytest.raises(FamilyError, match="does not match"):
        load_processor(mixed)

    broken = tmp_path / "broken"
    shutil.copytree(q3, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["vision_config"]["num_position_embeddings"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FamilyError, match=r"config.json: Qwen3-VL config lacks 'vision_config.num_position_emb"):
        load_model(load_config(overrides=[f"model.name_or_path={broken}"]).model)


# ---------------------------------------------------------------------------------------------------------------------
def test_data_probe_reports_family_sizes_and_tokens(synth_world):
    recs = json.loads(Path(synth_world["rl"]).read_text())
    video = Path(synth_world["root"]) / next(r for r in recs if r["data_type"] == "video")["path"]
    out = {}
    for family in ("qwen2_5_vl", "qwen3_vl"):
        r = run_cli("data", "probe", video, "--json", "--family", family, "--set", "video.min_pixels=3136",
                    "--set", "video.max_pixels=4096")
        out[family] = json.loads(r.output)
    a28, a32 = out["qwen2_5_vl"], out["qwen3_vl"]
    assert a28["family"] == "qwen2_5_vl" and a32["family"] == "qwen3_vl"
    assert (a28["resized_height"], a32["resized_height"]) == (56, 64)
    n = a32["nframes"]
    assert a28["visual_tokens"] == math.ceil(n / 2) * (56 // 14) ** 2 // 4
    assert a32["visual_tokens"] == math.ceil(n / 2) * (64 // 16) ** 2 // 4


def test_rollout_shuffled_copies_keep_the_ordered_timestamps(family_models, synth_world):
    """prepare_samples (train rl) on Qwen3-VL: each video's shuffled copy encodes to the same input_ids (timestamps
    of the presented order) and permuted pixels."""
    from pipelines.config import load_config
    from pipelines.models import encode_batch, load_processor
    from pipelines.prompts import load_template
    from pipelines.rl.rollout import prepare_samples

    path = family_models("qwen3_vl")
    proc = load_processor(path)
    cfg = load_config(overrides=[f"model.name_or_path={path}", "video.min_pixels=4096", "video.max_pixels=4096"])
    recs = json.loads(Path(synth_world["rl"]).read_text())
    rows = [(i, r) for i, r in enumerate(recs) if r["data_type"] == "video"][:3]
    samples, skipped = prepare_samples(rows, cfg, proc, load_template("video-r1"), synth_world["root"],
                                       torch.Generator().manual_seed(0), temporal=True)
    assert not skipped and len(samples) == 3
    for s in samples:
        assert s.media.video.shape[1:3] == (64, 64)
        a = encode_batch(proc, [s.prompt], [s.media])
        b = encode_batch(proc, [s.prompt], [s.shuffled_media])
        assert torch.equal(a["input_ids"], b["input_ids"]) and "seconds>" in proc.tokenizer.decode(a["input_ids"][0])
        assert not torch.equal(a["pixel_values_videos"], b["pixel_values_videos"])


@pytest.mark.parametrize("preset,family", [("video-r1-7b", "qwen2_5_vl"), ("qwen3-vl-8b", "qwen3_vl")])
def test_training_presets_hold_the_family_budgets(preset, family):
    """The paper's budgets (128 tokens per frame, qwen-vl-utils' sequence budget, images 4..256 tokens) in each
    family's pixels; the Qwen3-VL preset trains Qwen3-VL-8B-Instruct with the paper's schedule."""
    from pipelines.config import load_config

    cfg = load_config(preset)
    d = ADAPTERS[family].sampler_defaults()
    got = {"video.min_pixels": cfg.video.min_pixels, "video.max_pixels": cfg.video.max_pixels,
           "video.total_pixels": cfg.video.total_pixels, "image.min_pixels": cfg.image.min_pixels,
           "image.max_pixels": cfg.image.max_pixels}
    assert got == d
    assert ADAPTERS[family].train_preset == preset
    if family == "qwen3_vl":
        ref = load_config("video-r1-7b")
        assert cfg.model.name_or_path == "Qwen/Qwen3-VL-8B-Instruct"
        assert cfg.rl.model_dump() == ref.rl.model_dump() and cfg.sft.model_dump() == ref.sft.model_dump()


def test_eval_protocol_follows_the_model_family(family_models):
    from pipelines.config import load_config
    from videor1_cli.eval import _protocol_preset

    bench = {"eval.bench": "vsi"}
    assert _protocol_preset({**bench, "model.name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct"}) == "video-r1-eval"
    assert _protocol_preset({**bench, "model.name_or_path": "Qwen/Qwen3-VL-8B-Instruct"}) == "qwen3-vl-eval"
    assert _protocol_preset({**bench, "model.name_or_path": str(family_models("qwen3_5"))}) == "qwen3-vl-eval"
    q3, r1 = load_config("qwen3-vl-eval"), load_config("video-r1-eval")
    assert (q3.video.min_pixels, q3.video.max_pixels) == (128 * 32 * 32, 256 * 32 * 32)
    assert (r1.video.min_pixels, r1.video.max_pixels) == (128 * 28 * 28, 256 * 28 * 28)
    assert q3.eval.model_dump() == r1.eval.model_dump()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_prompt_length_counts_timestamps_and_visual_tokens(family, family_models):
    """rl's prompt.max_prompt_length check counts exactly the tokens the processor produces (Qwen3-VL: timestamp
    text and per-frame vision markers included)."""
    from pipelines.models import encode_batch, load_processor
    from pipelines.rl.rollout import prompt_tokens

    proc = load_processor(family_models(family))
    f = ADAPTERS[family].factor
    text = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>Which way?<|im_end|>\n"
    for media in (_video_media(n=8, size=2 * f), _video_media(n=6, size=3 * f, fps=0.5)):
        assert prompt_tokens(proc, text, media) == encode_batch(proc, [text], [media])["input_ids"].shape[1]
