"""Test-only helpers for tests/test_deepspeed.py, imported inside the DeepSpeed workers.

- `length_reward`: a reward plugin (``rl.rewards=[tests._ds_probe:length_reward]``) that varies inside a group, so
  a random tiny model gets non-zero advantages and gradients.
- `main` (``python -m tests._ds_probe`` under torchrun): the policy under DeepSpeed ZeRO-3 on 2 ranks, with and
  without LoRA; every rank exhausts `iter_vllm_weights` (gathering is collective) and rank 0 writes what it got next
  to the expected full tensors (the checkpoint's; with LoRA, W + scale * B @ A computed without DeepSpeed) to
  $PROBE_OUT/vllm-weights-<mode>.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def length_reward(completions, **_):
    return [min(1.0, len(c) / 40.0) for c in completions]


def _lora_cfg():
    from pipelines.config import load_config

    return load_config(overrides=["model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.0"]).model.lora


def _randomise_lora(model, seed: int) -> None:
    """LoRA's B starts at zero (merge would be a no-op): give every adapter weight a fixed random value."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def main() -> int:
    import torch

    torch.set_num_threads(1)
    from pipelines import launch as L
    from pipelines.config import load_config
    from pipelines.generation.vllm import iter_vllm_weights, vllm_param_name
    from pipelines.models import apply_lora, load_model

    model_dir, out = os.environ["PROBE_MODEL"], Path(os.environ["PROBE_OUT"])
    cfg = load_config(overrides=[f"model.name_or_path={model_dir}", "distributed.deepspeed=zero3",
                                 "distributed.nproc=2"])
    # Expected full tensors first, without DeepSpeed: once the accelerator holds a ZeRO-3 config, from_pretrained
    # builds models under zero.Init (partitioned, collective), so this must not run on one rank only.
    expected = {}
    for mode in ("full", "lora"):
        plain = load_model(cfg.model, for_training=False)
        if mode == "lora":
            plain = apply_lora(plain, _lora_cfg())
            _randomise_lora(plain, seed=1)
            plain = plain.merge_and_unload()
        expected[mode] = {vllm_param_name(n): p.detach().clone() for n, p in plain.named_parameters()}
        # Tied embeddings: vLLM's reload also wants lm_head.weight, the embedding matrix under that name.
        if plain.config.tie_word_embeddings:
            expected[mode].setdefault("lm_head.weight", plain.get_input_embeddings().weight.detach().clone())
    L.init_deepspeed_distributed(cfg)
    acc = L.make_accelerator(cfg, micro_batch_size=1, max_grad_norm=1.0, hidden_size=64)
    for mode in ("full", "lora"):
        model = load_model(cfg.model, for_training=True)
        if mode == "lora":
            model = apply_lora(model, _lora_cfg())
            _randomise_lora(model, seed=1)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        engine, _ = acc.prepare(model, opt)
        unwrapped = acc.unwrap_model(engine)
        partitioned = sum(1 for p in unwrapped.parameters() if hasattr(p, "ds_id") and p.numel() == 0)
        got = {name: t.detach().clone() for name, t in iter_vllm_weights(unwrapped)}
        if acc.is_main_process:
            torch.save({"got": got, "expected": expected[mode], "partitioned": partitioned, "world": acc.num_processes},
                       out / f"vllm-weights-{mode}.pt")
        acc.wait_for_everyone()
        acc.free_memory(engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
