"""Reference M-RoPE positions (pipelines/models/mrope.py) against hand-computed cases and the HF forward.

`test_forward_and_cached_generation_use_the_reference_positions` is the one that fails when the binding is bypassed
(checked by skipping `Adapter.install_rope` in `load_model`): it reads the positions the language model's rotary
embedding actually receives, in the prompt forward and in every cached decoding step, and compares them with
hand-computed reference values that transformers' own rule does not give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.models.mrope import reference_rope_index


def _types(*runs):
    """mm_token_type_ids for a sequence given as (modality, count) runs."""
    return torch.tensor([[m for m, n in runs for _ in range(n)]])


def test_text_after_a_long_video_resumes_after_its_temporal_extent():
    # 3 text tokens, a video of grid (t=4, h=4, w=4) with merge 2 -> 4 x 2 x 2 = 16 tokens, 2 text tokens.
    # fps 2 and temporal patch 2 -> second_per_grid_t 1.0; tokens_per_second 2 -> time positions 0, 2, 4, 6.
    tt = _types((0, 3), (2, 16), (0, 2))
    ids = torch.zeros_like(tt)
    pos, delta = reference_rope_index(ids, tt, None, torch.tensor([[4, 4, 4]]), torch.tensor([1.0]),
                                      spatial_merge_size=2, tokens_per_second=2)
    t, h, w = pos[:, 0].tolist()
    assert t[:3] == h[:3] == w[:3] == [0, 1, 2]
    assert t[3:19] == [3] * 4 + [5] * 4 + [7] * 4 + [9] * 4
    assert h[3:7] == [3, 3, 4, 4] and w[3:7] == [3, 4, 3, 4]
    # The reference resumes at max(vision) + 1 = 10; transformers 5.20 would resume at 3 + max(4, 4) // 2 = 5.
    assert t[19:] == h[19:] == w[19:] == [10, 11]
    assert delta.tolist() == [[12 - 21]]


def test_qwen2_vl_rule_uses_one_position_per_temporal_step():
    tt = _types((0, 1), (2, 4 * 1 * 1), (0, 1))
    pos, _ = reference_rope_index(torch.zeros_like(tt), tt, None, torch.tensor([[4, 2, 2]]), None,
                                  spatial_merge_size=2, tokens_per_second=None)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert pos[1, 0].tolist() == [0, 1, 1, 1, 1, 5]


def test_several_images_and_videos_with_left_padding():
    # sample 0: pad pad | text 2 | image (1, 4, 2) -> 2 x 1 | text 1 | video (2, 2, 2) -> 2 x 1 x 1 | text 1
    # sample 1: text 2 | video (6, 2, 2) -> 6 tokens at fps 1 (second_per_grid_t 2.0 -> step 4) | text 4
    runs0 = [(0, 2), (1, 2), (0, 1), (2, 2), (0, 1)]
    runs1 = [(0, 2), (2, 6), (0, 4)]
    t0, t1 = _types(*runs0)[0], _types(*runs1)[0]
    t0 = torch.cat([torch.zeros(12 - len(t0), dtype=torch.long), t0])
    tt = torch.stack([t0, t1])
    mask = torch.ones_like(tt)
    mask[0, :4] = 0
    pos, delta = reference_rope_index(
        torch.zeros_like(tt), tt, torch.tensor([[1, 4, 2]]), torch.tensor([[2, 2, 2], [6, 2, 2]]),
        torch.tensor([0.5, 2.0]), mask, spatial_merge_size=2, tokens_per_second=2)
    # sample 0: text 0,1 | image at 2 (h 2,3; w 2) | text 4 | video t: 5, 6 (0.5*2 = 1 per step) | text 7
    assert pos[0, 0, :4].tolist() == [0, 0, 0, 0]
    assert pos[0, 0, 4:].tolist() == [0, 1, 2, 2, 4, 5, 6, 7]
    assert pos[1, 0, 4:].tolist() == [0, 1, 2, 3, 4, 5, 5, 7]
    assert pos[2, 0, 4:].tolist() == [0, 1, 2, 2, 4, 5, 5, 7]
    assert delta[0].item() == 8 - 8
    # sample 1: text 0,1 | video t = 2 + 4k for k < 6 -> 2..22 | text from 23
    assert pos[0, 1].tolist() == [0, 1, 2, 6, 10, 14, 18, 22, 23, 24, 25, 26]
    assert pos[1, 1].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 23, 24, 25, 26]
    assert delta[1].item() == 27 - 12


def test_temporal_positions_truncate_like_vllm():
    # Sampled fps 0.3 -> second_per_grid_t = float32(2 / 0.3) = 6.6666665; times tokens_per_second 2 in float64 =
    # 13.33333301..., so t = 3 gives 39.999999 -> 39 (vLLM). float32 left to right (transformers 4.x) gives 40.
    spg = torch.tensor([2 / 0.3], dtype=torch.float32)
    tt = _types((2, 4))
    pos, _ = reference_rope_index(torch.zeros_like(tt), tt, None, torch.tensor([[4, 2, 2]]), spg,
                                  spatial_merge_size=2, tokens_per_second=2)
    assert pos[0, 0].tolist() == [0, 13, 26, 39]
    assert int((3 * spg[0] * 2).long()) == 40  # the float32 order this replaces


def test_spatially_dominated_inputs_agree_with_transformers(tiny_model_dir):
    """Where the spatial extent dominates (an image), the two rules coincide: the patched model equals HF's own."""
    from pipelines.config import Config
    from pipelines.models import Media, encode_batch, load_model, load_processor

    cfg = Config()
    proc = load_processor(tiny_model_dir)
    model = load_model(cfg.model, tiny_model_dir, device=torch.device("cpu"))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                    add_generation_prompt=True)
    img = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    batch = encode_batch(proc, [text], [Media(image=img)])
    args = dict(input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    ours = model.model.get_rope_index(**args)
    theirs = type(model.model).get_rope_index(model.model, **args)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_loaded_model_uses_reference_positions_and_cached_generation_matches_full_forward(tiny_model_dir):
    """A long, sparsely sampled video: HF's own rule differs; ours is used in forward AND in cached generation."""
    from pipelines.config import Config
    from pipelines.models import Media, encode_batch, load_model, load_processor

    cfg = Config()
    proc = load_processor(tiny_model_dir)
    torch.manual_seed(0)
    model = load_model(cfg.model, tiny_model_dir, device=torch.device("cpu"))
    with torch.no_grad():  # non-trivial weights so positions matter for the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    assert getattr(model.model, "_videor1_reference_rope", False)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "go"}]}],
                                    add_generation_prompt=True)
    video = np.random.default_rng(1).integers(0, 255, (16, 56, 56, 3), dtype=np.uint8)
    batch = encode_batch(proc, [text], [Media(video=video, fps=0.25)])  # 8 s per grid step: temporal >> spatial
    args = dict(input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=batch["second_per_grid_ts"],
                attention_mask=batch["attention_mask"])
    ours, _ = model.model.get_rope_index(**args)
    theirs, _ = type(model.model).get_rope_index(model.model, **args)
    assert not torch.equal(ours, theirs)
    n_vid = int((batch["mm_token_type_ids"] == 2).sum())
    first_text_after = int((batch["mm_token_type_ids"][0] == 2).nonzero().max()) + 1
    assert ours[0, 0, first_text_after] == ours[0, 0, :first_text_after].max() + 1
    assert n_vid > 0

    out = model.generate(**batch, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         eos_token_id=None)
    seq = out.sequences
    n_prompt = batch["input_ids"].shape[1]
    from pipelines.models import extend_for_completion

    full = extend_for_completion(batch, seq[:, n_prompt:])
    model.model.rope_deltas = None
    with torch.no_grad():
        logits = model(**full).logits
    for i, score in enumerate(out.scores):
        torch.testing.assert_close(logits[0, n_prompt - 1 + i], score[0], atol=1e-4, rtol=1e-4)


def test_the_adapter_decides_which_families_get_the_binding():
    """Qwen2.5-VL binds the time rule, Qwen2-VL the grid rule, the timestamped families keep transformers' own."""
    from pipelines.models.families import ADAPTERS

    class Fake(torch.nn.Module):
        visual = None

        def __init__(self):
            super().__init__()
            self.language_model = torch.nn.Identity()

        def get_rope_index(self):
            return "own"

    for family, expected in (("qwen3_vl", False), ("qwen3_5", False), ("qwen2_5_vl", True), ("qwen2_vl", True)):
        f = Fake()
        assert ADAPTERS[family].install_rope(f) is expected, family
        assert (f.get_rope_index.__func__ is Fake.get_rope_index) is not expected, family


def test_forward_and_cached_generation_use_the_reference_positions(tiny_model_dir):
    """A sparse video (4 frames at 0.25 fps: 8 s per temporal grid step) where the two rules differ. The positions
    the rotary embedding receives must be the hand-computed reference ones, in the forward and in each cached
    decoding step, and must differ from transformers' own (which resumes the text at 1 + max(h, w) / merge = 3)."""
    from pipelines.config import Config
    from pipelines.models import Media, encode_batch, load_model, load_processor

    proc = load_processor(tiny_model_dir)
    model = load_model(Config().model, tiny_model_dir, device=torch.device("cpu"))
    video = np.random.default_rng(2).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
    batch = encode_batch(proc, ["<|vision_start|><|video_pad|><|vision_end|>go"], [Media(video=video, fps=0.25)])
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]  # 2 x 2 x 2 = 8 merged tokens
    n = batch["input_ids"].shape[1]
    after = n - 9  # <|vision_end|> and the text
    # Hand-computed reference: <|vision_start|> at 0; the video from 1, time step 8 s x tokens_per_second 2 = 16;
    # the text resumes at max(vision) + 1 = 18.
    expected = torch.tensor([
        [0, 1, 1, 1, 1, 17, 17, 17, 17] + list(range(18, 18 + after)),
        [0, 1, 1, 2, 2, 1, 1, 2, 2] + list(range(18, 18 + after)),
        [0, 1, 2, 1, 2, 1, 2, 1, 2] + list(range(18, 18 + after)),
    ])
    seen: list[torch.Tensor] = []
    rotary = model.model.language_model.rotary_emb
    handle = rotary.register_forward_pre_hook(lambda m, args: seen.append(args[1][:, 0].clone()))
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
            forward = seen.pop()
            model.generate(**batch, max_new_tokens=3, do_sample=False, eos_token_id=None)
    finally:
        handle.remove()
    assert torch.equal(forward, expected)
    theirs, _ = type(model.model).get_rope_index(
        model.model, input_ids=batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
        video_grid_thw=batch["video_grid_thw"], second_per_grid_ts=batch["second_per_grid_ts"],
        attention_mask=batch["attention_mask"])
    assert not torch.equal(theirs[:, 0], expected)  # the case discriminates between the two rules
    prefill, *steps = seen
    assert torch.equal(prefill, expected) and len(steps) == 2
    last = 18 + after - 1
    for k, pos in enumerate(steps, start=1):  # each new token one position after the last: the reference's deltas
        assert pos.tolist() == [[last + k]] * 3
