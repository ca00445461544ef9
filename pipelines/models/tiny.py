"""Tiny offline models of every family: the real transformers classes at toy sizes, the same offline-trained byte-level
BPE tokenizer (Qwen's special tokens by name) and the family's real processor classes.

Qwen2.5-VL keeps `pipelines.models.build_tiny_model` (its default spec is what the quickstart's figures were measured
on). The new families use head_dim 32 for the language model (vLLM's CPU attention needs head_dim >= 32) and the
vision tower (one head of 32).
"""

from __future__ import annotations

import json
from pathlib import Path

# Qwen3-VL-Instruct's chat template without the tool-call branches (the shipped one renders the same text for
# system / user / assistant turns with images and videos): no default system turn, unlike Qwen2.5-VL.
QWEN3_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_meta(out: Path, family: str, seed: int, spec: dict) -> None:
    (out / "videor1_tiny.json").write_text(json.dumps({"seed": seed, "family": family, "spec": spec}))


def _ids(tokenizer) -> dict[str, int]:
    from pipelines.models import QWEN_SPECIAL_TOKENS

    return {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}


def _save(adapter, model, tokenizer, ids, out: Path, image_proc, video_proc, chat_template) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"]
    )
    model.save_pretrained(out)
    proc = adapter.processor_class()(image_processor=image_proc, video_processor=video_proc, tokenizer=tokenizer,
                                     chat_template=chat_template)
    proc.save_pretrained(out)


def build_qwen2(adapter, out_dir, seed: int = 0) -> Path:
    """Tiny Qwen2-VL: the Qwen2.5-VL tiny's sizes but 2 heads of 32 (vLLM's CPU attention needs head_dim >= 32),
    Qwen2-VL's vision tower (no window attention)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    from pipelines.models import CHAT_TEMPLATE, TinySpec, train_tiny_tokenizer

    spec = TinySpec(num_attention_heads=2, num_key_value_heads=1, mrope_section=(4, 6, 6))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer(spec.vocab_size)
    ids = _ids(tokenizer)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                             "mrope_section": list(spec.mrope_section)},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(depth=spec.vision_depth, embed_dim=spec.vision_hidden_size, hidden_size=spec.hidden_size,
                           mlp_ratio=2, num_heads=spec.vision_heads, patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = adapter.model_class()(config)
    size = {"shortest_edge": 28 * 28, "longest_edge": 16384 * 28 * 28}
    _save(adapter, model, tokenizer, ids, out, Qwen2VLImageProcessor(size=size), Qwen2VLVideoProcessor(size=size),
          CHAT_TEMPLATE)
    _write_meta(out, adapter.family, seed, spec.__dict__ | {"mrope_section": list(spec.mrope_section)})
    return out


def qwen3_text_config(family: str, vocab: int, ids: dict[str, int]) -> dict:
    """Language model of the tiny Qwen3-VL / Qwen3.5 (dense or MoE): 2 layers, 2 heads of 32, 1 KV head."""
    text = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    if family.startswith("qwen3_5"):
        # Hybrid: one Gated DeltaNet layer, one full-attention layer; rotary on a quarter of head_dim (8 -> 4 pairs).
        text.update(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                    linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=1,
                    linear_num_value_heads=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                     "mrope_interleaved": True, "partial_rotary_factor": 0.25})
    else:
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                     "mrope_interleaved": True})
    if family.endswith("_moe"):
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        if family == "qwen3_5_moe":
            text.update(shared_expert_intermediate_size=32)
        else:
            # transformers always renormalises the top-k router weights; vLLM reads the flag from the config.
            text.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    return text


def build_qwen3(adapter, out_dir, seed: int = 0) -> Path:
    """Tiny Qwen3-VL / Qwen3-VL-MoE / Qwen3.5 / Qwen3.5-MoE with Qwen3-VL's processor (patch 16, timestamps)."""
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen3VLVideoProcessor

    from pipelines.models import train_tiny_tokenizer

    family = adapter.family
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer(1024)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    ids = _ids(tokenizer)
    text = qwen3_text_config(family, len(tokenizer), ids)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1, patch_size=16, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=256)
    if family.startswith("qwen3_vl"):
        vision["deepstack_visual_indexes"] = [0]
    config_cls = getattr(transformers, adapter.model_class_name.replace("ForConditionalGeneration", "Config"))
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    model = adapter.model_class()(config)
    # Qwen3-VL / Qwen3.5 checkpoints normalise images and videos with mean = std = 0.5 (not Qwen2-VL's CLIP values;
    # vLLM normalises both on device with one set, so a mismatch here makes HF and vLLM disagree on videos).
    image_proc = Qwen2VLImageProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 16384 * 32 * 32},
                                       patch_size=16, merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    video_proc = Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 16384 * 32 * 32},
                                       patch_size=16, merge_size=2)
    _save(adapter, model, tokenizer, ids, out, image_proc, video_proc, QWEN3_CHAT_TEMPLATE)
    _write_meta(out, family, seed, {"text": text, "vision": vision})
    return out
