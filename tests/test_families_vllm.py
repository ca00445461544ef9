"""HF <-> vLLM greedy agreement per model family on tiny models with non-trivial random weights (text, images,
videos of several lengths / fps / source indices). Needs the vLLM CPU venv (run `VENV/bin/python -m pytest -m vllm
tests/test_families_vllm.py`); skipped where vLLM is not importable.

Checked here: the family's request form (`Adapter.vllm_video_metadata / vllm_mm_kwargs`: Qwen3-VL timestamps from
the same metadata as the HF processor) and the tiny models' configs load in vLLM's CPU build. Not compared (measured
with vLLM 0.32 CPU + transformers 5.19 in the vLLM venv):
- Qwen3.5 (dense, MoE): vLLM's CPU Gated DeltaNet kernel requires bf16 ("CPU GDN attention requires BF16"), where
  greedy agreement with a float32 HF reference is not expected;
- Qwen3-VL-MoE: transformers 5.x saves the fused experts as ``down_proj (E, hidden, inter)`` (nn.Linear layout);
  vLLM 0.32's loader expects the released checkpoints' transposed layout and fails with a shape error, so a
  Qwen3-VL-MoE checkpoint written by transformers 5 does not load in vLLM 0.32 (open: convert on save or on sync).
"""

from __future__ import annotations

import math
import os

for _k, _v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "nobind"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("vllm", reason="needs the vLLM venv")
pytestmark = pytest.mark.vllm

from pipelines.models import Media  # noqa: E402
from pipelines.models.families import ADAPTERS  # noqa: E402


def scramble(model, seed: int, scale: float = 1.5) -> None:
    """Non-trivial random weights (the default init gives near-uniform logits where engines agree trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(int(np.prod(p.shape[1:]))))
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def items_for(factor: int) -> list[Media]:
    rng = np.random.default_rng(0)
    f = factor
    out = [Media()]
    out += [Media(image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(2 * f, 2 * f), (2 * f, 3 * f)]]
    # (frames, height, width, sampled fps, stride of the source indices)
    for t, h, w, fps, stride in [(4, 2 * f, 2 * f, 2.0, 1), (8, 2 * f, 3 * f, 1.0, 3), (6, 3 * f, 2 * f, 0.5, 2)]:
        out.append(Media(video=rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8), fps=fps,
                         indices=list(range(0, t * stride, stride)), video_fps=fps * stride))
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_hf_and_vllm_greedy_agree(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    from pipelines.config import Config
    from pipelines.generation import Sampling
    from pipelines.generation.hf import HFBackend
    from pipelines.generation.vllm import VLLMBackend
    from pipelines.models import load_model, load_processor

    a = ADAPTERS[family]
    path = a.build_tiny(tmp_path / family, seed=0)
    if family == "qwen2_5_vl":  # the default tiny spec has head_dim 16; vLLM's CPU attention needs >= 32
        from pipelines.models import TinySpec, build_tiny_model

        path = build_tiny_model(tmp_path / family, seed=0, spec=TinySpec(num_attention_heads=2, num_key_value_heads=1,
                                                                         mrope_section=(4, 6, 6)))
    model = AutoModelForImageTextToText.from_pretrained(path)
    scramble(model, seed=1)
    model.save_pretrained(path)
    proc = load_processor(path)
    hf = HFBackend(load_model(Config().model.model_copy(update={"dtype": "float32"}), path,
                              device=torch.device("cpu")), proc, batch_size=8)
    items = items_for(a.factor)
    prompts = [proc.apply_chat_template(
        [{"role": "user", "content": [*([{"type": m.kind}] if m.kind != "text" else []),
                                      {"type": "text", "text": "What colour is the square?"}]}],
        add_generation_prompt=True, tokenize=False) for m in items]
    sampling = Sampling(max_new_tokens=12, temperature=0)
    want = hf.generate(prompts, items, sampling)
    engine = VLLMBackend(path, dtype="float32", enforce_eager=True, max_model_len=4096, seed=0,
                         limit_mm_per_prompt={"image": 1, "video": 1}, max_num_seqs=8)
    got = engine.generate(prompts, items, sampling)
    for m, h, v in zip(items, want, got):
        assert h[0].token_ids == v[0].token_ids, (family, m.kind)
