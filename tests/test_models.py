"""Tiny model round trip and the batch-encoding quirks of Qwen2.5-VL under transformers 5."""

from __future__ import annotations

import numpy as np
import torch

from conftest import run_cli
from pipelines.models import Media, encode_batch, extend_for_completion, load_processor, repeat_batch


def _prompt(proc, kind):
    msgs = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": "What colour is the square?"}]}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_tiny_round_trip_is_bit_identical(tiny_model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert type(m).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert sum(p.numel() for p in m.parameters()) < 400_000
    m.save_pretrained(tmp_path / "again")
    m2 = AutoModelForImageTextToText.from_pretrained(tmp_path / "again")
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    proc = load_processor(tiny_model_dir)
    assert proc.tokenizer.convert_tokens_to_ids("<|video_pad|>") == m.config.video_token_id
    assert m.generation_config.eos_token_id == proc.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_mixed_batch_keeps_sizes_and_per_video_fps(tiny_model_dir):
    proc = load_processor(tiny_model_dir)
    v1 = np.random.randint(0, 255, (8, 56, 56, 3), dtype=np.uint8)
    v2 = np.random.randint(0, 255, (4, 56, 84, 3), dtype=np.uint8)
    img = np.random.randint(0, 255, (56, 56, 3), dtype=np.uint8)
    texts = [_prompt(proc, "video"), _prompt(proc, "image"), _prompt(proc, "video")]
    b = encode_batch(proc, texts, [Media(video=v1, fps=4.0), Media(image=img), Media(video=v2, fps=1.0)])
    # frames are not re-sized by the processor: 56x56 -> a 2x2 grid of 28-px merged patches
    assert b["video_grid_thw"].tolist() == [[4, 4, 4], [2, 4, 6]]
    assert b["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert b["second_per_grid_ts"].tolist() == [0.5, 2.0]  # temporal_patch 2 / per-video fps
    vid_id = proc.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((b["input_ids"] == vid_id).sum()) == (4 * 4 * 4 + 2 * 4 * 6) // 4


def test_completion_forward_extends_mm_token_type_ids(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    proc = load_processor(tiny_model_dir)
    v = np.random.randint(0, 255, (8, 56, 56, 3), dtype=np.uint8)
    b = encode_batch(proc, [_prompt(proc, "video")], [Media(video=v, fps=2.0)])
    rb = repeat_batch(b, 3)
    assert rb["input_ids"].shape[0] == 3 and rb["pixel_values_videos"].shape[0] == 3 * b["pixel_values_videos"].shape[0]
    comp = torch.randint(20, 100, (3, 5))
    full = extend_for_completion(rb, comp)
    assert full["mm_token_type_ids"].shape == full["input_ids"].shape
    assert int(full["mm_token_type_ids"][:, -5:].abs().sum()) == 0
    out = m(**full)
    assert out.logits.shape[:2] == full["input_ids"].shape


def test_cli_model_tiny(tmp_path):
    run_cli("model", "tiny", "--out", tmp_path / "tm", "--seed", "1")
    assert (tmp_path / "tm" / "model.safetensors").exists() and (tmp_path / "tm" / "processor_config.json").exists()
