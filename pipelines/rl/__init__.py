"""GRPO / T-GRPO for Qwen2.5-VL on video and image prompts.

- `advantages`: temporal bonus, length bonus, advantage estimators (pure, registry)
- `losses`: importance ratios (token / GSPO sequence) and loss aggregations (grpo, bnpo, dapo, dr_grpo) (pure)
- `rollout`: decode once, shuffled copies, one generation call, rewards, batched log-prob forward
- `trainer`: `RLTrainer(cfg, run, run_dir)` with setup / train / save_checkpoint / load_checkpoint / cleanup

Heavy modules (torch, transformers, accelerate) load on first use.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name == "RLTrainer":
        from pipelines.rl.trainer import RLTrainer

        return RLTrainer
    raise AttributeError(name)


__all__ = ["RLTrainer"]
