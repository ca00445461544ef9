"""Tiny offline models of every family, all built here: the real transformers classes at toy sizes, one offline-trained
byte-level BPE tokenizer (Qwen's special tokens by name) and the family's real processor classes.

`Adapter.build_tiny` (pipelines.models.families) picks the builder and passes its family's toy configuration; nothing
here tests a family's name. Qwen2.5-VL's default spec (`TinySpec()`, head_dim 16) is what the quickstart's figures
were measured on; `TINY_VLLM_SPEC` and the other families use head_dim 32 (vLLM's CPU attention needs >= 32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipelines.models import QWEN_SPECIAL_TOKENS

# A Qwen2.5-VL chat template (identical to the one the released checkpoints ship, as vendored by trl).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Text the tiny tokenizer is trained on: the shipped prompt templates, answer formats, and the synthetic world's words.
_TINY_CORPUS = [
    "You are a helpful assistant.",
    "<think> </think> <answer> </answer> <think>The square is red in every frame.</think>\n<answer>A</answer>",
    "Please think about this question as if you were a human pondering deeply. Engage in an internal dialogue using "
    "expressions such as 'let me think', 'wait', 'Hmm', 'oh, I see', 'let's break it down', etc, or other natural "
    "language thought expressions It's encouraged to include self-reflection or verification in the reasoning "
    "process. Provide your detailed reasoning between the <think> </think> tags, and then give your final answer "
    "between the <answer> </answer> tags.",
    "Provide your detailed reasoning between the <think> and </think> tags, and then give your final answer between "
    "the <answer> and </answer> tags.",
    " Please provide only the single option letter (e.g., A, B, C, D, etc.) within the <answer> </answer> tags.",
    " Please provide the numerical value (e.g., 42 or 3.14) within the <answer> </answer> tags.",
    " Please transcribe text from the image/video clearly and provide your text answer within the <answer> </answer> "
    "tags.",
    " Please provide your text answer within the <answer> </answer> tags.",
    "Options:\nA. red\nB. green\nC. blue\nD. yellow\nE. F. G. H.",
    "What colour is the square? Which direction does the square move? left right up down. Which colour appears "
    "first? How many frames is the square red? How many squares are in the image? What word is written? Describe "
    "the motion of the square. How many pixels wide is the square? How far does the square travel? The square moves "
    "from the left to the right. It starts on the right and ends on the left. The word is CAT SUN BOX RED DOG HAT.",
    "0 1 2 3 4 5 6 7 8 9 10 12 16 20 24 28 32 40 48 56 64 0.5 1.5 3.14 42 100",
    "the a an in on of to is it first then after before every frame frames video image square squares colour color",
]


@dataclass
class TinySpec:
    """Sizes of the tiny Qwen2.5-VL (defaults: ~0.19 M parameters, measured learnable on 2 CPU cores)."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)
    rope_theta: float = 10000.0
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    max_position_embeddings: int = 4096


# The tiny model for vLLM: vLLM's CPU attention kernels take head sizes 32, 64, 80, ... (not the default spec's 16), so
# 2 heads / 1 kv head on the same hidden 64 (head_dim 32, mrope_section summing to 16). The default spec stays as is:
# the quickstart's measured figures depend on it.
TINY_VLLM_SPEC = TinySpec(num_attention_heads=2, num_key_value_heads=1, mrope_section=(4, 6, 6))


def train_tiny_tokenizer(vocab_size: int = 1024, extra_corpus: Sequence[str] = ()):
    """A byte-level BPE with Qwen's special tokens by name, trained offline in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(_TINY_CORPUS) + list(extra_corpus)
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def build_processor(tokenizer, min_pixels: int = 28 * 28, max_pixels: int = 16384 * 28 * 28):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Write a tiny random Qwen2.5-VL (model + tokenizer + processor) to out_dir; from_pretrained round-trips it."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer(spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_attention_heads
    if sum(spec.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {spec.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            max_position_embeddings=spec.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta,
                             "mrope_section": list(spec.mrope_section)},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=True,
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            num_heads=spec.vision_heads,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            out_hidden_size=spec.hidden_size,
            window_size=112,
            fullatt_block_indexes=[spec.vision_depth - 1],
            tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"]
    )
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    (out / "videor1_tiny.json").write_text(json.dumps({"seed": seed, "spec": spec.__dict__}, default=list))
    return out


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


def qwen3_text_config(vocab: int, ids: dict[str, int], overrides: dict[str, Any]) -> dict:
    """Language model of the tiny Qwen3-VL / Qwen3.5 (dense or MoE): 2 layers, 2 heads of 32, 1 KV head; `overrides`
    is the family's own part (`Adapter.tiny_text`: M-RoPE sections, hybrid layers, experts)."""
    text = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    return text | json.loads(json.dumps(overrides))  # a deep copy: the adapter's declaration stays untouched


def build_qwen3(adapter, out_dir, seed: int = 0) -> Path:
    """Tiny Qwen3-VL / Qwen3-VL-MoE / Qwen3.5 / Qwen3.5-MoE with Qwen3-VL's processor (patch 16, timestamps); the
    family's part of the text and vision configs comes from the adapter (`tiny_text`, `tiny_vision`)."""
    import torch
    import transformers
    from transformers import Qwen2VLImageProcessor, Qwen3VLVideoProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = train_tiny_tokenizer(1024)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    ids = _ids(tokenizer)
    text = qwen3_text_config(len(tokenizer), ids, adapter.tiny_text)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1, patch_size=16, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=256) | dict(adapter.tiny_vision)
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
    _write_meta(out, adapter.family, seed, {"text": text, "vision": vision})
    return out
