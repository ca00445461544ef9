"""How many optimizer steps an RL run takes (pure arithmetic, no torch).

The RL trainer and the quickstart both need it: the trainer to know when to stop, the quickstart to raise
`rl.num_epochs` so that `quickstart.rl_steps` runs in full. One function each, so that the two cannot drift apart
(the quickstart's first copy ignored `rl.gradient_accumulation_steps`, `data.max_samples` and sequence parallelism).
"""

from __future__ import annotations

import math


def steps_per_epoch(records: int, data_ranks: int, prompts_per_rank: int, grad_accum: int = 1) -> int:
    """Optimizer steps in one pass over `records` prompts: each data-parallel rank reads its own shard of
    records // data_ranks (the remainder is dropped, as in the trainer) and takes prompts_per_rank x grad_accum
    prompts per step; a last, short step still counts."""
    shard = records // max(1, data_ranks)
    return math.ceil(shard / (prompts_per_rank * grad_accum))


def total_steps(max_steps: int, num_epochs: float, per_epoch: int) -> int:
    """`rl.max_steps`, cut to `rl.num_epochs` passes over the records (at least one step)."""
    return max(1, min(max_steps, int(num_epochs * per_epoch)))


def epochs_for(steps: int, per_epoch: int) -> int:
    """The whole passes over the records that `steps` optimizer steps need."""
    return math.ceil(steps / max(1, per_epoch))
